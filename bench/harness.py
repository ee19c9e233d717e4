"""Processes the benchmarks start: free ports, waiting for HTTP, `corral gateway` in its own process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from launcher.sim.harness import free_port

__all__ = ["free_port", "gateway_process", "stop", "wait_http"]

ROOT = Path(__file__).resolve().parent.parent


def wait_http(url: str, timeout_s: float = 30.0, *, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; RuntimeError (with the tail of `log`, if given) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{url} did not answer within {timeout_s}s" + (f"; its log ends:\n{tail}" if tail else ""))


@contextlib.contextmanager
def gateway_process(
    workdir: Path,
    backends: list[str],
    *,
    policy: str = "residency",
    queue_size: int = 4096,
    extra_lines: Sequence[str] = (),
    api_keys: Sequence[str] = (),
    name: str = "gateway",
    gateway_lines: Sequence[str] = (),
    root: Path = ROOT,
) -> Iterator[str]:
    """`corral gateway` in its own process over `backends` (URLs, 64 slots each) and any backend
    tables in `extra_lines`, with more `[gateway]` keys from `gateway_lines`, requiring one of
    `api_keys` when given; yields its URL once its first polls have landed. `name` names its
    config, log and pid files in `workdir`. `root`: the checkout whose gateway runs (another
    commit's, for a before/after comparison in one run)."""
    port = free_port()
    config = workdir / f"{name}.toml"
    lines = ["[gateway]", f'listen = "127.0.0.1:{port}"', f'policy = "{policy}"', f"queue_size = {queue_size}"]
    lines += gateway_lines
    for url in backends:
        lines += ["[[gateway.backends]]", f'url = "{url}"', "num_parallel = 64"]
    lines += extra_lines
    config.write_text("\n".join(lines) + "\n")
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    env = dict(os.environ)
    env.pop("CORRAL_API_KEYS", None)
    if api_keys:
        env["CORRAL_API_KEYS"] = ",".join(api_keys)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.commands.cli", "gateway", "--config", str(config)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (workdir / f"{name}.pid").write_text(str(proc.pid))  # for benchmarks that read its CPU time
    try:
        # The ready signal (not "it listens"): at least one backend healthy and ready. The gateway
        # does its first health checks and polls before it listens, so routing already sees what
        # is resident.
        wait_http(f"http://127.0.0.1:{port}/api/corral/ready", log=log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc, signal.SIGTERM, timeout_s=15)
        log.close()


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout_s: float) -> None:
    """Ask a child to stop with `sig`, then SIGKILL it if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
