"""Scheduling on simulated rigs, observed from outside: /api/ps, /corral-sim/gpus, replies and the log."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ollama
import pytest

from launcher.facts.faults import is_out_of_memory
from launcher.sim.harness import SimServer, install_models


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("shared") / "models"
    names = ("llama3.3:70b", "llama3.1:8b", "qwen2.5:7b", "qwen2.5:14b", "qwen2.5:0.5b", "mistral:7b", "llama3.1:405b")
    install_models(models, *names)
    return models


def _ps(sim: SimServer) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in sim.ps()}


def test_a_model_larger_than_any_card_is_split_over_two(tmp_path: Path, shared_store: Path) -> None:
    with SimServer.start(tmp_path, gpus=["RTX 4090", "RTX 3090"], models_dir=shared_store, speed=500) as sim:
        with ollama.Client(host=sim.url) as client:
            client.generate(model="llama3.3:70b", prompt="", options={"num_ctx": 8192})
        entry = _ps(sim)["llama3.3:70b"]
        assert entry["size_vram"] == entry["size"] > 40e9  # all of it on the GPUs
        assert entry["context_length"] == 8192
        cards = sim.gpus()
        assert [c["uuid"] for c in cards] == ["GPU-sim-0000", "GPU-sim-0001"]
        assert all(c["memory_used"] > 15 * 1024**3 for c in cards)  # both cards hold layers
        assert sum(c["memory_used"] for c in cards) == entry["size_vram"]
        assert all(c["memory_free"] == c["memory_total"] - c["memory_used"] for c in cards)


def test_cpu_offload_then_eviction_when_the_next_model_does_not_fit(tmp_path: Path, shared_store: Path) -> None:
    with (
        SimServer.start(tmp_path, gpus=["RTX 4090"], models_dir=shared_store, speed=500) as sim,
        ollama.Client(sim.url) as client,
    ):
        client.generate(model="llama3.3:70b", prompt="", options={"num_ctx": 8192})
        big = _ps(sim)["llama3.3:70b"]
        assert 0 < big["size_vram"] < big["size"]  # alone on a 24 GB card: partly on the CPU
        assert sim.gpus()[0]["memory_used"] == big["size_vram"]
        # llama3.1:8b at 64K needs ~17 GiB: the card is full, so the idle 70B model goes.
        client.generate(model="llama3.1:8b", prompt="hi", options={"num_ctx": 65536, "num_predict": 2})
        assert list(_ps(sim)) == ["llama3.1:8b"]
        # qwen2.5:14b at 32K is predicted at ~15 GiB (file + f16 KV + 768 MiB batch surcharge), over
        # 80 % of the ~11 GiB left: llama3.1:8b is evicted too.
        client.generate(model="qwen2.5:14b", prompt="hi", options={"num_ctx": 32768, "num_predict": 2})
        assert list(_ps(sim)) == ["qwen2.5:14b"]
        # Small enough to share: both stay.
        client.generate(model="qwen2.5:0.5b", prompt="hi", options={"num_ctx": 4096, "num_predict": 2})
        assert sorted(_ps(sim)) == ["qwen2.5:0.5b", "qwen2.5:14b"]
        assert sim.log().count("evicting") == 2
        # 243 GB can never fit, not even with the CPU's 64 GB: everything is evicted, the automatic
        # context is retried once at 4096, then it fails with an error Ollama counts as out of memory.
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="llama3.1:405b", prompt="hi")
        assert e.value.status_code == 500 and is_out_of_memory(e.value.error)
        assert "retrying once at num_ctx 4096" in sim.log()
        assert _ps(sim) == {}


def test_backends_sharing_a_store_see_each_others_pulls(tmp_path: Path) -> None:
    models = tmp_path / "models"
    with (
        SimServer.start(tmp_path, name="a", models_dir=models) as a,
        SimServer.start(tmp_path, name="b", models_dir=models) as b,
    ):
        replies: list[Any] = []
        body = {"model": "qwen2.5:1.5b", "stream": False}
        pulls = [threading.Thread(target=lambda s=s: replies.append(s.json("POST", "/api/pull", body))) for s in (a, b)]
        for t in pulls:  # both download into the one store at once, and both succeed
            t.start()
        for t in pulls:
            t.join(30)
        assert replies == [{"status": "success"}, {"status": "success"}]
        tags = b.json("GET", "/api/tags")["models"]
        assert [m["name"] for m in tags] == ["qwen2.5:1.5b"]
        assert b.json("POST", "/api/generate", {"model": "qwen2.5:1.5b", "prompt": "x", "stream": False})["done"]


@pytest.fixture(scope="module")
def two_slots(tmp_path_factory: pytest.TempPathFactory, shared_store: Path) -> Iterator[SimServer]:
    # Real time (speed 1) so that a generation lasts long enough to be overlapped on purpose.
    env = {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_MAX_LOADED_MODELS": "1"}
    tmp = tmp_path_factory.mktemp("slots")
    with SimServer.start(tmp, env=env, models_dir=shared_store, speed=1, sim={"load_gbps": 500.0}) as sim:
        yield sim


class _Stream(threading.Thread):
    """A streamed generate in a thread: its chunks, and an event set at the first one."""

    def __init__(self, sim: SimServer, body: dict[str, Any]) -> None:
        super().__init__()
        self.sim, self.body = sim, body
        self.chunks: list[dict[str, Any]] = []
        self.started = threading.Event()

    def run(self) -> None:
        with ollama.Client(host=self.sim.url) as client:
            for part in client.generate(stream=True, **self.body):
                self.chunks.append(part.model_dump() | {"seen_at": time.monotonic()})
                self.started.set()


def test_max_loaded_models(two_slots: SimServer) -> None:
    with ollama.Client(host=two_slots.url) as client:
        client.generate(model="qwen2.5:0.5b", prompt="")
        client.generate(model="mistral:7b", prompt="")  # fits beside it, but OLLAMA_MAX_LOADED_MODELS=1
    assert list(_ps(two_slots)) == ["mistral:7b"]


def test_parallel_slots_make_the_third_request_wait(two_slots: SimServer) -> None:
    body = {"model": "llama3.1:8b", "prompt": "a long answer please", "options": {"seed": 1}}
    with ollama.Client(host=two_slots.url) as client:
        alone = client.generate(**body)  # loads it and gives the single-sequence token time
    first, second, third = (_Stream(two_slots, body) for _ in range(3))
    for stream in (first, second):
        stream.start()
    assert first.started.wait(10) and second.started.wait(10)  # both slots are now taken
    third.start()
    for stream in (first, second, third):
        stream.join(30)
    done = [s.chunks[-1] for s in (first, second, third)]
    assert all(d["done"] and d["eval_count"] == alone.eval_count for d in done)
    # The third could only start once one of the two had finished...
    assert third.chunks[0]["seen_at"] >= min(first.chunks[-1]["seen_at"], second.chunks[-1]["seen_at"])
    # ...and that wait shows in its total, outside load, prompt eval and eval.
    waited = done[2]
    accounted = waited["load_duration"] + waited["prompt_eval_duration"] + waited["eval_duration"]
    assert waited["total_duration"] - accounted > 0.5 * done[0]["eval_duration"]
    # Two sequences decoding side by side share each step: each got its tokens a little slower.
    assert done[0]["eval_duration"] > (alone.eval_duration or 0)


def test_keep_alive_expiry_and_truthful_expires_at(tmp_path: Path, shared_store: Path) -> None:
    env = {"OLLAMA_KEEP_ALIVE": "1h"}
    with SimServer.start(tmp_path, models_dir=shared_store, speed=50, env=env) as sim, ollama.Client(sim.url) as client:
        client.generate(model="qwen2.5:0.5b", prompt="x", options={"num_predict": 1})
        expires = datetime.fromisoformat(_ps(sim)["qwen2.5:0.5b"]["expires_at"].replace("Z", "+00:00"))
        left_s = (expires - datetime.now(UTC)).total_seconds()
        assert 3600 / 50 - 5 < left_s <= 3600 / 50  # the server default, at the speed factor
        client.generate(model="qwen2.5:0.5b", prompt="x", options={"num_predict": 1}, keep_alive="2s")
        sim.wait_for(lambda s: not s.ps())  # 2 s of simulated idleness later it is gone


def test_changed_load_options_force_a_reload(tmp_path: Path, shared_store: Path) -> None:
    with SimServer.start(tmp_path, models_dir=shared_store, speed=500) as sim, ollama.Client(sim.url) as client:
        client.generate(model="qwen2.5:0.5b", prompt="x", options={"num_ctx": 2048, "num_predict": 1})
        assert _ps(sim)["qwen2.5:0.5b"]["context_length"] == 2048
        warm = client.generate(model="qwen2.5:0.5b", prompt="x", options={"num_ctx": 2048, "num_predict": 1})
        assert sim.log().count("loading qwen2.5:0.5b") == 1
        client.generate(model="qwen2.5:0.5b", prompt="x", options={"num_ctx": 8192, "num_predict": 1})
        assert _ps(sim)["qwen2.5:0.5b"]["context_length"] == 8192
        assert sim.log().count("loading qwen2.5:0.5b") == 2
        assert warm.load_duration is not None and warm.load_duration < 0.3e9  # attached: no 0.6 s runner start


def _post(sim: SimServer, body: dict[str, Any], out: list[Any]) -> None:
    try:
        out.append(sim.request("POST", "/api/generate", body, timeout_s=60))
    except OSError as e:
        out.append(e)


def test_full_queue_is_503_and_sigterm_stops_promptly(tmp_path: Path, shared_store: Path) -> None:
    env = {"OLLAMA_MAX_QUEUE": "1", "OLLAMA_DEBUG": "1"}
    sim = SimServer.start(tmp_path, models_dir=shared_store, env=env, speed=20, sim={"load_gbps": 0.01})
    try:
        outcomes: list[list[Any]] = [[], []]
        loading = threading.Thread(target=_post, args=(sim, {"model": "llama3.1:8b", "prompt": "x"}, outcomes[0]))
        loading.start()
        sim.wait_for(lambda s: "loading llama3.1:8b" in s.log())  # taken from the queue, loading
        queued = threading.Thread(target=_post, args=(sim, {"model": "mistral:7b", "prompt": "x"}, outcomes[1]))
        queued.start()
        sim.wait_for(lambda s: "queued a request for mistral:7b" in s.log())
        status, headers, body = sim.request("POST", "/api/generate", {"model": "qwen2.5:0.5b", "prompt": "x"})
        assert status == 503
        assert json.loads(body) == {"error": "server busy, please try again.  maximum pending requests exceeded"}
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        # A loaded model bypasses the queue entirely, so only scheduling requests are refused.
    finally:
        assert sim.stop(timeout_s=10) == 0
    loading.join(10)
    queued.join(10)
    assert not loading.is_alive() and not queued.is_alive()
    assert "shutting down" in sim.log()


def test_interrupted_streams(tmp_path: Path, shared_store: Path) -> None:
    """A client that goes away frees its slot; SIGTERM ends a stream with an error line and exits 0."""
    # CPU only, in real time: decoding an 8B model from host memory is slow enough to interrupt.
    env = {"CUDA_VISIBLE_DEVICES": "", "OLLAMA_KEEP_ALIVE": "0"}
    sim = SimServer.start(tmp_path, models_dir=shared_store, env=env, speed=1, sim={"load_gbps": 500.0})
    body = {"model": "llama3.1:8b", "prompt": "x", "options": {"num_predict": 60}}
    try:
        conn = http.client.HTTPConnection(sim.host, sim.port, timeout=20)
        conn.request("POST", "/api/generate", json.dumps(body))
        response = conn.getresponse()
        assert json.loads(response.readline())["done"] is False
        assert _ps(sim)
        conn.close()  # gone mid-stream: the request ends, and with keep-alive 0 the model unloads
        sim.wait_for(lambda s: not s.ps())

        stream = _Stream(sim, body)
        errors: list[str] = []

        def run() -> None:
            try:
                _Stream.run(stream)
            except ollama.ResponseError as e:
                errors.append(e.error)

        reader = threading.Thread(target=run)
        reader.start()
        assert stream.started.wait(20)
    finally:
        assert sim.stop(timeout_s=5) == 0
    reader.join(10)
    assert not reader.is_alive()
    assert errors == [
        "model runner has unexpectedly stopped, this may be due to resource limitations or an internal error, "
        "check ollama server logs for details"
    ]
    assert not stream.chunks[-1]["done"]


def test_answer_length_comes_from_the_rig_and_num_predict_still_caps_it(tmp_path: Path, shared_store: Path) -> None:
    rig = {"answer_tokens_min": 150, "answer_tokens_max": 150}
    with (
        SimServer.start(tmp_path, models_dir=shared_store, speed=5000, sim=rig) as sim,
        ollama.Client(host=sim.url) as client,
    ):
        natural = client.generate(model="qwen2.5:0.5b", prompt="tell me everything")
        capped = client.generate(model="qwen2.5:0.5b", prompt="tell me everything", options={"num_predict": 40})
    assert (natural.eval_count, natural.done_reason) == (150, "stop")
    assert (capped.eval_count, capped.done_reason) == (40, "length")


def test_warm_requests_report_no_load_time_even_when_others_are_decoding(tmp_path: Path, shared_store: Path) -> None:
    # At a high speed factor, real overhead must not be scaled into seconds of "load" (the gateway
    # reads a large load_duration as a cold load).
    env = {"OLLAMA_NUM_PARALLEL": "16", "OLLAMA_KEEP_ALIVE": "-1"}
    with SimServer.start(tmp_path, models_dir=shared_store, speed=100000, env=env) as sim:
        sim.json("POST", "/api/generate", {"model": "qwen2.5:0.5b", "prompt": ""})
        replies: list[dict[str, Any]] = []

        def ask() -> None:
            body = {"model": "qwen2.5:0.5b", "prompt": "hello", "stream": False}
            for _ in range(10):
                replies.append(sim.json("POST", "/api/generate", body))

        threads = [threading.Thread(target=ask) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(replies) == 120
    assert max(r.get("load_duration", 0) for r in replies) < 0.5e9


# -- HEAD's memory model: /api/ps sizes and the out-of-memory retry ------------------------------


def test_ps_reports_model_kv_and_compute_buffers_as_head_does(tmp_path: Path, shared_store: Path) -> None:
    from launcher.facts import memory
    from launcher.facts.catalog import find_model

    spec = find_model("llama3.1:8b")
    assert spec is not None
    with SimServer.start(tmp_path, gpus=["RTX 4090"], models_dir=shared_store) as sim:
        with ollama.Client(host=sim.url) as client:
            client.generate(model="llama3.1:8b", prompt="", options={"num_ctx": 8192})
        entry = _ps(sim)["llama3.1:8b"]
    # All on the card: weights (less the token embeddings llama.cpp keeps on the host), 1 GiB of
    # f16 KV for 8192 tokens, and a compute buffer of a few hundred MiB; no graph reserve.
    assert entry["size"] == entry["size_vram"]
    predicted = memory.predict_server_vram(spec, 8192, 1)
    assert predicted - 0.5 * 1024**3 < entry["size_vram"] < predicted + 0.5 * 1024**3
    assert entry["context_length"] == 8192


def test_an_automatic_context_that_runs_out_of_memory_is_retried_at_the_next_tier(tmp_path: Path) -> None:
    # On an H100 Ollama's default context is 262144 (capped to the model's 131072); with 8 slots the
    # KV cache alone is 128 GiB: the card holds ~18 of the 32 layers, and the ~56 GiB that --fit
    # would leave on the host do not fit this box's 32 GB. Ollama retries once at 32768 (sched.go
    # nextLowerAutoNumCtx), where the model loads fully on the card.
    models = tmp_path / "models"
    install_models(models, "llama3.1:8b")
    env = {"OLLAMA_NUM_PARALLEL": "8"}
    with SimServer.start(tmp_path, gpus=["H100"], models_dir=models, env=env, sim={"host_mem_gb": 32}) as sim:
        with ollama.Client(host=sim.url) as client:
            reply = client.generate(model="llama3.1:8b", prompt="hi", options={"num_predict": 2})
        assert reply.done
        entry = _ps(sim)["llama3.1:8b"]
        assert entry["context_length"] == 32768
        assert entry["size"] == entry["size_vram"]
        assert "ran out of memory; retrying once at num_ctx 32768" in sim.log()


def test_an_asked_context_that_runs_out_of_memory_is_not_retried_at_a_lower_one(tmp_path: Path) -> None:
    # num_ctx set by the request: no lower tier to try. The other model is evicted first (the
    # prediction is over 80 % of the free memory), then the load itself runs out of host memory.
    models = tmp_path / "models"
    install_models(models, "llama3.1:8b", "qwen2.5:0.5b")
    with (
        SimServer.start(
            tmp_path, gpus=["RTX 4090"], models_dir=models, env={"OLLAMA_NUM_PARALLEL": "4"}, sim={"host_mem_gb": 8}
        ) as sim,
        ollama.Client(host=sim.url) as client,
    ):
        client.generate(model="qwen2.5:0.5b", prompt="hi", options={"num_ctx": 2048, "num_predict": 2})
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="llama3.1:8b", prompt="hi", options={"num_ctx": 131072, "num_predict": 2})
        assert e.value.status_code == 500 and is_out_of_memory(e.value.error)
        assert "retrying once" not in sim.log()
        assert _ps(sim) == {}


def test_what_the_planner_plans_for_the_seeds_70b_loads_fully_on_the_cards(tmp_path: Path, shared_store: Path) -> None:
    # The planner puts llama3.3:70b at 8192 x 2 on 2x RTX 4090 (a split, OLLAMA_SCHED_SPREAD=1); the
    # simulated Ollama, with the same memory model, loads it there with nothing on the CPU.
    from launcher.config import LauncherSettings, ModelEntry, SimGpu
    from launcher.facts.catalog import find_model
    from launcher.gpus.discovery import simulated_inventory
    from launcher.planner.plan import ModelRequest, plan

    spec = find_model("llama3.3:70b")
    assert spec is not None
    cards = simulated_inventory([SimGpu(name="RTX 4090"), SimGpu(name="RTX 4090")])
    request = ModelRequest(ModelEntry("llama3.3:70b", num_ctx=8192), spec)
    (backend,) = plan(cards, [request], LauncherSettings()).backends
    env = {"OLLAMA_NUM_PARALLEL": str(backend.num_parallel), "OLLAMA_SCHED_SPREAD": "1"}
    with SimServer.start(tmp_path, gpus=["RTX 4090", "RTX 4090"], models_dir=shared_store, env=env) as sim:
        with ollama.Client(host=sim.url) as client:
            client.generate(model="llama3.3:70b", prompt="", options={"num_ctx": 8192})
        entry = _ps(sim)["llama3.3:70b"]
    assert entry["size_vram"] == entry["size"]
    assert abs(entry["size_vram"] - backend.models[0].vram_bytes) < 0.5 * 1024**3
