"""Model files: the Ollama store, GGUF, and what a model is. Imports only `launcher.facts`.

    store.py       Ollama's on-disk store (OLLAMA_MODELS): manifests and content-addressed blobs
    gguf.py        GGUF key/values <-> `ModelSpec` (ggufio.py reads, ggufwrite.py writes)
    show.py        the one `/api/show` reply -> model facts parser
    resolve.py     a model's facts from the best source: the store, a running backend, the catalog
"""
