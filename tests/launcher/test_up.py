"""`corral up`: preload against recording fake backends, and the whole rig end to end (the simulated
backends, the in-process gateway, the official ollama client, SIGTERM and SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from launcher.commands import up
from launcher.commands.cli import main
from launcher.planner.placement import PlannedModel
from launcher.supervise import preload as preload_module
from launcher.supervise.preload import PreloadTarget, ProgressPrinter, keep_alive_json, preload
from tests.launcher.test_supervisor import children_now, wait_gone

# --- preload against recording fakes --------------------------------------------------------------


@dataclass
class FakeOllama:
    """Just enough of Ollama for preload; records every request it receives."""

    installed: set[str] = field(default_factory=set)
    embedding: set[str] = field(default_factory=set)
    pull_error: dict[str, str] = field(default_factory=dict)
    load_error: dict[str, str] = field(default_factory=dict)
    load_stuck: set[str] = field(default_factory=set)  # loads that never answer until `release` is set
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/pull", self.pull)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/embed", self.embed)
        return app

    async def tags(self, request: web.Request) -> web.Response:
        self.received.append(("tags", {}))
        return web.json_response({"models": [{"name": n, "model": n} for n in sorted(self.installed)]})

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(("pull", body))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        name = body["model"]
        await resp.write(b'{"status":"pulling manifest"}\n')
        if name in self.pull_error:
            await resp.write(json.dumps({"error": self.pull_error[name]}).encode() + b"\n")
            return resp
        total = 1000
        for completed in range(0, total + 1, 50):
            line = {"status": "pulling abc", "digest": "sha256:abc", "total": total, "completed": completed}
            await resp.write(json.dumps(line).encode() + b"\n")
        await resp.write(b'{"status":"success"}\n')
        self.installed.add(name if ":" in name else name + ":latest")
        return resp

    async def show(self, request: web.Request) -> web.Response:
        name = (await request.json())["model"]
        caps = ["embedding"] if name in self.embedding else ["completion"]
        return web.json_response({"capabilities": caps})

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(("generate", body))
        if body["model"] in self.load_error:
            return web.json_response({"error": self.load_error[body["model"]]}, status=500)
        if body["model"] in self.load_stuck:
            await self.release.wait()
        return web.json_response({"model": body["model"], "response": "", "done": True, "done_reason": "load"})

    async def embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(("embed", body))
        return web.json_response({"model": body["model"], "embeddings": []})


async def serve(fake: FakeOllama) -> TestServer:
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    return server


def model(name: str, num_ctx: int = 0, num_gpu: int = -1) -> PlannedModel:
    return PlannedModel(name=name, num_ctx=num_ctx, vram_bytes=1, expected_tokens_per_s=1.0, num_gpu=num_gpu)


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_preload_pulls_once_per_shared_store_then_loads_on_every_backend() -> None:
    # Two backends share one store (one fake answers for the store); both plan llama3.1:8b.
    store_fake = FakeOllama(installed={"qwen2.5:7b"}, embedding={"nomic-embed-text"})
    other = FakeOllama(installed={"qwen2.5:7b"}, embedding={"nomic-embed-text"})
    s0, s1 = await serve(store_fake), await serve(other)
    targets = [
        PreloadTarget("g0", url_of(s0), "box:/m", (model("llama3.1:8b", 8192), model("nomic-embed-text"))),
        PreloadTarget("g1", url_of(s1), "box:/m", (model("llama3.1:8b", 8192), model("qwen2.5:7b", num_gpu=20))),
    ]
    out = io.StringIO()
    try:
        async with aiohttp.ClientSession() as session:
            results = await preload(
                session,
                targets,
                keep_alive_for=lambda m: "3600" if m == "qwen2.5:7b" else "30m",
                progress=ProgressPrinter(out, tty=False),
            )
    finally:
        await s0.close()
        await s1.close()
    assert [(r.backend_id, r.model, r.ok) for r in results] == [
        ("g0", "llama3.1:8b", True),
        ("g0", "nomic-embed-text", True),
        ("g1", "llama3.1:8b", True),
        ("g1", "qwen2.5:7b", True),
    ]
    pulls = [body["model"] for kind, body in store_fake.received + other.received if kind == "pull"]
    assert sorted(pulls) == ["llama3.1:8b", "nomic-embed-text"]  # once each, through the store's first backend
    assert not [1 for kind, _ in other.received if kind == "pull"]
    loads = {(kind, body["model"]): body for kind, body in store_fake.received + other.received if kind != "tags"}
    assert loads[("generate", "llama3.1:8b")]["options"] == {"num_ctx": 8192}
    assert (
        loads[("generate", "llama3.1:8b")]["prompt"] == "" and loads[("generate", "llama3.1:8b")]["keep_alive"] == "30m"
    )
    assert loads[("embed", "nomic-embed-text")]["input"] == []  # embedding models refuse /api/generate
    qwen = loads[("generate", "qwen2.5:7b")]
    assert qwen["keep_alive"] == 3600 and qwen["options"] == {"num_gpu": 20}
    text = out.getvalue()
    assert "pulling llama3.1:8b: 50% (500 B of 1.0 KB)" in text
    assert text.count("pulling llama3.1:8b: ") == 9  # one line per 10 %, 10 % .. 90 %
    assert "g1: qwen2.5:7b loaded in" in text


async def test_preload_failures_name_backend_model_and_error_and_do_not_stop_the_rest() -> None:
    fake = FakeOllama(
        pull_error={"nosuch:1b": "pull model manifest: file does not exist"},
        load_error={"qwen2.5:7b": "llama-server process has terminated: out of memory"},
        installed={"qwen2.5:7b", "llama3.2:1b"},
    )
    server = await serve(fake)
    targets = [PreloadTarget("g2", url_of(server), "", (model("nosuch:1b"), model("qwen2.5:7b"), model("llama3.2:1b")))]
    try:
        async with aiohttp.ClientSession() as session:
            results = await preload(
                session, targets, keep_alive_for=lambda m: "5m", progress=ProgressPrinter(io.StringIO(), tty=False)
            )
    finally:
        await server.close()
    by_model = {r.model: r for r in results}
    assert by_model["nosuch:1b"].describe() == (
        "g2: nosuch:1b not preloaded: pull failed: pull model manifest: file does not exist"
    )
    assert not by_model["qwen2.5:7b"].ok and "out of memory" in by_model["qwen2.5:7b"].error
    assert by_model["llama3.2:1b"].ok


async def test_a_stuck_load_is_reported_as_stuck_not_as_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preload_module, "STALL_TIMEOUT_S", 0.2)
    fake = FakeOllama(installed={"qwen2.5:7b"}, load_stuck={"qwen2.5:7b"})
    server = await serve(fake)
    targets = [PreloadTarget("g1", url_of(server), "s", (model("qwen2.5:7b"),))]
    try:
        async with aiohttp.ClientSession() as session:
            (result,) = await preload(
                session, targets, keep_alive_for=lambda m: "5m", progress=ProgressPrinter(io.StringIO(), tty=False)
            )
    finally:
        fake.release.set()
        await server.close()
    assert result.describe() == "g1: qwen2.5:7b not preloaded: no answer for 0.2s"


async def test_preload_reports_an_unreachable_backend() -> None:
    targets = [PreloadTarget("g0", "http://127.0.0.1:9", "s", (model("llama3.2:1b"),))]
    async with aiohttp.ClientSession() as session:
        (result,) = await preload(
            session, targets, keep_alive_for=lambda m: "5m", progress=ProgressPrinter(io.StringIO(), tty=False)
        )
    assert not result.ok and result.error.startswith("cannot list installed models on g0: backend unreachable")


def test_progress_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    progress = ProgressPrinter(out, tty=True)
    progress.pull_progress("llama3.1:8b", 250, 1000)
    progress.pull_progress("llama3.1:8b", 500, 1000)
    progress.pull_done("llama3.1:8b")
    progress.line("done")
    text = out.getvalue()
    assert "\r\x1b[K  pulling llama3.1:8b [#####...............]  25%" in text
    assert "[##########..........]  50%" in text
    assert text.endswith("\r\x1b[Kdone\n")


@pytest.mark.parametrize(
    ("text", "expected"), [("30m", "30m"), ("3600", 3600), ("-1", -1), ("0", 0), ("1h30m", "1h30m")]
)
def test_keep_alive_goes_to_the_api_in_a_form_it_accepts(text: str, expected: int | str) -> None:
    assert keep_alive_json(text) == expected


# --- end to end: `corral up` on the simulated example rig --------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SIM_SPEED = "400"
UP_TIMEOUT_S = 90.0  # generous: the whole rig starts in a few seconds even on 2 cores
STOP_TIMEOUT_S = 30.0
TWO_MODELS = ("llama3.1:8b", "llama3.3:70b")


def free_port_range(count: int) -> int:
    """A base port with `count` free ports after it (checked by binding each)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def rig_config(tmp_path: Path, *, extra_launcher: str = "") -> tuple[Path, str]:
    """A copy of the example config.toml with a temp store, free ports, and the simulated rig."""
    text = (REPO / "config.toml").read_text()
    gateway_port = free_port_range(1)
    replacements = {
        r"(?m)^ollama_bin = .*$": 'ollama_bin = "sim"',
        r"(?m)^models_dir = .*$": f'models_dir = "{tmp_path / "models"}"',
        r"(?m)^base_port = .*$": f"base_port = {free_port_range(8)}\nstart_timeout_s = 60\n{extra_launcher}",
        r"(?m)^listen = .*$": f'listen = "127.0.0.1:{gateway_port}"',
    }
    for pattern, replacement in replacements.items():
        text, count = re.subn(pattern, replacement, text, count=1)
        assert count == 1, pattern
    config = tmp_path / "config.toml"
    config.write_text(text)
    return config, f"http://127.0.0.1:{gateway_port}"


