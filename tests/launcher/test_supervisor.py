"""Supervision with real child processes (tests/support/misbehave.py): start, health gate, crash and
restart with backoff, stop with SIGTERM then SIGKILL, no orphans even when the launcher is killed,
and the environment each backend receives."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from gateway.record import BackendKind, BackendRecord, BackendState
from gateway.state.memory import MemoryStore
from launcher.config import LauncherSettings
from launcher.facts.strictconf import ConfigError
from launcher.planner.placement import PlannedBackend, PlannedModel
from launcher.sim.harness import free_port
from launcher.supervise.env import backend_env, check_env_overrides, resolve_models_dir
from launcher.supervise.supervisor import (
    BackendLaunch,
    BackendProcess,
    BackendStartError,
    State,
    Supervisor,
    Timing,
    backoff_delay,
)

REPO = Path(__file__).resolve().parents[2]
MISBEHAVE = str(REPO / "tests" / "support" / "misbehave.py")
WAIT_S = 20.0  # generous upper bound for anything a test waits on; tests pass long before it
FAST = Timing(start_timeout_s=15.0, stop_timeout_s=2.0, restart_backoff_s=0.05, restart_backoff_max_s=0.2)


def planned(backend_id: str = "g0", port: int | None = None, **overrides: object) -> PlannedBackend:
    fields: dict[str, object] = {
        "id": backend_id,
        "kind": BackendKind.SINGLE,
        "port": port if port is not None else free_port(),
        "gpu_indices": (0,),
        "gpu_uuids": ("GPU-aaaa",),
        "gpu_names": ("RTX 4090",),
        "vram_total_bytes": 24 * 10**9,
        "vram_planned_bytes": 6 * 10**9,
        "num_parallel": 2,
        "max_loaded_models": 0,
        "speed": 1.008,
        "models": (PlannedModel(name="llama3.1:8b", num_ctx=0, vram_bytes=6 * 10**9, expected_tokens_per_s=100.0),),
    }
    fields.update(overrides)
    return PlannedBackend(**fields)  # type: ignore[arg-type]


def launch(backend: PlannedBackend, *flags: str, log_dir: str = "") -> BackendLaunch:
    env = dict(os.environ) | {"OLLAMA_HOST": f"127.0.0.1:{backend.port}"}
    return BackendLaunch(backend, (sys.executable, MISBEHAVE, "serve", *flags), env, log_dir=log_dir)


async def wait_for_restart(proc: BackendProcess, restarts: int, timeout_s: float) -> None:
    """Until `proc` has been restarted `restarts` times and is ready again."""
    await proc.wait_for(lambda: proc.restarts >= restarts and proc.state == State.READY, timeout_s)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (pid 1 here may not reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + WAIT_S
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        await asyncio.sleep(0.02)


# --- environment -------------------------------------------------------------------------------


def test_env_single_backend_pins_its_card_and_clears_inherited_ollama_settings(tmp_path: Path) -> None:
    settings = LauncherSettings(num_parallel=4, keep_alive="1h", max_queue=64, env={"OLLAMA_DEBUG": "1"})
    inherited = {"PATH": "/usr/bin", "OLLAMA_SCHED_SPREAD": "1", "OLLAMA_HOST": "0.0.0.0:11434", "HOME": "/root"}
    env = backend_env(planned(port=11500), settings, models_dir=tmp_path, base_env=inherited)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert env["OLLAMA_HOST"] == "127.0.0.1:11500"
    assert env["OLLAMA_MODELS"] == str(tmp_path)
    assert env["OLLAMA_NUM_PARALLEL"] == "2"  # the plan's, not [launcher].num_parallel
    assert env["OLLAMA_KEEP_ALIVE"] == "1h"
    assert env["OLLAMA_MAX_QUEUE"] == "64"
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "0"
    assert env["OLLAMA_DEBUG"] == "1"
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    assert "OLLAMA_SCHED_SPREAD" not in env  # a shell export must not spread a single-card backend
    assert "CORRAL_SIM_RIG" not in env and "OLLAMA_CONTEXT_LENGTH" not in env


def test_env_split_backend_spreads_over_its_group_strongest_first(tmp_path: Path) -> None:
    split = planned(
        "g2+g3",
        port=11502,
        kind=BackendKind.SPLIT,
        gpu_indices=(3, 2),
        gpu_uuids=("GPU-dddd", "GPU-cccc"),
        max_loaded_models=1,
        num_parallel=1,
    )
    settings = LauncherSettings(context_length=8192, kv_cache_type="q8_0")
    env = backend_env(split, settings, models_dir=tmp_path, base_env={})
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-dddd,GPU-cccc"
    assert env["OLLAMA_SCHED_SPREAD"] == "1"
    assert env["OLLAMA_MAX_LOADED_MODELS"] == "1"
    assert env["OLLAMA_CONTEXT_LENGTH"] == "8192"
    assert env["OLLAMA_KV_CACHE_TYPE"] == "q8_0"
    assert env["OLLAMA_FLASH_ATTENTION"] == "1"


def test_env_without_uuids_uses_pci_order_indices_and_cpu_backend_hides_gpus(tmp_path: Path) -> None:
    no_uuid = planned(gpu_indices=(1, 0), gpu_uuids=("", ""), port=11501)
    env = backend_env(no_uuid, LauncherSettings(), models_dir=tmp_path, base_env={})
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    cpu = planned("cpu", kind=BackendKind.CPU, gpu_indices=(), gpu_uuids=(), gpu_names=())
    assert backend_env(cpu, LauncherSettings(), models_dir=tmp_path, base_env={})["CUDA_VISIBLE_DEVICES"] == "-1"


def test_env_sim_backend_gets_the_rig_file_and_speed(tmp_path: Path) -> None:
    rig = str(tmp_path / "config.toml")
    env = backend_env(
        planned(), LauncherSettings(), models_dir=tmp_path, base_env={"CORRAL_SIM_SPEED": "5"}, sim_rig=rig
    )
    assert env["CORRAL_SIM_RIG"] == rig and env["CORRAL_SIM_SPEED"] == "5"  # inherited passes through
    env = backend_env(planned(), LauncherSettings(), models_dir=tmp_path, base_env={}, sim_rig=rig, sim_speed=250)
    assert env["CORRAL_SIM_SPEED"] == "250.0"
    real = backend_env(planned(), LauncherSettings(), models_dir=tmp_path, base_env={"CORRAL_SIM_RIG": "x"})
    assert "CORRAL_SIM_RIG" not in real


def test_env_default_context_is_the_planned_one_so_plain_requests_find_the_preloaded_copy(tmp_path: Path) -> None:
    def pm(name: str, num_ctx: int) -> PlannedModel:
        return PlannedModel(name=name, num_ctx=num_ctx, vram_bytes=1, expected_tokens_per_s=1.0)

    # nomic-embed-text is trained on 2048 tokens: Ollama caps a 32768 default to that for it.
    mixed = planned(models=(pm("llama3.1:8b", 32768), pm("nomic-embed-text", 2048)))
    assert backend_env(mixed, LauncherSettings(), models_dir=tmp_path, base_env={})["OLLAMA_CONTEXT_LENGTH"] == "32768"
    differing = planned(models=(pm("qwen2.5:7b", 4096), pm("llama3.1:8b", 8192), pm("llama3.2:1b", 4096)))
    assert (
        backend_env(differing, LauncherSettings(), models_dir=tmp_path, base_env={})["OLLAMA_CONTEXT_LENGTH"] == "4096"
    )
    empty = planned(models=())
    assert "OLLAMA_CONTEXT_LENGTH" not in backend_env(empty, LauncherSettings(), models_dir=tmp_path, base_env={})
    configured = LauncherSettings(context_length=16384)
    assert backend_env(empty, configured, models_dir=tmp_path, base_env={})["OLLAMA_CONTEXT_LENGTH"] == "16384"


def test_env_an_ipv6_host_is_bracketed_as_ollama_reads_it(tmp_path: Path) -> None:
    from launcher.sim.env import parse_ollama_host  # the simulator splits OLLAMA_HOST as envconfig.Host() does

    env = backend_env(planned(port=11500), LauncherSettings(host="::1"), models_dir=tmp_path, base_env={})
    assert env["OLLAMA_HOST"] == "[::1]:11500"
    assert parse_ollama_host(env["OLLAMA_HOST"])[1:3] == ("::1", 11500)
    on_ipv6 = BackendLaunch(planned(port=11500), ("ollama", "serve"), env, host="::1")
    assert on_ipv6.url == "http://[::1]:11500"


def test_env_overrides_may_tune_but_not_rewire_a_backend() -> None:
    check_env_overrides(LauncherSettings(env={"OLLAMA_FLASH_ATTENTION": "0", "HTTPS_PROXY": "http://proxy:3128"}))
    with pytest.raises(ConfigError, match=r"launcher\.env\.CUDA_VISIBLE_DEVICES"):
        check_env_overrides(LauncherSettings(env={"CUDA_VISIBLE_DEVICES": "0"}))
    with pytest.raises(ConfigError, match=r"launcher\.env\.OLLAMA_HOST"):
        check_env_overrides(LauncherSettings(env={"OLLAMA_HOST": "0.0.0.0:1"}))


def test_models_dir_is_expanded_and_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_models_dir("~/.ollama/models", None) == tmp_path / "home" / ".ollama" / "models"
    assert resolve_models_dir(".corral/models", tmp_path / "rig" / "config.toml") == tmp_path / "rig/.corral/models"
    assert resolve_models_dir("/srv/models", tmp_path / "config.toml") == Path("/srv/models")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 1.0, 60.0, rng) for n in range(1, 10)]
    for n, delay in enumerate(delays, start=1):
        raw = min(60.0, 2.0 ** (n - 1))
        assert 0.8 * raw <= delay <= raw
    assert delays[-1] > 45  # reached the cap
    assert backoff_delay(10_000, 1.0, 60.0, rng) <= 60.0


# --- processes -----------------------------------------------------------------------------------


async def test_start_publishes_ready_record_and_stop_withdraws_it() -> None:
    store = MemoryStore()
    backend = planned()
    async with Supervisor([launch(backend)], FAST, store=store, host_name="box", store_id="box:/m") as sup:
        assert await sup.start_all() == []
        proc = sup["g0"]
        assert proc.state == State.READY and proc.version == "0.0.0-misbehave"
        (record,) = await store.list_backends()
        assert record.state == BackendState.READY
        assert record.url == f"http://127.0.0.1:{backend.port}"
        assert record.host == "box" and record.store_id == "box:/m"
        assert record.planned_models == ("llama3.1:8b",)
        assert record.gpu_uuids == ("GPU-aaaa",) and record.num_parallel == 2
        assert record.started_at > 0 and record.restarts == 0
        assert record.default_num_ctx == 0  # the launch's env sets no OLLAMA_CONTEXT_LENGTH
        pid = proc.pid
        assert pid is not None and alive(pid)
    assert not alive(pid)
    assert await store.list_backends() == []
    assert list(proc.history) == [State.STOPPED, State.STARTING, State.READY, State.STOPPING, State.STOPPED]


async def test_crash_restarts_with_backoff_and_counts_restarts() -> None:
    store = MemoryStore()
    seen: list[BackendState] = []
    original_put = store.put_backend

    async def recording_put(record, ttl_s=None):  # type: ignore[no-untyped-def]
        seen.append(record.state)
        await original_put(record, ttl_s)

    store.put_backend = recording_put  # type: ignore[method-assign]
    ready_again: list[int] = []

    async def on_restart_ready(proc: BackendProcess) -> None:
        ready_again.append(proc.restarts)

    supervisor = Supervisor(
        [launch(planned(), "--crash-after-ready", "1.0")], FAST, store=store, on_restart_ready=on_restart_ready
    )
    async with supervisor as sup:
        assert await sup.start_all() == []
        proc = sup["g0"]
        await wait_for_restart(proc, 2, WAIT_S)
        history = list(proc.history)
        assert history[:3] == [State.STOPPED, State.STARTING, State.READY]
        assert history[3:6] == [State.BACKOFF, State.STARTING, State.READY]
        assert "exited unexpectedly with status 2" in proc.last_error
        assert "panic: crash-after-ready" in proc.last_error
        (record,) = await store.list_backends()
        assert record.restarts >= 2 and "panic: crash-after-ready" in record.last_error
    assert ready_again[:2] == [1, 2]  # e.g. preload the planned models again after each restart
    # The gateway saw the backend go down (failed) and come back (ready).
    assert BackendState.FAILED in seen and seen.index(BackendState.FAILED) < len(seen) - 1
    assert seen.count(BackendState.READY) >= 3


@pytest.mark.parametrize(("stable_after_s", "attempts"), [(60.0, ["1", "2"]), (0.0, ["1", "1"])])
async def test_backoff_grows_per_crash_and_resets_after_a_stable_run(
    stable_after_s: float, attempts: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    timing = Timing(
        start_timeout_s=15.0, restart_backoff_s=0.05, restart_backoff_max_s=0.2, stable_after_s=stable_after_s
    )
    with caplog.at_level(logging.WARNING, logger="launcher.supervise.supervisor"):
        # 1 s up before each crash: longer than the health gate's slowest poll (0.5 s), so every
        # start is seen ready before the crash, however slow the machine is.
        async with Supervisor([launch(planned(), "--crash-after-ready", "1.0")], timing) as sup:
            assert await sup.start_all() == []
            await wait_for_restart(sup["g0"], 2, WAIT_S)
    restarts = [r.getMessage() for r in caplog.records if "restarting in" in r.getMessage()]
    assert [m.rsplit("attempt ", 1)[1].rstrip(")") for m in restarts[:2]] == attempts


async def test_restart_clears_the_crashed_backends_runners() -> None:
    async with Supervisor([launch(planned(), "--spawn-child", "--crash-after-ready", "1.0")], FAST) as sup:
        assert await sup.start_all() == []
        proc = sup["g0"]
        first_pid = proc.pid
        assert first_pid is not None
        grandchildren = await _children_of(first_pid)
        assert grandchildren
        await wait_for_restart(proc, 1, WAIT_S)
        await wait_gone([first_pid, *grandchildren])


async def _children_of(pid: int) -> list[int]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = children_now(pid)
        if found:
            return found
        await asyncio.sleep(0.02)
    return []


def children_now(pid: int) -> list[int]:
    """Live processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


