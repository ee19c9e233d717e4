"""The simulated `ollama serve`: Ollama's API and scheduler over a performance model of real GPUs.

`corral-sim serve` (cli.py -> server.py) reads `ollama serve`'s environment (env.py) and serves the
app built in app.py: Ollama's routes and gin's middleware behaviour, over a `SimService`
(service.py) that holds the model store (launcher/models/store.py), the scheduler and the pulls.

    scheduler.py, runner.py   loading, eviction, keep-alive, queueing: Ollama's server/sched.go rules
    engine.py                 continuous batching: tokens at the performance model's pace
    inference.py, textgen.py  one completion/chat/embedding, its text and its reported durations
    handlers_infer.py         /api/generate, /api/chat, /api/embed, /api/embeddings
    handlers_models.py        /, /api/version, tags, show, ps, pull, push, delete, copy, blobs, gpus
    create.py, pull.py        /api/create and the simulated registry's downloads (registry.py)
    openai_compat.py          /v1/* (openai_wire.py: the OpenAI request/response translation)
    gojson.py, wire.py        Go-style JSON in (gin binding errors) and out (NDJSON, errors)
    clock.py                  simulated time (a speed factor), and a manual clock for tests
"""
