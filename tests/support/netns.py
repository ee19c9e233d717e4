"""Hosts as Linux network namespaces for tests: `ip netns` + veth pairs, processes started inside
them, and a cleanup that always ends those processes and deletes the namespaces.

    with NetnsLab(tmp_path) as lab:
        front, a = lab.host("front"), lab.host("a")
        lab.link(front, "198.18.1.1", a, "198.18.1.2")        # a /24 veth pair between two hosts
        proc = lab.spawn(a, ["redis-server", ...], hostname="gpu-a")
        lab.run(front, ["curl", ...])

Only the namespaces made here carry the traffic: no interface is added to the caller's namespace
and no route leads out, so nothing can reach any other address. Needs root; `NetnsLab.unavailable()`
says why not (for a skip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

STOP_WAIT_S = 20.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class NetnsLab:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.token = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._links = 0

    @staticmethod
    def unavailable() -> str:
        """Why namespaces cannot be made here ("" when they can)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        probe = f"corral-probe-{uuid.uuid4().hex[:6]}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip() or made.returncode}"
        _ip("netns", "del", probe, check=False)
        return ""

    # -- topology --------------------------------------------------------------------------------

    def host(self, name: str) -> str:
        """A new namespace with its loopback up; returns its name."""
        ns = f"corral-{self.token}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
        """A veth pair made directly inside the two namespaces, addressed as one /24."""
        self._links += 1
        end_a, end_b = f"cr{self.token}a{self._links}", f"cr{self.token}b{self._links}"
        _ip("link", "add", end_a, "netns", ns_a, "type", "veth", "peer", "name", end_b, "netns", ns_b)
        for ns, end, addr in ((ns_a, end_a, addr_a), (ns_b, end_b, addr_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", end)
            _ip("-n", ns, "link", "set", end, "up")

    # -- processes -------------------------------------------------------------------------------

    def spawn(
        self, ns: str, argv: Sequence[str], *, hostname: str | None = None, log_name: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `ns` (with its own hostname when given, as a separate host has), its
        output to a log file. The Popen's pid is the program's own: ip, unshare and sh exec it."""
        command = ["ip", "netns", "exec", ns]
        if hostname:
            script = 'hostname "$0" && exec "$@"'
            command += ["unshare", "--uts", "sh", "-c", script, hostname]
        command += list(argv)
        log = self.log_path(log_name or f"{ns}-{len(self.procs)}")
        with log.open("ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def log_path(self, name: str) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self.workdir / f"{name}.log"

    def run(self, ns: str, argv: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout_s, check=False
        )

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout_s: float = STOP_WAIT_S) -> None:
        """SIGCONT (it may be stopped), SIGTERM, wait, then SIGKILL: always reaped."""
        if proc.poll() is not None:
            return
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- cleanup ---------------------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        # Anything still inside our namespaces was started by us (a backend whose launcher was
        # killed, say): end it by pid before the namespaces go.
        deadline = time.monotonic() + STOP_WAIT_S
        for ns in self.namespaces:
            while time.monotonic() < deadline:
                pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
