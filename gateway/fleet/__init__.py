"""The live picture of the backends, kept current in the background.

pool.py        the backend pool: what the gateway knows of each backend; builds snapshots
poller.py      records, health checks, /api/tags and /api/ps polling
inflight.py    requests sent to a backend and not finished, per (backend, model)
records.py     what a record missing from a restarted store means (kept while healthy, 30 s)
modelfacts.py  what a cold load of a model costs, learned from /api/show
"""
