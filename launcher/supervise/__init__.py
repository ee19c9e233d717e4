"""Running the backends: one owner task per `ollama serve` (real or simulated).

    supervisor.py  all backends: start, publish records, stop; the orphan guard's client
    backend.py     one backend's state machine and its owner task
    childproc.py   spawn, relay output, stop a whole process group
    env.py         the environment contract each backend starts with
    orphan_guard.py the watchdog process that clears backends if the launcher dies
    preload.py     pull and load each backend's planned models before traffic arrives
"""
