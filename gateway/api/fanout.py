"""Fan-out plumbing for fleet-wide calls: choosing one backend per model store, calling several
backends at once, and merging several progress streams (pull, create) into one.

Backends with the same non-empty `store_id` share one model store: a pull, copy, delete or blob
upload through one of them is seen by all, so the gateway does it once per distinct store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.api.errors import error_text
from gateway.fleet.pool import BackendPool
from gateway.record import BackendState
from gateway.routing.snapshot import BackendView


def routable(pool: BackendPool) -> list[BackendView]:
    """Backends that take requests now: healthy and ready, in id order (from a fresh snapshot)."""
    views = pool.snapshot().backends
    return sorted((v for v in views if v.healthy and v.record.state == BackendState.READY), key=lambda v: v.id)


def store_key(backend: BackendView) -> str:
    return backend.record.store_id or f"backend:{backend.record.id}"


def one_per_store(backends: Sequence[BackendView]) -> list[BackendView]:
    """The first backend of each distinct model store."""
    seen: set[str] = set()
    chosen = []
    for b in backends:
        key = store_key(b)
        if key not in seen:
            seen.add(key)
            chosen.append(b)
    return chosen


@dataclass
class Reply:
    """A complete (small) reply from one backend; `status` None when it could not be reached."""

    backend_id: str
    status: int | None
    body: bytes = b""
    content_type: str = "application/json"
    error: str = ""

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def error_text(self) -> str:
        return self.error if self.status is None else error_text(self.body, self.status)


async def call(
    session: aiohttp.ClientSession,
    backend: BackendView,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    client_timeout: aiohttp.ClientTimeout,
) -> Reply:
    """One request with a small reply, read whole. Never raises for network errors."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        async with session.request(
            method, backend.record.url + path, data=body, headers=headers, timeout=client_timeout
        ) as resp:
            raw = await resp.read()
            return Reply(backend.record.id, resp.status, raw, resp.headers.get("Content-Type", "application/json"))
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return Reply(backend.record.id, None, error=f"backend {backend.record.id}: {type(e).__name__}: {e}")


async def call_all(
    session: aiohttp.ClientSession,
    backends: Sequence[BackendView],
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    client_timeout: aiohttp.ClientTimeout,
) -> list[Reply]:
    return list(
        await asyncio.gather(*(call(session, b, method, path, body, client_timeout=client_timeout) for b in backends))
    )


# ---------------------------------------------------------------------------------------------
# Merged progress


@dataclass
class ProgressMerger:
    """Folds several backends' ProgressResponse lines into one stream.

    Per-layer lines (with a digest) become one line whose total and completed are the sums over the
    backends downloading that layer; other statuses ("pulling manifest", "writing manifest", ...)
    are passed on the first time any backend reports them. "success" and errors are held back:
    the merged stream ends with one "success" when every backend succeeded, else one error line
    naming the backends that failed.
    """

    backend_ids: Sequence[str]
    layers: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    statuses_sent: set[str] = field(default_factory=set)
    succeeded: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)

    def feed(self, backend_id: str, line: dict[str, Any]) -> dict[str, Any] | None:
        """Take one line from one backend; returns the merged line to send, if any."""
        if "error" in line:
            self.errors[backend_id] = str(line["error"])
            return None
        status = str(line.get("status", ""))
        digest = line.get("digest")
        if isinstance(digest, str) and digest:
            per_backend = self.layers.setdefault(digest, {})
            per_backend[backend_id] = (_int(line.get("total")), _int(line.get("completed")))
            merged: dict[str, Any] = {"status": status, "digest": digest}
            total = sum(t for t, _ in per_backend.values())
            completed = sum(c for _, c in per_backend.values())
            if total:
                merged["total"] = total
            if completed:
                merged["completed"] = completed
            return merged
        if status == "success":
            self.succeeded.add(backend_id)
            return None
        if status and status not in self.statuses_sent:
            self.statuses_sent.add(status)
            return {"status": status}
        return None

    def fail(self, backend_id: str, message: str) -> None:
        self.errors[backend_id] = message

    def finish(self, backend_id: str) -> None:
        """The backend's stream ended; without success or error it ended too early."""
        if backend_id not in self.succeeded and backend_id not in self.errors:
            self.errors[backend_id] = "stream ended before success"

    def final(self) -> dict[str, Any]:
        if self.errors:
            parts = [f"{b}: {m}" for b, m in sorted(self.errors.items())]
            if len(self.backend_ids) == 1:
                return {"error": next(iter(self.errors.values()))}
            return {"error": "; ".join(parts)}
        return {"status": "success"}


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


async def ndjson_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of an NDJSON (or single JSON) reply, as they arrive."""
    buffer = b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            value = _parse(line)
            if value is not None:
                yield value
    value = _parse(buffer)
    if value is not None:
        yield value


def _parse(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
