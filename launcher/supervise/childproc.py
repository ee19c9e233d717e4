"""Low-level handling of one backend child process: spawn, relay its output, stop its whole group.

The state machine (launcher/backend_process.py) decides *when*; this module knows *how*:

- every child starts in its own session (so its process group is its own, and Ctrl-C at the
  terminal reaches only the launcher, which then stops the children in order);
- on Linux each child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so a
  launcher killed with SIGKILL cannot leave an `ollama serve` behind. The "parent" for that signal
  is the *thread* that forked: asyncio forks from the event-loop thread, which in `corral up` is the
  main thread and lives as long as the process. (A supervisor on a loop in a worker thread would
  see its backends killed when that thread ends: an early stop, never an orphan.) The orphan
  guard (launcher/supervise/orphan_guard.py) then clears what PDEATHSIG cannot reach: the child's own
  children (Ollama's llama-server runners do not ask for a parent-death signal), which share the
  child's process group;
- stopping is SIGTERM to the group, a wait, SIGKILL to the group, and a reap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from launcher.supervise.orphan_guard import group_alive

log = logging.getLogger("launcher.supervise.supervisor")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TAIL_LINES = 20
_READ_CHUNK_BYTES = 64 * 1024
_GROUP_POLL_S = 0.05

# Backend output worth showing without -v: Ollama's slog levels, Go panics, Python tracebacks.
_LOUD_LINE = re.compile(r"level=(ERROR|WARN)|\b(ERROR|WARNING|CRITICAL|FATAL)\b|^panic:|^Traceback|Error:")


class SpawnError(Exception):
    """The backend could not be started at all (missing binary, not executable, port taken)."""


def pdeathsig_preexec(death_signal: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive `death_signal` when the launcher dies (Linux only).

    libc's prctl is resolved here, in the parent, so the child runs no import or dlopen between
    fork and exec (preexec_fn must not take locks another thread might hold at fork time).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    launcher_pid = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        # The launcher may have died between fork and prctl: then no signal would ever come.
        if os.getppid() != launcher_pid:
            os.kill(os.getpid(), death_signal)

    return preexec


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (checked by binding it ourselves).

    SO_REUSEADDR keeps a socket of a just-stopped backend in TIME_WAIT from counting as "in use";
    Ollama's Go listener sets it too, so it could bind in that case as well. Raises SpawnError when
    nothing could listen there at all (not a local address, a name that does not resolve).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            if e.errno == errno.EADDRNOTAVAIL:
                raise SpawnError(f"cannot listen on {host}:{port}: no such local address") from None
            raise SpawnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return False


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Reports the child's exit as soon as the kernel does.

    `Process.wait()` on Python < 3.12 resolves only once the child's pipes are closed too, and a
    runner the child started keeps them open after the child died; a crash must not wait for that.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


class Child:
    """A started backend process: `proc` for its pipes, `exited` set the moment it exits."""

    def __init__(self, proc: asyncio.subprocess.Process, exited: asyncio.Event) -> None:
        self.proc = proc
        self.exited = exited

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        await self.exited.wait()
        code = self.proc.returncode
        return -1 if code is None else code


async def spawn(argv: Sequence[str], env: dict[str, str], *, cwd: str | None = None) -> Child:
    """Start one backend in its own session with stdout/stderr piped back. Raises SpawnError."""
    if not argv:
        raise SpawnError("empty command")
    loop = asyncio.get_running_loop()
    protocol = _ExitAwareProtocol(_READ_CHUNK_BYTES, loop)
    try:
        transport, _ = await loop.subprocess_exec(
            lambda: protocol,
            *argv,
            env=env,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=pdeathsig_preexec(),
        )
    except FileNotFoundError:
        raise SpawnError(f"cannot start {argv[0]!r}: no such file (is Ollama installed and on PATH?)") from None
    except PermissionError:
        raise SpawnError(f"cannot start {argv[0]!r}: not executable (permission denied)") from None
    except OSError as e:
        raise SpawnError(f"cannot start {argv[0]!r}: {e.strerror or e}") from None
    return Child(asyncio.subprocess.Process(transport, protocol, loop), protocol.exited)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def _group_gone(pgid: int) -> None:
    # The kernel offers no notification for "process group empty" (only for our own child), so poll.
    while group_alive(pgid):  # noqa: ASYNC110
        await asyncio.sleep(_GROUP_POLL_S)


async def stop_group(child: Child, timeout_s: float) -> bool:
    """Stop a child and everything in its process group; returns True when SIGKILL was needed.

    1. SIGTERM to the group (the child and any runners it started);
    2. wait up to `timeout_s` for the child to exit and the group to empty;
    3. SIGKILL to the group;
    4. reap the child, so no zombie stays behind.
    Safe to call when the child already exited (then it only clears the rest of the group).
    """
    pgid = child.pid  # start_new_session made the child its group's leader
    signal_group(pgid, signal.SIGTERM)
    killed = False
    try:
        await asyncio.wait_for(asyncio.gather(child.wait(), _group_gone(pgid)), timeout_s)
    except TimeoutError:
        killed = True
        signal_group(pgid, signal.SIGKILL)
    await child.wait()
    with contextlib.suppress(TimeoutError):
        # A killed group empties at once; the short bound only guards against a member stuck
        # in uninterruptible sleep (a GPU driver call), which no signal can hurry.
        await asyncio.wait_for(_group_gone(pgid), 5.0)
    return killed


class OutputRelay:
    """Drains a child's stdout and stderr (a full pipe would block the child) into the log.

    Lines go to `log_file` when one is given, else to logging as `<id> line` (DEBUG, or WARNING for
    lines that look like errors). The last lines are kept for failure messages.
    """

    def __init__(self, backend_id: str, log_file: IO[bytes] | None = None) -> None:
        self.backend_id = backend_id
        self.log_file = log_file
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, child: Child) -> None:
        self.tail.clear()
        for stream in (child.proc.stdout, child.proc.stderr):
            if stream is not None:
                self._tasks.append(asyncio.create_task(self._pump(stream)))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while True:
            chunk = await stream.read(_READ_CHUNK_BYTES)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw)
        if pending:
            self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        if self.log_file is not None:
            self.log_file.write(raw + b"\n")
            self.log_file.flush()
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line.strip():
            return
        self.tail.append(line)
        loud = bool(_LOUD_LINE.search(line))
        if loud or self.log_file is None:
            log.log(logging.WARNING if loud else logging.DEBUG, "<%s> %s", self.backend_id, line)

    async def drain(self, timeout_s: float = 1.0) -> None:
        """Wait for both pipes to reach EOF (bounded: a grandchild that left the group may hold
        them open), then stop reading."""
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def tail_text(self, lines: int = 8) -> str:
        return " | ".join(list(self.tail)[-lines:])


def open_log_file(log_dir: str, backend_id: str) -> IO[bytes]:
    """Append-mode log file `<log_dir>/<backend id>.log` (the directory is created)."""
    path = Path(os.path.expanduser(log_dir))
    path.mkdir(parents=True, exist_ok=True)
    safe_id = re.sub(r"[^A-Za-z0-9_.+-]", "_", backend_id)
    return (path / f"{safe_id}.log").open("ab")
