"""`corral gateway --workers N`: N gateway processes on one address, and the supervisor that keeps them.

    parent (supervisor)          reserves the port, starts N workers, restarts one that dies
      worker 1/N ... worker N/N  each a full GatewayServer on its own SO_REUSEPORT listener

The kernel spreads new connections over the workers' listeners. The workers share their routing
state (backend records, in-flight counts, slot reservations) through the Redis store, which is why
workers > 1 needs `state = "redis"`; health checks, polls and queues are per worker. Counters and
histograms are kept in per-process files in a directory the parent makes (PROMETHEUS_MULTIPROC_DIR),
so whichever worker answers a scrape reports every worker's totals (gateway/metrics.py).

The parent holds a socket bound to the address with SO_REUSEPORT that never listens: the kernel
hands it no connection, but it keeps the port (port 0 becomes one real port every worker binds, and
a worker restarting finds its port still there). Workers are fresh interpreters started with
`python -m launcher.commands.gateway_workers` (no loop or threads forked from the parent); each
reads its `WorkerSpec` from stdin and writes "ready" on stdout once it listens.

Stop: SIGINT/SIGTERM to the parent becomes SIGTERM to every worker; each drains like a single
gateway (`drain_timeout_s`) and the parent exits once all have exited. Workers ignore SIGINT, so
Ctrl-C at a terminal takes that one path too. A worker that dies on its own is restarted with
capped exponential backoff (reset after a stable run); one that fails its very first start ends
the whole command (status 1), since its siblings would fail the same way. Each worker asks the
kernel for SIGTERM when the parent dies (PR_SET_PDEATHSIG), so a supervisor killed with SIGKILL
leaves workers that drain and exit, never ones that serve on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from prometheus_client import multiprocess

from gateway.api.auth import check_listen_allowed, load_keys
from gateway.config import GatewaySettings
from gateway.metrics import MULTIPROC_DIR_ENV
from gateway.server import GatewayServer, socket_address
from gateway.tls import server_ssl_context
from launcher.commands.cli import setup_logging
from launcher.commands.gateway import open_store_or_say
from launcher.facts.ollama import host_port
from launcher.facts.strictconf import ConfigError
from launcher.signals import on_stop_signals
from launcher.supervise.backend import backoff_delay
from launcher.supervise.childproc import pdeathsig_preexec

# By name: a worker runs this module as __main__.
log = logging.getLogger("launcher.commands.gateway_workers")

READY_LINE = b"ready\n"
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A worker that ran this long before dying starts its backoff over.
STABLE_AFTER_S = 60.0
# After a worker's own drain timeout, how long it may take to close before it is killed.
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs, sent to it on stdin (pickled: parent and child are one
    program, and the settings are a frozen dataclass already checked by the parent)."""

    settings: GatewaySettings
    index: int  # 1-based
    count: int
    port: int  # the real port, even when the config says 0
    verbosity: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


class WorkerStartFailed(Exception):
    """A worker exited before it first listened."""


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT that never listens (so the kernel routes no
    connection to it). Raises OSError when the address cannot be bound."""
    family, address = socket_address(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # The options GatewayServer's listeners get from socket.create_server: sockets that
        # disagree on them could not share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def served_url(settings: GatewaySettings, port: int) -> str:
    host = settings.listen_host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"{'https' if settings.tls else 'http'}://{host_port(host, port)}"


class Supervisor:
    """Runs `count` workers until `stop` is set; one owner task per worker."""

    def __init__(self, settings: GatewaySettings, port: int, verbosity: int, *, metrics_dir: str = "") -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        # The workers' environment: theirs is the parent's, plus where to keep metric values.
        self._env = {**os.environ, MULTIPROC_DIR_ENV: metrics_dir} if metrics_dir else None
        self.port = port
        self.verbosity = verbosity
        self.count = settings.workers
        # What a worker runs; it reads a WorkerSpec on stdin and writes READY_LINE once it listens.
        self.worker_argv: tuple[str, ...] = (sys.executable, "-m", "launcher.commands.gateway_workers")
        self._rng = random.Random()
        # Resolved here, in the parent: the child runs no import between fork and exec.
        self._preexec = pdeathsig_preexec(signal.SIGTERM)
        self._ready: set[int] = set()
        self.all_ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> int:
        """0 once every worker stopped after `stop`; 1 when a worker failed its first start (the
        others are stopped first)."""
        owners = [asyncio.create_task(self._own(i, stop), name=f"gateway-worker-{i}") for i in self._indexes()]
        code = 0
        for owner in asyncio.as_completed(owners):
            try:
                await owner
            except WorkerStartFailed as e:
                print(f"corral gateway: {e}; stopping the other workers", file=sys.stderr)
                code = 1
                stop.set()
            except OSError as e:  # not even started (no fork, no interpreter)
                print(f"corral gateway: cannot start a worker: {e}; stopping the others", file=sys.stderr)
                code = 1
                stop.set()
        return code

    def _indexes(self) -> range:
        return range(1, self.count + 1)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        spec = WorkerSpec(self.settings, index, self.count, self.port, self.verbosity)
        proc = await asyncio.create_subprocess_exec(
            *self.worker_argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=self._preexec,
            env=self._env,
        )
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(spec))
        with contextlib.suppress(ConnectionError):  # it died at once: its exit says the rest
            await proc.stdin.drain()
        proc.stdin.close()
        log.info("gateway worker %s started (pid %d)", spec.label, proc.pid)
        return proc

    async def _own(self, index: int, stop: asyncio.Event) -> None:
        label = f"{index}/{self.count}"
        attempt = 0
        first = True
        while not stop.is_set():
            proc = await self._spawn(index)
            started_at = time.monotonic()
            ready = await _first_of(_read_ready(proc), stop)
            if ready:
                self._ready.add(index)
                if len(self._ready) == self.count:
                    self.all_ready.set()
                await _first_of(proc.wait(), stop)
            if stop.is_set():
                await self._stop(proc, label)
                return
            code = await proc.wait()  # it exited on its own (or is about to, its stdout closed)
            self._forget_metrics(proc.pid)
            if first and not ready:
                raise WorkerStartFailed(f"worker {label} exited with {_exit_text(code)} before listening")
            first = False
            if time.monotonic() - started_at >= STABLE_AFTER_S:
                attempt = 0
            attempt += 1
            delay_s = backoff_delay(attempt, RESTART_BACKOFF_S, RESTART_BACKOFF_MAX_S, self._rng)
            log.warning(
                "gateway worker %s (pid %d) exited with %s; restarting in %.1fs",
                label,
                proc.pid,
                _exit_text(code),
                delay_s,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_s)

    def _forget_metrics(self, pid: int) -> None:
        """A dead worker's live gauges go (its counters stay: they are part of the totals)."""
        if self.metrics_dir:
            multiprocess.mark_process_dead(pid, self.metrics_dir)

    async def _stop(self, proc: asyncio.subprocess.Process, label: str) -> None:
        """SIGTERM (the worker drains), then SIGKILL if it outlives its drain by STOP_GRACE_S."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.drain_timeout_s + STOP_GRACE_S)
        except TimeoutError:
            log.warning("gateway worker %s (pid %d) did not stop; killing it", label, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _read_ready(proc: asyncio.subprocess.Process) -> bool:
    """True once the worker says it listens; False when its stdout closed first (it died)."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        if line == READY_LINE:
            return True
    return False


