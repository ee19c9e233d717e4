"""The pool's cached snapshot against a fresh build: whatever sequence of changes the poller and the
request path make, the views built once per change of the fleet's shape must show what a view built
now would show, and the router must decide the same on both."""

from __future__ import annotations

import random
from dataclasses import fields, replace
from typing import Any

from gateway.fleet.pool import BackendPool
from gateway.fleet.work import Work
from gateway.record import BackendRecord
from gateway.routing.cost import model_size_bytes
from gateway.routing.policy import ResidencyPolicy, RouteRequest, choose
from gateway.routing.snapshot import BackendView, LoadOptions, ModelFacts, Snapshot
from tests.support.fakes import fast_settings

MODELS = ["a:1", "b:1", "c:1"]
IDS = ["g0", "g1"]
LIVE_MAPS = ("in_flight", "queued", "observed", "last_used", "last_interactive")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _view_state(view: BackendView) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for f in fields(view):
        value = getattr(view, f.name)
        if f.name in LIVE_MAPS:
            value = dict(value)
        elif f.name == "work":
            value = {model: len(value[model]) for model in value}
        state[f.name] = value
    return state


def _state(snapshot: Snapshot) -> tuple[object, ...]:
    idx = snapshot.idx
    return (
        [_view_state(v) for v in snapshot.backends],
        dict(snapshot.models),
        {m: [v.id for v in vs] for m, vs in idx.holders.items()},
        [v.id for v in idx.unknown],
        dict(idx.resident_copies),
    )


def _change(pool: BackendPool, rng: random.Random, clock: Clock, state: dict[str, Any]) -> None:
    """One random change, as the poller or a request would make it."""
    b, m = rng.choice(IDS), rng.choice(MODELS)
    works: list[Work] = state["works"]
    op = rng.randrange(16)
    if op == 0:
        pool.mark_success(b, rng.choice(["0.11.0", "0.12.0", None]))
    elif op == 1:
        pool.mark_failure(b, "refused")
    elif op == 2:
        pool.apply_tags(b, [{"name": x} for x in MODELS if rng.random() < 0.6])
    elif op == 3:
        rows = [
            {
                "name": x,
                "size": rng.choice([1e9, 2e9]),
                "size_vram": 1e9,
                "context_length": rng.choice([2048, 4096]),
                "expires_at": rng.choice(["2030-01-01T00:00:00Z", "2031-01-01T00:00:00Z"]),
            }
            for x in MODELS
            if rng.random() < 0.5
        ]
        pool.apply_ps(b, rows, clock.now - rng.random() * 2)
    elif op == 4:
        works.append(pool.begin(b, m, num_predict=rng.choice([None, 8])))
    elif op == 5 and works:
        pool.end(works.pop(rng.randrange(len(works))))
    elif op == 6:
        pool.start_loading(b, m)
    elif op == 7:
        pool.stop_loading(b, m)
    elif op == 8:
        final: dict[str, Any] = {"done": True, "eval_count": 10, "eval_duration": 10**8}
        if rng.random() < 0.7:
            final["load_duration"] = rng.choice([10**6, 5 * 10**9])  # warm, or a cold load
        pool.observe_reply(b, m, final, LoadOptions(num_ctx=rng.choice([None, 8192])), 0.1)
    elif op == 9:
        pool.forget_resident(b, m)
    elif op == 10:
        pool.replace_in_flight({x: {y: rng.randrange(3) for y in MODELS} for x in IDS})
    elif op == 11:
        facts = ModelFacts(
            name=m,
            size_bytes=rng.choice([0, 3 * 2**30]),
            kv_bytes_per_token=100_000,
            overhead_bytes=2**28,
            context_length=131072,
        )
        pool.set_facts(m, facts)
    elif op == 12:  # a heartbeat, sometimes with a new default context
        records = state["records"]
        records[b] = replace(records[b], updated_at=clock.now, default_num_ctx=rng.choice([0, 4096]))
        pool.sync_records(records.values())
    elif op == 13:
        state["queues"][m] = rng.randrange(3)
    elif op == 14:
        pool.note_stored(b, m, rng.choice([1, -1]))
    else:  # a decision over the cached snapshot fills its memo
        options = LoadOptions(num_ctx=rng.choice([None, 2048]))
        choose(RouteRequest(model=m, options=options), pool.snapshot(), ResidencyPolicy())


def test_the_cached_snapshot_always_equals_a_fresh_one() -> None:
    rng = random.Random(7)
    requests = [RouteRequest(model=m, options=o) for m in MODELS for o in (LoadOptions(), LoadOptions(num_ctx=2048))]
    for trial in range(120):
        clock = Clock()
        queues: dict[str, int] = {}
        pool = BackendPool(fast_settings(), clock=clock, queue_depths=lambda q=queues: dict(q))  # type: ignore[misc]
        records = {
            b: BackendRecord(id=b, url=f"http://127.0.0.1:{n + 1}", num_parallel=2, vram_total_bytes=24 * 2**30)
            for n, b in enumerate(IDS)
        }
        pool.sync_records(records.values())
        state: dict[str, Any] = {"works": [], "records": records, "queues": queues}
        for step in range(40):
            clock.now += rng.random()
            _change(pool, rng, clock, state)
            cached = pool.snapshot()
            pool._reshaped()  # what a fresh build would show now
            fresh = pool.snapshot()
            assert _state(cached) == _state(fresh), (trial, step)
            for request in requests:
                assert repr(choose(request, cached, ResidencyPolicy())) == repr(
                    choose(request, fresh, ResidencyPolicy())
                ), (trial, step, request)
            for key, value in cached.idx.memo.items():
                if key[0] == "size":
                    assert model_size_bytes(str(key[1]), fresh) == value, (trial, step, key)
