"""Several hosts, for real: two GPU hosts and a front host as network namespaces joined by veth
pairs. Each GPU host runs `corral up` (simulated rig, state in Redis) with its backends bound to
that host's own address; the front host runs Redis and two `corral gateway`s. Clients talk to the
gateways from inside the front host, so all traffic stays between the namespaces made here.

    GPU host A 198.18.1.2 ── veth ── 198.18.1.1  front host: Redis, gateways :11434 and :11435
    GPU host B 198.18.2.2 ── veth ── 198.18.2.1

(198.18.0.0/15 is the range set aside for network tests; nothing routes it, and the namespaces
have no route out anyway.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.commands.up import SHARED_RECORD_TTL_S
from launcher.sim.harness import install_models
from tests.support.netns import NetnsLab

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(240)]

MODEL = "llama3.1:8b"
GATEWAYS = ("127.0.0.1:11434", "127.0.0.1:11435")
HOSTS = {"gpu-a": ("198.18.1.2", "198.18.1.1"), "gpu-b": ("198.18.2.2", "198.18.2.1")}
# A generous bound for "within the record TTL": the TTL, a poll, and a slow shared machine.
GONE_WITHIN_S = SHARED_RECORD_TTL_S + 25.0
CORRAL = str(Path(sys.executable).with_name("corral"))


def gpu_host_config(tmp: Path, name: str, address: str, redis_address: str) -> Path:
    models = tmp / f"{name}-models"
    install_models(models, MODEL)  # what an earlier `ollama pull` left in this host's store
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""
[launcher]
ollama_bin = "sim"
models_dir = "{models}"
host = "{address}"
base_port = 11500
num_parallel = 1
keep_alive = "30m"
log_dir = "{tmp / f"{name}-logs"}"

[[models]]
name = "{MODEL}"

[gateway]
listen = "127.0.0.1:11434"
state = "redis"
redis_url = "redis://{redis_address}:6379/0"

[sim]
speed = 1.0
answer_tokens_min = 400
answer_tokens_max = 400
[[sim.gpus]]
name = "RTX 4090"
"""
    )
    return path


def front_config(tmp: Path) -> Path:
    path = tmp / "front.toml"
    path.write_text(
        """
[gateway]
state = "redis"
redis_url = "redis://127.0.0.1:6379/0"
health_interval_s = 1.0
poll_interval_s = 0.5
"""
    )
    return path


