"""`corral up` serves before its backends are ready, and keeps its keys out of their environments.

The whole simulated rig runs as real processes: the gateway must answer `/api/version` while the
backends are still starting and the models are still being pulled, hold a model call in its queue
until a backend can take it, and flip `GET /api/corral/ready` from 503 to 200. Every child
(backends and the orphan guard) must start without the gateway's keys in `/proc/PID/environ`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.launcher.test_up import REPO, SIM_SPEED, UP_TIMEOUT_S, UpProcess, rig_config, stop_up

API_KEY = "sk-corral-test-api-0123456789"
ADMIN_KEY = "sk-corral-test-admin-0123456789"
OTHER_SECRET = "corral-token-not-for-children"


async def start_up_with_keys(config: Path) -> UpProcess:
    env = dict(os.environ) | {
        "CORRAL_SIM_SPEED": SIM_SPEED,
        "CORRAL_API_KEYS": API_KEY,
        "CORRAL_ADMIN_KEYS": ADMIN_KEY,
        "CORRAL_PUSH_TOKEN": OTHER_SECRET,  # any CORRAL_* key variable stays with the launcher
    }
    stderr_path = config.with_name("corral-up.stderr")
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "launcher.commands.cli", "up", "--config", str(config),
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    return UpProcess(proc, [], stderr_path)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
async def test_up_answers_at_once_queues_model_calls_and_keeps_keys_from_children(tmp_path: Path) -> None:
    config, url = rig_config(tmp_path)
    up = await start_up_with_keys(config)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        await up.wait_for_line("listening: ")
        async with aiohttp.ClientSession() as http:
            # Before any backend is ready: the gateway answers, and says it is not ready.
            async with http.get(url + "/api/corral/ready") as resp:  # open to probes: no key
                assert resp.status == 503
            async with http.get(url + "/api/version", headers=auth) as resp:
                assert resp.status == 200 and (await resp.json())["version"]
            async with http.get(url + "/", headers=auth) as resp:
                assert resp.status == 200
            async with http.get(url + "/api/tags", headers=auth) as resp:
                assert resp.status == 200
            # A model call made now waits in the queue ("starting") and is served once ready.
            body = {"model": "llama3.1:8b", "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
            early = asyncio.create_task(http.post(url + "/api/generate", json=body, headers=auth))
            async with asyncio.timeout(UP_TIMEOUT_S):
                while True:
                    async with http.get(url + "/api/corral/ready") as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.1)
            async with asyncio.timeout(UP_TIMEOUT_S):
                reply = await early
                assert reply.status == 200, await reply.text()
                assert (await reply.json())["done"] is True
                reply.release()
        await up.wait_for_line("ready: ")
        children = up.descendants()
        assert len(children) >= 4  # backends and the orphan guard
        for pid in children:
            try:
                env = environ_of(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone meanwhile (a short-lived helper)
            for secret in (API_KEY, ADMIN_KEY, OTHER_SECRET):
                assert secret not in env.values(), (pid, [k for k, v in env.items() if v == secret])
            assert "CORRAL_API_KEYS" not in env and "CORRAL_ADMIN_KEYS" not in env
    finally:
        code = await stop_up(up)
    assert code == 0, up.stderr
