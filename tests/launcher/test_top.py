"""`corral top`: `--once` prints one frame as text, from a real gateway over fake backends; the
frame shows the GPUs, backends, models, traffic, decisions and warnings of the status document.
The live mode's `q` is driven in a real terminal (a pty)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from launcher.commands import top
from launcher.commands.cli import main
from launcher.facts.cards import find_card
from launcher.facts.gpuinfo import GpuInfo, PublishedGpu
from tests.support.fakes import MakeFake, fast_settings

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3


def gpu_row(index: int, backend: str, used_gib: float, planned_gib: float) -> PublishedGpu:
    """A card as the launcher publishes it (launcher.gpus.publish.gpu_rows), with NVML's sensors."""
    card = find_card("RTX 4090")
    assert card is not None
    used = int(used_gib * GIB)
    gpu = GpuInfo(
        index, f"GPU-test-{index}", "RTX 4090", 24 * GIB, 24 * GIB - used, used, card,
        temperature_c=64, power_w=301.5, utilization_pct=87,
    )  # fmt: skip
    return PublishedGpu(gpu, backend, int(planned_gib * GIB))


def run_once(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["top", "--once", *argv])
    return code, out.getvalue(), err.getvalue()


async def test_once_prints_gpus_backends_models_traffic_and_decisions(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    g0 = await fakes(name="g0", resident={"llama3.1:8b": 8192})
    g1 = await fakes(name="g1", healthy=False)  # failing its health checks: down
    store = MemoryStore()
    await store.put_gpus("box", [gpu_row(0, "g0", 6.5, 9.0), gpu_row(1, "g1", 0, 9.0)])
    settings = fast_settings(g0.backend(vram_gb=24, num_parallel=4), g1.backend(vram_gb=24))
    async with GatewayServer(settings, store, keys=ApiKeys()) as gw:
        for _ in range(3):
            async with http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
                assert resp.status == 200
                await resp.read()
        code, text, err = await asyncio.to_thread(run_once, "--url", gw.url)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].startswith(f"corral top {gw.url}") and "policy residency" in lines[0]
    # A warning line for the backend that is down, before the tables.
    assert any(line.startswith("! backend g1 is down") for line in lines)
    gpu0 = next(line for line in lines if "GPU" not in line and " g0 " in line and "RTX 4090" in line)
    assert "6.5 / 24.0" in gpu0 and "87%" in gpu0 and "64°C" in gpu0 and "█" in gpu0 and "▒" in gpu0
    g0_line = next(line for line in lines if line.lstrip("│ ").startswith("g0 "))
    for cell in ("ready", "llama3.1:8b", "resident", "8192", "0/4"):
        assert cell in g0_line
    assert "down" in next(line for line in lines if line.lstrip("│ ").startswith("g1 "))
    traffic = lines[next(i for i, line in enumerate(lines) if line.startswith("Models (last"))]
    assert traffic
    (model_line,) = [line for line in lines if line.lstrip("│ ").startswith("llama3.1:8b") and "ms" in line]
    assert model_line.rstrip(" │").endswith("0/3")  # three answered, none failed
    sends = [line for line in lines if "resident_free_slot" in line]
    assert len(sends) == 3 and all(" send " in line and " g0 " in line for line in sends)


def test_once_without_a_gateway_is_one_line_and_status_1() -> None:
    with socket_closed_port() as port:
        code, text, err = run_once("--url", f"http://127.0.0.1:{port}")
    assert code == 1 and text == ""
    assert err.startswith("corral top: no corral gateway at") and err.count("\n") == 1


@contextlib.contextmanager
def socket_closed_port() -> Any:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def test_frame_of_an_empty_document_still_renders() -> None:
    console = top.Console(width=120, record=True, file=io.StringIO())
    console.print(top.frame({}, "http://x"))  # type: ignore[typeddict-item]
    text = console.export_text()
    assert "GPUs" in text and "Backends" in text and "Routing decisions" in text


async def test_live_mode_redraws_and_q_quits(fakes: MakeFake) -> None:
    fake = await fakes(name="g0")
    async with GatewayServer(fast_settings(fake.backend()), MemoryStore(), keys=ApiKeys()) as gw:
        code, screen = await asyncio.to_thread(_top_in_a_terminal, gw.url)
    assert "g0" in screen and "Backends" in screen
    assert code == 0


def _top_in_a_terminal(url: str) -> tuple[int, str]:
    """Run `corral top` on a pseudo-terminal, wait for a frame naming g0, press q."""
    leader, follower = pty.openpty()
    env = dict(os.environ) | {"COLUMNS": "160", "LINES": "50", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.commands.cli", "top", "--url", url, "--interval", "0.2"],
        stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, env=env, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    screen = b""
    try:
        deadline = time.monotonic() + 60
        while b"g0" not in screen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                with contextlib.suppress(OSError):
                    screen += os.read(leader, 65536)
        os.write(leader, b"q")
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return code, screen.decode(errors="replace")


def test_help_names_the_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "launcher.commands.cli", "top", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "--once" in out.stdout and "--json" not in out.stdout
