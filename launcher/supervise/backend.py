"""One supervised backend: its state machine and the single owner task that drives it.

States (`State`), after llama-swap's process states:

    stopped -> starting -> ready -> stopping -> stopped
                  |          | crash                ^
                  |          v                      |
                  |       backoff -> starting ...   | stop()
                  v
                failed   (the first start did not succeed: nothing is retried)

Only the owner task changes the state; `start()` and `stop()` ask it and wait. A backend that
was ready once is restarted after every crash, with capped exponential backoff and jitter, and
the backoff resets once a run has lasted `stable_after_s`. A backend whose *first* start fails
(missing binary, port taken, exits at once, never healthy) goes to `failed` with the reason: the
operator has a configuration problem to fix, and retrying would only hide it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import IO

import aiohttp

from launcher.config import LauncherSettings
from launcher.planner.placement import PlannedBackend
from launcher.supervise.childproc import (
    Child,
    OutputRelay,
    SpawnError,
    open_log_file,
    port_in_use,
    signal_group,
    spawn,
    stop_group,
)
from launcher.supervise.env import http_url

log = logging.getLogger("launcher.supervise.supervisor")

HEALTH_PATH = "/api/version"
HEALTH_REQUEST_TIMEOUT_S = 2.0
_FIRST_POLL_S = 0.02
_MAX_POLL_S = 0.5


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"  # exited unexpectedly; waiting to restart
    STOPPING = "stopping"
    FAILED = "failed"  # the first start failed; not retried


@dataclass(frozen=True)
class Timing:
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    stable_after_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: LauncherSettings) -> Timing:
        return cls(
            start_timeout_s=settings.start_timeout_s,
            stop_timeout_s=settings.stop_timeout_s,
            restart_backoff_s=settings.restart_backoff_s,
            restart_backoff_max_s=settings.restart_backoff_max_s,
            stable_after_s=settings.stable_after_s,
        )


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random, jitter: float = 0.2) -> float:
    """Seconds to wait before restart number `attempt` (1-based): `base * 2**(attempt-1)` capped at
    `cap`, then shortened by up to `jitter` (so backends that crashed together do not restart in
    lockstep, and the cap is never exceeded)."""
    exponent = min(max(attempt, 1) - 1, 62)  # large attempt counts must not overflow the float
    raw_s = min(cap_s, base_s * 2.0**exponent)
    return raw_s * (1.0 - jitter * rng.random())


@dataclass(frozen=True)
class BackendLaunch:
    """How to run one planned backend: the command, its environment, where it listens."""

    planned: PlannedBackend
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    host: str = "127.0.0.1"
    log_dir: str = ""  # empty: output is relayed through logging

    @property
    def id(self) -> str:
        return self.planned.id

    @property
    def port(self) -> int:
        return self.planned.port

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)


class BackendStartError(Exception):
    """A backend that could not be started; `str()` names the backend and says why."""

    def __init__(self, backend_id: str, reason: str) -> None:
        self.backend_id = backend_id
        self.reason = reason
        super().__init__(f"backend {backend_id}: {reason}")


class _StartFailed(Exception):
    pass


StateCallback = Callable[["BackendProcess", State], Awaitable[None]]


class BackendProcess:
    """One backend process under supervision. Methods are called from the event loop's thread."""

    def __init__(
        self,
        launch: BackendLaunch,
        timing: Timing,
        session: aiohttp.ClientSession,
        *,
        on_change: StateCallback | None = None,
        on_spawn: Callable[[int], Awaitable[None]] | None = None,
        on_exit: Callable[[int], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.launch = launch
        self.timing = timing
        self.state = State.STOPPED
        self.history: collections.deque[State] = collections.deque([State.STOPPED], maxlen=200)
        self.restarts = 0
        self.last_error = ""
        self.started_at = 0.0  # epoch seconds the current process became ready
        self.pid: int | None = None
        self.version = ""
        self._session = session
        self._on_change = on_change
        self._on_spawn = on_spawn
        self._on_exit = on_exit
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self._settled = asyncio.Event()  # set once the first start has succeeded, failed or been stopped
        self._changed = asyncio.Condition()
        self._proc: Child | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_file: IO[bytes] | None = None
        self._relay = OutputRelay(launch.id)

    @property
    def id(self) -> str:
        return self.launch.id

    def __repr__(self) -> str:
        return f"<BackendProcess {self.id} {self.state} pid={self.pid}>"

    async def start(self) -> None:
        """Start the owner task and wait until the backend is ready (or has failed).

        Raises BackendStartError when the first start fails; the backend is then `failed` and no
        process of it is left running. Calling start() on a running backend only waits.
        """
        if self._task is None:
            if self.launch.log_dir:
                try:
                    self._log_file = open_log_file(self.launch.log_dir, self.id)
                except OSError as e:
                    self.last_error = f"cannot open its log file in {self.launch.log_dir}: {e.strerror or e}"
                    await self._set(State.FAILED)
                    raise BackendStartError(self.id, self.last_error) from None
                self._relay.log_file = self._log_file
            self._task = asyncio.create_task(self._own(), name=f"backend-{self.id}")
        settled = asyncio.ensure_future(self._settled.wait())
        try:
            await asyncio.wait({settled, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            settled.cancel()
        if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
            raise RuntimeError(f"backend {self.id}: supervision failed") from self._task.exception()
        if self.state == State.FAILED:
            raise BackendStartError(self.id, self.last_error)

    async def stop(self) -> None:
        """Stop the backend for good: SIGTERM to its group, SIGKILL after stop_timeout_s, reap.

        Blocks until no process of this backend is left. Idempotent.
        """
        self._stop.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Block until `predicate()` holds, checked now and after every state change or spawn
        (raises TimeoutError after timeout_s)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)

    async def _set(self, state: State) -> None:
        if state == self.state:
            return
        self.state = state
        self.history.append(state)
        if state in (State.READY, State.FAILED, State.STOPPED):
            self._settled.set()
        await self._notify()
        if self._on_change is not None:
            try:
                await self._on_change(self, state)
            except Exception:  # publishing must never take supervision down
                log.exception("<%s> state-change hook failed", self.id)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _own(self) -> None:
        attempt = 0
        ever_ready = False
        try:
            while not self._stop.is_set():
                await self._set(State.STARTING)
                try:
                    proc = await self._start_once()
                except _StartFailed as e:
                    if self._stop.is_set():
                        break
                    self.last_error = str(e)
                    # A first start's failure is raised to the caller of start(), who reports it.
                    log.log(logging.ERROR if ever_ready else logging.DEBUG, "<%s> %s", self.id, self.last_error)
                    if not ever_ready:
                        await self._set(State.FAILED)
                        return
                else:
                    ever_ready = True
                    ready_at = time.monotonic()
                    if await self._run_until_exit(proc):
                        break  # stop() was called; the finally clause stops the process
                    if time.monotonic() - ready_at >= self.timing.stable_after_s:
                        attempt = 0
                if self._stop.is_set():
                    break
                attempt += 1
                delay_s = backoff_delay(
                    attempt, self.timing.restart_backoff_s, self.timing.restart_backoff_max_s, self._rng
                )
                log.warning("<%s> restarting in %.1fs (attempt %d)", self.id, delay_s, attempt)
                await self._set(State.BACKOFF)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay_s)
                if self._stop.is_set():
                    break
                self.restarts += 1
        except asyncio.CancelledError:
            # Cancelled without stop() (the loop is shutting down): no time to be graceful, but
            # the group must not outlive us.
            if self._proc is not None:
                signal_group(self._proc.pid, signal.SIGKILL)
            raise
        finally:
            if not self._is_cancelling():
                await self._stop_process()
                if self.state != State.FAILED:
                    await self._set(State.STOPPED)

    def _is_cancelling(self) -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _start_once(self) -> Child:
        """Spawn and health-gate one process. Raises _StartFailed with a reason; leaves nothing running."""
        launch = self.launch
        try:
            if port_in_use(launch.host, launch.port):
                raise _StartFailed(
                    f"port {launch.port} on {launch.host} is already in use (another ollama serve? "
                    f"`ss -ltnp 'sport = :{launch.port}'` shows who); pick a free range with [launcher].base_port"
                )
            proc = await spawn(launch.argv, dict(launch.env))
        except SpawnError as e:
            raise _StartFailed(str(e)) from None
        self._proc = proc
        self.pid = proc.pid
        await self._notify()  # wait_for() callers may be watching for the pid
        self._relay.attach(proc)
        if self._on_spawn is not None:
            await self._on_spawn(proc.pid)
        log.debug("<%s> started pid %d on %s", self.id, proc.pid, launch.url)
        log.debug("<%s> command: %s", self.id, " ".join(launch.argv))
        began = time.monotonic()
        try:
            self.version = await self._wait_healthy(proc)
        except _StartFailed:
            await self._stop_process()
            raise
        self.started_at = time.time()
        log.info("<%s> ready after %.1fs (pid %d)", self.id, time.monotonic() - began, proc.pid)
        return proc

    async def _wait_healthy(self, proc: Child) -> str:
        """Poll the health endpoint until it answers 200; fail fast when the child exits first."""
        deadline = time.monotonic() + self.timing.start_timeout_s
        url = self.launch.url + HEALTH_PATH
        poll_s = _FIRST_POLL_S
        exited = asyncio.ensure_future(proc.exited.wait())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                if exited.done():
                    await self._stop_process()  # clears what it left in its group, then drains its output
                    tail = self._relay.tail_text()
                    raise _StartFailed(
                        f"exited with status {proc.returncode} before it was ready" + (f": {tail}" if tail else "")
                    )
                if stopping.done():
                    raise _StartFailed("stopped while starting")
                version = await self._probe(url)
                if version is not None:
                    return version
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    tail = self._relay.tail_text(4)
                    raise _StartFailed(
                        f"not healthy after {self.timing.start_timeout_s:g}s (GET {url} never answered)"
                        + (f"; last output: {tail}" if tail else "")
                    )
                await asyncio.wait({exited, stopping}, timeout=min(poll_s, remaining_s))
                poll_s = min(poll_s * 2, _MAX_POLL_S)
        finally:
            for fut in (exited, stopping):
                if not fut.done():
                    fut.cancel()

    async def _probe(self, url: str) -> str | None:
        """The backend's version when it answers GET /api/version with 200, else None."""
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_TIMEOUT_S)
            async with self._session.get(url, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    return ""
                return str(body.get("version", "")) if isinstance(body, dict) else ""
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _run_until_exit(self, proc: Child) -> bool:
        """Mark ready and wait; True when stop() ended the wait, False when the process exited."""
        await self._set(State.READY)
        exited = asyncio.ensure_future(proc.exited.wait())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (exited, stopping):
                if not fut.done():
                    fut.cancel()
        if self._stop.is_set() and proc.returncode is None:
            return True
        code = proc.returncode
        # Runners the dead backend started may still hold VRAM (and its output pipes): clear its
        # group before reading the last lines and restarting.
        await self._stop_process()
        tail = self._relay.tail_text()
        self.last_error = f"exited unexpectedly with status {code}" + (f": {tail}" if tail else "")
        log.error("<%s> %s", self.id, self.last_error)
        return self._stop.is_set()

    async def _stop_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            await self._set(State.STOPPING)
            log.info("<%s> stopping pid %d", self.id, proc.pid)
        killed = await stop_group(proc, self.timing.stop_timeout_s)
        if killed:
            log.warning("<%s> did not stop within %gs of SIGTERM; killed", self.id, self.timing.stop_timeout_s)
        await self._relay.drain()
        if self._on_exit is not None:
            await self._on_exit(proc.pid)
        self._proc = None
        self.pid = None
