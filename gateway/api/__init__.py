"""The HTTP surface: Ollama's API and /v1 on one port.

    parse.py       what the router needs from a model-scoped request; bad requests refused like Ollama
    dispatch.py    model calls: decide, wait, forward, fail over, learn
    admission.py   the bounded per-model wait queue
    front.py       the one middleware: request ids, limits, drain accounting, errors, Host, CORS, keys
    proxy.py       forwarding one request to one backend, streaming the reply byte for byte
    upstream.py    the lean HTTP/1.1 client model calls go over (pooled keep-alive, httptools)
    headers.py     which headers cross the gateway, in each direction
    fleetwide.py   calls about the whole fleet (tags, ps, pull, create, delete, ...)
    fanout.py, progress.py, blobs.py   fan-out to one backend per model store, merged progress
    status.py      GET /api/corral/status; its shape is status_doc.py (TypedDicts shared with the
                   readers: corral status, corral top, the page), warnings from status_warnings.py
    activity.py    recent routing decisions and per-model traffic, for the live views
    page/          the fleet page at /corral/ (static files shipped in the package)
    ready.py       the startup gate of `corral up` (model calls wait as "starting")
    bodies.py, strictjson.py   reading bodies (size, time, encodings) and strict JSON
    limits.py      client limits: header timeout, connection cap, early 413 (the guarded protocol)
    timeouts.py    upstream bounds: connect, first byte from the router's expectation, stream idle
    hosts.py, accesslog.py     Ollama's Host check; request ids and the access log
    auth.py, cors.py, errors.py, lifecycle.py   keys, browsers, error replies, drain accounting
"""
