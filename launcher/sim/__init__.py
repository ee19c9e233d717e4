"""The simulated `ollama serve`: Ollama's API and scheduler over a performance model of real GPUs."""
