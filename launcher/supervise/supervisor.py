"""Backend supervision: one owner task per `ollama serve` (real or simulated), records published.

`Supervisor` runs one `BackendProcess` (launcher/backend_process.py: the state machine) per planned
backend, starts them in parallel, health-gated, and publishes each backend's `BackendRecord` into
the state store on every state change, so the gateway routes around a backend that is down and
takes it back when it is ready again. It also runs the orphan guard (launcher/supervise/orphan_guard.py), so
that not even a SIGKILL of the launcher leaves a backend or one of its runners behind.

    async with Supervisor(launches, timing, store=store, host_name=hostname) as sup:
        failures = await sup.start_all()
        ...
    # leaving the block stops every backend (SIGTERM to its group, SIGKILL after stop_timeout_s)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from gateway.record import BackendRecord, BackendState
from gateway.state.health import StoreHealth, reraise_if_cancelled
from gateway.state.store import StateStore
from launcher.facts.ollama import context_length_env
from launcher.supervise.backend import (
    BackendLaunch,
    BackendProcess,
    BackendStartError,
    State,
    Timing,
    backoff_delay,
)
from launcher.supervise.env import http_url

__all__ = [
    "BackendLaunch",
    "BackendProcess",
    "BackendStartError",
    "OrphanGuard",
    "State",
    "Supervisor",
    "Timing",
    "backoff_delay",
    "record_state",
]

log = logging.getLogger("launcher.supervise.supervisor")

_RECORD_STATE: dict[State, BackendState] = {
    State.STOPPED: BackendState.FAILED,
    State.STARTING: BackendState.STARTING,
    State.READY: BackendState.READY,
    State.BACKOFF: BackendState.FAILED,
    State.STOPPING: BackendState.DRAINING,
    State.FAILED: BackendState.FAILED,
}


def record_state(state: State) -> BackendState:
    """The gateway-facing state of a supervised backend: only `ready` receives requests."""
    return _RECORD_STATE[state]


# The orphan guard's whole environment (it kills process groups; it needs no key, no CUDA).
GUARD_ENV_VARS: frozenset[str] = frozenset(
    {"PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ"}
)


# How often the heartbeat asks the store whether it restarted (one cheap call).
STORE_WATCH_S = 1.0


class OrphanGuard:
    """Client side of launcher/supervise/orphan_guard.py: tells the guard process which groups to clear."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "launcher.supervise.orphan_guard",
            repr(self.grace_s),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            # Its own session: a signal to the launcher's process group must not take the guard too.
            start_new_session=True,
            # Only what a Python interpreter needs: the guard has no use for the launcher's keys.
            env={k: v for k, v in os.environ.items() if k in GUARD_ENV_VARS},
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None or self._proc.returncode is not None:
            return
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.warning("the orphan guard exited; backends rely on the parent-death signal alone")

    async def watch(self, pgid: int) -> None:
        await self._send(f"+{pgid}")

    async def forget(self, pgid: int) -> None:
        await self._send(f"-{pgid}")

    async def close(self) -> None:
        """Close the pipe (the guard then clears what is still registered, normally nothing) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.wait_closed()
        try:
            await asyncio.wait_for(proc.wait(), self.grace_s + 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def url_host(listen_host: str) -> str:
    """The host to put in a backend's URL: a wildcard listen address is reached by hostname."""
    if listen_host in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return listen_host


RestartHook = Callable[[BackendProcess], Coroutine[Any, Any, None]]