async def test_stop_during_startup_stops_the_child_without_an_error() -> None:
    async with Supervisor([launch(planned(), "--ready-after", "30")], FAST) as sup:
        proc = sup["g0"]
        starting = asyncio.create_task(proc.start())
        await proc.wait_for(lambda: proc.pid is not None, WAIT_S)
        pid = proc.pid
        assert pid is not None
        await proc.stop()
        await starting  # returns: a stop is not a start failure
        assert proc.state == State.STOPPED and not alive(pid)
        assert State.FAILED not in proc.history


async def test_never_healthy_fails_with_the_reason_and_leaves_nothing() -> None:
    timing = Timing(start_timeout_s=1.0, stop_timeout_s=2.0)
    async with Supervisor([launch(planned("g1"), "--never-healthy")], timing) as sup:
        (failure,) = await sup.start_all()
        assert isinstance(failure, BackendStartError)
        assert "backend g1" in str(failure) and "not healthy after 1s" in str(failure)
        assert "/api/version" in str(failure)
        assert sup["g1"].state == State.FAILED and sup["g1"].pid is None


async def test_exit_at_once_fails_fast_with_its_stderr() -> None:
    timing = Timing(start_timeout_s=60.0)  # failing long before this proves the fail-fast path
    async with Supervisor([launch(planned(), "--exit-at-once")], timing) as sup:
        began = time.monotonic()
        (failure,) = await sup.start_all()
        assert time.monotonic() - began < timing.start_timeout_s
        assert "exited with status 3 before it was ready" in failure.reason
        assert "could not initialize the fake GPU" in failure.reason
        assert list(sup["g0"].history) == [State.STOPPED, State.STARTING, State.FAILED]


