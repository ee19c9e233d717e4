"""Helpers shared by the tests: fake NVML, fake Ollama servers, a misbehaving child process."""
