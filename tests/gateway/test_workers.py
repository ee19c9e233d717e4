"""`corral gateway --workers N`: real worker processes on one SO_REUSEPORT port, sharing a real Redis.

Each test runs the command as a child over in-process fake backends, with a private redis-server
(tests/support/redisproc.py): the gateway's keys use the store's fixed "corral:" prefix, which the
shared Redis at 127.0.0.1:6379 may hold for other gateways on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import GatewaySettings
from launcher.commands.gateway_workers import Supervisor, workers_warning
from tests.support.cli import corral_gateway
from tests.support.fakes import FakeOllama, MakeFake, wait_for
from tests.support.redisproc import RedisProcess

DEVNULL = asyncio.subprocess.DEVNULL  # the supervisor prints on stderr only
DEADLINE_S = 30.0
GENERATE = {"model": "llama3.1:8b", "prompt": "hi"}


@pytest.fixture
def redis_url(own_redis: RedisProcess) -> str:
    return own_redis.url


class Workers:
    """`corral gateway` as a child; its stderr lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._more = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._more:
                self.lines.append(line.decode().rstrip("\n"))
                self._more.notify_all()
        async with self._more:
            self.lines.append("")  # EOF
            self._more.notify_all()

    async def line(self, pattern: str, *, after: int = 0, timeout_s: float = DEADLINE_S) -> re.Match[str]:
        """The first stderr line from index `after` on that matches `pattern` (waiting for it)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout_s), self._more:
            index = after
            while True:
                while index < len(self.lines):
                    if match := regex.search(self.lines[index]):
                        return match
                    if self.lines[index] == "" and index == len(self.lines) - 1 and self._reader.done():
                        raise AssertionError(f"exited without {pattern!r}:\n" + "\n".join(self.lines))
                    index += 1
                await self._more.wait()

    def pids(self) -> dict[str, int]:
        """Worker label -> the pid most recently started for it."""
        found: dict[str, int] = {}
        for text in self.lines:
            if match := re.search(r"gateway worker (\d+/\d+) started \(pid (\d+)\)", text):
                found[match.group(1)] = int(match.group(2))
        return found

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), DEADLINE_S)
        await asyncio.wait_for(self._reader, DEADLINE_S)
        return code


def config(tmp_path: Path, redis_url: str, *backends: str, extra: str = "") -> Path:
    lines = [
        "[gateway]",
        'listen = "127.0.0.1:0"',  # one free port, shared by every worker
        'state = "redis"',
        f'redis_url = "{redis_url}"',
        "poll_interval_s = 0.05",
        "health_interval_s = 0.1",
        "queue_timeout_s = 30",
        "drain_timeout_s = 10",
        extra,
    ]
    for url in backends:
        lines += ["[[gateway.backends]]", f'url = "{url}"', "num_parallel = 1"]
    path = tmp_path / "corral.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def workers(path: Path, count: int = 2) -> AsyncIterator[tuple[Workers, str]]:
    """The running command and its URL (once every worker listens); SIGKILLed if still running
    when the block ends, with its workers."""
    gw = Workers(await corral_gateway("--config", str(path), "--workers", str(count), stdout=DEVNULL))
    try:
        url = (await gw.line(r"serving (http://\S+) with \d+ workers")).group(1)
        yield gw, url
    finally:
        if gw.proc.returncode is None:
            for pid in gw.pids().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            gw.proc.kill()
            await gw.proc.wait()
        if not gw._reader.done():
            gw._reader.cancel()


async def status_of(url: str) -> dict[str, Any]:
    """The status document's gateway part, over a connection of its own (so the kernel picks the
    worker afresh)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(url + "/api/corral/status") as resp,
    ):
        assert resp.status == 200
        doc: dict[str, Any] = (await resp.json())["gateway"]
        return doc