async def test_ignored_sigterm_gets_sigkill_after_the_stop_timeout(caplog: pytest.LogCaptureFixture) -> None:
    timing = Timing(start_timeout_s=15.0, stop_timeout_s=0.3)
    async with Supervisor([launch(planned(), "--ignore-sigterm")], timing) as sup:
        assert await sup.start_all() == []
        pid = sup["g0"].pid
        assert pid is not None
        with caplog.at_level(logging.WARNING, logger="launcher.supervise.supervisor"):
            await sup.stop_all()
        assert not alive(pid)
        assert "<g0> did not stop within 0.3s of SIGTERM; killed" in caplog.text
        assert sup["g0"].state == State.STOPPED


async def test_port_in_use_names_the_backend_and_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with Supervisor([launch(planned("g3", port=port))], FAST) as sup:
            (failure,) = await sup.start_all()
    assert str(failure).startswith("backend g3: port ")
    assert f"port {port} on 127.0.0.1 is already in use" in str(failure)


@pytest.mark.parametrize(
    ("host", "reason"),
    [("nosuch.invalid", "cannot listen on nosuch.invalid:"), ("192.0.2.1", "no such local address")],
)
async def test_a_host_nothing_can_listen_on_is_a_start_failure_not_a_crash(host: str, reason: str) -> None:
    backend = planned("g1")
    bad = BackendLaunch(backend, (sys.executable, MISBEHAVE, "serve"), dict(os.environ), host=host)
    async with Supervisor([bad, launch(planned("g0"))], FAST) as sup:
        (failure,) = await sup.start_all()
        assert str(failure).startswith("backend g1: cannot listen on ") and reason in str(failure)
        assert sup["g1"].state == State.FAILED and sup["g0"].state == State.READY


