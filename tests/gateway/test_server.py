"""GatewayServer's lifecycle (drain) and `corral gateway` as a real child process."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.cli import corral_gateway
from tests.support.fakes import FakeOllama, MakeFake, fast_settings, wait_for

START_DEADLINE_S = 30.0


def gateway(*backends: FakeOllama) -> GatewayServer:
    return GatewayServer(fast_settings(*(b.backend() for b in backends)), MemoryStore(), keys=ApiKeys())


async def test_drain_lets_a_running_stream_finish_and_refuses_new_connections(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    hold = asyncio.Event()
    gw = gateway(await fakes(name="g0", hold=hold))
    await gw.start()
    resp = await http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"})
    assert json.loads(await resp.content.readline())["response"] == "tok0 "
    drain = asyncio.create_task(gw.drain(10.0))
    await wait_for(lambda: not gw.accepting)  # the drain stopped the listener
    async with aiohttp.ClientSession() as fresh:  # a new connection, not the kept-alive one
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.get(gw.url + "/api/version")
    assert not drain.done()
    hold.set()
    rest = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
    assert rest[-1]["done"] is True
    assert await asyncio.wait_for(drain, timeout=10) is True
    assert await gw.drain(1.0) is True  # idempotent


async def test_drain_refuses_new_requests_on_kept_alive_connections(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    hold = asyncio.Event()
    gw = gateway(await fakes(name="g0", hold=hold))
    await gw.start()
    async with http.get(gw.url + "/api/version") as resp:  # leaves an idle pooled connection
        assert resp.status == 200
    async with aiohttp.ClientSession() as streaming:
        resp = await streaming.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"})
        await resp.content.readline()
        drain = asyncio.create_task(gw.drain(10.0))
        await wait_for(lambda: not gw.accepting)
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(gw.url + "/api/version")  # the pooled connection, or a new one
        hold.set()
        await resp.read()
        assert await asyncio.wait_for(drain, timeout=10) is True


async def test_drain_timeout_cuts_what_is_left(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0", hold=asyncio.Event())  # released only by the fixture's teardown
    gw = gateway(fake)
    await gw.start()
    resp = await http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"})
    await resp.content.readline()
    assert await gw.drain(0.1) is False
    await asyncio.wait_for(fake.cancelled.wait(), timeout=10)  # the upstream request was cancelled too
    resp.close()


async def test_unload_goes_wherever_the_model_is_loaded(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    a = await fakes(name="a", resident={"llama3.1:8b": 4096})
    b = await fakes(name="b", resident={"llama3.1:8b": 4096})
    c = await fakes(name="c")
    async with gateway(a, b, c) as gw:
        async with http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "keep_alive": 0}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Corral-Backend"] == "a, b"  # every copy, named
        assert len(a.calls("/api/generate")) == 1 and len(b.calls("/api/generate")) == 1
        assert not c.calls("/api/generate")


async def test_an_unload_that_fails_somewhere_says_so(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    failing = await fakes(name="a", resident={"llama3.1:8b": 4096}, fail_status=500)
    fine = await fakes(name="b", resident={"llama3.1:8b": 4096})
    gw = gateway(failing, fine)
    async with gw, http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "keep_alive": 0}) as resp:
        assert resp.status == 500  # the model may still be loaded on "a"
        assert resp.headers["X-Corral-Backend"] == "a, b"  # every copy it acted on
        assert await resp.json() == {"error": "a failing"}
    assert len(fine.calls("/api/generate")) == 1


async def test_a_large_body_reaches_the_backend_intact(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake) as gw:
        payload = {"model": "llama3.1:8b", "prompt": "word " * 600_000, "stream": False}  # ~3 MB
        body = json.dumps(payload).encode()
        async with http.post(
            gw.url + "/api/generate", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 200
    assert fake.calls("/api/generate")[0].body == body


async def test_corral_gateway_runs_alone_and_stops_on_sigterm(
    fakes: MakeFake, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fake = await fakes(name="g0")
    config = str(tmp_path / "none.toml")
    proc = await corral_gateway("--config", config, "--backend", fake.url, "--listen", "127.0.0.1:0")
    try:
        assert proc.stderr is not None
        url = None
        async with asyncio.timeout(START_DEADLINE_S):
            while url is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "corral gateway exited before serving"
                match = re.search(r"serving (http://\S+)", line)
                url = match.group(1) if match else None
        async with http.get(url + "/api/tags") as resp:
            assert [m["name"] for m in (await resp.json())["models"]] == ["llama3.1:8b"]
        async with http.post(url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
            assert resp.headers["X-Corral-Backend"] == fake.url.removeprefix("http://")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=START_DEADLINE_S) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "/nonexistent/corral.toml"], "no such file"),
        (["--config", "/nonexistent/corral.toml", "--backend", "http://127.0.0.1:1", "--listen", "nope"], "listen"),
        (["--config", "/nonexistent/corral.toml", "--backend", "ftp://x"], "gateway.backends[0].url"),
    ],
)
async def test_corral_gateway_config_errors_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    proc = await corral_gateway(*args)
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=START_DEADLINE_S)
    assert proc.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
