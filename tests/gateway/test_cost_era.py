"""The router costs a load with the memory model of the backend's Ollama (from /api/version), as
the planner planned it and the backend will judge it."""

from __future__ import annotations

from gateway.fleet.modelfacts import facts_from_catalog
from gateway.record import BackendKind, BackendRecord, BackendState
from gateway.routing.cost import backend_era, need_bytes
from gateway.routing.snapshot import BackendView, LoadOptions
from launcher.facts import memory
from launcher.facts.catalog import find_model
from launcher.facts.memory import Era

GIB = 1024**3


def _view(version: str) -> BackendView:
    rec = BackendRecord(
        id="g0",
        url="http://127.0.0.1:11500",
        gpu_uuids=("GPU-0",),
        kind=BackendKind.SINGLE,
        num_parallel=1,
        max_loaded_models=0,
        vram_total_bytes=80 * GIB,
        speed=3.3,
        state=BackendState.READY,
        updated_at=0.0,
    )
    return BackendView(record=rec, healthy=True, installed=frozenset({"llama3.1:8b"}), version=version)


def test_each_backend_is_costed_with_its_own_ollamas_memory_model() -> None:
    facts = facts_from_catalog("llama3.1:8b")
    spec = find_model("llama3.1:8b")
    assert facts is not None and spec is not None
    head, old, unknown = _view("0.33.0"), _view("0.12.10"), _view("")
    assert (backend_era(head), backend_era(old), backend_era(unknown)) == (Era.HEAD, Era.A, Era.HEAD)
    opts = LoadOptions(num_ctx=131072)
    # HEAD: PredictServerVRAM (file + f16 KV) + the 2 GiB surcharge of num_batch 2048, what sched.go
    # compares with 80 % of the free memory.
    assert need_bytes(head, opts, facts, None) == memory.predict_server_vram(spec, 131072, 1) + 2 * GIB
    assert need_bytes(unknown, opts, facts, None) == need_bytes(head, opts, facts, None)
    # Ollama <= 0.29 reserves the GraphSize graph and the minimum on each card instead.
    kv = facts.kv_bytes_per_token * 131072
    assert need_bytes(old, opts, facts, None) == facts.size_bytes + kv + facts.overhead_bytes_era_a
    assert facts.overhead_bytes_era_a > memory.MINIMUM_MEMORY_BYTES