@dataclass
class UpProcess:
    proc: asyncio.subprocess.Process
    lines: list[str]
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    async def wait_for_line(self, needle: str, timeout_s: float = UP_TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            for line in self.lines:
                if needle in line:
                    return line
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"corral up exited before {needle!r}:\n" + "\n".join(self.lines))
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if needle in line:
                    return line

    def descendants(self) -> list[int]:
        """Every live process below `corral up` (backends, their children, the orphan guard)."""
        found: list[int] = []
        frontier = [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            children = children_now(parent)
            found.extend(children)
            frontier.extend(children)
        return found


async def start_up(config: Path, *flags: str) -> UpProcess:
    env = dict(os.environ) | {"CORRAL_SIM_SPEED": SIM_SPEED}
    env.pop("CORRAL_API_KEYS", None)
    stderr_path = config.with_name("corral-up.stderr")
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "launcher.commands.cli", "up", "--config", str(config), *flags,
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    return UpProcess(proc, [], stderr_path)


async def stop_up(up: UpProcess, sig: int | None = signal.SIGTERM) -> int:
    """Send `sig` (None: none, wait for it to exit by itself) and collect the rest of stdout."""
    if sig is not None and up.proc.returncode is None:
        up.proc.send_signal(sig)
    async with asyncio.timeout(STOP_TIMEOUT_S):
        if up.proc.stdout is not None:
            rest = await up.proc.stdout.read()
            up.lines.extend(rest.decode().splitlines())
        return await up.proc.wait()


async def test_up_serves_two_models_on_their_planned_cards_then_sigterm_stops_everything(tmp_path: Path) -> None:
    config, url = rig_config(tmp_path)
    up = await start_up(config)
    try:
        ready = await up.wait_for_line("ready: ")
        assert url in ready
        assert any("running the simulated rig" in line for line in up.lines)
        assert any(line.startswith("plan: ") for line in up.lines)
        children = up.descendants()
        assert len(children) >= 4  # three or more backends and the orphan guard

        # The example plan puts llama3.1:8b on the 4090s and llama3.3:70b (43 GB) on the 3090 pair.
        client = ollama.AsyncClient(host=url)
        try:
            for model in TWO_MODELS:
                reply = await client.chat(model=model, messages=[{"role": "user", "content": "hello"}])
                assert reply.message.content and reply.done
        finally:
            await client.close()

        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/api/corral/status") as resp:
                status = await resp.json()
            served_by = {}
            for model in TWO_MODELS:
                body = {"model": model, "prompt": "hi", "stream": False}
                async with session.post(url + "/api/generate", json=body) as resp:
                    assert resp.status == 200
                    served_by[model] = resp.headers["X-Corral-Backend"]
        backends = {b["id"]: b for b in status["backends"]}
        assert all(b["state"] == "ready" for b in backends.values())
        for model, backend_id in served_by.items():
            assert model in backends[backend_id]["planned_models"]
            resident = [r["name"] for r in backends[backend_id]["resident"]]
            assert model in resident
        # Two different models, two different cards, as planned.
        cards = {model: set(backends[b]["gpu_uuids"]) for model, b in served_by.items()}
        assert not cards[TWO_MODELS[0]] & cards[TWO_MODELS[1]]
        gpus = [g for rows in status["gpus"].values() for g in rows]
        assert len(gpus) == 4
        used = {g["backend"]: g["memory_used_bytes"] for g in gpus}
        assert used[served_by[TWO_MODELS[0]]] > 0  # preloaded models show in the inventory

        table = await asyncio.to_thread(_run_status, url, False)
        assert "Backends" in table and "ready" in table and "llama3.1:8b" in table
        as_json = json.loads(await asyncio.to_thread(_run_status, url, True))
        assert {b["id"] for b in as_json["backends"]} == set(backends)
    finally:
        code = await stop_up(up)
    assert code == 0, up.stderr
    assert "SIGTERM: stopping" in up.lines and up.lines[-1] == "stopped: the gateway and every backend are down"
    await wait_gone(children)
    # The gateway is gone too.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0


def _run_status(url: str, as_json: bool) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", "--url", url, *(["--json"] if as_json else [])]) == 0
    return out.getvalue()


async def test_sigkill_of_corral_up_leaves_no_backend_behind(tmp_path: Path) -> None:
    config, _ = rig_config(tmp_path)
    up = await start_up(config, "--no-preload")
    try:
        await up.wait_for_line("ready: ")
        children = up.descendants()
        assert len(children) >= 4
    finally:
        code = await stop_up(up, signal.SIGKILL)
    assert code == -signal.SIGKILL
    await wait_gone(children)


async def test_a_port_in_use_names_the_backend_and_exits_1(tmp_path: Path) -> None:
    config, _ = rig_config(tmp_path)
    base_port = int(re.search(r"(?m)^base_port = (\d+)", config.read_text()).group(1))  # type: ignore[union-attr]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base_port + 1))
        taken.listen()
        up = await start_up(config, "--no-preload")
        code = await stop_up(up, None)
    assert code == 1
    assert re.search(rf"corral up: backend \S+: port {base_port + 1} on 127.0.0.1 is already in use", up.stderr)
    assert not any(line.startswith("ready: ") for line in up.lines)


# --- refusals before anything starts (in process: nothing is spawned) ---------------------------------


def test_config_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--config", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.toml: no such file")
    config, _ = rig_config(tmp_path, extra_launcher='env = { OLLAMA_HOST = "0.0.0.0:1" }')
    assert main(["up", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "launcher.env.OLLAMA_HOST: is set by the launcher" in err[0]
    config.write_text(config.read_text().replace('env = { OLLAMA_HOST = "0.0.0.0:1" }', ""))
    assert main(["up", "--config", str(config), "--speed", "0"]) == 2
    assert "--speed: must be > 0, got 0.0" in capsys.readouterr().err


def test_a_model_that_fits_nowhere_is_a_plan_error_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = rig_config(tmp_path, extra_launcher="allow_cpu_offload = false")
    config.write_text(config.read_text() + '\n[[models]]\nname = "llama3.1:405b"\n')
    assert main(["up", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "plan: " in captured.out
    assert "corral up: " in captured.err and "llama3.1:405b" in captured.err
    assert not (tmp_path / "models").exists()  # refused before anything started


def test_a_busy_gateway_port_is_refused_before_any_backend_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = rig_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["up", "--config", str(config), "--listen", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"the gateway cannot listen on 127.0.0.1:{port}: already in use" in err


@pytest.mark.parametrize(
    ("edit", "flags", "code", "expected"),
    [
        # 192.0.2.1 is TEST-NET-1: never an address of this machine.
        ("", ["--listen", "192.0.2.1:11434"], 1, "the gateway cannot listen on 192.0.2.1:11434: no such local address"),
        ("", ["--listen", "nosuch.invalid:11434"], 1, "the gateway cannot listen on nosuch.invalid:11434: "),
        ("", ["--listen", "0.0.0.0:0"], 2, "gateway.listen: refusing to listen on non-loopback address '0.0.0.0'"),
        ("base_port = GATEWAY_PORT", [], 1, "backend g0 is planned on port GATEWAY_PORT, where the gateway listens"),
        ("", ["--base-port", "GATEWAY_PORT"], 1, "backend g0 is planned on port GATEWAY_PORT, where the gateway"),
        ("", ["--base-port", "80"], 2, "--base-port: must be between 1024 and 65000, got 80"),
        ('state = "redis"\nredis_url = "redis://127.0.0.1:1/0"', [], 1, "cannot reach the state store at redis://"),
        ("models_dir = 'FILE/models'", [], 1, "cannot create the model store FILE/models: Not a directory"),
    ],
    ids=[
        "not-local",
        "no-such-name",
        "open-without-keys",
        "port-clash",
        "base-port-clash",
        "bad-base-port",
        "redis-down",
        "bad-store",
    ],
)
def test_what_would_fail_later_is_refused_before_anything_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    edit: str,
    flags: list[str],
    code: int,
    expected: str,
) -> None:
    if "0.0.0.0:0" in flags:
        monkeypatch.delenv("CORRAL_API_KEYS", raising=False)
    else:  # keys: a non-loopback gateway address is allowed, so the address itself is what fails
        monkeypatch.setenv("CORRAL_API_KEYS", "sk-test")
    config, url = rig_config(tmp_path)
    gateway_port = url.rsplit(":", 1)[1]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    edit = edit.replace("GATEWAY_PORT", gateway_port).replace("FILE", str(a_file))
    expected = expected.replace("GATEWAY_PORT", gateway_port).replace("FILE", str(a_file))
    flags = [flag.replace("GATEWAY_PORT", gateway_port) for flag in flags]
    text = config.read_text()
    if edit.startswith(("base_port", "models_dir")):
        text = re.sub(rf"(?m)^{edit.split(' ')[0]} = .*$", edit, text, count=1)
    elif edit:
        text = text.replace("[gateway]\n", f"[gateway]\n{edit}\n", 1)
    config.write_text(text)
    assert main(["up", "--config", str(config), *flags]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "models").exists()  # nothing started


async def test_strict_makes_a_failed_preload_fatal(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeOllama(installed={"qwen2.5:7b"}, load_error={"qwen2.5:7b": "out of memory"})
    server = await serve(fake)
    targets = [PreloadTarget("g1", url_of(server), "s", (model("qwen2.5:7b"),))]
    out = ProgressPrinter(io.StringIO(), tty=False)
    try:
        async with aiohttp.ClientSession() as session:
            for strict, expected in ((False, 0), (True, 1)):
                opts = up.UpOptions(preload=True, strict=strict, speed=None, listen_host="127.0.0.1", listen_port=0)
                stopper = up.Stopper(out)
                assert await up._preload(session, targets, lambda m: "5m", out, stopper, opts) == expected
    finally:
        await server.close()
    err = capsys.readouterr().err
    assert "corral up: PRELOAD FAILED: backend g1, model qwen2.5:7b: out of memory" in err
    assert "--strict: stopping" in err


async def test_sigterm_during_preload_stops_cleanly(tmp_path: Path) -> None:
    config, _ = rig_config(tmp_path)
    up = await start_up(config, "--speed", "1")  # real time: the 43 GB pull takes far longer than this test
    try:
        await up.wait_for_line("pulling llama3.1:8b ...")
        children = up.descendants()
    finally:
        code = await stop_up(up)
    assert code == 0, up.stderr
    assert up.lines[-1] == "stopped: the gateway and every backend are down"
    assert not any(line.startswith("ready: ") for line in up.lines)
    await wait_gone(children)