class Supervisor:
    """Supervises a rig's backends and publishes their records. Use as an async context manager."""

    def __init__(
        self,
        launches: Sequence[BackendLaunch],
        timing: Timing,
        *,
        store: StateStore | None = None,
        host_name: str | None = None,
        store_id: str = "",
        record_ttl_s: float | None = None,
        on_restart_ready: RestartHook | None = None,
        rng: random.Random | None = None,
        orphan_guard: bool = True,
        record_prefix: str = "",
    ) -> None:
        """`store_id` marks backends that share one model store (`<hostname>:<models_dir>`);
        `record_ttl_s` makes records expire unless heartbeated (for shared stores such as Redis);
        `on_restart_ready` runs (in the background) each time a backend is ready again after a
        crash, e.g. to preload its planned models again. `record_prefix` goes before each backend
        id in its record: planned ids ("g0") are unique on one host only, so launchers on several
        hosts sharing one store publish "<host>/g0"."""
        self.timing = timing
        self.store = store
        self.host_name = host_name or socket.gethostname()
        self.store_id = store_id
        self.record_ttl_s = record_ttl_s
        self.record_prefix = record_prefix
        self._launches = tuple(launches)
        self._on_restart_ready = on_restart_ready
        self._rng = rng or random.Random()
        self._guard = OrphanGuard(timing.stop_timeout_s) if orphan_guard else None
        self._session: aiohttp.ClientSession | None = None
        self._processes: dict[str, BackendProcess] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self.store_health = StoreHealth("launcher")
        # While True, ready backends are published as "starting": `corral up` serves at once but
        # sends no model call to a backend before its planned models are pulled and preloaded
        # (the gateway queues them as "starting"). end_warming() publishes them ready.
        self.warming = False

    @property
    def processes(self) -> list[BackendProcess]:
        return list(self._processes.values())

    def __getitem__(self, backend_id: str) -> BackendProcess:
        return self._processes[backend_id]

    @property
    def guard_pid(self) -> int | None:
        return self._guard.pid if self._guard else None

    async def __aenter__(self) -> Supervisor:
        # Health probes go to loopback backends: never through an HTTP(S)_PROXY from the environment.
        self._session = aiohttp.ClientSession(trust_env=False)
        if self._guard is not None:
            await self._guard.start()
        for launch in self._launches:
            self._processes[launch.id] = BackendProcess(
                launch,
                self.timing,
                self._session,
                on_change=self._changed,
                on_spawn=self._guard.watch if self._guard else None,
                on_exit=self._guard.forget if self._guard else None,
                rng=self._rng,
            )
        if self.record_ttl_s is not None:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(self.record_ttl_s))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start_all(self) -> list[BackendStartError]:
        """Start every backend in parallel and wait until each is ready or has failed.

        Returns the failures (an empty list when all are ready); failed backends leave no process.
        """
        results = await asyncio.gather(*(p.start() for p in self._processes.values()), return_exceptions=True)
        failures: list[BackendStartError] = []
        for result in results:
            if isinstance(result, BackendStartError):
                failures.append(result)
            elif isinstance(result, BaseException):
                raise result
        return failures

    async def stop_all(self) -> None:
        """Stop every backend in parallel; returns when none of their processes is left."""
        await asyncio.gather(*(p.stop() for p in self._processes.values()))

    async def close(self) -> None:
        """Stop all backends, withdraw their records, stop the guard. Idempotent."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.stop_all()
        if self.store is not None:
            for backend_id in self._processes:
                try:
                    await self.store.remove_backend(self.record_prefix + backend_id)
                except Exception:
                    log.exception("<%s> could not withdraw the backend record", backend_id)
        if self._guard is not None:
            await self._guard.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def record(self, proc: BackendProcess) -> BackendRecord:
        """The gateway's view of one supervised backend, as of now."""
        planned = proc.launch.planned
        return BackendRecord(
            id=self.record_prefix + planned.id,
            url=http_url(url_host(proc.launch.host), proc.launch.port),
            host=self.host_name,
            gpu_uuids=planned.gpu_uuids,
            gpu_names=planned.gpu_names,
            kind=planned.kind,
            num_parallel=planned.num_parallel,
            max_loaded_models=planned.max_loaded_models,
            vram_total_bytes=planned.vram_total_bytes,
            speed=planned.speed,
            planned_models=planned.model_names,
            planned_num_ctx=tuple(m.num_ctx for m in planned.models),
            store_id=self.store_id,
            default_num_ctx=context_length_env(proc.launch.env),
            state=BackendState.STARTING if self.warming and proc.state == State.READY else record_state(proc.state),
            updated_at=time.time(),
            started_at=proc.started_at if proc.state == State.READY else 0.0,
            restarts=proc.restarts,
            last_error=proc.last_error,
        )

    async def end_warming(self) -> None:
        """Publish the ready backends as ready (see `warming`)."""
        self.warming = False
        await self._publish_all()

    def records(self) -> list[BackendRecord]:
        return [self.record(p) for p in self._processes.values()]

    async def publish(self, proc: BackendProcess) -> None:
        if self.store is None:
            return
        if proc.state == State.STOPPED:
            # Stopped on purpose: the backend is gone, not broken.
            await self.store.remove_backend(self.record_prefix + proc.id)
            return
        await self.store.put_backend(self.record(proc), ttl_s=self.record_ttl_s)

    async def _changed(self, proc: BackendProcess, state: State) -> None:
        try:
            await self.publish(proc)
        except Exception as e:  # the heartbeat publishes it once the store is back
            self.store_health.failed(e)
        if state == State.READY and proc.restarts and self._on_restart_ready is not None:
            task = asyncio.create_task(self._on_restart_ready(proc))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _heartbeat_loop(self, ttl_s: float) -> None:
        """Re-publish every record each ttl/3, and at once when the store comes back from an outage
        or restarted empty (its generation changed): gateways keep a vanished record only for a
        grace period, so the fleet must be back in the store well within it. One warning per
        outage (StoreHealth), not one per record per beat."""
        assert self.store is not None
        beat_s = max(ttl_s / 3.0, 0.05)
        tick_s = min(beat_s, STORE_WATCH_S)
        generation: str | None = None
        next_beat = time.monotonic() + beat_s
        while True:
            await asyncio.sleep(tick_s)
            try:
                current = await self.store.generation()
            except Exception as e:
                reraise_if_cancelled()  # close() waits for this loop to end
                self.store_health.failed(e)
                continue
            recovered = self.store_health.succeeded()
            restarted = generation is not None and current != generation
            generation = current
            if not (recovered or restarted or time.monotonic() >= next_beat):
                continue
            next_beat = time.monotonic() + beat_s
            if restarted:
                log.info("state store restarted: re-publishing %d backend records", len(self._processes))
            await self._publish_all()

    async def _publish_all(self) -> None:
        for proc in self._processes.values():
            if proc.state == State.STOPPED:
                continue
            try:
                await self.publish(proc)
            except Exception as e:
                reraise_if_cancelled()
                self.store_health.failed(e)
                return

