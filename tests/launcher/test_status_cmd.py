"""`corral status`: the table and --json from a gateway's status document, and the one-line errors.

The status of a real running rig is checked end to end in tests/launcher/test_up.py; here a small aiohttp
server stands in for the gateway so every answer (401, 404, nothing listening) can be produced."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from launcher.commands import status as status_cmd
from launcher.commands.cli import main
from launcher.sim.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0
GIB = 1024**3

STATUS: dict[str, Any] = {
    "gateway": {
        "version": "0.1.0",
        "listen": "127.0.0.1:11434",
        "policy": "residency",
        "started_at": NOW - 125,
        "uptime_s": 125.0,
        "active_requests": 3,
        "queue_depths": {"llama3.3:70b": 2},
        "queue_size": 256,
    },
    "gpus": {
        "box": [
            {"index": 0, "uuid": "GPU-a", "name": "RTX 4090", "memory_total_bytes": 24 * GIB,
             "memory_used_bytes": 6 * GIB, "memory_free_bytes": 18 * GIB, "backend": "g0"},
            {"index": 1, "uuid": "GPU-b", "name": "RTX 3090", "memory_total_bytes": 24 * GIB,
             "memory_used_bytes": 0, "memory_free_bytes": 24 * GIB, "backend": "g1"},
        ]
    },
    "backends": [
        {"id": "g0", "url": "http://127.0.0.1:11500", "state": "ready", "healthy": True, "started_at": NOW - 3700,
         "restarts": 1, "gpu_names": ["RTX 4090"], "last_error": "exited unexpectedly with status 2",
         "in_flight": {"llama3.1:8b": 3}, "queued": {},
         "resident": [{"name": "llama3.1:8b", "size_vram_bytes": 6 * GIB, "context_length": 4096,
                       "expires_at": NOW + 1800}]},
        {"id": "g1", "url": "http://127.0.0.1:11501", "state": "failed", "healthy": False, "started_at": 0,
         "restarts": 4, "gpu_names": ["RTX 3090"], "last_error": "exited unexpectedly with status 1: panic: CUDA",
         "in_flight": {}, "queued": {}, "resident": []},
    ],
}  # fmt: skip


def test_table_shows_gpus_backends_residency_and_problems() -> None:
    text = status_cmd.render(STATUS, "http://127.0.0.1:11434", now=NOW)
    lines = text.splitlines()
    assert lines[0].startswith("gateway http://127.0.0.1:11434  corral 0.1.0  policy residency  up 2m05s")
    assert "active requests 3" in lines[0] and "queued 2 (llama3.3:70b 2)" in lines[0]
    gpu0 = next(line for line in lines if "RTX 4090" in line and "GPU" not in line and "g0" in line and "GiB" in line)
    assert "6.0 / 24.0 GiB" in gpu0 and "25%" in gpu0 and "18.0 GiB" in gpu0
    g0 = next(line for line in lines if line.startswith("  g0 ") and "http" in line)
    for cell in ("ready", "1h01m", "http://127.0.0.1:11500", "3 (llama3.1:8b 3)"):
        assert cell in g0
    resident = lines[lines.index("Resident models") + 2]
    assert resident.split() == ["g0", "llama3.1:8b", "6.0", "GiB", "4096", "30m00s"]
    g1 = next(line for line in lines if line.startswith("  g1 ") and "http" in line)
    assert "failed" in g1 and " 4 " in g1
    assert (
        lines[-1] == "  g1: exited unexpectedly with status 1: panic: CUDA"
    )  # a ready backend's old error is not a problem


def test_empty_fleet_says_so() -> None:
    text = status_cmd.render({"gateway": {}, "gpus": {}, "backends": []}, "http://x")
    assert "GPUs\n  (none reported)" in text and "Backends\n  (none)" in text
    assert "Resident models\n  (none)" in text


async def fake_gateway(require_key: str = "") -> TestServer:
    async def handler(request: web.Request) -> web.Response:
        if require_key and request.headers.get("Authorization") != f"Bearer {require_key}":
            return web.json_response({"error": "missing or invalid API key"}, status=401)
        return web.json_response(STATUS)

    app = web.Application()
    app.router.add_get("/api/corral/status", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def run_status(*argv: str) -> int:
    # corral status is synchronous (urllib); run it off the loop that serves the fake gateway.
    return await asyncio.to_thread(main, ["status", *argv])


async def test_json_prints_the_gateways_document(capsys: pytest.CaptureFixture[str]) -> None:
    server = await fake_gateway()
    try:
        assert await run_status("--url", f"127.0.0.1:{server.port}", "--json") == 0
    finally:
        await server.close()
    assert json.loads(capsys.readouterr().out) == STATUS


async def test_api_key_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await fake_gateway(require_key="sk-test")
    try:
        assert await run_status("--url", f"http://127.0.0.1:{server.port}") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refused the request (401: missing or invalid API key)" in err[0]
        assert "CORRAL_API_KEY" in err[0]
        monkeypatch.setenv("CORRAL_API_KEY", "sk-test")
        assert await run_status("--url", f"http://127.0.0.1:{server.port}") == 0
        assert "Backends" in capsys.readouterr().out
    finally:
        await server.close()


def test_no_gateway_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["status", "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(f"corral status: no corral gateway at http://127.0.0.1:{port} (")
    assert err[0].endswith("is `corral up` running?")


def test_url_defaults_to_the_configs_listen_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "rig.toml"
    config.write_text('[gateway]\nlisten = "0.0.0.0:12345"\n')
    args = argparse.Namespace(url=None, config=str(config))
    assert status_cmd.gateway_url(args) == "http://127.0.0.1:12345"
    args = argparse.Namespace(url="http://gw.example:80/", config=str(config))
    assert status_cmd.gateway_url(args) == "http://gw.example:80"
    monkeypatch.chdir(tmp_path)  # no config.toml here: Ollama's usual address
    assert status_cmd.gateway_url(argparse.Namespace(url=None, config="config.toml")) == "http://127.0.0.1:11434"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[bad", "corral status: http://[bad is not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:12x", "corral status: http://127.0.0.1:12x is not a valid URL (nonnumeric port: '12x')"),
    ],
)
def test_a_malformed_url_is_one_line_and_exit_1(url: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", url]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [expected]


async def test_a_server_that_does_not_speak_http_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await run_status("--url", f"127.0.0.1:{port}") == 1
    finally:
        server.close()
        await server.wait_closed()
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"corral status: http://127.0.0.1:{port} did not answer HTTP (")
    assert err.endswith("is it a corral gateway?")


def test_corral_status_loads_only_its_own_command() -> None:
    # `corral status` is what people run in a loop: it must not pay for (or break on) importing
    # the launcher, the gateway and their dependencies.
    script = (
        "import sys; from launcher.commands.cli import main; main(['status', '--url', 'http://127.0.0.1:1']); "
        "print(sorted(m for m in ('launcher.commands.up', 'launcher.commands.plan', 'launcher.commands.gateway', "
        "'aiohttp') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    assert "no corral gateway at http://127.0.0.1:1" in proc.stderr