async def _first_of(work: Coroutine[Any, Any, object], stop: asyncio.Event) -> bool:
    """`work`'s result as a bool, unless `stop` is set first: then work is cancelled, and False."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    return bool(task.result())


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def check_before_spawning(settings: GatewaySettings) -> None:
    """What every worker would refuse, refused once here: ConfigError for the keys, an open
    non-loopback address or the TLS files."""
    keys = load_keys(settings, os.environ)
    check_listen_allowed(settings.listen_host, keys)
    server_ssl_context(settings)


async def _supervise(settings: GatewaySettings, verbosity: int) -> int:
    store = await open_store_or_say(settings)
    if store is None:
        return 1
    await store.close()  # only checked: each worker opens its own
    try:
        reserved = reserve_port(settings.listen_host, settings.listen_port)
    except OSError as e:
        print(f"corral: cannot listen on {settings.listen}: {e.strerror or e}", file=sys.stderr)
        return 1
    # prometheus_client's per-process files: any worker's /metrics sums them (gateway/metrics.py).
    metrics_dir = tempfile.TemporaryDirectory(prefix="corral-metrics-")
    with reserved, metrics_dir:
        port = int(reserved.getsockname()[1])
        supervisor = Supervisor(settings, port, verbosity, metrics_dir=metrics_dir.name)
        stop = asyncio.Event()

        def on_signal(_sig: signal.Signals) -> None:
            if not stop.is_set():
                print("corral gateway: draining every worker", file=sys.stderr)
            stop.set()

        with on_stop_signals(on_signal):
            announce = asyncio.create_task(_announce(supervisor, settings, port, stop))
            try:
                return await supervisor.run(stop)
            finally:
                announce.cancel()


async def _announce(supervisor: Supervisor, settings: GatewaySettings, port: int, stop: asyncio.Event) -> None:
    if await _first_of(supervisor.all_ready.wait(), stop):
        backends = ", ".join(b.url for b in settings.backends) or "registered by launchers"
        print(
            f"corral gateway: serving {served_url(settings, port)} with {settings.workers} workers "
            f"(policy {settings.policy}; backends: {backends})",
            file=sys.stderr,
        )


def workers_warning(settings: GatewaySettings) -> str | None:
    """The line `corral up` prints when `[gateway] workers` asks for more than one process: the
    same config file may serve `corral gateway` elsewhere, so it is not refused."""
    if settings.workers <= 1:
        return None
    return (
        f"warning: [gateway] workers = {settings.workers} applies to `corral gateway` only; "
        "corral up runs one gateway, in its own process"
    )


def run_workers(settings: GatewaySettings, verbosity: int) -> int:
    """`corral gateway` with settings.workers > 1: the supervisor. ConfigError before anything
    starts; 1 when the store, the address or a worker's first start fails."""
    check_before_spawning(settings)
    return asyncio.run(_supervise(settings, verbosity))


# -- the worker process ----------------------------------------------------------------------------


async def _serve_worker(spec: WorkerSpec) -> int:
    settings = spec.settings
    store = await open_store_or_say(settings, f"corral gateway worker {spec.label}")
    if store is None:
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with GatewayServer(settings, store, port=spec.port, worker=spec.label) as server:
            _say_ready()
            await stop.wait()
            log.info("gateway worker %s draining", spec.label)
            await server.drain()
    except OSError as e:
        reason = e.strerror or e
        print(f"corral gateway worker {spec.label}: cannot listen on port {spec.port}: {reason}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"corral gateway worker {spec.label}: {e}", file=sys.stderr)
        return 2
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        await store.close()
    return 0


def _say_ready() -> None:
    """Tell the supervisor, then point stdout at /dev/null: the supervisor reads no further, and a
    stray print must neither block on a full pipe nor keep it open."""
    sys.stdout.flush()
    os.write(1, READY_LINE)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def worker_main() -> int:
    # Ctrl-C reaches the whole process group; the supervisor answers it with SIGTERM to each
    # worker, so one signal path stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    setup_logging(spec.verbosity)
    return asyncio.run(_serve_worker(spec))


if __name__ == "__main__":
    sys.exit(worker_main())
