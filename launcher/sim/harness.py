"""Run `corral-sim serve` as a real child process in tests.

    from launcher.sim.harness import SimServer

    def test_something(tmp_path):
        with SimServer.start(tmp_path, gpus=["RTX 4090"], speed=200) as sim:
            sim.pull("llama3.1:8b")                     # fast: the simulated download runs at `speed`
            client = ollama.Client(host=sim.url)

    async def test_async(tmp_path):
        async with SimServer.start(tmp_path, gpus=["RTX 4090", "RTX 3090"]) as sim:
            ...

`start` writes a rig file (the `[sim]` section) into `tmp_path`, starts the child on a free port
(OLLAMA_HOST=127.0.0.1:0; the child logs the port it bound), waits until `GET /` answers (failing
fast with the child's log if it exits), and `stop` (or leaving the `with`) sends SIGTERM, then
SIGKILL. Several servers may share one `models_dir`, as the backends of a rig share one store.
`install_models(models_dir, ...)` fills a store directly, without any server, for tests that only
need models present. Benchmarks use the same harness (and `free_port`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from launcher.facts.catalog import find_model
from launcher.models.store import Layer, ModelStore
from launcher.sim.registry import layers_for

_LISTENING = re.compile(r"Listening on (\S+):(\d+) ")
_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_rig(path: Path, gpus: Sequence[str | Mapping[str, Any]], **sim: Any) -> Path:
    """Write a TOML file with a `[sim]` section: `gpus` are card names or tables ({"name", "vram_gb", ...})."""
    lines = ["[sim]"]
    for key, value in sim.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for gpu in gpus:
        lines.append("[[sim.gpus]]")
        entry = {"name": gpu} if isinstance(gpu, str) else dict(gpu)
        for key, value in entry.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def install_models(models_dir: Path, *names: str) -> None:
    """Install catalog models into a store directly (what a finished `pull` leaves), no server needed."""
    store = ModelStore(models_dir)
    for name in names:
        spec = find_model(name)
        if spec is None:
            raise ValueError(f"{name!r} is not in the catalog")
        config, layers = layers_for(spec)
        for blob in (*layers, config):
            store.write_blob(blob.data)
        store.write_manifest(
            name,
            Layer(config.media_type, config.digest, config.declared_size),
            [Layer(b.media_type, b.digest, b.declared_size) for b in layers],
        )


class SimError(AssertionError):
    """The simulated server did not start or answered unexpectedly."""


class SimServer:
    """One `corral-sim serve` child process. Use `SimServer.start(...)` as a (async) context manager."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, models_dir: Path, rig_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.models_dir = models_dir
        self.rig_path = rig_path
        self.host = "127.0.0.1"
        self.port = 0

    # -- starting and stopping ------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        *,
        gpus: Sequence[str | Mapping[str, Any]] = ("RTX 4090",),
        env: Mapping[str, str] | None = None,
        speed: float = 200.0,
        models_dir: Path | None = None,
        name: str = "sim",
        sim: Mapping[str, Any] | None = None,
        startup_timeout_s: float = 20.0,
    ) -> SimServer:
        """Start a server over simulated `gpus` and wait until it answers. Raises SimError.

        `env` adds or overrides environment variables (OLLAMA_NUM_PARALLEL, CUDA_VISIBLE_DEVICES, ...;
        a value of None is not allowed, use "" where CUDA's empty value is meant). `sim` adds keys to
        the rig's [sim] section (load_gbps, download_mbps, host_mem_gb, ...). `name` keeps the files of
        several servers in one `tmp_path` apart.
        """
        tmp_path.mkdir(parents=True, exist_ok=True)
        rig_path = write_rig(tmp_path / f"{name}-rig.toml", gpus, **dict(sim or {}))
        models = models_dir or tmp_path / "models"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CUDA_", "CORRAL_"))}
        child_env |= {
            "OLLAMA_HOST": "127.0.0.1:0",
            "OLLAMA_MODELS": str(models),
            "CORRAL_SIM_RIG": str(rig_path),
            "CORRAL_SIM_SPEED": str(speed),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH", "")])),
        }
        child_env |= dict(env or {})
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "launcher.sim.cli", "serve"],
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        server = cls(process, log_path, models, rig_path)
        try:
            server._wait_ready(startup_timeout_s)
        except BaseException:
            server.kill()
            raise
        return server

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimError(f"corral-sim exited with {self.process.returncode}:\n{self.log()}")
            match = _LISTENING.search(self.log())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                with contextlib.suppress(OSError):
                    if self.request("GET", "/")[0] == 200:
                        return
            time.sleep(0.02)
        raise SimError(f"corral-sim did not answer within {timeout_s}s:\n{self.log()}")

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the child now (a crashed backend)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- facts ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the child wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- small synchronous client ---------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request: (status, headers, body). `body` is JSON-encoded unless it is bytes."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        """A request whose 2xx reply is JSON; raises SimError with the reply otherwise."""
        status, _headers, raw = self.request(method, path, body)
        if not 200 <= status < 300:
            raise SimError(f"{method} {path} -> {status}: {raw.decode(errors='replace')}")
        return json.loads(raw) if raw else None

    def pull(self, name: str) -> None:
        """Install `name` through the server's own /api/pull (not streamed). Raises SimError."""
        reply = self.json("POST", "/api/pull", {"model": name, "stream": False})
        if reply != {"status": "success"}:
            raise SimError(f"pull {name}: {reply}")

    def ps(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/api/ps")["models"])

    def gpus(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/corral-sim/gpus")["gpus"])

    def wait_for(self, predicate: Any, *, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
        """Poll `predicate(self)` until it returns something truthy; that value. Raises SimError."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise SimError(f"condition not met within {timeout_s}s; log:\n{self.log()[-2000:]}")
            time.sleep(interval_s)
