"""Where the gateway's CPU goes on small requests: a sampling profile (py-spy) of `corral gateway`
under the overhead benchmark's c=16 chat load, summed by owner and by step of the request path.

    .venv/bin/pip install py-spy && .venv/bin/python -m bench.profile        # ~1 minute

Same fleet as `bench/overhead.py` (two simulated backends, one resident model, API keys on). On a
machine with 2 or more CPUs the gateway is pinned to the last one and everything else to the
others, so that its samples are its own work and not time spent waiting for a core. Reported: the
gateway's CPU per request while pinned (and the aiohttp floor's, `bench/floor_proxy.py`, measured
the same way), then the share of the gateway's busy samples by owner (Corral's code, aiohttp,
asyncio, ...) and by step (the routing decision, learning from the reply, forwarding and relaying,
...). `--raw FILE` keeps py-spy's collapsed stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import gateway_process  # noqa: E402 - the repo root must be importable first
from bench.overhead import API_KEY, HEADERS, floor_process, process_cpu_s, resident_fleet, run_small  # noqa: E402

# Steps of the model-call path, by the frame that marks them (first match wins, outermost first).
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("routing decision", ("_decide_or_wait (gateway/api/dispatch.py",)),
    ("learning from the reply (rates, metrics, activity)", ("_learn (gateway/api/dispatch.py",)),
    ("requests in flight (pool, store)", ("_LocalHold", "InFlight.hold", "_maybe_hold", "BackendPool.begin")),
    ("body read and parse", ("parse_model_call", "read_body (gateway/api/dispatch.py", "request_priority")),
    ("forward and relay (upstream client, the reply)", ("forward (gateway/api/proxy.py",)),
]
HANDLER = "handle_model_call (gateway/api/dispatch.py"
FRONT = "front_middleware"
_OWNER = re.compile(r"\(([^/():]+)/")


def summarize(raw: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(busy samples, samples by owner of the innermost frame, samples by step) of a py-spy raw file."""
    owners: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or "select" in frames[-1]:  # the loop waiting for sockets: idle
            continue
        n = int(count)
        busy += n
        owner = next((m.group(1) for f in reversed(frames) if (m := _OWNER.search(f))), "other")
        owners["Corral (gateway/, launcher/)" if owner in ("gateway", "launcher") else owner] += n
        step = next((name for name, marks in STEPS if any(m in f for f in frames for m in marks)), None)
        if step is None:
            if any(HANDLER in f for f in frames):
                step = "rest of the model-call handler"
            elif any(FRONT in f for f in frames):
                step = "front middleware (limits, tracking, auth, access record)"
            else:
                step = "aiohttp and asyncio outside the handler (HTTP parse, writes, event loop)"
        steps[step] += n
    return busy, owners, steps


def pin(pid: int, cpus: set[int]) -> None:
    subprocess.run(["taskset", "-a", "-cp", ",".join(map(str, sorted(cpus))), str(pid)], stdout=subprocess.DEVNULL)


def cpu_per_request(url: Callable[[], str], pid: int, requests: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        before = process_cpu_s([pid])
        asyncio.run(run_small("profile", "c=16", url, 16, requests))
        samples.append((process_cpu_s([pid]) - before) / requests * 1e6)
    return sorted(samples)[len(samples) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="how long py-spy samples")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks in this file")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    HEADERS["profile"] = {"Authorization": f"Bearer {API_KEY}"}
    cpus = sorted(os.sched_getaffinity(0))
    gateway_cpus, other_cpus = ({cpus[-1]}, set(cpus[:-1])) if len(cpus) > 1 else (set(cpus), set(cpus))
    with tempfile.TemporaryDirectory(prefix="corral-profile-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        sims = resident_fleet(stack, workdir, 100000.0)
        for sim in sims:
            pin(sim.process.pid, other_cpus)
        backends = [s.url for s in sims]
        gateway_url = stack.enter_context(gateway_process(workdir, backends, api_keys=[API_KEY]))
        gateway_pid = int((workdir / "gateway.pid").read_text())
        floor_url, floor_pid = stack.enter_context(floor_process(workdir, backends))
        for pid in (gateway_pid, floor_pid):
            pin(pid, gateway_cpus)
        os.sched_setaffinity(0, other_cpus)
        for warm in (lambda: gateway_url, lambda: floor_url):
            asyncio.run(run_small("profile", "warmup", warm, 16, 500))
        gateway_us = cpu_per_request(lambda: gateway_url, gateway_pid, 2000, 5)
        floor_us = cpu_per_request(lambda: floor_url, floor_pid, 2000, 5)

        raw = args.raw or workdir / "gateway.raw"
        record = [spy, "record", "-p", str(gateway_pid), "-d", str(args.seconds), "-r", "250", "-f", "raw"]
        record += ["-o", str(raw)]
        with subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline and proc.poll() is None:
                asyncio.run(run_small("profile", "c=16", lambda: gateway_url, 16, 1000))
            proc.wait(timeout=args.seconds + 30)
        busy, owners, steps = summarize(raw)

    print(
        f"CPU per request, pinned (median of 5 x 2000 at c=16): gateway {gateway_us:.0f} µs, "
        f"aiohttp floor {floor_us:.0f} µs"
    )
    print(f"\ngateway busy samples: {busy}")
    print("\n| owner of the running code | share |\n|---|---:|")
    for name, n in owners.most_common():
        print(f"| {name} | {100 * n / busy:.1f} % |")
    print("\n| step of the request path (with what it calls) | share |\n|---|---:|")
    for name, n in steps.most_common():
        print(f"| {name} | {100 * n / busy:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
