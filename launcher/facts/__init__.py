"""Pure knowledge of Ollama, cards and models, written once; imports nothing else of Corral.

    ollama.py      Ollama's own rules: names and tags, Go durations and keep_alive, context tiers,
                   models per GPU, load-option keys, OLLAMA_* env parsing
    cards.py       the card table (bandwidth, compute, memory) the performance model needs
    catalog.py     the model catalog: architecture facts of common Ollama models
    perf.py        the performance and memory model: VRAM need, load, prefill and decode times
    gpuinfo.py     the typed GPU inventory record shared by discovery, the state store and status
    hosts.py       Ollama's Host check (DNS-rebinding guard), shared by the simulator and the gateway
    strictconf.py  strict TOML decoding into frozen dataclasses, and `ConfigError`
"""
