"""`pull` from the simulated registry, with Ollama's progress stream (server/images.go PullModel).

Statuses, in order: "pulling manifest", then per layer "pulling <digest[7:19]>" with digest, total
and completed (completed advancing at [sim].download_mbps times the speed factor, reported about
every 60 ms like Ollama's ticker; a blob already in the store completes at once), "verifying sha256
digest", "writing manifest", "success". A name the registry does not have fails the way Ollama's
does when the registry answers 404: "pull model manifest: file does not exist". Concurrent pulls of
one blob in this process share a single download.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from launcher.facts.catalog import ModelSpec, find_model
from launcher.facts.names import DEFAULT_HOST, DEFAULT_NAMESPACE, ModelName
from launcher.models.store import Layer, ModelStore
from launcher.sim.clock import Clock
from launcher.sim.registry import Blob, layers_for
from launcher.sim.wire import Items, StreamError

PROGRESS_INTERVAL_WALL_S = 0.06
NOT_FOUND = "pull model manifest: file does not exist"


def registry_spec(name: ModelName) -> ModelSpec | None:
    """The catalog model the simulated registry serves for `name`, if any (library namespace only)."""
    if name.host.lower() != DEFAULT_HOST or name.namespace.lower() != DEFAULT_NAMESPACE:
        return None
    return find_model(f"{name.model}:{name.tag}".lower())


@dataclass
class _Download:
    blob: Blob
    completed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None


class PullManager:
    """Installs catalog models into the store, as `ollama pull` would download them."""

    def __init__(self, store: ModelStore, clock: Clock, *, download_mbps: float) -> None:
        self.store = store
        self.clock = clock
        self.download_bytes_per_s = download_mbps * 1e6
        self._downloads: dict[str, _Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _progress(self, blob: Blob, completed: int) -> dict[str, Any]:
        out: dict[str, Any] = {"status": f"pulling {blob.digest[7:19]}", "digest": blob.digest}
        if blob.declared_size:
            out["total"] = blob.declared_size
        if completed:
            out["completed"] = completed
        return out

    async def _download(self, dl: _Download) -> None:
        try:
            seconds = dl.blob.declared_size / self.download_bytes_per_s
            start = self.clock.now()
            sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
            try:
                while not sleeper.done():
                    await asyncio.wait({sleeper}, timeout=PROGRESS_INTERVAL_WALL_S)
                    elapsed = self.clock.now() - start
                    dl.completed = min(dl.blob.declared_size, int(elapsed * self.download_bytes_per_s))
            finally:
                sleeper.cancel()  # a no-op once it finished; on close it stops the simulated wait too
            await asyncio.to_thread(self.store.write_blob, dl.blob.data)
            dl.completed = dl.blob.declared_size
        except BaseException as e:
            dl.error = e
            raise
        finally:
            dl.done.set()
            self._downloads.pop(dl.blob.digest, None)

    async def _fetch(self, blob: Blob) -> AsyncIterator[dict[str, Any]]:
        path = self.store.blob_path(blob.digest)
        if path.is_file() and path.stat().st_size == len(blob.data):
            yield self._progress(blob, blob.declared_size)
            return
        dl = self._downloads.get(blob.digest)
        if dl is None:
            dl = _Download(blob)
            self._downloads[blob.digest] = dl
            task = asyncio.create_task(self._download(dl), name=f"download-{blob.digest[7:19]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while not dl.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dl.done.wait(), PROGRESS_INTERVAL_WALL_S)
            if not dl.done.is_set():
                yield self._progress(blob, dl.completed)
        if dl.error is not None:
            raise OSError(str(dl.error) or "download failed")
        yield self._progress(blob, blob.declared_size)

    async def pull(self, name: ModelName) -> Items:
        """Pull `name`; yields progress objects, or a StreamError at the point it fails."""
        yield {"status": "pulling manifest"}
        spec = registry_spec(name)
        if spec is None:
            yield StreamError(NOT_FOUND)
            return
        config, layers = layers_for(spec)
        try:
            for blob in (*layers, config):
                async for progress in self._fetch(blob):
                    yield progress
        except OSError as e:
            yield StreamError(str(e))
            return
        yield {"status": "verifying sha256 digest"}
        for blob in (*layers, config):
            data = await asyncio.to_thread(self.store.read_blob, blob.digest)
            if "sha256:" + hashlib.sha256(data).hexdigest() != blob.digest:
                self.store.blob_path(blob.digest).unlink(missing_ok=True)
                yield StreamError(f"digest mismatch, file must be downloaded again: {blob.digest}")
                return
        yield {"status": "writing manifest"}
        previous = self.store.get(name.full)
        manifest_layers = [Layer(b.media_type, b.digest, b.declared_size) for b in layers]
        config_layer = Layer(config.media_type, config.digest, config.declared_size)
        written = await asyncio.to_thread(self.store.write_manifest, name.full, config_layer, manifest_layers)
        if previous is not None and self.store.prune and previous.digests - written.digests:
            yield {"status": "removing unused layers"}
            in_use: set[str] = set()
            for m in self.store.list():
                in_use |= m.digests
            for digest in previous.digests - in_use:
                self.store.blob_path(digest).unlink(missing_ok=True)
        yield {"status": "success"}