async def test_a_log_dir_that_cannot_be_made_fails_the_backend_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    log_dir = str(tmp_path / "a-file" / "logs")
    async with Supervisor([launch(planned("g0"), log_dir=log_dir)], FAST) as sup:
        (failure,) = await sup.start_all()
        assert str(failure) == f"backend g0: cannot open its log file in {log_dir}: Not a directory"
        assert sup["g0"].state == State.FAILED and sup["g0"].pid is None


async def test_records_in_a_shared_store_are_heartbeated_then_withdrawn() -> None:
    # A record with a TTL (Redis) must be refreshed while the backend runs, or every gateway would
    # drop it after the TTL; each refresh carries a new updated_at.
    store = MemoryStore()
    async with Supervisor([launch(planned())], FAST, store=store, record_ttl_s=0.3) as sup:
        assert await sup.start_all() == []
        (first,) = await store.list_backends()
        deadline = time.monotonic() + WAIT_S
        while True:
            records = await store.list_backends()
            if records and records[0].updated_at > first.updated_at:
                break
            assert time.monotonic() < deadline, "the record was never refreshed"
            await asyncio.sleep(0.05)
        assert records[0].state == BackendState.READY
    assert await store.list_backends() == []


async def test_a_record_prefix_keeps_hosts_apart_in_a_shared_store() -> None:
    # Planned ids ("g0") repeat on every host; launchers sharing one store publish "<host>/g0".
    store = MemoryStore()
    async with Supervisor([launch(planned("g0"))], FAST, store=store, record_ttl_s=5.0, record_prefix="box-a/") as sup:
        assert await sup.start_all() == []
        assert [r.id for r in await store.list_backends()] == ["box-a/g0"]
        await store.put_backend(BackendRecord(id="box-b/g0", url="http://127.0.0.2:1"))  # another host's
    # Leaving withdraws this launcher's record only.
    assert [r.id for r in await store.list_backends()] == ["box-b/g0"]


