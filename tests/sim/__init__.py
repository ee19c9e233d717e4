"""Tests of the simulated `ollama serve` (launcher/sim)."""