async def every_worker(url: str, count: int = 2, tries: int = 200) -> dict[str, dict[str, Any]]:
    """One status document from each worker: fresh connections until every label has answered."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        doc = await status_of(url)
        seen[doc["worker"]] = doc
        if len(seen) == count:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered {tries} connections")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def until_gone(pids: list[int]) -> None:
    await wait_for(lambda: not any(alive(p) for p in pids), DEADLINE_S, interval_s=0.05)


async def test_workers_share_one_port_and_each_answers_as_itself(
    fakes: MakeFake, tmp_path: Path, redis_url: str
) -> None:
    fake = await fakes(name="g0")
    async with workers(config(tmp_path, redis_url, fake.url)) as (gw, url):
        docs = await every_worker(url)
        pids = gw.pids()
        assert sorted(docs) == ["1/2", "2/2"]
        # Separate processes, none of them the supervisor, each the one the supervisor started.
        assert {label: doc["pid"] for label, doc in docs.items()} == pids
        assert gw.proc.pid not in pids.values()
        assert all(doc["listen"] == url.removeprefix("http://") for doc in docs.values())
        for label in ("1/2", "2/2"):
            await gw.line(rf"gateway worker {label} listening on {re.escape(url)}")
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/api/generate", json=GENERATE) as resp:
                assert resp.status == 200
                assert resp.headers["X-Corral-Backend"] == fake.url.removeprefix("http://")
            async with http.get(url + "/metrics") as resp:  # one worker's own registry
                info = re.findall(r'^corral_gateway_worker_info\{worker="(\d/2)"\} 1\.0$', await resp.text(), re.M)
            assert len(info) == 1 and info[0] in docs
        assert await gw.stop() == 0


def requests_counted(metrics_text: str) -> float:
    """corral_requests_total summed over its label sets, from a scrape's text."""
    return sum(float(m.group(1)) for m in re.finditer(r"^corral_requests_total\{[^}]*\} (\S+)$", metrics_text, re.M))


async def test_every_scrape_reads_the_totals_of_all_workers(fakes: MakeFake, tmp_path: Path, redis_url: str) -> None:
    # A scrape through the shared port reaches whichever worker the kernel picks: its counters must
    # be the fleet's totals, not that worker's share, or rate() would jump from scrape to scrape.
    fake = await fakes(name="g0")
    async with workers(config(tmp_path, redis_url, fake.url)) as (gw, url):
        await every_worker(url)  # both listen
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(12):  # fresh connections: spread over the workers as the kernel likes
                async with http.post(url + "/api/generate", json={**GENERATE, "stream": False}) as resp:
                    assert resp.status == 200
            answered: set[str] = set()
            for _ in range(200):
                async with http.get(url + "/metrics") as resp:
                    text = await resp.text()
                worker = re.findall(r'^corral_gateway_worker_info\{worker="(\d/2)"\} 1\.0$', text, re.M)
                assert len(worker) == 1  # the one that answered, not every worker's
                assert requests_counted(text) == 12, text
                answered.add(worker[0])
                if len(answered) == 2:
                    break
        assert answered == {"1/2", "2/2"}
        assert await gw.stop() == 0


async def test_a_backend_slot_is_shared_by_every_worker(fakes: MakeFake, tmp_path: Path, redis_url: str) -> None:
    # One slot (num_parallel = 1) and a first answer held open: every other request, whichever
    # worker it reached, must wait for that slot rather than reach the backend beside it.
    hold = asyncio.Event()
    fake: FakeOllama = await fakes(name="g0", hold=hold, chunk_delay_s=0.02)
    async with workers(config(tmp_path, redis_url, fake.url)) as (gw, url), contextlib.AsyncExitStack() as stack:

        async def generate() -> list[str]:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            )
            async with session.post(url + "/api/generate", json=GENERATE) as resp:
                assert resp.status == 200, await resp.text()
                return [line.decode() async for line in resp.content if line.strip()]

        requests: list[asyncio.Task[list[str]]] = []
        busy: dict[str, dict[str, Any]] = {}
        # Requests on fresh connections until both workers hold some (the kernel spreads them).
        while len(requests) < 16:
            requests.append(asyncio.create_task(generate()))
            await asyncio.sleep(0.1)
            busy = await every_worker(url)
            if all(doc["active_requests"] > 0 for doc in busy.values()):
                break
        assert all(doc["active_requests"] > 0 for doc in busy.values()), busy
        assert fake.active == 1
        hold.set()
        async with asyncio.timeout(DEADLINE_S):
            replies = await asyncio.gather(*requests)
        assert all(len(lines) == fake.chunks + 1 and '"done": true' in lines[-1] for lines in replies)
        assert fake.max_active == 1
        assert len(fake.calls("/api/generate")) == len(requests)
        assert await gw.stop() == 0