async def test_missing_binary_is_a_clear_message() -> None:
    backend = planned()
    missing = BackendLaunch(backend, ("/nonexistent/ollama", "serve"), dict(os.environ))
    async with Supervisor([missing], FAST) as sup:
        (failure,) = await sup.start_all()
    assert str(failure) == (
        "backend g0: cannot start '/nonexistent/ollama': no such file (is Ollama installed and on PATH?)"
    )


async def test_backends_start_in_parallel_and_one_failure_does_not_stop_the_others() -> None:
    launches = [launch(planned("g0")), launch(planned("g1"), "--exit-at-once"), launch(planned("g2"))]
    async with Supervisor(launches, FAST) as sup:
        failures = await sup.start_all()
        assert [f.backend_id for f in failures] == ["g1"]
        assert sup["g0"].state == State.READY and sup["g2"].state == State.READY


async def test_log_dir_receives_each_backends_output(tmp_path: Path) -> None:
    async with Supervisor([launch(planned("g0"), log_dir=str(tmp_path / "logs"))], FAST) as sup:
        assert await sup.start_all() == []
    text = (tmp_path / "logs" / "g0.log").read_text()
    assert "misbehave listening on 127.0.0.1:" in text


async def test_backend_receives_the_built_environment(tmp_path: Path) -> None:
    backend = planned("g2+g3", kind=BackendKind.SPLIT, gpu_indices=(3, 2), gpu_uuids=("GPU-d", "GPU-c"))
    settings = LauncherSettings(context_length=8192)
    env = backend_env(backend, settings, models_dir=tmp_path / "models", base_env=dict(os.environ))
    env_file = tmp_path / "env.json"
    run = BackendLaunch(backend, (sys.executable, MISBEHAVE, "serve", "--env-file", str(env_file)), env)
    store = MemoryStore()
    async with Supervisor([run], FAST, store=store) as sup:
        assert await sup.start_all() == []
        (record,) = await store.list_backends()
        assert record.default_num_ctx == 8192  # the gateway learns what plain requests get there
    received = json.loads(env_file.read_text())
    assert received["CUDA_VISIBLE_DEVICES"] == "GPU-d,GPU-c"
    assert received["OLLAMA_SCHED_SPREAD"] == "1"
    assert received["OLLAMA_HOST"] == f"127.0.0.1:{backend.port}"
    assert received["OLLAMA_MODELS"] == str(tmp_path / "models")


