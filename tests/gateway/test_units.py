"""The gateway's pure pieces: request parsing, health bookkeeping, model facts, stream merging."""

from __future__ import annotations

import json

import pytest

from gateway.api.fanout import ProgressMerger
from gateway.api.parse import BadRequest, parse_model_call
from gateway.api.proxy import FinalChunkTap
from gateway.fleet.inflight import InFlight
from gateway.fleet.modelfacts import facts_from_catalog, facts_from_show
from gateway.fleet.pool import BackendPool
from gateway.record import BackendRecord
from gateway.routing.policy import ResidencyPolicy, RouteRequest, Send, choose
from gateway.routing.snapshot import LoadOptions, ModelFacts, ObservedStats
from gateway.state.memory import MemoryStore
from launcher.facts.catalog import find_model
from launcher.facts.ollama import is_zero_keep_alive
from tests.support.fakes import fast_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryStore):
    """A store whose next increment fails, like a shared store that hiccups once."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_next_incr = False

    async def incr_in_flight(self, backend_id: str, model: str) -> int:
        if self.refuse_next_incr:
            self.refuse_next_incr = False
            raise ConnectionError("store unreachable")
        return await super().incr_in_flight(backend_id, model)


async def test_a_request_the_store_never_counted_is_not_uncounted_there() -> None:
    store = FlakyStore()
    pool = BackendPool(fast_settings())
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1")])
    released: list[tuple[str | None, str | None]] = []
    pool.subscribe(lambda change: released.append((change.backend_id, change.model)) if change.kind == "slot" else None)
    in_flight = InFlight(store, pool)
    async with in_flight.hold("g0", "m"):  # counted in the store
        store.refuse_next_incr = True
        async with in_flight.hold("g0", "m"):  # the store refused to count this one
            assert pool.in_flight_counts() == {"g0": {"m": 2}}  # the router still sees both
        await in_flight.settle()
        assert await store.in_flight() == {"g0": {"m": 1}}  # the first is still counted
        assert pool.in_flight_counts() == {"g0": {"m": 1}}
    await in_flight.settle()
    assert await store.in_flight() == {} and pool.in_flight_counts() == {}
    assert released == [("g0", "m"), ("g0", "m")]


def test_parse_reads_model_options_and_stream_defaults() -> None:
    body = json.dumps({"model": "llama3.1", "prompt": "x" * 400, "options": {"num_ctx": 8192, "temperature": 0}})
    call = parse_model_call("/api/generate", body.encode())
    assert call.model == "llama3.1:latest" and call.requested_as == "llama3.1"
    assert call.options == LoadOptions(num_ctx=8192)
    assert call.stream is True and call.prompt_tokens == 100
    chat = parse_model_call("/v1/chat/completions", b'{"model": "m:1", "messages": [], "options": {"num_ctx": 9}}')
    assert chat.openai and chat.stream is False and chat.options == LoadOptions()  # OpenAI: no Ollama options
    show = parse_model_call("/api/show", b'{"name": "old-style:1"}')
    assert show.kind == "show" and show.model == "old-style:1"
    with pytest.raises(BadRequest, match="options"):
        parse_model_call("/api/chat", b'{"model": "m", "options": [1]}')


@pytest.mark.parametrize(
    ("body", "unload"),
    [
        ({"model": "m", "keep_alive": 0}, True),
        ({"model": "m", "keep_alive": "0s"}, True),
        ({"model": "m", "prompt": "", "keep_alive": "0"}, True),
        ({"model": "m", "prompt": "hi", "keep_alive": 0}, False),
        ({"model": "m", "keep_alive": "5m"}, False),
        ({"model": "m"}, False),
    ],
)
def test_unload_requests_are_recognised(body: dict[str, object], unload: bool) -> None:
    assert parse_model_call("/api/generate", json.dumps(body).encode()).unload is unload


def test_keep_alive_zero_in_every_spelling() -> None:
    assert all(is_zero_keep_alive(v) for v in (0, 0.0, "0", "0s", "0m0s"))
    assert not any(is_zero_keep_alive(v) for v in (False, -1, "5m", "soon", None))


def test_ejection_after_consecutive_failures_and_return_after_the_pause() -> None:
    clock = Clock()
    pool = BackendPool(fast_settings(eject_after_failures=2, eject_for_s=10), clock=clock)
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1")])
    assert not pool.healthy("g0")  # unknown until a check succeeds
    assert pool.mark_success("g0", "0.12.3") is True
    assert pool.mark_failure("g0", "refused") is False
    assert pool.mark_success("g0") is False  # a success in between resets the count
    assert pool.mark_failure("g0", "refused") is False
    assert pool.mark_failure("g0", "refused") is True
    assert not pool.healthy("g0")
    clock.now += 5
    assert pool.mark_success("g0") is False  # answering again, but still serving its pause
    clock.now += 6
    assert pool.mark_success("g0") is True and pool.healthy("g0")
    assert pool.version() == "0.12.3"


def test_polled_residency_keeps_what_replies_revealed_until_a_later_poll() -> None:
    clock = Clock()
    pool = BackendPool(fast_settings(cold_load_threshold_s=1.0), clock=clock)
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1", vram_total_bytes=24 * 1024**3)])
    poll_started = clock.now
    clock.now += 1
    final = {"done": True, "load_duration": 3_000_000_000, "eval_count": 50, "eval_duration": 500_000_000}
    facts = pool.observe_reply("g0", "llama3.1:8b", final, LoadOptions(num_ctx=2048), service_s=4.0)
    assert facts.cold_load and facts.tokens_per_s == pytest.approx(100.0)
    pool.apply_ps("g0", [], poll_started)  # a poll that began before the reply: keeps the observation
    assert pool.is_resident("g0", "llama3.1:8b")
    row = {
        "name": "llama3.1:8b",
        "size": 6e9,
        "size_vram": 6e9,
        "context_length": 2048,
        "expires_at": "2030-01-01T00:00:00Z",
    }
    pool.apply_ps("g0", [row], clock.now + 1)
    view = pool.snapshot().backends[0]
    resident = view.resident_model("llama3.1:8b")
    assert resident is not None and resident.loaded_with == LoadOptions(num_ctx=2048)
    assert view.free_vram_bytes == 24 * 1024**3 - 6_000_000_000
    pool.apply_ps("g0", [], clock.now + 2)  # unloaded since
    assert not pool.is_resident("g0", "llama3.1:8b")


def test_a_load_the_gateway_saw_is_reused_for_the_same_options_past_the_trained_context() -> None:
    # qwen2.5:7b is trained for 32768 tokens: Ollama loads a num_ctx=65536 request at 32768, and
    # reuses that copy for the next such request. Until a poll shows the copy, only the gateway's
    # own note says so, and it must not send the second request to a reload elsewhere.
    pool = BackendPool(fast_settings())
    model = "qwen2.5:7b"
    facts = facts_from_catalog(model)
    assert facts is not None and facts.context_length == 32768
    pool.set_facts(model, facts)
    records = [
        BackendRecord(id=b, url=f"http://127.0.0.1:{p}", vram_total_bytes=24 * 1024**3, speed=s)
        for b, p, s in (("g0", 1, 1.0), ("g1", 2, 3.3))
    ]
    pool.sync_records(records)
    for backend_id in ("g0", "g1"):
        pool.mark_success(backend_id)
        pool.apply_tags(backend_id, [{"name": model, "size": facts.size_bytes}])
    options = LoadOptions(num_ctx=65536)
    final = {"done": True, "load_duration": 3_000_000_000, "eval_count": 5, "eval_duration": 50_000_000}
    pool.observe_reply("g0", model, final, options, service_s=3.1)
    decision = choose(RouteRequest(model, options=options), pool.snapshot(), ResidencyPolicy())
    assert isinstance(decision, Send), decision
    assert (decision.backend_id, decision.reason) == ("g0", "resident_free_slot"), decision.explanation
    noted = pool.snapshot().backend("g0").resident_model(model)  # type: ignore[union-attr]
    assert noted is not None and noted.context_length == 32768


def test_service_time_is_the_time_a_request_held_a_slot() -> None:
    # The backend queued this request for 7 s before it got a slot: that wait is not service time,
    # and wall time (here 20 s through a busy network) is only the fallback for replies without durations.
    pool = BackendPool(fast_settings())
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1")])
    final = {
        "done": True,
        "total_duration": 10_000_000_000,
        "load_duration": 7_000_000_000,
        "prompt_eval_count": 100,
        "prompt_eval_duration": 500_000_000,
        "eval_count": 200,
        "eval_duration": 2_000_000_000,
    }
    pool.observe_reply("g0", "llama3.1:8b", final, LoadOptions(), service_s=20.0)
    assert _observed(pool)["llama3.1:8b"].service_s == pytest.approx(2.5)
    embed = {"model": "nomic-embed-text", "total_duration": 300_000_000, "load_duration": 100_000_000}
    pool.observe_reply("g0", "nomic-embed-text", embed, LoadOptions(), service_s=20.0)
    assert _observed(pool)["nomic-embed-text"].service_s == pytest.approx(0.2)
    pool.observe_reply("g0", "other", {"done": True}, LoadOptions(), service_s=20.0)
    assert _observed(pool)["other"].service_s == pytest.approx(20.0)


def _observed(pool: BackendPool) -> dict[str, ObservedStats]:
    view = pool.snapshot().backend("g0")
    assert view is not None
    return dict(view.observed)


def test_model_facts_from_show_agree_with_the_catalog() -> None:
    spec = find_model("llama3.1:8b")
    assert spec is not None
    arch = spec.family
    show = {
        "details": {"quantization_level": spec.quantization},
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": spec.parameter_count,
            f"{arch}.block_count": spec.block_count,
            f"{arch}.embedding_length": spec.embedding_length,
            f"{arch}.attention.head_count": spec.head_count,
            f"{arch}.attention.head_count_kv": spec.head_count_kv,
            f"{arch}.context_length": spec.context_length,
            f"{arch}.vocab_size": spec.vocab_size,
        },
        "capabilities": ["completion"],
    }
    from_show = facts_from_show("llama3.1:8b", show, spec.file_size_bytes)
    assert from_show == facts_from_catalog("llama3.1:8b")
    assert facts_from_show("x", {"model_info": {}}, 1) is None


def test_progress_merger_sums_layers_and_ends_once() -> None:
    merger = ProgressMerger(["a", "b"])
    assert merger.feed("a", {"status": "pulling manifest"}) == {"status": "pulling manifest"}
    assert merger.feed("b", {"status": "pulling manifest"}) is None
    layer = {"status": "pulling abc", "digest": "sha256:abc", "total": 100, "completed": 40}
    merger.feed("a", layer)
    assert merger.feed("b", {**layer, "completed": 60}) == {**layer, "total": 200, "completed": 100}
    assert merger.feed("a", {"status": "success"}) is None
    merger.feed("b", {"error": "disk full"})
    merger.finish("a")
    merger.finish("b")
    assert merger.final() == {"error": "b: disk full"}


def test_final_chunk_tap_reads_the_last_object() -> None:
    tap = FinalChunkTap()
    for piece in (b'{"done": false}\n{"do', b'ne": true, "eval_count": 3}\n'):
        tap.feed(piece)
    assert tap.final() == {"done": True, "eval_count": 3}
    broken = FinalChunkTap()
    broken.feed(b'{"done": tr')
    assert broken.final() is None


def test_every_snapshot_shows_the_pool_as_it_is_now() -> None:
    # Views are built once per change of the fleet's shape and read the request counters live:
    # whatever changed, the next decision must see it.
    clock = Clock()
    pool = BackendPool(fast_settings(), clock=clock)
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1", num_parallel=2)])
    pool.mark_success("g0", "0.12.0")
    model = "llama3.1:8b"
    pool.apply_tags("g0", [{"name": model, "size": 4_900_000_000}])
    row = {"name": model, "size": 6e9, "size_vram": 6e9, "context_length": 2048, "expires_at": "2030-01-01T00:00:00Z"}
    pool.apply_ps("g0", [row], clock.now)
    before = pool.snapshot()
    assert before.backend("g0").resident_model(model).context_length == 2048  # type: ignore[union-attr]

    pool.apply_ps("g0", [{**row, "context_length": 8192}], clock.now)  # reloaded: same name, new context
    assert pool.snapshot().backend("g0").resident_model(model).context_length == 8192  # type: ignore[union-attr]
    assert before.backend("g0").resident_model(model).context_length == 2048  # type: ignore[union-attr]

    work = pool.begin("g0", model, num_predict=8)
    view = pool.snapshot().backend("g0")
    assert view is not None and view.in_flight == {model: 1} and len(view.work[model]) == 1
    clock.now += 2
    assert pool.snapshot().now == clock.now
    pool.end(work)
    assert pool.snapshot().backend("g0").in_flight == {}  # type: ignore[union-attr]

    pool.mark_success("g0", "0.13.0")
    assert pool.snapshot().backend("g0").version == "0.13.0"  # type: ignore[union-attr]
    final = {"done": True, "load_duration": 1_000_000, "eval_count": 10, "eval_duration": 100_000_000}
    pool.observe_reply("g0", model, final, LoadOptions(), service_s=0.1)
    assert pool.snapshot().backend("g0").observed[model].tokens_per_s == pytest.approx(100.0)  # type: ignore[union-attr]
    pool.mark_failure("g0", "refused")
    pool.mark_failure("g0", "refused")
    assert not pool.snapshot().backend("g0").healthy  # type: ignore[union-attr]


def test_a_snapshot_counts_the_waiters_for_models_installed_there() -> None:
    waiting = {"llama3.1:8b": 3, "elsewhere:1b": 2}
    pool = BackendPool(fast_settings(), queue_depths=lambda: dict(waiting))
    pool.sync_records([BackendRecord(id="g0", url="http://127.0.0.1:1")])
    pool.apply_tags("g0", [{"name": "llama3.1:8b"}])
    view = pool.snapshot().backend("g0")
    assert view is not None
    assert view.queued.get("llama3.1:8b", 0) == 3 and view.queued.get("elsewhere:1b", 0) == 0
    assert dict(view.queued) == {"llama3.1:8b": 3}
    waiting["llama3.1:8b"] = 0  # read live: the waiters were served
    assert pool.snapshot().backend("g0").queued.get("llama3.1:8b", 0) == 0  # type: ignore[union-attr]
    assert dict(view.queued) == {}


def test_whether_a_model_can_fit_is_judged_by_each_backends_own_ollama() -> None:
    # Two cards alike but for their Ollama: 0.29 (era A) adds a per-card graph that makes this
    # model too large for 24 GiB, 0.30 (HEAD) does not. The one that can load it gets it.
    pool = BackendPool(fast_settings())
    model = "big:1"
    gib = 1024**3
    facts = ModelFacts(
        name=model,
        size_bytes=20 * gib,
        kv_bytes_per_token=1024,
        overhead_bytes=1 * gib,
        context_length=8192,
        overhead_bytes_era_a=6 * gib,
    )
    pool.set_facts(model, facts)
    pool.sync_records(
        [BackendRecord(id=b, url=f"http://127.0.0.1:{p}", vram_total_bytes=24 * gib) for b, p in (("g0", 1), ("g1", 2))]
    )
    for backend_id, version in (("g0", "0.29.0"), ("g1", "0.30.0")):
        pool.mark_success(backend_id, version)
        pool.apply_tags(backend_id, [{"name": model, "size": facts.size_bytes}])
    for _ in range(2):  # the second decision reads what the first worked out for this shape
        decision = choose(RouteRequest(model), pool.snapshot(), ResidencyPolicy())
        assert isinstance(decision, Send) and decision.backend_id == "g1", decision
