"""Corral gateway: one Ollama endpoint that routes by model residency, free VRAM and queue depth."""
