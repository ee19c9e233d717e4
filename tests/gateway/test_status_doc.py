"""The live views' data: warnings derived from what the gateway sees, and the activity recorder
(routing decisions and per-model traffic over a bounded window)."""

from __future__ import annotations

import time

import aiohttp

from gateway.api.activity import DECISIONS_KEPT, MODELS_KEPT, Activity, percentile
from gateway.api.auth import ApiKeys
from gateway.api.status_doc import StatusDoc
from gateway.appkeys import POOL
from gateway.record import BackendKind, BackendRecord, BackendState
from gateway.routing.policy import Reject, Send, Wait
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import MakeFake, fast_settings, wait_for
from tests.support.statusdoc import mismatches

GB = 1_000_000_000


async def test_restart_loop_and_cpu_offload_are_warned_about(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    # Records as a launcher publishes them: g0 restarted four times and up for 30 s; g1 holds a
    # model partly in system memory (Ollama's size_vram below its size); cpu is a CPU backend.
    g0 = await fakes(name="g0")
    g1 = await fakes(name="g1", models={"llama3.3:70b": 43 * GB}, resident={"llama3.3:70b": 8192},
                     vram={"llama3.3:70b": 30 * GB})  # fmt: skip
    cpu = await fakes(name="cpu")
    store = MemoryStore()
    now = time.time()
    await store.put_backend(BackendRecord(id="g0", url=g0.url, restarts=4, started_at=now - 30, last_error="boom"))
    await store.put_backend(BackendRecord(id="g1", url=g1.url, vram_total_bytes=48 * 1024**3, started_at=now))
    await store.put_backend(BackendRecord(id="cpu", url=cpu.url, kind=BackendKind.CPU, started_at=now))
    async with GatewayServer(fast_settings(), store, keys=ApiKeys()) as gw:
        await wait_for(lambda: all(b.healthy for b in gw.app[POOL].backends.values()))
        async with http.get(gw.url + "/api/corral/status") as resp:
            status = await resp.json()
    assert mismatches(status, StatusDoc) == []
    warnings = {(w["kind"], w["subject"]): w["message"] for w in status["warnings"]}
    assert set(warnings) == {("restart_loop", "g0"), ("cpu_offload", "g1"), ("cpu_offload", "cpu")}
    assert warnings[("restart_loop", "g0")] == "backend g0 restarted 4 times and is not staying up: boom"
    assert "llama3.3:70b on g1 is 30% in system memory" in warnings[("cpu_offload", "g1")]
    (row,) = [b for b in status["backends"] if b["id"] == "g1"]
    assert row["models"][0]["cpu_bytes"] == 13 * GB and row["status"] == "ready"


async def test_a_backend_whose_process_exited_is_down_with_the_reason(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    fake = await fakes(name="g0")
    store = MemoryStore()
    await store.put_backend(BackendRecord(id="g0", url=fake.url, state=BackendState.FAILED, last_error="exit 1"))
    async with GatewayServer(fast_settings(), store, keys=ApiKeys()) as gw:
        status = await (await http.get(gw.url + "/api/corral/status")).json()
    (row,) = status["backends"]
    assert row["status"] == "down" and row["uptime_s"] is None
    (warning,) = status["warnings"]
    assert warning == {
        "kind": "backend_down",
        "subject": "g0",
        "message": "backend g0 is down (its process is not running): exit 1",
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_decisions_are_a_bounded_ring_newest_first() -> None:
    activity = Activity()
    for i in range(DECISIONS_KEPT + 10):
        activity.decided(f"m{i}", Send(backend_id="g0", reason="cold_load", expected_ttft_s=1.23456))
    activity.decided("x", Wait(reason="all_busy", expected_wait_s=2.0))
    activity.decided("y", Reject(status=404, message="no", reason="not_found"))
    decisions = activity.decisions()
    assert len(decisions) == DECISIONS_KEPT
    assert [d["decision"] for d in decisions[:3]] == ["reject", "wait", "send"]
    assert decisions[2] == {
        "at": decisions[2]["at"], "model": f"m{DECISIONS_KEPT + 9}", "decision": "send", "reason": "cold_load",
        "backend": "g0", "expected_ttft_s": 1.235,
    }  # fmt: skip


def test_model_stats_cover_the_window_only() -> None:
    clock = Clock()
    activity = Activity(window_s=60, clock=clock)
    clock.now += 100  # up long enough that the whole window counts
    activity.finished("old", 200, 0.5, {"eval_count": 100})
    clock.now += 61
    for ttft in (0.1, 0.2, 0.3, 0.4, 1.0):
        activity.finished("m", 200, ttft, {"eval_count": 12})
    activity.finished("m", 500, None, None)
    activity.finished("m", 200, 9.0, None, failed=True)  # cut mid-stream: an error, not a latency
    (row,) = activity.model_stats()  # "old" has left the window
    assert row == {
        "model": "m", "requests": 7, "errors": 2, "requests_per_s": round(7 / 60, 3), "ttft_p50_s": 0.3,
        "ttft_p95_s": 1.0, "tokens_per_s": 1.0, "in_flight": 0, "queued": 0,
    }  # fmt: skip
    # A model with work waiting shows up before its first answer.
    assert [r["model"] for r in activity.model_stats(in_flight={"new": 1})] == ["m", "new"]


def test_the_number_of_models_is_bounded() -> None:
    activity = Activity()
    for i in range(MODELS_KEPT + 5):
        activity.finished(f"m{i}", 200, 0.1, None)
    names = {r["model"] for r in activity.model_stats()}
    assert len(names) == MODELS_KEPT and "m0" not in names and f"m{MODELS_KEPT + 4}" in names


def test_percentile_by_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.95) == 1.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.95) == 95.0
