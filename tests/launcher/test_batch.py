"""`corral batch` as a user runs it: the real CLI in its own process, against a real `corral up` on the
simulated rig (two cards, a hot chat model on both, an embedding model), or a lone `corral-sim serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher.sim.harness import SimServer, install_models
from tests.launcher.test_supervisor import children_now
from tests.launcher.test_up import free_port_range

REPO = Path(__file__).resolve().parents[2]
CHAT_MODEL = "llama3.2:1b"
EMBED_MODEL = "nomic-embed-text"
WAIT_S = 90.0  # generous bounds for a slow, shared machine; tests wait on conditions, not times


@dataclass
class Rig:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def backend_pids(self) -> list[int]:
        """The simulated backends' processes (below `corral up`, or below a wrapper of theirs)."""
        found, frontier = [], [self.proc.pid]
        while frontier:
            for child in children_now(frontier.pop()):
                frontier.append(child)
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                if b"launcher.sim.cli serve" in cmdline:
                    found.append(child)
        return found


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("batch-rig")
    install_models(tmp / "models", CHAT_MODEL, EMBED_MODEL)  # no downloads: the store is already full
    base_port = free_port_range(3)
    port = base_port + 2  # the gateway just above the two backends
    config = tmp / "config.toml"
    config.write_text(
        f"""
[launcher]
ollama_bin = "sim"
models_dir = "{tmp / "models"}"
base_port = {base_port}
start_timeout_s = 60
num_parallel = 4

[[models]]
name = "{CHAT_MODEL}"
hot = true

[[models]]
name = "{EMBED_MODEL}"

[gateway]
listen = "127.0.0.1:{port}"

[sim]
answer_tokens_min = 4
answer_tokens_max = 8
[[sim.gpus]]
name = "RTX 4090"
[[sim.gpus]]
name = "RTX 4090"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env["CORRAL_SIM_SPEED"] = "100"
    log = tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.commands.cli", "up", "--config", str(config)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_S
        while "ready: " not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield Rig(f"http://127.0.0.1:{port}", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_lines(count: int, *, start: int = 0) -> list[str]:
    return [
        json.dumps({"id": f"q{i}", "model": CHAT_MODEL, "messages": [{"role": "user", "content": f"question {i}"}]})
        for i in range(start, start + count)
    ]


def batch_cmd(inp: Path | str, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "launcher.commands.cli", "batch", str(inp), "-o", str(out), *flags]


def batch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    return env | extra


def run_batch(inp: Path | str, out: Path, *flags: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        batch_cmd(inp, out, *flags), cwd=REPO, env=batch_env(), input=stdin, capture_output=True, text=True,
        timeout=WAIT_S,
    )  # fmt: skip


def start_batch(inp: Path, out: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        batch_cmd(inp, out, *flags), cwd=REPO, env=batch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def wait_lines(out: Path, count: int, proc: subprocess.Popen[str]) -> int:
    """Wait until the output holds `count` lines (or the batch has ended); the number it holds."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        have = out.read_bytes().count(b"\n") if out.exists() else 0
        if have >= count or proc.poll() is not None:
            return have
        time.sleep(0.01)
    raise AssertionError(f"{out} never reached {count} lines")


def one_ok_per_id(out: Path, ids: list[str]) -> None:
    ok = Counter(r["id"] for r in results(out) if r["ok"])
    assert set(ok) == set(ids) and set(ok.values()) == {1}, [i for i, n in ok.items() if n != 1][:5]


# --- through Corral -------------------------------------------------------------------------------


def test_300_items_and_2_bad_lines_give_300_answers_and_2_failures_spread_over_the_cards(
    rig: Rig, tmp_path: Path
) -> None:
    lines = chat_lines(300)
    lines.insert(100, '{"id": "broken", "messages": ')  # not JSON
    lines.insert(200, json.dumps({"id": "no-body", "model": CHAT_MODEL}))  # JSON, but no request in it
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    done = run_batch(inp, out, "--url", rig.url)
    assert done.returncode == 1, done.stderr  # some items failed
    rows = results(out)
    assert len(rows) == 302
    failures = {r["line"]: r for r in rows if not r["ok"]}
    assert set(failures) == {101, 201}
    assert "not JSON" in failures[101]["error"] and failures[201]["id"] == "no-body"
    assert "line 101: not JSON" in done.stderr
    one_ok_per_id(out, [f"q{i}" for i in range(300)])
    answered = [r for r in rows if r["ok"]]
    assert all(r["response"]["message"]["content"] and r["attempts"] == 1 for r in answered)
    assert {r["backend"] for r in answered} == {"g0", "g1"}  # the whole fleet worked
    assert "items: 300 ok, 2 failed, 0 skipped" in done.stdout
    assert "requests per backend: g0=" in done.stdout and "p95" in done.stdout


def test_a_backend_sigkilled_at_30_percent_loses_no_item(rig: Rig, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(chat_lines(300)) + "\n")
    backends = rig.backend_pids()
    assert len(backends) == 2
    proc = start_batch(inp, out, "--url", rig.url)
    wait_lines(out, 90, proc)
    os.kill(backends[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, stderr
    one_ok_per_id(out, [f"q{i}" for i in range(300)])
    assert len(results(out)) == 300


def test_the_batch_sigkilled_at_60_percent_then_resumed_answers_every_id_exactly_once(rig: Rig, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(chat_lines(300)) + "\n")
    proc = start_batch(inp, out, "--url", rig.url)
    had = wait_lines(out, 180, proc)
    proc.kill()
    proc.communicate(timeout=WAIT_S)
    assert 180 <= had < 300
    again = run_batch(inp, out, "--url", rig.url, "--resume")
    assert again.returncode == 0, again.stderr
    one_ok_per_id(out, [f"q{i}" for i in range(300)])
    skipped = int(again.stdout.split(" skipped")[0].rsplit(", ", 1)[1])
    assert skipped >= 180 and f"items: {300 - skipped} ok, 0 failed" in again.stdout


def test_embed_over_1000_inputs(rig: Rig, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps({"input": f"document number {i}"}) for i in range(1000)) + "\n")
    done = run_batch(inp, out, "--url", rig.url, "--endpoint", "embed", "--model", EMBED_MODEL)
    assert done.returncode == 0, done.stderr
    rows = results(out)
    assert sorted(r["id"] for r in rows) == list(range(1, 1001))  # no id given: the line number
    assert all(r["ok"] and len(r["response"]["embeddings"][0]) == 768 for r in rows)


# --- against a lone simulated Ollama, and what is refused before anything is sent -------------------


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    tmp = tmp_path_factory.mktemp("batch-lone")
    install_models(tmp / "models", CHAT_MODEL)
    # Answers of a few hundred tokens at 5x real time: long enough that items are in flight when
    # the Ctrl-C test interrupts.
    sim = {"answer_tokens_min": 200, "answer_tokens_max": 300}
    with SimServer.start(tmp, env={"OLLAMA_NUM_PARALLEL": "4"}, speed=5, sim=sim) as server:
        yield server


def test_a_lone_ollama_without_the_capacity_route_with_concurrency_4(lone: SimServer, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(chat_lines(40)) + "\n")
    done = run_batch(inp, out, "--url", lone.url, "--concurrency", "4")
    assert done.returncode == 0, done.stderr
    one_ok_per_id(out, [f"q{i}" for i in range(40)])
    assert all(r["backend"] is None for r in results(out))
    assert "requests per backend: direct=40" in done.stdout


def test_ctrl_c_drains_the_items_in_flight_then_resume_finishes(lone: SimServer, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [f"q{i}" for i in range(100)]
    inp.write_text("\n".join(chat_lines(100)) + "\n")
    proc = start_batch(inp, out, "--url", lone.url, "--concurrency", "4")
    at_interrupt = wait_lines(out, 6, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 130
    assert "sending no more" in stderr and "aborted" not in stderr
    rows = results(out)
    # The items in flight at the interrupt finished and were written; nothing new was started.
    assert at_interrupt < len(rows) <= at_interrupt + 4 + 1
    assert all(r["ok"] for r in rows) and f"items: {len(rows)} ok, 0 failed" in stdout
    again = run_batch(inp, out, "--url", lone.url, "--concurrency", "4", "--resume")
    assert again.returncode == 0, again.stderr
    one_ok_per_id(out, ids)


def test_a_torn_last_line_is_dropped_and_its_item_asked_again(lone: SimServer, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(chat_lines(6)) + "\n")
    assert run_batch(inp, out, "--url", lone.url).returncode == 0
    rows = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(rows[:3]) + rows[3][: len(rows[3]) // 2])  # a crash mid-write of line 4
    refused = run_batch(inp, out, "--url", lone.url)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr  # never appended to blindly
    again = run_batch(inp, out, "--url", lone.url, "--resume")
    assert again.returncode == 0, again.stderr
    assert "dropped a torn last line" in again.stderr and "items: 3 ok, 0 failed, 3 skipped" in again.stdout
    one_ok_per_id(out, [f"q{i}" for i in range(6)])


def test_duplicate_ids_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    text = "\n".join([*chat_lines(3), json.dumps({"id": 7, "prompt": "a"}), json.dumps({"id": "q1", "prompt": "b"})])
    # 127.0.0.1:9 (discard) has no server: a batch that sent anything would fail there, not refuse.
    done = run_batch("-", out, "--url", "http://127.0.0.1:9", "--model", CHAT_MODEL, stdin=text + "\n")
    assert done.returncode == 2
    assert 'line 5: duplicate id "q1" (first on line 2); nothing was sent' in done.stderr
    assert not out.exists()
    # Ids compare as JSON text: 7 and "7" are two items.
    distinct = json.dumps({"id": 7, "prompt": "a"}) + "\n" + json.dumps({"id": "7", "prompt": "b"}) + "\n"
    sent = run_batch("-", out, "--url", "http://127.0.0.1:9", "--model", CHAT_MODEL, "--retries", "0", stdin=distinct)
    assert sent.returncode == 1 and len(results(out)) == 2  # both tried (and failed: nothing listens)
