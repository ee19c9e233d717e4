"""ModelFacts for the router: what a cold load of a model costs in bytes.

Two sources, both without loading weights: the built-in catalog (launcher.facts.catalog), or a
backend's `/api/show` (launcher.models.show, the parser the planner uses). Either way the numbers go
through launcher.facts.perf, the same
memory model the planner and the simulator use, so the router, the plan and the backends agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway.routing.snapshot import ModelFacts
from launcher.facts import perf
from launcher.facts.catalog import ModelSpec, find_model
from launcher.models.show import ShowIncomplete, spec_from_show


def facts_from_spec(spec: ModelSpec, name: str, size_bytes: int = 0) -> ModelFacts:
    """Facts at Ollama's default load options (4096 context, one slot)."""
    if size_bytes and size_bytes != spec.file_size_bytes:
        spec = replace(spec, file_size_bytes=size_bytes)
    one_token = perf.LoadOptions(num_ctx=1, num_parallel=1)
    return ModelFacts(
        name=name,
        size_bytes=spec.file_size_bytes,
        kv_bytes_per_token=perf.kv_cache_bytes(spec, one_token),
        overhead_bytes=perf.card_overhead_bytes(spec, perf.LoadOptions()),
        overhead_bytes_era_a=perf.card_overhead_bytes(spec, perf.LoadOptions(era=perf.Era.A)),
        context_length=spec.context_length,
        embedding_only=spec.embedding_only,
    )


def facts_from_catalog(name: str, size_bytes: int = 0) -> ModelFacts | None:
    spec = find_model(name)
    return None if spec is None else facts_from_spec(spec, name, size_bytes)


def facts_from_show(name: str, show: Mapping[str, Any], size_bytes: int) -> ModelFacts | None:
    """Facts from a backend's `/api/show` reply (launcher.models.show, the planner's parser too);
    None when the reply lacks the architecture's shape."""
    try:
        return facts_from_spec(spec_from_show(name, show, size_bytes), name)
    except ShowIncomplete:
        return None
