"""Preload: make each backend's planned models installed and resident before traffic arrives.

For every shared model store (backends with the same store_id see the same OLLAMA_MODELS), the
models any of its backends plan are checked against `GET /api/tags` once, and the missing ones are
pulled once (`POST /api/pull`, streamed, with progress). Then every backend loads its own planned
models with an empty request, which Ollama answers as soon as the model is resident
(`done_reason: "load"`): `/api/generate` with an empty prompt, or `/api/embed` with an empty input
for embedding models (which refuse /api/generate). The request carries the configured keep_alive,
and the planned num_ctx / num_gpu when the plan sets them, so the resident copy is the one the plan
sized.

A failure never raises: it comes back as a `PreloadResult` naming the backend, the model and the
error text. `corral up` then still starts (the backend is ready; the model loads on first use) and
says so loudly; `corral up --strict` makes any failure fatal instead.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp

from launcher.facts.catalog import find_model, normalize_name
from launcher.planner.placement import PlannedModel

PULL_CONCURRENCY = 3
# A pull or load that makes no progress for this long is dead; a slow one is fine (a 40 GB model
# from a network disk takes minutes). Ollama's own stall timeout for loads is 5 minutes.
STALL_TIMEOUT_S = 300.0
CONTROL_TIMEOUT_S = 30.0  # a listing or a /api/show answers at once


@dataclass(frozen=True)
class PreloadTarget:
    """One ready backend and the models the plan put on it."""

    backend_id: str
    url: str
    store_id: str
    models: tuple[PlannedModel, ...]


@dataclass(frozen=True)
class PreloadResult:
    backend_id: str
    model: str
    ok: bool
    pulled: bool = False
    error: str = ""
    seconds: float = 0.0

    def describe(self) -> str:
        if self.ok:
            return f"{self.backend_id}: {self.model} loaded in {self.seconds:.1f}s"
        return f"{self.backend_id}: {self.model} not preloaded: {self.error}"


def keep_alive_json(text: str) -> int | str:
    """The config's keep_alive as the API wants it: the env var accepts integer seconds as a string,
    the API does not (a bare "3600" fails to parse as a duration), so those go as numbers."""
    stripped = text.strip()
    if stripped.lstrip("-").isdigit():
        return int(stripped)
    return stripped


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class ProgressPrinter:
    """Progress for long steps. On a terminal, active pulls share one redrawn status line; in a log
    (not a TTY), each pull prints one line per ~10 %."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._pulls: dict[str, tuple[int, int]] = {}
        self._printed_decile: dict[str, int] = {}
        self._status_shown = False

    def line(self, text: str) -> None:
        self._clear_status()
        print(text, file=self.stream, flush=True)
        self._draw_status()

    def pull_progress(self, model: str, completed: int, total: int) -> None:
        self._pulls[model] = (completed, total)
        if self.tty:
            self._draw_status()
            return
        if total <= 0:
            return
        decile = min(int(completed * 10 / total), 10)
        if decile > self._printed_decile.get(model, 0) and decile < 10:
            self._printed_decile[model] = decile
            self.line(f"  pulling {model}: {decile * 10}% ({_human_bytes(completed)} of {_human_bytes(total)})")

    def pull_done(self, model: str) -> None:
        self._pulls.pop(model, None)
        self._printed_decile.pop(model, None)
        self._draw_status()

    def _clear_status(self) -> None:
        if self.tty and self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False

    def _draw_status(self) -> None:
        if not self.tty or not self._pulls:
            self._clear_status()
            return
        parts = []
        for model, (completed, total) in self._pulls.items():
            pct = 100 * completed / total if total > 0 else 0.0
            filled = int(pct / 5)
            parts.append(f"{model} [{'#' * filled}{'.' * (20 - filled)}] {pct:3.0f}%")
        self.stream.write("\r\x1b[K  pulling " + " | ".join(parts))
        self.stream.flush()
        self._status_shown = True


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text()
    try:
        body = json.loads(text)
    except ValueError:
        return f"HTTP {resp.status}: {text.strip()[:200]}"
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return f"HTTP {resp.status}"


async def installed_models(session: aiohttp.ClientSession, url: str) -> set[str]:
    """Normalized names of the models in the backend's store (GET /api/tags)."""
    async with session.get(url + "/api/tags", timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)) as resp:
        if resp.status != 200:
            raise RuntimeError(await _error_text(resp))
        body = await resp.json(content_type=None)
    return {normalize_name(str(m.get("name") or m.get("model", ""))) for m in body.get("models") or []}


async def pull(session: aiohttp.ClientSession, url: str, model: str, progress: ProgressPrinter) -> None:
    """Pull one model through one backend, streaming progress. Raises RuntimeError with Ollama's text."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=STALL_TIMEOUT_S)
    totals: dict[str, tuple[int, int]] = {}
    try:
        async with session.post(url + "/api/pull", json={"model": model, "stream": True}, timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(await _error_text(resp))
            async for raw in resp.content:
                if not raw.strip():
                    continue
                event = json.loads(raw)
                if "error" in event:
                    raise RuntimeError(str(event["error"]))
                digest = event.get("digest")
                if digest and event.get("total"):
                    totals[digest] = (int(event.get("completed") or 0), int(event["total"]))
                    progress.pull_progress(
                        model, sum(c for c, _ in totals.values()), sum(t for _, t in totals.values())
                    )
                if event.get("status") == "success":
                    return
        raise RuntimeError("the pull stream ended without success")
    finally:
        progress.pull_done(model)


async def _capabilities(session: aiohttp.ClientSession, url: str, model: str) -> set[str]:
    """The model's capabilities from /api/show; the catalog answers when the backend cannot."""
    try:
        async with session.post(
            url + "/api/show", json={"model": model}, timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S)
        ) as resp:
            if resp.status == 200:
                body = await resp.json(content_type=None)
                caps = body.get("capabilities")
                if isinstance(caps, list):
                    return {str(c) for c in caps}
    except (aiohttp.ClientError, TimeoutError, ValueError):
        pass
    spec = find_model(model)
    return {"embedding"} if spec is not None and spec.embedding_only else {"completion"}


