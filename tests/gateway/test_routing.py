"""Routing decisions over hand-built snapshots: where a request goes, and why."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterable, Mapping
from dataclasses import replace

import pytest

from gateway.record import BackendKind, BackendRecord, BackendState
from gateway.routing.policy import (
    POLICY_NAMES,
    REASONS,
    Decision,
    LeastBusyPolicy,
    Reject,
    ResidencyPolicy,
    RoundRobinPolicy,
    RouteRequest,
    Send,
    Wait,
    choose,
    make_policy,
)
from gateway.routing.snapshot import BackendView, LoadOptions, ModelFacts, ObservedStats, ResidentModel, Snapshot

GB = 1000**3
GIB = 1024**3
NOW = 1_700_000_000.0

LLAMA = "llama3.1:8b"
QWEN = "qwen2.5:7b"
MISTRAL = "mistral:7b"
BIG = "llama3.3:70b"
EMBED = "nomic-embed-text:latest"

FACTS: dict[str, ModelFacts] = {
    LLAMA: ModelFacts(LLAMA, int(4.9 * GB), 131072, 600 * 1024**2, 131072),
    QWEN: ModelFacts(QWEN, int(4.7 * GB), 57344, 600 * 1024**2, 32768),
    MISTRAL: ModelFacts(MISTRAL, int(4.4 * GB), 131072, 600 * 1024**2, 32768),
    BIG: ModelFacts(BIG, int(42.5 * GB), 327680, 1200 * 1024**2, 131072),
    EMBED: ModelFacts(EMBED, int(0.27 * GB), 36864, 100 * 1024**2, 2048, embedding_only=True),
}
ALL_MODELS = frozenset(FACTS)


def record(
    backend_id: str,
    *,
    vram_gib: float = 24,
    speed: float = 1.0,
    kind: BackendKind = BackendKind.SINGLE,
    num_parallel: int = 1,
    gpus: int = 1,
    state: BackendState = BackendState.READY,
    max_loaded_models: int = 0,
) -> BackendRecord:
    return BackendRecord(
        id=backend_id,
        url=f"http://127.0.0.1:{11500 + int(backend_id[-1]) if backend_id[-1].isdigit() else 11600}",
        gpu_uuids=tuple(f"GPU-{backend_id}-{i}" for i in range(gpus)),
        kind=kind,
        num_parallel=num_parallel,
        max_loaded_models=max_loaded_models,
        vram_total_bytes=int(vram_gib * GIB),
        speed=speed,
        state=state,
        updated_at=NOW,
    )


def resident(
    name: str, *, ctx: int = 32768, expires_in_s: float | None = 300.0, loaded_with: LoadOptions | None = None
) -> ResidentModel:
    size = FACTS[name].size_bytes
    kv = FACTS[name].kv_bytes_per_token * ctx
    return ResidentModel(
        name=name,
        size_bytes=size,
        size_vram_bytes=size + kv + FACTS[name].overhead_bytes,
        context_length=ctx,
        expires_at=None if expires_in_s is None else NOW + expires_in_s,
        loaded_with=loaded_with,
    )


def view(
    rec: BackendRecord,
    *,
    installed: Iterable[str] = ALL_MODELS,
    resident_models: Iterable[ResidentModel] = (),
    in_flight: Mapping[str, int] | None = None,
    queued: Mapping[str, int] | None = None,
    healthy: bool = True,
    loading: str | None = None,
    observed: Mapping[str, ObservedStats] | None = None,
    last_used: Mapping[str, float] | None = None,
    inventory_known: bool = True,
) -> BackendView:
    res = tuple(resident_models)
    return BackendView(
        record=rec,
        healthy=healthy,
        installed=frozenset(installed),
        resident=res,
        in_flight=dict(in_flight or {}),
        queued=dict(queued or {}),
        free_vram_bytes=max(rec.vram_total_bytes - sum(r.size_vram_bytes for r in res), 0),
        loading=loading,
        observed=dict(observed or {}),
        last_used=dict(last_used or {}),
        inventory_known=inventory_known,
    )


def snap(*views: BackendView, models: Mapping[str, ModelFacts] = FACTS) -> Snapshot:
    return Snapshot(backends=tuple(views), models=models, now=NOW)


def route(snapshot: Snapshot, model: str = LLAMA, policy: ResidencyPolicy | None = None, **request: object) -> Decision:
    return choose(RouteRequest(model, **request), snapshot, policy or ResidencyPolicy())  # type: ignore[arg-type]


def sent_to(decision: Decision) -> str:
    assert isinstance(decision, Send), decision
    return decision.backend_id


# ---------------------------------------------------------------------------------------------
# residency


def test_second_request_sticks_to_the_backend_where_the_model_is_loaded() -> None:
    # g1 is slower, and still wins: the model is loaded there, a cold load on g0 would cost seconds.
    g0 = view(record("g0", speed=3.3))
    g1 = view(record("g1", speed=1.0, num_parallel=4), resident_models=[resident(LLAMA)], in_flight={LLAMA: 1})
    decision = route(snap(g0, g1), prompt_tokens=200)
    assert sent_to(decision) == "g1"
    assert isinstance(decision, Send)
    assert decision.reason == "resident_free_slot"
    assert decision.expected_ttft_s < 0.5
    # A free slot of a loaded copy beats any cold load, which is not even costed.
    assert "g1: resident, 3/4 slots free" in decision.explanation and "g0" not in decision.explanation


def test_spills_to_another_card_when_the_resident_one_is_saturated_and_a_load_is_quicker() -> None:
    busy = ObservedStats(tokens_per_s=40.0, load_s=2.5, service_s=12.0, samples=20)
    g0 = view(record("g0"))
    g1 = view(record("g1"), resident_models=[resident(LLAMA)], in_flight={LLAMA: 2}, observed={LLAMA: busy})
    decision = route(snap(g0, g1))
    assert sent_to(decision) == "g0"
    assert isinstance(decision, Send) and decision.reason == "spill"
    assert "g0: cold load" in decision.explanation


def test_two_resident_copies_share_the_load_instead_of_one_taking_all() -> None:
    # Both cards hold the model with free slots; batching on the busier one slows every stream there.
    g0 = view(record("g0", num_parallel=16), resident_models=[resident(LLAMA)], in_flight={LLAMA: 6})
    g1 = view(record("g1", num_parallel=16), resident_models=[resident(LLAMA)], in_flight={LLAMA: 2})
    assert sent_to(route(snap(g0, g1))) == "g1"
    evened = view(record("g1", num_parallel=16), resident_models=[resident(LLAMA)], in_flight={LLAMA: 6})
    assert sent_to(route(snap(g0, evened))) == "g0"  # a tie again: the stable order decides


def test_a_busy_resident_copy_still_beats_a_cold_load_while_it_has_free_slots() -> None:
    g0 = view(record("g0", num_parallel=16), resident_models=[resident(LLAMA)], in_flight={LLAMA: 12})
    g1 = view(record("g1", num_parallel=16))
    decision = route(snap(g0, g1))
    assert sent_to(decision) == "g0"
    assert isinstance(decision, Send) and decision.reason == "resident_free_slot"


def test_waits_at_the_gateway_for_the_busy_copy_when_a_cold_load_would_take_longer() -> None:
    # Late binding: the only slot is taken, so nothing is sent to g1's own queue; the request
    # waits at the gateway, where it can still go wherever a slot frees first.
    quick = ObservedStats(tokens_per_s=120.0, load_s=2.5, service_s=1.5, samples=20)
    g0 = view(record("g0"))
    g1 = view(record("g1"), resident_models=[resident(LLAMA)], in_flight={LLAMA: 1}, observed={LLAMA: quick})
    decision = route(snap(g0, g1))
    assert isinstance(decision, Wait) and decision.reason == "all_busy"
    assert decision.expected_wait_s is not None and decision.expected_wait_s < 2.0


def test_a_busy_model_is_never_evicted_the_request_waits_instead() -> None:
    # Only g0 has the model installed, and g0 is full of a model that is serving requests.
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], in_flight={QWEN: 1})
    g1 = view(record("g1"), installed=[QWEN])
    decision = route(snap(g0, g1), MISTRAL)
    assert isinstance(decision, Wait)
    assert decision.reason == "all_busy"
    assert "after busy qwen2.5:7b" in decision.explanation


def test_an_idle_model_is_evicted_when_that_is_the_only_way_in() -> None:
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], last_used={QWEN: NOW - 3600})
    decision = route(snap(g0), MISTRAL)
    assert sent_to(decision) == "g0"
    assert isinstance(decision, Send) and decision.reason == "cold_load_evict"
    assert "evicting qwen2.5:7b" in decision.explanation


def test_evicting_a_hot_model_costs_more_than_evicting_a_cold_one() -> None:
    # Both cards are equal and full of one idle model each; g0's was used seconds ago, g1's an hour ago.
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], last_used={QWEN: NOW - 2})
    g1 = view(record("g1", vram_gib=12), resident_models=[resident(LLAMA)], last_used={LLAMA: NOW - 3600})
    assert sent_to(route(snap(g0, g1), MISTRAL)) == "g1"
    # Swap which one is hot: the choice follows.
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], last_used={QWEN: NOW - 3600})
    g1 = view(record("g1", vram_gib=12), resident_models=[resident(LLAMA)], last_used={LLAMA: NOW - 2})
    assert sent_to(route(snap(g0, g1), MISTRAL)) == "g0"


def test_without_the_gateways_own_record_recency_comes_from_expires_at() -> None:
    # Under the default 5m keep_alive, expiring in 290 s means used 10 s ago; in 10 s, used 290 s ago.
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536, expires_in_s=290)])
    g1 = view(record("g1", vram_gib=12), resident_models=[resident(LLAMA, expires_in_s=10)])
    assert sent_to(route(snap(g0, g1), MISTRAL)) == "g1"
    # A model kept forever (keep_alive -1: /api/ps shows an expiry centuries away) counts as hot.
    pinned = view(record("g0", vram_gib=12), resident_models=[resident(LLAMA, expires_in_s=1e10)])
    cold = view(record("g1", vram_gib=12), resident_models=[resident(QWEN, ctx=65536, expires_in_s=5)])
    assert sent_to(route(snap(pinned, cold), MISTRAL)) == "g1"


def test_requests_waiting_at_the_gateway_make_a_model_hot() -> None:
    # Same recency; g0's model has requests queued at the gateway, so g1's is the one to evict.
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], queued={QWEN: 3})
    g1 = view(record("g1", vram_gib=12), resident_models=[resident(LLAMA)])
    assert sent_to(route(snap(g0, g1), MISTRAL)) == "g1"


def test_max_loaded_models_forces_an_eviction_even_with_memory_free() -> None:
    g0 = view(
        record("g0", vram_gib=80, max_loaded_models=2),
        resident_models=[resident(QWEN), resident(LLAMA)],
        last_used={QWEN: NOW - 3600, LLAMA: NOW - 1},
    )
    decision = route(snap(g0), MISTRAL)
    assert isinstance(decision, Send) and decision.reason == "cold_load_evict"
    assert "evicting qwen2.5:7b" in decision.explanation


def test_a_group_named_by_card_names_alone_holds_three_models_per_card() -> None:
    # A static split backend (`gpus = ["RTX 3090", "RTX 3090"]`) has names and no UUIDs: two cards
    # still hold Ollama's 3 models each, so a fourth loads beside the three idle ones.
    split = replace(
        record("s01", vram_gib=48, kind=BackendKind.SPLIT), gpu_uuids=(), gpu_names=("RTX 3090", "RTX 3090")
    )
    g0 = view(split, resident_models=[resident(LLAMA), resident(QWEN), resident(EMBED, ctx=2048)])
    decision = route(snap(g0), MISTRAL)
    assert isinstance(decision, Send) and decision.reason == "cold_load", decision.explanation


def test_a_model_larger_than_every_single_card_goes_to_the_split_backend() -> None:
    g0 = view(record("g0", speed=3.3))
    g1 = view(record("g1"))
    split = view(record("s01", vram_gib=48, kind=BackendKind.SPLIT, gpus=2, speed=0.9))
    decision = route(snap(g0, g1, split), BIG, options=LoadOptions(num_ctx=8192))
    assert sent_to(decision) == "s01"
    assert isinstance(decision, Send) and decision.reason == "split_required"
    # A model that fits one card still prefers the single cards.
    assert sent_to(route(snap(g0, g1, split), LLAMA)) == "g0"


def test_a_model_that_fits_nowhere_is_rejected_with_a_clear_message() -> None:
    decision = route(snap(view(record("g0")), view(record("g1"))), BIG, options=LoadOptions(num_ctx=8192))
    assert isinstance(decision, Reject)
    assert (decision.status, decision.reason) == (500, "too_large")
    assert "llama3.3:70b" in decision.message and "24.0 GiB" in decision.message


def test_a_cpu_backend_takes_what_no_card_can_hold() -> None:
    cpu = view(record("cpu0", vram_gib=24, kind=BackendKind.CPU, speed=0.1))
    decision = route(snap(view(record("g0")), cpu), BIG, options=LoadOptions(num_ctx=8192))
    assert sent_to(decision) == "cpu0"


def test_the_split_backend_being_down_is_a_503_not_too_large() -> None:
    split = view(record("s01", vram_gib=48, kind=BackendKind.SPLIT, gpus=2), healthy=False)
    decision = route(snap(view(record("g0")), split), BIG, options=LoadOptions(num_ctx=8192))
    assert isinstance(decision, Reject) and (decision.status, decision.reason) == (503, "no_healthy_backend")


def test_without_num_ctx_a_request_gets_the_backends_context_length() -> None:
    # Both backends run with OLLAMA_CONTEXT_LENGTH=4096. g0's copy was loaded by someone asking for
    # 16384: Ollama would reload it for a request that leaves num_ctx out. g1's copy matches.
    g0 = replace(view(record("g0", speed=3.3), resident_models=[resident(LLAMA, ctx=16384)]), default_num_ctx=4096)
    g1 = replace(view(record("g1"), resident_models=[resident(LLAMA, ctx=4096)]), default_num_ctx=4096)
    decision = route(snap(g0, g1))
    assert sent_to(decision) == "g1"
    assert isinstance(decision, Send) and decision.reason == "resident_free_slot"
    # With the automatic tier (no OLLAMA_CONTEXT_LENGTH), a copy with an automatic context is reused.
    auto = view(record("g0", speed=3.3), resident_models=[resident(LLAMA, ctx=16384)])
    assert sent_to(route(snap(auto, view(record("g1"))))) == "g0"
    # A copy whose context the gateway never learned (0) is assumed to match, not reloaded.
    unknown = replace(view(record("g0"), resident_models=[resident(LLAMA, ctx=0)]), default_num_ctx=4096)
    assert sent_to(route(snap(unknown, view(record("g1", speed=3.3))))) == "g0"


def test_a_different_num_ctx_means_not_resident() -> None:
    g0 = view(record("g0", speed=3.3), resident_models=[resident(LLAMA, ctx=8192)])
    g1 = view(record("g1"))
    # Same context as loaded: stick to g0.
    same = route(snap(g0, g1), options=LoadOptions(num_ctx=8192))
    assert sent_to(same) == "g0"
    assert isinstance(same, Send) and same.reason == "resident_free_slot"
    # Another context would reload on g0 (evicting its own copy), so the empty g1 is as good or better.
    honor = ResidencyPolicy(context_policy="honor")
    other = route(snap(g0, g1), policy=honor, options=LoadOptions(num_ctx=16384))
    assert isinstance(other, Send) and other.reason in ("cold_load", "cold_load_evict")
    assert other.reason != "resident_free_slot"
    # Under "fit" (the default) a larger context whose prompt and answer fit the loaded one is
    # served there, at the loaded context.
    fit = route(snap(g0, g1), options=LoadOptions(num_ctx=16384), prompt_tokens=500, num_predict=200)
    assert isinstance(fit, Send) and (fit.backend_id, fit.reason, fit.num_ctx) == ("g0", "context_fit", 8192)
    too_long = route(snap(g0, g1), options=LoadOptions(num_ctx=16384), prompt_tokens=8000, num_predict=500)
    assert isinstance(too_long, Send) and too_long.reason != "context_fit" and too_long.num_ctx is None
    # A num_ctx above the model's trained context is capped, like Ollama does.
    capped = view(record("g0"), resident_models=[resident(QWEN, ctx=32768)])
    assert isinstance(route(snap(capped), QWEN, options=LoadOptions(num_ctx=65536)), Send)
    assert route(snap(capped), QWEN, options=LoadOptions(num_ctx=65536)).reason == "resident_free_slot"


def test_other_load_options_are_compared_when_the_loading_request_was_seen() -> None:
    loaded = resident(LLAMA, loaded_with=LoadOptions(num_batch=512, num_gpu=33))
    g0 = view(record("g0"), resident_models=[loaded])
    assert route(snap(g0), options=LoadOptions(num_batch=512)).reason == "resident_free_slot"
    assert route(snap(g0), options=LoadOptions()).reason == "resident_free_slot"
    assert route(snap(g0), options=LoadOptions(num_gpu=-1)).reason == "resident_free_slot"
    assert route(snap(g0), options=LoadOptions(num_batch=1024)).reason == "cold_load_evict"
    assert route(snap(g0), options=LoadOptions(num_gpu=20)).reason == "cold_load_evict"


def test_retries_go_to_a_backend_not_tried_yet() -> None:
    g0 = view(record("g0"))
    g1 = view(record("g1"), resident_models=[resident(LLAMA)])
    assert sent_to(route(snap(g0, g1))) == "g1"
    assert sent_to(route(snap(g0, g1), exclude=frozenset({"g1"}))) == "g0"
    exhausted = route(snap(g0, g1), exclude=frozenset({"g0", "g1"}))
    assert isinstance(exhausted, Reject) and (exhausted.status, exhausted.reason) == (503, "exhausted")


@pytest.mark.parametrize("state", [BackendState.DRAINING, BackendState.STARTING, BackendState.FAILED])
def test_unhealthy_and_not_ready_backends_are_skipped(state: BackendState) -> None:
    g0 = view(record("g0"))
    sick = view(record("g1"), resident_models=[resident(LLAMA)], healthy=False)
    other = view(record("g2", state=state), resident_models=[resident(LLAMA)])
    for policy in ("residency", "round-robin", "least-busy", "random"):
        for _ in range(3):
            assert sent_to(choose(RouteRequest(LLAMA), snap(g0, sick, other), make_policy(policy))) == "g0"


def test_unknown_model_is_ollamas_404_with_the_name_as_written() -> None:
    g0 = view(record("g0"))
    decision = route(snap(g0), "nosuch:latest", requested_as="nosuch")
    assert isinstance(decision, Reject)
    assert (decision.status, decision.message, decision.reason) == (404, "model 'nosuch' not found", "not_found")


def test_a_backend_whose_inventory_is_not_known_yet_may_have_it() -> None:
    g0 = view(record("g0"))
    fresh = view(record("g1"), installed=(), inventory_known=False)
    assert sent_to(route(snap(g0, fresh), "nosuch:latest")) == "g1"


def test_no_healthy_backend_at_all_is_503_and_starting_ones_mean_wait() -> None:
    down = view(record("g0"), healthy=False)
    decision = route(snap(down))
    assert isinstance(decision, Reject) and (decision.status, decision.reason) == (503, "no_healthy_backend")
    assert decision.message.startswith("no healthy backend")
    starting = view(record("g1", state=BackendState.STARTING), installed=(), inventory_known=False, healthy=False)
    assert isinstance(route(snap(down, starting)), Wait)
    assert route(snap(down, starting)).reason == "starting"
    decision = route(snap())
    assert isinstance(decision, Reject) and decision.reason == "no_healthy_backend"


def test_a_model_only_on_a_down_backend_is_503_not_404() -> None:
    g0 = view(record("g0"), installed=[QWEN])
    g1 = view(record("g1"), installed=[LLAMA], healthy=False)
    decision = route(snap(g0, g1))
    assert isinstance(decision, Reject) and (decision.status, decision.reason) == (503, "no_healthy_backend")


@pytest.mark.parametrize("state", [BackendState.FAILED, BackendState.DRAINING])
def test_a_model_only_on_a_failed_or_draining_backend_is_503_not_404(state: BackendState) -> None:
    # A crashed backend waits out its restart backoff as "failed": its models are not gone, and a
    # 404 would make `ollama run` pull the model again.
    g0 = view(record("g0"), installed=[QWEN])
    g1 = view(record("g1", state=state), installed=[LLAMA], healthy=False)
    decision = route(snap(g0, g1))
    assert isinstance(decision, Reject) and (decision.status, decision.reason) == (503, "no_healthy_backend")
    # Likewise the only backend large enough for a model: not "too large".
    split = view(record("s01", vram_gib=48, kind=BackendKind.SPLIT, gpus=2, state=state), healthy=False)
    decision = route(snap(view(record("g0")), split), BIG, options=LoadOptions(num_ctx=8192))
    assert isinstance(decision, Reject) and (decision.status, decision.reason) == (503, "no_healthy_backend")
    # One never reached (nothing known of its store) does not turn unknown names into 503s.
    never = view(record("g1", state=state), installed=(), inventory_known=False, healthy=False)
    decision = route(snap(g0, never), "nosuch:latest")
    assert isinstance(decision, Reject) and (decision.status, decision.reason) == (404, "not_found")


def test_ties_go_to_the_faster_gpu() -> None:
    slow = view(record("g0", speed=1.0))
    fast = view(record("g1", speed=3.3))
    decision = route(snap(slow, fast))
    assert sent_to(decision) == "g1"
    # The same with the faster one first in the snapshot, and for an equal resident model on both.
    assert sent_to(route(snap(fast, slow))) == "g1"
    both = [view(record(i, speed=s), resident_models=[resident(LLAMA)]) for i, s in (("g0", 1.0), ("g1", 3.3))]
    assert sent_to(route(snap(*both))) == "g1"


def test_a_copy_never_gets_more_requests_than_its_slots() -> None:
    slow = ObservedStats(tokens_per_s=20.0, load_s=2.5, service_s=60.0, samples=20)
    g0 = view(record("g0"), resident_models=[resident(LLAMA)], in_flight={LLAMA: 1}, observed={LLAMA: slow})
    for policy in (ResidencyPolicy(max_wait_s=30.0), ResidencyPolicy(max_wait_s=None)):
        waited = route(snap(g0), policy=policy)
        assert isinstance(waited, Wait) and waited.reason == "all_busy"
        assert waited.expected_wait_s is not None and waited.expected_wait_s > 1.0
    four = view(record("g0", num_parallel=4), resident_models=[resident(LLAMA)], in_flight={LLAMA: 3})
    assert sent_to(route(snap(four))) == "g0"
    assert isinstance(route(snap(four), ahead=1), Wait)  # the one free slot goes to the waiter ahead


def test_gateway_queued_requests_count_as_ahead() -> None:
    stats = ObservedStats(tokens_per_s=60.0, load_s=2.5, service_s=1.5, samples=20)
    g0 = view(record("g0"))
    g1 = view(record("g1"), resident_models=[resident(LLAMA)], in_flight={LLAMA: 1}, observed={LLAMA: stats})
    assert isinstance(route(snap(g0, g1)), Wait)  # its slot frees sooner than g0 would load
    # Four requests wait ahead of this one: the k-th slot to free is too far off, a load is sooner.
    decision = route(snap(g0, g1), ahead=4)
    assert isinstance(decision, Send) and (decision.backend_id, decision.reason) == ("g0", "spill")


def test_a_load_in_progress_is_joined_and_another_models_load_delays_a_cold_load() -> None:
    joining = view(record("g0"), loading=LLAMA)
    decision = route(snap(joining, view(record("g1", speed=0.5))))
    assert isinstance(decision, Send) and (decision.backend_id, decision.reason) == ("g0", "loading")
    # g0 is busy loading another (big) model: the equal g1 loads ours sooner.
    g0 = view(record("g0", vram_gib=80), loading=BIG)
    g1 = view(record("g1", vram_gib=80))
    assert sent_to(route(snap(g0, g1))) == "g1"


def test_missing_facts_fall_back_to_what_is_known() -> None:
    g0 = view(record("g0"), resident_models=[resident(LLAMA)])
    g1 = view(record("g1", speed=3.3))
    decision = route(snap(g0, g1, models={}))
    assert sent_to(decision) == "g0"
    cold = route(snap(view(record("g1")), models={}))
    assert isinstance(cold, Send) and cold.reason == "cold_load"


def test_embedding_models_have_one_slot() -> None:
    g0 = view(record("g0", num_parallel=4), resident_models=[resident(EMBED, ctx=2048)], in_flight={EMBED: 1})
    decision = route(snap(g0), EMBED, kind="embed")
    assert isinstance(decision, Wait) and decision.reason == "all_busy"  # its one slot is taken


def test_show_needs_the_model_installed_but_never_a_fit() -> None:
    g0 = view(record("g0"), in_flight={LLAMA: 3})
    g1 = view(record("g1"))
    decision = route(snap(g0, g1), BIG, kind="show")
    assert isinstance(decision, Send) and (decision.backend_id, decision.reason) == ("g1", "metadata")
    assert isinstance(route(snap(g0, g1), "nosuch:latest", kind="show"), Reject)


# ---------------------------------------------------------------------------------------------
# baselines


def test_round_robin_cycles_deterministically_over_eligible_backends() -> None:
    views = [view(record(f"g{i}")) for i in range(3)]
    without = view(record("g3"), installed=[QWEN])
    down = view(record("g4"), healthy=False)
    snapshot = snap(views[2], down, views[0], without, views[1])
    policy = make_policy("round-robin")
    picks = [sent_to(choose(RouteRequest(LLAMA), snapshot, policy)) for _ in range(7)]
    assert picks == ["g0", "g1", "g2", "g0", "g1", "g2", "g0"]
    again = RoundRobinPolicy()
    assert [sent_to(choose(RouteRequest(LLAMA), snapshot, again)) for _ in range(7)] == picks
    decision = choose(RouteRequest(LLAMA), snapshot, policy)
    assert isinstance(decision, Send) and decision.reason == "round_robin"
    # A backend that leaves does not skew the cycle: after g1 comes g2, or g0 when g2 is gone.
    assert sent_to(choose(RouteRequest(LLAMA), snap(views[0], views[1]), policy)) == "g0"


def test_least_busy_picks_fewest_in_flight_and_ties_to_the_faster_gpu() -> None:
    g0 = view(record("g0", speed=1.0), in_flight={LLAMA: 1})
    g1 = view(record("g1", speed=0.5), in_flight={QWEN: 2})
    g2 = view(record("g2", speed=0.9), in_flight={})
    g3 = view(record("g3", speed=2.0), in_flight={})
    decision = choose(RouteRequest(LLAMA), snap(g0, g1, g2, g3), LeastBusyPolicy())
    assert isinstance(decision, Send) and (decision.backend_id, decision.reason) == ("g3", "least_busy")
    g3 = view(record("g3", speed=2.0), in_flight={MISTRAL: 1})
    assert sent_to(choose(RouteRequest(LLAMA), snap(g0, g1, g2, g3), LeastBusyPolicy())) == "g2"


def test_random_is_uniform_over_eligible_and_repeatable_with_a_seed() -> None:
    views = [view(record(f"g{i}")) for i in range(4)]
    too_small = view(record("g9", vram_gib=4))
    snapshot = snap(*views, too_small)
    picks_a = [
        sent_to(choose(RouteRequest(LLAMA), snapshot, make_policy("random", random.Random(7)))) for _ in range(1)
    ]
    policy_a = make_policy("random", random.Random(42))
    policy_b = make_policy("random", random.Random(42))
    seq_a = [sent_to(choose(RouteRequest(LLAMA), snapshot, policy_a)) for _ in range(400)]
    seq_b = [sent_to(choose(RouteRequest(LLAMA), snapshot, policy_b)) for _ in range(400)]
    assert seq_a == seq_b
    assert picks_a[0] in {"g0", "g1", "g2", "g3"}
    counts = {backend_id: seq_a.count(backend_id) for backend_id in {"g0", "g1", "g2", "g3"}}
    assert "g9" not in seq_a
    assert min(counts.values()) > 60  # 100 expected each; a skewed or stuck pick fails this


def test_baselines_send_even_where_the_residency_policy_would_wait() -> None:
    # Like a plain load balancer: the backend queues it (Ollama waits for the busy model itself).
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], in_flight={QWEN: 1})
    assert isinstance(route(snap(g0), MISTRAL), Wait)
    for name in ("round-robin", "least-busy", "random"):
        decision = choose(RouteRequest(MISTRAL), snap(g0), make_policy(name, random.Random(3)))
        assert isinstance(decision, Send) and decision.backend_id == "g0"
        assert decision.expected_ttft_s > 0


def test_make_policy_knows_the_config_names() -> None:
    assert [make_policy(name).name for name in POLICY_NAMES] == list(POLICY_NAMES)
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest")


# ---------------------------------------------------------------------------------------------
# every decision


def _scenarios() -> list[tuple[Snapshot, RouteRequest]]:
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], in_flight={QWEN: 1})
    g1 = view(record("g1"), resident_models=[resident(LLAMA)], in_flight={LLAMA: 5})
    g2 = view(record("g2", vram_gib=48, kind=BackendKind.SPLIT, gpus=2), loading=QWEN)
    g3 = view(record("g3", state=BackendState.STARTING), healthy=False, inventory_known=False, installed=())
    fleet = snap(g0, g1, g2)
    return [
        (fleet, RouteRequest(LLAMA, prompt_tokens=1000)),
        (fleet, RouteRequest(QWEN)),
        (fleet, RouteRequest(MISTRAL, options=LoadOptions(num_ctx=4096))),
        (fleet, RouteRequest(BIG, options=LoadOptions(num_ctx=8192))),
        (fleet, RouteRequest(BIG)),
        (fleet, RouteRequest(EMBED, kind="embed")),
        (fleet, RouteRequest(LLAMA, kind="show")),
        (fleet, RouteRequest("nosuch:latest")),
        (fleet, RouteRequest(LLAMA, exclude=frozenset({"g0", "g1", "g2"}))),
        (snap(g0), RouteRequest(MISTRAL)),
        (snap(g3), RouteRequest(LLAMA)),
        (snap(), RouteRequest(LLAMA)),
    ]


def test_every_decision_has_a_reason_from_the_fixed_set_and_an_explanation() -> None:
    seen: set[str] = set()
    for name in POLICY_NAMES:
        policy = make_policy(name, random.Random(1))
        for snapshot, request in _scenarios():
            decision = choose(request, snapshot, policy)
            assert decision.reason in REASONS, decision
            assert decision.explanation
            if isinstance(decision, Send):
                assert snapshot.backend(decision.backend_id) is not None
                assert decision.expected_ttft_s >= 0.0
            seen.add(decision.reason)
    # The scenarios reach well over half of the set, so a reason outside it would have shown up.
    assert len(seen) >= 12, sorted(seen)


def test_choose_over_eight_backends_does_not_allocate_wildly() -> None:
    models = [LLAMA, QWEN, MISTRAL]
    views = [
        view(
            record(f"g{i}", num_parallel=4, speed=1.0 + i / 10),
            resident_models=[resident(models[i % 3]), resident(models[(i + 1) % 3])],
            in_flight={models[i % 3]: i % 5},
            last_used={models[(i + 1) % 3]: NOW - 10 * i},
        )
        for i in range(8)
    ]
    snapshot = snap(*views)
    policy = ResidencyPolicy()
    requests = [RouteRequest(m, prompt_tokens=500) for m in (*models, BIG)]
    for request in requests:  # warm caches (interned strings, dataclass machinery)
        choose(request, snapshot, policy)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(250):
            for request in requests:
                choose(request, snapshot, policy)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One decision over 8 backends builds a handful of small objects: nothing is retained between
    # calls, and the working set of a call stays far below a megabyte.
    assert after - before < 16 * 1024
    assert peak - before < 256 * 1024


def test_a_request_only_a_loaded_copy_could_take_is_refused_when_it_does_not_fit_that_copy() -> None:
    g0 = view(record("g0", num_parallel=4), resident_models=[resident(LLAMA, ctx=8192)])
    asked = LoadOptions(num_ctx=131072)
    fits = route(snap(g0), options=asked, prompt_tokens=100, num_predict=100)
    assert isinstance(fits, Send) and (fits.reason, fits.num_ctx) == ("context_fit", 8192)
    too_long = route(snap(g0), options=asked, prompt_tokens=60000)
    assert isinstance(too_long, Reject) and too_long.status == 500 and too_long.reason == "too_large"


def test_the_only_copy_of_a_planned_model_is_not_evicted_while_something_else_can_serve() -> None:
    planned = replace(record("g0", vram_gib=12), planned_models=(QWEN,))
    g0 = view(planned, resident_models=[resident(QWEN, ctx=65536)], last_used={QWEN: NOW - 3600})
    g1 = view(record("g1"), resident_models=[resident(LLAMA)], in_flight={LLAMA: 1})
    # g1's copy of llama is busy; loading it on g0 would evict g0's planned qwen: wait instead.
    decision = route(snap(g0, g1))
    assert isinstance(decision, Wait)
    # With no other copy anywhere, the planned model is evicted, and the decision says so.
    alone = route(snap(g0))
    assert isinstance(alone, Send) and alone.evicts_planned == (QWEN,)


def test_a_batch_request_never_evicts_a_model_interactive_traffic_just_used() -> None:
    g0 = view(record("g0", vram_gib=12), resident_models=[resident(QWEN, ctx=65536)], last_used={QWEN: NOW - 10})
    hot = replace(g0, last_interactive={QWEN: NOW - 10})
    assert isinstance(route(snap(hot), MISTRAL), Send)  # interactive may (it costs, but it is the only way)
    assert isinstance(route(snap(hot), MISTRAL, priority="batch"), Wait)
    cold = replace(g0, last_interactive={QWEN: NOW - 3600})
    assert isinstance(route(snap(cold), MISTRAL, priority="batch"), Send)


def test_choose_looks_only_at_the_backends_that_may_hold_the_model() -> None:
    others = [view(record(f"x{i}"), installed=[QWEN]) for i in range(50)]
    g0 = view(record("g0"), installed=[LLAMA], resident_models=[resident(LLAMA)])
    snapshot = snap(*others, g0)
    assert [v.id for v in snapshot.candidates(LLAMA)] == ["g0"]
    assert sent_to(route(snapshot)) == "g0"
