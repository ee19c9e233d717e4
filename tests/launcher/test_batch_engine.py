"""The importable batch engine over a real socket: which failures are retried, what the server
receives, duplicate ids, and the journal's torn-line rule."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from launcher.batch.aimd import Aimd
from launcher.batch.engine import run_batch
from launcher.batch.journal import JournalError, open_journal, scan
from launcher.batch.progress import show_progress
from launcher.batch.stats import BatchStats
from launcher.batch.types import BatchOptions, DuplicateIdError, ItemResult


class Scripted:
    """A chat server that answers each id's attempts from a script: a status (with an error text and
    optional Retry-After) per attempt, 200 once the script runs out. Records every request."""

    def __init__(self, script: dict[str, list[tuple[int, str, str | None]]]) -> None:
        self.script = script
        self.received: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((body, dict(request.headers)))
        steps = self.script.get(body["messages"][0]["content"], [])
        if steps:
            status, error, retry_after = steps.pop(0)
            if status == 0:  # no answer for this long: a hung attempt
                await asyncio.sleep(float(error))
                return web.json_response({"error": "too late"}, status=500)
            headers = {"Retry-After": retry_after} if retry_after else {}
            return web.json_response({"error": error}, status=status, headers=headers)
        reply = {"model": body["model"], "message": {"role": "assistant", "content": "ok"}, "done": True}
        return web.json_response(reply | {"prompt_eval_count": 3, "eval_count": 5})


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    fake = Scripted({})
    app = web.Application()
    app.router.add_post("/api/chat", fake.chat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


def item(item_id: Any, content: str) -> dict[str, Any]:
    return {"id": item_id, "messages": [{"role": "user", "content": content}]}


async def collect(items: list[dict[str, Any]], options: BatchOptions) -> dict[Any, ItemResult]:
    return {r.id: r async for r in run_batch(items, options)}


async def test_backend_faults_are_retried_honouring_retry_after_and_request_errors_are_not(
    scripted: tuple[Scripted, str],
) -> None:
    fake, url = scripted
    fake.script.update(
        {
            "busy": [(503, "server busy, please try again.  maximum pending requests exceeded", "0.2")],
            "crash": [(500, "llama runner process has terminated: signal: killed", None)] * 2,
            "bad-option": [(500, 'option "num_ctx" must be of type integer', None)],
            "missing": [(404, "model 'x' not found", None)],
            "always-down": [(502, "bad gateway", None)] * 10,
        }
    )
    options = BatchOptions(url=url, model="m", concurrency=2, retries=3, backoff_base_s=0.01, api_key="sk-batch")
    got = await collect(
        [item(i, c) for i, c in enumerate(["busy", "crash", "bad-option", "missing", "always-down"])], options
    )
    assert got[0].ok and got[0].attempts == 2 and got[0].seconds >= 0.2  # waited as Retry-After said
    assert got[1].ok and got[1].attempts == 3
    assert not got[2].ok and got[2].attempts == 1 and got[2].status == 500 and "must be of type" in got[2].error
    assert not got[3].ok and got[3].attempts == 1 and got[3].status == 404
    assert not got[4].ok and got[4].attempts == 4 and got[4].status == 502  # 1 + --retries 3
    assert got[0].output_tokens == 5 and got[0].prompt_tokens == 3
    body, headers = fake.received[0]
    assert headers["X-Corral-Priority"] == "batch" and headers["Authorization"] == "Bearer sk-batch"
    assert body["stream"] is False and body["model"] == "m" and "id" not in body


async def test_the_engine_raises_at_the_first_duplicate_and_keeps_1_and_quoted_1_apart(
    scripted: tuple[Scripted, str],
) -> None:
    _, url = scripted
    options = BatchOptions(url=url, model="m", concurrency=1)
    got = await collect([item(1, "a"), item("1", "b")], options)
    assert set(got) == {1, "1"} and all(r.ok for r in got.values())
    with pytest.raises(DuplicateIdError, match='duplicate id "x"'):
        await collect([item("x", "a"), item("y", "b"), item("x", "c")], options)


def test_a_torn_or_garbled_last_line_is_cut_and_earlier_lines_kept(tmp_path: Path) -> None:
    whole = [json.dumps({"id": i, "ok": i != 2}) + "\n" for i in range(4)]
    resumed, end = scan("".join(whole).encode() + b'{"id": 4, "ok": tr')
    assert resumed.ok_keys == {"0", "1", "3"} and resumed.failed_keys == {"2"} and end == len("".join(whole))
    resumed, end = scan("".join(whole).encode() + b'{"id": 4, "o\n')  # a newline, but not a whole object
    assert "4" not in resumed.ok_keys and end == len("".join(whole))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(whole) + '{"id": 9')
    with pytest.raises(JournalError, match="--resume"):
        open_journal(out, resume=False, overwrite=False)
    journal, resumed = open_journal(out, resume=True, overwrite=False)
    journal.append({"id": 9, "ok": True})
    journal.close()
    assert resumed.torn_bytes == len('{"id": 9')
    assert out.read_text() == "".join(whole) + '{"id":9,"ok":true}\n'


async def test_timeout_s_bounds_one_attempt_and_the_next_attempt_is_answered(scripted: tuple[Scripted, str]) -> None:
    fake, url = scripted
    fake.script["hangs-once"] = [(0, "5", None)]
    options = BatchOptions(url=url, model="m", concurrency=1, timeout_s=0.3, backoff_base_s=0.01)
    got = await collect([item("a", "hangs-once")], options)
    assert got["a"].ok and got["a"].attempts == 2 and got["a"].seconds < 5


def test_aimd_halves_once_per_congestion_event_and_climbs_back_to_the_fleets_slots() -> None:
    limit = Aimd(limit=2.0, ceiling=64)
    limit.set_target(16)
    assert limit.current == 16
    limit.on_overload()
    limit.on_overload()  # the same full queue seen by another request in flight: no second halving
    assert limit.current == 8
    for _ in range(200):
        limit.on_success()
    assert limit.current == 16  # additive increase, capped at the fleet's slots
    limit.set_target(4)  # cards went away
    assert limit.current == 4
    fixed = Aimd.fixed_at(4)
    fixed.on_overload()
    fixed.set_target(100)
    assert fixed.current == 4


async def test_progress_on_a_terminal_is_a_live_bar_and_elsewhere_a_line_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from launcher.batch import progress

    stats = BatchStats(total=10)
    stats.add(ItemResult("a", '"a"', True, output_tokens=7, seconds=0.1))
    stats.note_request("g1")
    tty = io.StringIO()
    async with show_progress(stats, tty, tty=True):
        await asyncio.sleep(0.05)
    assert "1/10" in tty.getvalue() and "g1=1" in tty.getvalue() and "\x1b[" in tty.getvalue()
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.01)
    log = io.StringIO()
    async with show_progress(stats, log, tty=False):
        await asyncio.sleep(0.2)  # many intervals: at least one line, whatever the machine's load
    assert log.getvalue().startswith("batch: 1/10 done, 0 failed,") and "\x1b[" not in log.getvalue()
