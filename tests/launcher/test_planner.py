"""The placement planner: the rigs people run Ollama on (shared/seeds), and the decisions `corral plan` explains."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.record import BackendKind
from launcher.config import LauncherSettings, ModelEntry, SimGpu, load_config
from launcher.facts.catalog import find_model
from launcher.gpus.discovery import GpuInfo, simulated_inventory
from launcher.planner.fit import ollama_default_ctx
from launcher.planner.placement import Plan, PlannedBackend
from launcher.planner.plan import ModelRequest, plan

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def _rig(*names: str) -> list[GpuInfo]:
    return simulated_inventory([SimGpu(name=n) for n in names])


def _requests(*entries: ModelEntry) -> list[ModelRequest]:
    requests = []
    for i, entry in enumerate(entries):
        spec = find_model(entry.name)
        assert spec is not None, entry.name
        requests.append(ModelRequest(entry, spec, i))
    return requests


def _plan(cards: list[GpuInfo], *entries: ModelEntry, **settings: object) -> Plan:
    return plan(cards, _requests(*entries), LauncherSettings(**settings))  # type: ignore[arg-type]


def _holding(p: Plan, model: str) -> list[PlannedBackend]:
    return [b for b in p.backends if model in b.model_names]


def _rejections(p: Plan, model: str) -> dict[str, str]:
    return {r.candidate: r.reason for r in p.rejections if r.model == model}


def _assert_within_free(p: Plan, cards: list[GpuInfo]) -> None:
    free = {g.uuid: g.memory_free_bytes for g in cards}
    for b in p.backends:
        for pos, uuid in enumerate(b.gpu_uuids):
            assert sum(m.card_vram_bytes[pos] for m in b.models) <= free[uuid], b.id


# -- the seeds' rigs ---------------------------------------------------------------------------


def test_llama33_70b_on_two_24gb_cards_is_one_split_backend() -> None:
    cards = _rig("RTX 3090", "RTX 3090")
    p = _plan(cards, ModelEntry("llama3.3:70b", num_ctx=8192, num_parallel=1))
    assert p.ok and not p.warnings
    (backend,) = p.backends
    assert backend.kind is BackendKind.SPLIT
    assert backend.gpu_indices == (0, 1) and backend.id == "g0+g1"
    (model,) = backend.models
    # shared/seeds/001 saw 23.8 + 22.4 GB on the two cards.
    assert all(20e9 < b < 25.5e9 for b in model.card_vram_bytes)
    assert model.num_gpu == -1 and model.num_ctx == 8192
    assert "no single card holds it" in model.reason
    # The "needs" figure is the plan's VRAM column (what it would hold); --fit's margin comes apart.
    assert "needs 41.9 GiB at num_ctx 8192 x 1 (+ 1.0 GiB" in _rejections(p, "llama3.3:70b")["g0 (RTX 3090)"]
    _assert_within_free(p, cards)


def test_an_8b_model_on_two_a6000s_gets_a_backend_per_card() -> None:
    p = _plan(_rig("A6000", "A6000"), ModelEntry("llama3.1:8b"))
    assert p.ok
    assert [(b.id, b.kind, b.port, b.model_names) for b in p.backends] == [
        ("g0", BackendKind.SINGLE, 11500, ("llama3.1:8b",)),
        ("g1", BackendKind.SINGLE, 11501, ("llama3.1:8b",)),
    ]
    # Ollama's default for a 48 GiB card (262144, capped to the model's 131072) needs 104 GiB at
    # 4 slots; the planner steps down Ollama's tiers and says so.
    first, second = (b.models[0] for b in p.backends)
    assert first.num_ctx == second.num_ctx == 32768
    assert "Ollama's default here, 131072, does not fit" in first.reason
    assert p.notes["llama3.1:8b"].startswith("2 copies on g0, g1")


def test_the_hot_model_gets_the_4090_and_the_other_the_3090() -> None:
    cards = _rig("RTX 3090", "RTX 4090")  # the slower card first, as NVML may well list them
    p = _plan(cards, ModelEntry("qwen2.5:7b", replicas=1), ModelEntry("llama3.1:8b", hot=True, replicas=1))
    assert [b.gpu_names for b in _holding(p, "llama3.1:8b")] == [("RTX 4090",)]
    assert [b.gpu_names for b in _holding(p, "qwen2.5:7b")] == [("RTX 3090",)]
    assert _holding(p, "llama3.1:8b")[0].models[0].reason.startswith("hot model")
    # Without `hot`, config order is the priority: the first model takes the faster card.
    p = _plan(cards, ModelEntry("qwen2.5:7b", replicas=1), ModelEntry("llama3.1:8b", replicas=1))
    assert [b.gpu_names for b in _holding(p, "qwen2.5:7b")] == [("RTX 4090",)]


def test_llama4_scout_67gb_on_two_48gb_cards_is_split() -> None:
    cards = _rig("A6000", "A6000")
    p = _plan(cards, ModelEntry("llama4:16x17b", num_parallel=1))
    assert p.ok
    (backend,) = p.backends
    assert backend.kind is BackendKind.SPLIT and backend.gpu_indices == (0, 1)
    assert backend.num_parallel == 1
    # Roughly even halves, as shared/seeds/003 expected on identical cards.
    low, high = sorted(backend.models[0].card_vram_bytes)
    assert low / high > 0.8
    _assert_within_free(p, cards)


def test_a_model_larger_than_the_rig_runs_partly_on_the_cpu_with_a_warning() -> None:
    p = _plan(_rig("RTX 4090", "RTX 4090"), ModelEntry("llama3.1:405b"))
    assert p.ok
    (backend,) = p.backends
    assert backend.kind is BackendKind.CPU and backend.gpu_indices == (0, 1)
    (model,) = backend.models
    assert 0 < model.num_gpu < 127  # layers on GPU, out of 126 + the output layer
    assert model.num_ctx == 4096  # the smallest tier keeps the most layers on the cards
    (warning,) = [w for w in p.warnings if w.startswith("llama3.1:405b runs partly on the CPU")]
    assert "short by" in warning and f"~{model.expected_tokens_per_s:.1f} tokens/s" in warning
    assert model.expected_tokens_per_s < 2
    assert backend.num_parallel == 1  # the fewest slots keep the most layers on the cards


def test_a_model_larger_than_the_rig_is_an_error_when_offload_is_off() -> None:
    p = _plan(_rig("RTX 4090", "RTX 4090"), ModelEntry("llama3.1:405b"), allow_cpu_offload=False)
    assert not p.ok and p.backends == ()
    (error,) = p.errors
    assert error.startswith("llama3.1:405b: too large for this rig: needs ")
    assert "which have 48.0 GiB (short by " in error
    assert "allow_cpu_offload" in error


# -- context ---------------------------------------------------------------------------------


def test_a_128k_context_that_no_longer_fits_one_card_is_split_instead() -> None:
    cards = _rig("RTX 4090", "RTX 4090")
    short = _plan(cards, ModelEntry("llama3.1:8b", num_parallel=1))
    assert [b.kind for b in short.backends] == [BackendKind.SINGLE, BackendKind.SINGLE]
    # At HEAD 131072 x 1 (16 GiB of KV) still fits one 24 GiB card; two slots of it do not.
    long = _plan(cards, ModelEntry("llama3.1:8b", num_ctx=131072, num_parallel=2))
    (backend,) = long.backends
    assert backend.kind is BackendKind.SPLIT
    assert backend.models[0].num_ctx == 131072 and backend.num_parallel == 2
    assert "no single card holds it" in backend.models[0].reason
    assert "at num_ctx 131072 x 2" in _rejections(long, "llama3.1:8b")["g0 (RTX 4090)"]


def test_a_128k_context_gets_fewer_replicas_to_leave_room_for_the_next_model() -> None:
    cards = _rig("A6000", "A6000")
    p = _plan(cards, ModelEntry("llama3.1:8b", num_ctx=131072, num_parallel=2), ModelEntry("qwen2.5:32b", num_ctx=8192))
    assert p.ok
    assert [b.id for b in _holding(p, "llama3.1:8b")] == ["g0"]
    assert [b.id for b in _holding(p, "qwen2.5:32b")] == ["g1"]
    assert _rejections(p, "llama3.1:8b")["g1 (A6000)"] == "would leave no room for qwen2.5:32b"


def test_kv_cache_quantization_lets_ollamas_default_context_fit() -> None:
    cards = _rig("RTX 4090")
    f16 = _plan(cards, ModelEntry("qwen2.5:14b"))
    q8 = _plan(cards, ModelEntry("qwen2.5:14b"), kv_cache_type="q8_0")
    assert f16.backends[0].models[0].num_ctx == 4096
    assert "Ollama's default here, 32768, does not fit" in f16.backends[0].models[0].reason
    assert q8.backends[0].models[0].num_ctx == 32768
    assert f16.backends[0].num_parallel == q8.backends[0].num_parallel == 4


def test_context_is_capped_to_the_models_limit() -> None:
    p = _plan(_rig("RTX 4090"), ModelEntry("nomic-embed-text", num_ctx=8192))
    (model,) = p.backends[0].models
    assert model.name == "nomic-embed-text:latest"
    assert model.num_ctx == 2048
    assert "the model's limit (asked 8192)" in model.reason


def test_ollamas_default_context_tiers() -> None:
    assert ollama_default_ctx(16 * GIB) == 4096
    assert ollama_default_ctx(24 * GIB) == 32768
    assert ollama_default_ctx(48 * GIB) == 262144


# -- pins and replicas -------------------------------------------------------------------------


def test_a_pin_by_index_or_uuid_puts_the_model_there_only() -> None:
    cards = _rig("RTX 4090", "RTX 4090", "RTX 4090")
    by_index = _plan(cards, ModelEntry("llama3.1:8b", pin=(1,)))
    assert [b.id for b in by_index.backends] == ["g1"]
    assert by_index.backends[0].models[0].reason.startswith("pinned to g1")
    by_uuid = _plan(cards, ModelEntry("llama3.1:8b", pin=(cards[2].uuid, 0)))
    assert [b.id for b in by_uuid.backends] == ["g0", "g2"]


def test_a_pin_wins_over_a_hot_model() -> None:
    cards = _rig("RTX 4090", "RTX 3090")
    p = _plan(
        cards,
        ModelEntry("llama3.1:8b", hot=True, replicas=1),
        ModelEntry("qwen2.5:32b", num_ctx=8192, num_parallel=1, pin=(0,)),
    )
    assert p.ok
    assert [b.gpu_names for b in _holding(p, "qwen2.5:32b")] == [("RTX 4090",)]
    assert [b.gpu_names for b in _holding(p, "llama3.1:8b")] == [("RTX 3090",)]


def test_an_impossible_pin_is_an_error_that_says_why() -> None:
    cards = _rig("RTX 4090", "RTX 4090")
    p = _plan(cards, ModelEntry("llama3.3:70b", num_ctx=8192, num_parallel=1, pin=(0,)))
    assert p.backends == ()
    (error,) = p.errors
    assert error.startswith("llama3.3:70b: pinned to g0, but it cannot go there: needs 41.9 GiB")
    assert "24.0 GiB free" in error
    p = _plan(cards, ModelEntry("llama3.1:8b", pin=(7,)), ModelEntry("qwen2.5:7b"))
    assert p.errors == ("llama3.1:8b: pin 7: no such GPU (this rig has g0 GPU-sim-0000, g1 GPU-sim-0001)",)
    assert _holding(p, "qwen2.5:7b"), "the other models are still planned"


@pytest.mark.parametrize(
    ("replicas", "copies", "warned"), [(1, 1, False), (2, 2, False), ("auto", 3, False), (4, 3, True)]
)
def test_replicas_count_or_auto(replicas: int | str, copies: int, warned: bool) -> None:
    p = _plan(_rig("A6000", "A6000", "A6000"), ModelEntry("llama3.1:8b", replicas=replicas))
    assert len(_holding(p, "llama3.1:8b")) == copies
    assert any("replicas = 4, but only 3 placed" in w for w in p.warnings) == warned


# -- sharing a card ----------------------------------------------------------------------------


def test_several_small_models_share_one_card() -> None:
    cards = _rig("RTX 4090")
    names = ("llama3.2:3b", "qwen2.5:1.5b", "gemma2:2b", "nomic-embed-text")
    p = _plan(cards, *(ModelEntry(n) for n in names))
    assert p.ok and not p.warnings
    (backend,) = p.backends
    assert backend.model_names == ("llama3.2:3b", "qwen2.5:1.5b", "gemma2:2b", "nomic-embed-text:latest")
    assert backend.max_loaded_models >= 4
    assert backend.vram_planned_bytes <= cards[0].memory_free_bytes
    assert "shares g0 (RTX 4090) with llama3.2:3b" in backend.models[1].reason


def test_ollamas_80_percent_rule_keeps_a_small_model_off_a_nearly_full_card() -> None:
    # 21.4 + 0.7 GiB fit the 24 GiB card, but Ollama would evict the embedder to reload qwen (it
    # loads beside others only within 80 % of what they leave), so the planner does not pair them.
    cards = _rig("RTX 4090")
    p = _plan(cards, ModelEntry("qwen2.5:32b", num_ctx=8192, num_parallel=1), ModelEntry("nomic-embed-text"))
    assert [b.id for b in _holding(p, "qwen2.5:32b")] == ["g0"]
    assert [b.id for b in _holding(p, "nomic-embed-text:latest")] == ["cpu"]
    assert "over 80 % of the" in _rejections(p, "nomic-embed-text:latest")["g0 (RTX 4090)"]
    assert any("nomic-embed-text:latest is not served on a GPU: it runs on the CPU alone" in w for w in p.warnings)
    # The look-ahead keeps later models in mind, but priority wins over sending qwen to the CPU.
    assert (
        "by priority: nomic-embed-text:latest then finds no room on a GPU"
        in _holding(p, "qwen2.5:32b")[0].models[0].reason
    )


def test_on_an_over_full_rig_a_model_that_needs_the_cpu_anyway_leaves_the_card_to_one_that_fits() -> None:
    # 405b would run 10 layers on the card; qwen fits there whole. gemma fits nowhere beside qwen,
    # and is not held against anyone.
    p = _plan(
        _rig("RTX 4090"),
        ModelEntry("llama3.1:405b"),
        ModelEntry("qwen2.5:32b", num_ctx=8192, num_parallel=1),
        ModelEntry("gemma2:27b", num_parallel=1),
    )
    assert p.ok
    assert [(b.id, b.model_names) for b in p.backends] == [
        ("g0", ("qwen2.5:32b",)),
        ("cpu", ("llama3.1:405b", "gemma2:27b")),
    ]
    assert _rejections(p, "llama3.1:405b")["g0"] == "would leave no room for qwen2.5:32b"


def test_a_shared_backend_runs_at_the_smallest_num_parallel_and_says_so() -> None:
    p = _plan(_rig("A6000"), ModelEntry("llama3.1:8b", num_ctx=8192), ModelEntry("qwen2.5:7b", num_parallel=2))
    (backend,) = p.backends
    assert backend.model_names == ("llama3.1:8b", "qwen2.5:7b")
    assert backend.num_parallel == 2
    assert any(w.startswith("llama3.1:8b gets num_parallel 2 on g0, not 4") for w in p.warnings)


def test_max_loaded_models_limits_sharing() -> None:
    p = _plan(
        _rig("RTX 4090"),
        ModelEntry("llama3.2:3b"),
        ModelEntry("qwen2.5:1.5b"),
        max_loaded_models=1,
        allow_cpu_offload=False,
    )
    assert [b.model_names for b in p.backends] == [("llama3.2:3b",)]
    assert p.backends[0].max_loaded_models == 1
    assert "max_loaded_models = 1 allows 1 model(s) per backend" in _rejections(p, "qwen2.5:1.5b")["g0 (RTX 4090)"]
    (error,) = p.errors
    assert error.startswith("qwen2.5:1.5b: no room left: needs ")


# -- reserves ----------------------------------------------------------------------------------


def test_the_compute_tier_reserve_turns_a_tight_single_card_into_a_split() -> None:
    cards = _rig("RTX 4090", "RTX 4090")
    entry = ModelEntry("qwen2.5:32b", num_ctx=8192, num_parallel=1, replicas=1)
    ollama = _plan(cards, entry)
    assert [(b.id, b.kind) for b in ollama.backends] == [("g0", BackendKind.SINGLE)]
    tier = _plan(cards, entry, reserve="compute-tier")
    assert [(b.id, b.kind) for b in tier.backends] == [("g0+g1", BackendKind.SPLIT)]
    assert "20.0 GiB free after the 4.0 GiB compute-tier reserve" in _rejections(tier, "qwen2.5:32b")["g0 (RTX 4090)"]


def test_a_card_reserve_by_index_or_uuid_moves_the_model() -> None:
    cards = _rig("RTX 4090", "RTX 4090")
    entry = ModelEntry("llama3.1:8b", replicas=1)
    assert [b.id for b in _plan(cards, entry, card_reserve_gb={"0": 20.0}).backends] == ["g1"]
    p = _plan(cards, entry, card_reserve_gb={cards[1].uuid: 20.0, "9": 1.0})
    assert [b.id for b in p.backends] == ["g0"]
    assert p.warnings == ("launcher.card_reserve_gb.9: no GPU with that index or UUID; ignored",)


# -- the example rig and the contract ---------------------------------------------------------


def test_the_example_config_gives_a_sensible_plan() -> None:
    cfg = load_config(ROOT / "config.toml")
    cards = simulated_inventory(cfg.sim.gpus)
    requests = [ModelRequest(e, find_model(e.name), i) for i, e in enumerate(cfg.models)]  # type: ignore[arg-type]
    p = plan(cards, requests, cfg.launcher)
    assert p.ok and not p.warnings
    by_id = {b.id: b for b in p.backends}
    # The 43 GB model gets the two 3090s to itself; the hot model a 4090 of its own at Ollama's
    # default context for it (32768 x 4 slots), the two others the other 4090.
    assert by_id["g2+g3"].kind is BackendKind.SPLIT and by_id["g2+g3"].model_names == ("llama3.3:70b",)
    assert by_id["g2+g3"].num_parallel == 1
    assert by_id["g0"].model_names == ("llama3.1:8b",) and by_id["g0"].gpu_names == ("RTX 4090",)
    assert by_id["g0"].models[0].num_ctx == 32768 and by_id["g0"].num_parallel == 4
    assert set(by_id["g1"].model_names) == {"qwen2.5:7b", "nomic-embed-text:latest"}
    assert [b.port for b in p.backends] == [11500, 11501, 11502]
    assert _rejections(p, "llama3.1:8b")["g2 (RTX 3090)"] == "would leave no room for qwen2.5:7b"
    assert set(p.notes) == {"llama3.1:8b", "qwen2.5:7b", "nomic-embed-text:latest", "llama3.3:70b"}
    _assert_within_free(p, cards)


_DETERMINISM_RIG = ("RTX 4090", "RTX 3090", "RTX 4090", "A6000")
_DETERMINISM_MODELS = (
    ModelEntry("llama3.1:8b", hot=True),
    ModelEntry("qwen2.5:14b"),
    ModelEntry("llama3.3:70b", num_ctx=8192),
    ModelEntry("nomic-embed-text"),
)


def test_the_same_input_gives_the_same_plan() -> None:
    cards = _rig(*_DETERMINISM_RIG)
    assert _plan(cards, *_DETERMINISM_MODELS) == _plan(cards, *_DETERMINISM_MODELS)
    # Also across processes: set and dict orders of strings change with the hash seed.
    script = (
        "from tests.launcher.test_planner import _DETERMINISM_MODELS, _DETERMINISM_RIG, _plan, _rig; "
        "print(repr(_plan(_rig(*_DETERMINISM_RIG), *_DETERMINISM_MODELS)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {repr(_plan(cards, *_DETERMINISM_MODELS)) + "\n"}


def test_mig_instances_of_one_card_are_told_apart() -> None:
    (whole,) = _rig("A100 80GB")
    half = 40 * GIB
    instances = [
        replace(whole, uuid=f"MIG-{n}", memory_total_bytes=half, memory_free_bytes=half, mig_parent_uuid=whole.uuid)
        for n in range(2)
    ]
    p = _plan(instances, ModelEntry("llama3.1:8b", num_ctx=8192))
    assert [(b.id, b.gpu_uuids) for b in p.backends] == [("g0.0", ("MIG-0",)), ("g0.1", ("MIG-1",))]


def test_without_gpus_models_run_on_the_cpu_or_not_at_all() -> None:
    p = _plan([], ModelEntry("llama3.2:3b"))
    assert [(b.id, b.kind, b.gpu_indices) for b in p.backends] == [("cpu", BackendKind.CPU, ())]
    assert p.backends[0].models[0].num_gpu == 0
    assert not _plan([], ModelEntry("llama3.2:3b"), allow_cpu_offload=False).ok


def test_the_same_model_twice_is_planned_once() -> None:
    p = _plan(_rig("RTX 4090"), ModelEntry("llama3.1"), ModelEntry("llama3.1:latest"))
    assert [b.model_names for b in p.backends] == [("llama3.1:latest",)]
    assert p.warnings == ("llama3.1:latest: the same model as llama3.1; ignored",)


# -- shared/seeds/001 and 002 with the launcher's defaults (no num_parallel on the model) ----------


@pytest.mark.parametrize(
    ("rig", "measured"),
    [(("RTX 4090", "RTX 4090"), 22.6), (("RTX 3090", "RTX 3090"), 17.1), (("RTX 4090", "RTX 3090"), 18.3)],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v),
)
def test_the_seeds_70b_is_split_over_the_gpus_with_slots_stepped_down(rig: tuple[str, ...], measured: float) -> None:
    cards = _rig(*rig)
    p = _plan(cards, ModelEntry("llama3.3:70b", num_ctx=8192))
    assert p.ok and not p.warnings
    (backend,) = p.backends
    assert backend.kind is BackendKind.SPLIT and backend.gpu_indices == (0, 1)
    assert backend.num_parallel < 4
    (model,) = backend.models
    assert model.num_gpu == -1 and model.num_ctx == 8192
    assert f"num_parallel {backend.num_parallel}, stepped down from 4" in model.reason
    assert "does not fit (needs" in model.reason  # the step-down says what 4 slots would have needed
    assert model.expected_tokens_per_s == pytest.approx(measured, rel=0.15)
    assert sum(model.card_layers) == 81
    _assert_within_free(p, cards)


def test_a_clean_split_gives_each_card_layers_in_proportion_to_its_free_memory() -> None:
    cards = _rig("RTX 4090", "RTX 3090")
    p = _plan(cards, ModelEntry("llama3.3:70b", num_ctx=8192, num_parallel=1))
    (backend,) = p.backends
    assert backend.gpu_names == ("RTX 4090", "RTX 3090")  # strongest first in CUDA_VISIBLE_DEVICES
    (model,) = backend.models
    strong, weak = model.card_layers
    assert abs(strong - weak) <= 2  # equal free memory: about equal shares, as llama.cpp splits


def test_the_70b_stays_on_the_gpus_and_the_8b_beside_it_is_told_where_it_goes() -> None:
    cards = _rig("RTX 4090", "RTX 4090")
    p = _plan(cards, ModelEntry("llama3.3:70b", num_ctx=8192), ModelEntry("llama3.1:8b"))
    (split,) = [b for b in p.backends if b.kind is BackendKind.SPLIT]
    assert split.model_names == ("llama3.3:70b",)
    (cpu,) = _holding(p, "llama3.1:8b")
    assert cpu.kind is BackendKind.CPU
    (warning,) = [w for w in p.warnings if w.startswith("llama3.1:8b is not served on a GPU")]
    assert "runs on the CPU alone (~" in warning and "beside the models placed before it" in warning
    # The split backend has no room for it beside the 70B: the plan says how much it would need.
    assert "left beside llama3.3:70b" in _rejections(p, "llama3.1:8b")["g0+g1"]
    no_offload = _plan(
        cards, ModelEntry("llama3.3:70b", num_ctx=8192), ModelEntry("llama3.1:8b"), allow_cpu_offload=False
    )
    assert _holding(no_offload, "llama3.3:70b")[0].kind is BackendKind.SPLIT
    (error,) = no_offload.errors
    assert error.startswith("llama3.1:8b: no room left")


def test_a_split_takes_the_strong_card_and_lists_it_first() -> None:
    # shared/seeds/002: the faster card should lead. Of 3090, 4090, 3090 the split takes the 4090 and
    # one 3090 (the best predicted rate), 4090 first in CUDA_VISIBLE_DEVICES.
    cards = _rig("RTX 3090", "RTX 4090", "RTX 3090")
    p = _plan(cards, ModelEntry("llama3.3:70b", num_ctx=8192))
    (backend,) = p.backends
    assert backend.gpu_indices[0] == 1 and len(backend.gpu_indices) == 2
    assert backend.gpu_names == ("RTX 4090", "RTX 3090")
    two_3090s = _plan(_rig("RTX 3090", "RTX 3090"), ModelEntry("llama3.3:70b", num_ctx=8192))
    assert backend.models[0].expected_tokens_per_s > two_3090s.backends[0].models[0].expected_tokens_per_s


def test_a_model_that_fits_the_strong_card_makes_a_clean_break_there() -> None:
    # shared/seeds/002: a 5090 + 3090 pair runs "as slow as the 3090" when the model is split; a model
    # that fits the 5090 alone goes there whole.
    p = _plan(_rig("RTX 3090", "RTX 5090"), ModelEntry("qwen2.5:32b", num_ctx=8192))
    (backend,) = p.backends
    assert backend.kind is BackendKind.SINGLE and backend.gpu_names == ("RTX 5090",)