async def load(session: aiohttp.ClientSession, url: str, planned: PlannedModel, keep_alive: int | str) -> None:
    """Make one model resident on one backend with an empty request. Raises RuntimeError."""
    options: dict[str, Any] = {}
    if planned.num_ctx > 0:
        options["num_ctx"] = planned.num_ctx
    if planned.num_gpu >= 0:
        options["num_gpu"] = planned.num_gpu
    body: dict[str, Any] = {"model": planned.name, "keep_alive": keep_alive}
    if options:
        body["options"] = options
    caps = await _capabilities(session, url, planned.name)
    if "embedding" in caps and "completion" not in caps:
        path, body = "/api/embed", body | {"input": []}
    else:
        path, body = "/api/generate", body | {"prompt": "", "stream": False}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=STALL_TIMEOUT_S)
    async with session.post(url + path, json=body, timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError(await _error_text(resp))
        await resp.read()


def _failure(exc: BaseException, timeout_s: float) -> str:
    """The error text for a failed request. `timeout_s`: the limit it ran under. aiohttp's read
    timeouts are connection errors too, so timeouts are told apart first: a backend that stops
    answering in the middle of a load is stuck, not unreachable."""
    if isinstance(exc, TimeoutError):
        return f"no answer for {timeout_s:g}s"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return f"backend unreachable ({exc})"
    return str(exc) or type(exc).__name__


async def preload(
    session: aiohttp.ClientSession,
    targets: Sequence[PreloadTarget],
    *,
    keep_alive_for: Callable[[str], str],
    progress: ProgressPrinter,
) -> list[PreloadResult]:
    """Pull what is missing (once per store), then load every target's planned models.

    Loads on one backend run one after another (Ollama loads serially anyway); backends load in
    parallel. Returns one result per (backend, planned model), in target order.
    """
    pull_errors = await _pull_missing(session, targets, progress)

    async def load_all(target: PreloadTarget) -> list[PreloadResult]:
        results = []
        for planned in target.models:
            name = normalize_name(planned.name)
            if name in pull_errors:
                results.append(PreloadResult(target.backend_id, planned.name, False, error=pull_errors[name]))
                continue
            began = time.monotonic()
            progress.line(f"  {target.backend_id}: loading {planned.name} ...")
            try:
                await load(session, target.url, planned, keep_alive_json(keep_alive_for(planned.name)))
            except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as e:
                result = PreloadResult(target.backend_id, planned.name, False, error=_failure(e, STALL_TIMEOUT_S))
            else:
                result = PreloadResult(target.backend_id, planned.name, True, seconds=time.monotonic() - began)
            progress.line(f"  {result.describe()}")
            results.append(result)
        return results

    per_target = await asyncio.gather(*(load_all(t) for t in targets))
    return [r for results in per_target for r in results]


async def _pull_missing(
    session: aiohttp.ClientSession, targets: Sequence[PreloadTarget], progress: ProgressPrinter
) -> dict[str, str]:
    """Pull each store's missing models once; returns {normalized model: error} for the failures."""
    by_store: dict[str, list[PreloadTarget]] = {}
    for target in targets:
        # Backends without a store id cannot be assumed to share anything: each is its own store.
        by_store.setdefault(target.store_id or f"<own>{target.backend_id}", []).append(target)
    errors: dict[str, str] = {}
    limit = asyncio.Semaphore(PULL_CONCURRENCY)

    async def pull_one(url: str, model: str) -> None:
        async with limit:
            began = time.monotonic()
            progress.line(f"  pulling {model} ...")
            try:
                await pull(session, url, model, progress)
            except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as e:
                errors[normalize_name(model)] = f"pull failed: {_failure(e, STALL_TIMEOUT_S)}"
                progress.line(f"  pull of {model} failed: {_failure(e, STALL_TIMEOUT_S)}")
            else:
                progress.line(f"  pulled {model} in {time.monotonic() - began:.1f}s")

    jobs: list[Coroutine[Any, Any, None]] = []
    for store_targets in by_store.values():
        via = store_targets[0]
        wanted: dict[str, str] = {}
        for target in store_targets:
            for planned in target.models:
                wanted.setdefault(normalize_name(planned.name), planned.name)
        try:
            installed = await installed_models(session, via.url)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as e:
            for name in wanted:
                errors[name] = f"cannot list installed models on {via.backend_id}: {_failure(e, CONTROL_TIMEOUT_S)}"
            continue
        jobs.extend(pull_one(via.url, model) for name, model in wanted.items() if name not in installed)
    await asyncio.gather(*jobs)
    return errors
