"""Shared state behind one interface: in-memory for one gateway, Redis for several.

    memory.py      the `StateStore` protocol and the in-memory store
    redis_store.py the Redis store (several gateways, several hosts)
"""