async def test_sigterm_drains_every_worker_then_all_exit(fakes: MakeFake, tmp_path: Path, redis_url: str) -> None:
    hold = asyncio.Event()
    fake = await fakes(name="g0", hold=hold)
    async with workers(config(tmp_path, redis_url, fake.url)) as (gw, url), aiohttp.ClientSession() as http:
        pids = list(gw.pids().values())
        resp = await http.post(url + "/api/generate", json=GENERATE)
        first = await resp.content.readline()
        assert b"tok0" in first
        mark = len(gw.lines)
        gw.proc.send_signal(signal.SIGTERM)
        await gw.line("draining every worker", after=mark)
        for label in ("1/2", "2/2"):
            await gw.line(rf"gateway worker {label} draining", after=mark)
        assert gw.proc.returncode is None  # the stream in progress holds one worker's drain
        hold.set()
        rest = [line async for line in resp.content if line.strip()]
        assert b'"done": true' in rest[-1]
        resp.release()
        assert await gw.stop() == 0
        await until_gone(pids)


async def test_a_worker_that_dies_is_restarted(fakes: MakeFake, tmp_path: Path, redis_url: str) -> None:
    fake = await fakes(name="g0")
    async with workers(config(tmp_path, redis_url, fake.url)) as (gw, url):
        old = gw.pids()["1/2"]
        mark = len(gw.lines)
        os.kill(old, signal.SIGKILL)
        await gw.line(rf"gateway worker 1/2 \(pid {old}\) exited with signal SIGKILL; restarting", after=mark)
        await gw.line(r"gateway worker 1/2 started", after=mark)
        new = gw.pids()["1/2"]
        assert new != old
        await gw.line(r"gateway worker 1/2 listening", after=mark)
        assert (await every_worker(url))["1/2"]["pid"] == new
        pids = list(gw.pids().values())
        assert await gw.stop() == 0
        await until_gone(pids)


async def test_workers_do_not_outlive_a_killed_supervisor(fakes: MakeFake, tmp_path: Path, redis_url: str) -> None:
    fake = await fakes(name="g0")
    async with workers(config(tmp_path, redis_url, fake.url)) as (gw, _url):
        pids = list(gw.pids().values())
        assert len(pids) == 2
        gw.proc.kill()
        await asyncio.wait_for(gw.proc.wait(), DEADLINE_S)
        await until_gone(pids)  # PR_SET_PDEATHSIG: each got SIGTERM, drained (nothing running), exited


async def test_a_taken_address_ends_the_command(fakes: MakeFake, tmp_path: Path, redis_url: str) -> None:
    fake = await fakes(name="g0")
    # A listener without SO_REUSEPORT: no worker could share its port, so none is started.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = config(tmp_path, redis_url, fake.url)
        path.write_text(path.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'))
        proc = await corral_gateway("--config", str(path), "--workers", "2", stdout=DEVNULL)
        _, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode == 1
    expected = f"corral: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert stderr.decode().strip().splitlines() == [expected]


# A stand-in worker: worker 1 fails at once, worker 2 comes up and waits to be stopped.
FIRST_FAILS = """
import os, pickle, sys, time
spec = pickle.load(sys.stdin.buffer)
if spec.index == 1:
    sys.exit(3)
os.write(1, b"ready\\n")
time.sleep(60)
"""


async def test_a_worker_that_fails_its_first_start_stops_the_others_and_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    supervisor = Supervisor(GatewaySettings(state="redis", workers=2), port=1, verbosity=0)
    supervisor.worker_argv = (sys.executable, "-c", FIRST_FAILS)
    stop = asyncio.Event()
    assert await asyncio.wait_for(supervisor.run(stop), DEADLINE_S) == 1
    assert stop.is_set()
    err = capsys.readouterr().err
    assert "corral gateway: worker 1/2 exited with status 3 before listening; stopping the other workers" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--workers", "0"], "gateway.workers: must be >= 1, got 0"),
        (["--workers", "65"], "gateway.workers: must be <= 64, got 65"),
        (["--workers", "2"], 'gateway.workers: workers = 2 needs state = "redis"'),
    ],
)
async def test_bad_worker_counts_are_config_errors(args: list[str], expected: str) -> None:
    proc = await corral_gateway(
        "--config", "/nonexistent/corral.toml", "--backend", "http://127.0.0.1:1", *args, stdout=DEVNULL
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_corral_up_says_once_that_workers_are_for_corral_gateway() -> None:
    assert workers_warning(GatewaySettings()) is None
    line = workers_warning(GatewaySettings(state="redis", workers=4))
    assert line is not None and "workers = 4 applies to `corral gateway` only" in line
