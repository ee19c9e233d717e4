"""Shared state behind one interface: in-memory for one gateway, Redis for several.

    store.py       the `StateStore` protocol, and opening the configured store
    memory.py      the in-memory store
    redis_store.py the Redis store (several gateways, several hosts)
    health.py      whether the store answers: one warning per outage, the gauge, re-publish hooks
"""