# A launcher that the test kills with SIGKILL: it prints its backends' pids, then waits forever.
KILLED_LAUNCHER = """
import asyncio, json, os, sys
from tests.launcher.test_supervisor import launch, planned, FAST
from launcher.supervise.supervisor import Supervisor
from launcher.sim.harness import free_port

async def main():
    launches = [launch(planned("g0"), "--spawn-child"), launch(planned("g1"), "--ignore-sigterm")]
    async with Supervisor(launches, FAST) as sup:
        assert await sup.start_all() == []
        print(json.dumps({"backends": [p.pid for p in sup.processes], "guard": sup.guard_pid}), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_sigkill_of_the_launcher_leaves_no_backend_and_no_runner() -> None:
    launcher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_LAUNCHER, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert launcher.stdout is not None
        line = await asyncio.wait_for(launcher.stdout.readline(), WAIT_S)
        pids = json.loads(line)
        backends: list[int] = pids["backends"]
        runners = await _children_of(backends[0])
        assert runners and all(alive(p) for p in [*backends, *runners])
        launcher.send_signal(signal.SIGKILL)
        await launcher.wait()
        await wait_gone([*backends, *runners, pids["guard"]])
    finally:
        if launcher.returncode is None:
            launcher.kill()
            await launcher.wait()
