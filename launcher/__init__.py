"""Corral launcher: discover GPUs, plan placement, start and supervise one Ollama per GPU or group."""