class Fleet:
    """The running lab, and what a client on the front host sees."""

    def __init__(self, lab: NetnsLab, front: str, tmp: Path) -> None:
        self.lab = lab
        self.front = front
        self.tmp = tmp
        self.launchers: dict[str, subprocess.Popen[bytes]] = {}
        self.gpu_ns: dict[str, str] = {}
        self.configs: dict[str, Path] = {}

    def start_launcher(self, name: str) -> None:
        self.launchers[name] = self.lab.spawn(
            self.gpu_ns[name], [CORRAL, "up", "--config", str(self.configs[name])], hostname=name, log_name=name
        )

    def curl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self.front, ["curl", "-sS", "--noproxy", "*", "-m", "45", *args], timeout_s)

    def status(self, gateway: str) -> list[dict[str, Any]]:
        result = self.curl(f"http://{gateway}/api/corral/status")
        if result.returncode != 0:
            return []
        backends: list[dict[str, Any]] = json.loads(result.stdout)["backends"]
        return backends

    def routable_hosts(self, gateway: str) -> set[str]:
        return {b["id"].split("/")[0] for b in self.status(gateway) if b["healthy"] and b["state"] == "ready"}

    def known_hosts(self, gateway: str) -> set[str]:
        return {b["id"].split("/")[0] for b in self.status(gateway)}

    def chats(self, gateway: str, count: int) -> list[tuple[int, str]]:
        """`count` chats at once through `gateway`: (status, serving backend) for each."""
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
            | {"options": {"num_predict": 120}}
        )
        procs = []
        for _ in range(count):
            argv = ["curl", "-sS", "--noproxy", "*", "-m", "45", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"]
            argv += ["-H", "Content-Type: application/json", "-d", body, f"http://{gateway}/api/chat"]
            procs.append(
                subprocess.Popen(["ip", "netns", "exec", self.front, *argv], stdout=subprocess.PIPE, text=True)
            )
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            lines = out.splitlines()
            backend = next(
                (ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("x-corral-backend:")), ""
            )
            code = int(lines[-1][-3:]) if lines and lines[-1][-3:].isdigit() else 0
            results.append((code, backend))
        return results

    def hosts_serving(self, gateway: str, rounds: int = 5) -> set[str]:
        """The hosts whose backends answered pairs of simultaneous chats (until both did)."""
        served: set[str] = set()
        for _ in range(rounds):
            results = self.chats(gateway, 2)
            assert all(code == 200 for code, _ in results), (results, self.logs())
            served |= {backend.split("/")[0] for _, backend in results}
            if served == set(HOSTS):
                break
        return served

    def logs(self) -> str:
        parts = []
        for log in sorted(self.tmp.glob("lab/*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"--- {log.name}\n{text[-2500:]}")
        return "\n".join(parts)


def wait_until(fleet: Fleet, what: str, check: Callable[[], bool], bound_s: float, during: Callable[[], None]) -> None:
    """Poll `check` (running `during` each round, e.g. client traffic) until true within `bound_s`."""
    deadline = time.monotonic() + bound_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound_s:.0f}s\n{fleet.logs()}")
        during()
        time.sleep(0.3)


@pytest.fixture
def lab(tmp_path: Path) -> Any:
    reason = NetnsLab.unavailable()
    if reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    for tool in ("redis-server", "curl"):
        if not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
            pytest.skip(f"{tool} is not installed")
    with NetnsLab(tmp_path / "lab") as made:
        yield made


def test_two_gpu_hosts_behind_two_gateways_survive_a_dead_and_a_frozen_launcher(lab: NetnsLab, tmp_path: Path) -> None:
    front = lab.host("front")
    fleet = Fleet(lab, front, tmp_path)
    for name, (address, front_address) in HOSTS.items():
        ns = lab.host(name)
        lab.link(front, front_address, ns, address)
        fleet.gpu_ns[name] = ns
        fleet.configs[name] = gpu_host_config(tmp_path, name, address, front_address)
    binds = " ".join(["127.0.0.1", *(f for _, f in HOSTS.values())])
    lab.spawn(
        front,
        [
            *("redis-server", "--bind", binds, "--port", "6379", "--save", "", "--appendonly", "no"),
            *("--dir", str(tmp_path), "--protected-mode", "no"),
        ],
        log_name="redis",
    )
    deadline = time.monotonic() + 20
    while lab.run(front, ["redis-cli", "-h", "127.0.0.1", "ping"]).stdout.strip() != "PONG":
        assert time.monotonic() < deadline, "redis did not start"
        time.sleep(0.1)
    for name in HOSTS:
        fleet.start_launcher(name)
    config = front_config(tmp_path)
    for i, listen in enumerate(GATEWAYS):
        lab.spawn(front, [CORRAL, "gateway", "--config", str(config), "--listen", listen], log_name=f"gateway-{i}")

    def no_traffic() -> None:
        pass

    both = set(HOSTS)
    for gw in GATEWAYS:
        wait_until(fleet, f"{gw} routes to both hosts", lambda gw=gw: fleet.routable_hosts(gw) == both, 90, no_traffic)

    # A chat through either gateway reaches backends on both hosts: two at once, one slot per
    # backend, so the second goes to the other host.
    for gw in GATEWAYS:
        assert fleet.hosts_serving(gw) == both, fleet.logs()

    failures: list[tuple[int, str]] = []

    sent = [0]

    def traffic_served_by(host: str | None) -> Callable[[], None]:
        """One chat, alternating gateways; it must succeed (on `host`'s backends, when given)."""

        def send() -> None:
            sent[0] += 1
            for code, backend in fleet.chats(GATEWAYS[sent[0] % 2], 1):
                if code != 200 or (host is not None and not backend.startswith(host + "/")):
                    failures.append((code, backend))

        return send

    # Kill host A's launcher outright: its backends leave routing (their record expires within the
    # TTL; the orphan guard stops the processes) while requests keep succeeding on host B.
    fleet.launchers["gpu-a"].send_signal(signal.SIGKILL)
    fleet.launchers["gpu-a"].wait(timeout=10)
    for gw in GATEWAYS:
        wait_until(
            fleet,
            f"{gw} drops host A's records",
            lambda gw=gw: "gpu-a" not in fleet.known_hosts(gw),
            GONE_WITHIN_S,
            traffic_served_by("gpu-b"),
        )
    traffic_served_by("gpu-b")()
    assert not failures, (failures, fleet.logs())

    # Restarting host A brings its backends back.
    fleet.start_launcher("gpu-a")
    for gw in GATEWAYS:
        wait_until(fleet, f"{gw} routes to A again", lambda gw=gw: fleet.routable_hosts(gw) == both, 90, no_traffic)

    # Freeze host B's launcher: its backends still answer, but its records go stale and expire, so
    # the gateways stop routing there (until then B may serve: it is alive); requests keep working.
    launcher_b = fleet.launchers["gpu-b"]
    launcher_b.send_signal(signal.SIGSTOP)
    try:
        for gw in GATEWAYS:
            wait_until(
                fleet,
                f"{gw} drops host B's stale records",
                lambda gw=gw: "gpu-b" not in fleet.known_hosts(gw),
                GONE_WITHIN_S,
                traffic_served_by(None),
            )
        for _ in range(2):
            traffic_served_by("gpu-a")()
        assert not failures, (failures, fleet.logs())
        # The frozen host's backends are alive all along: only their records went away.
        address = HOSTS["gpu-b"][0]
        assert fleet.curl(f"http://{address}:11500/api/version").returncode == 0
    finally:
        launcher_b.send_signal(signal.SIGCONT)
    # Resumed, it heartbeats again and its backends return to routing.
    for gw in GATEWAYS:
        wait_until(fleet, f"{gw} routes to B again", lambda gw=gw: fleet.routable_hosts(gw) == both, 60, no_traffic)
    assert fleet.hosts_serving(GATEWAYS[0]) == set(HOSTS), fleet.logs()


def test_the_nftables_rules_let_only_the_gateways_reach_a_backend_port(tmp_path: Path) -> None:
    """deploy/systemd/corral-backends.nft on a GPU host, with this lab's addresses in its sets: the
    gateway host reaches a backend port, another host on another interface does not."""
    reason = NetnsLab.unavailable()
    if reason:
        pytest.skip(f"cannot make network namespaces here: {reason}")
    if not any(Path(d, "nft").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("nft is not installed (apt-get install nftables)")
    rules = (Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "corral-backends.nft").read_text()
    gateway_set = "elements = { 10.0.0.21, 10.0.0.22 }"
    hosts_set = "elements = { 10.0.0.11, 10.0.0.12, 10.0.0.21, 10.0.0.22 }"
    assert gateway_set in rules and hosts_set in rules
    with NetnsLab(tmp_path / "lab") as lab:
        gpu, front, outsider = lab.host("gpu"), lab.host("front"), lab.host("other")
        lab.link(front, "198.18.1.1", gpu, "198.18.1.2")
        lab.link(outsider, "198.18.3.2", gpu, "198.18.3.1")
        # The outsider is routed to the backend's address through the GPU host's other interface.
        assert lab.run(outsider, ["ip", "route", "add", "198.18.1.0/24", "via", "198.18.3.1"]).returncode == 0
        # A stand-in for a backend: anything listening on a backend port of the host's address.
        lab.spawn(gpu, [sys.executable, "-m", "http.server", "11500", "--bind", "198.18.1.2"], log_name="backend")
        url = "http://198.18.1.2:11500/"

        def reaches(ns: str) -> bool:
            return lab.run(ns, ["curl", "-sS", "--noproxy", "*", "-m", "3", "-o", "/dev/null", url]).returncode == 0

        deadline = time.monotonic() + 20
        while not reaches(front):
            assert time.monotonic() < deadline, "the stand-in backend did not start"
            time.sleep(0.2)
        assert reaches(outsider)  # without the rules, anyone routed here gets in
        path = tmp_path / "corral-backends.nft"
        path.write_text(
            rules.replace(gateway_set, "elements = { 198.18.1.1 }").replace(
                hosts_set, "elements = { 198.18.1.1, 198.18.1.2 }"
            )
        )
        loaded = lab.run(gpu, ["nft", "-f", str(path)])
        assert loaded.returncode == 0, loaded.stderr
        assert reaches(front)
        assert not reaches(outsider)
