"""The simulated backend's state: settings, clock, store, scheduler and pulls, shared by the handlers.

One `SimService` per `corral-sim serve` process, created by the app factory and closed with the app
(no module-level state). It also resolves model names the way the handlers need them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass

from launcher.facts.names import ModelName
from launcher.models.store import ModelStore
from launcher.sim.clock import Clock
from launcher.sim.env import ServeSettings
from launcher.sim.models import InstalledModel, load_installed
from launcher.sim.pull import PullManager
from launcher.sim.scheduler import Scheduler, SchedulerSettings

VERSION = "0.33.0"  # the Ollama release whose behaviour this simulates


class ModelRefError(Exception):
    """A model reference that cannot name a model; `kind` is "required", "invalid" or "conflict"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ModelRef:
    original: str
    name: ModelName


def _source_suffix(text: str) -> tuple[str, str]:
    """modelref.parseSourceSuffix: (base, "local" | "cloud" | "") for an explicit source suffix."""
    head, sep, suffix_raw = text.rpartition(":")
    if not sep:
        return text, ""
    suffix = suffix_raw.strip().lower()
    if suffix in ("local", "cloud"):
        return head, suffix
    if "/" not in suffix_raw and suffix.endswith("-cloud"):
        return f"{head}:{suffix_raw.strip()[: -len('-cloud')]}", "cloud"
    return text, ""


def parse_model_ref(raw: str) -> ModelRef:
    """parseAndValidateModelRef: trim, drop an explicit ":local", refuse empty, conflicting and invalid names.

    A ":cloud" source would go to ollama.com, which a simulated backend cannot reach: such names
    are treated like any other (and are not installed). Raises ModelRefError.
    """
    text = (raw or "").strip()
    if not text:
        raise ModelRefError("required", "model is required")
    base, source = _source_suffix(text)
    if source and _source_suffix(base)[1]:
        raise ModelRefError("conflict", f"use either :local or :cloud, not both: {json.dumps(text)}")
    if source != "local":
        base = text
    name = ModelName.parse(base)
    if not name.is_valid:
        raise ModelRefError("invalid", "invalid model name")
    return ModelRef(text, name)


class SimService:
    """Everything one simulated `ollama serve` holds."""

    def __init__(self, settings: ServeSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.store = ModelStore(settings.models_dir, prune=not settings.noprune)
        self.scheduler = Scheduler(
            SchedulerSettings(
                cards=settings.cards,
                num_parallel=settings.num_parallel,
                max_runners=settings.max_runners,
                max_queue=settings.max_queue,
                sched_spread=settings.sched_spread,
                kv_cache_type=settings.kv_cache_type,
                default_keep_alive_s=settings.keep_alive_s,
                load_gbps=settings.rig.load_gbps,
                host_mem_bytes=settings.host_mem_bytes,
                host_mem_bw_gbps=settings.rig.host_mem_bw_gbps,
            ),
            clock,
        )
        self.pulls = PullManager(self.store, clock, download_mbps=settings.rig.download_mbps)
        self._models: dict[tuple[str, str], InstalledModel] = {}
        self.salt = secrets.randbits(32)

    async def start(self) -> None:
        self.settings.models_dir.mkdir(parents=True, exist_ok=True)
        if self.store.prune:
            await asyncio.to_thread(self.store.prune_unused_blobs)
        self.scheduler.start()

    async def close(self) -> None:
        await self.pulls.close()
        await self.scheduler.close()

    def installed(self, name: ModelName) -> InstalledModel | None:
        """The installed model `name` (cached per manifest digest). Raises ModelLoadError."""
        manifest = self.store.get(name.full)
        if manifest is None:
            return None
        cache_key = (manifest.name, manifest.digest)
        cached = self._models.get(cache_key)
        if cached is not None:
            return cached
        model = load_installed(self.store, name.full)
        if model is not None:
            self._models[cache_key] = model
        return model

    def next_salt(self) -> int:
        self.salt = (self.salt * 6364136223846793005 + 1442695040888963407) % 2**64
        return self.salt
