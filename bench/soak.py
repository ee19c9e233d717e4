"""Soak: N concurrent streams through the gateway for M minutes; completed/failed, RSS and fds over time.

    .venv/bin/python -m bench.soak --streams 200 --minutes 10     # defaults: 100 streams, 2 minutes

Two simulated backends (real `corral-sim serve` processes, up to 64 slots each) serve one model;
`corral gateway` runs in its own process in front of them. Each of N clients streams /api/generate
(~128 tokens) again and again until the time is up. Every `--sample-s` seconds one line reports
the requests completed and failed so far and the gateway process's resident memory (VmRSS) and
open file descriptors, read from /proc. A leak shows as RSS or fds that keep climbing after the
first samples; the summary prints the last sample against the first after warm-up, as ratios.
It is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.harness import ROOT, free_port, stop, wait_http
from launcher.sim.harness import SimServer, install_models

MODEL = "llama3.1:8b"


@dataclass
class Tally:
    completed: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


def proc_sample(pid: int) -> tuple[float, int]:
    """(VmRSS in MiB, open fds) of a process."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def one_stream(http: aiohttp.ClientSession, url: str, tally: Tally) -> None:
    body = {"model": MODEL, "prompt": "tell me a story", "options": {"num_predict": 128}}
    try:
        async with http.post(url + "/api/generate", json=body) as resp:
            if resp.status != 200:
                tally.fail(f"HTTP {resp.status}")
                await resp.read()
                return
            last: dict[str, object] = {}
            async for line in resp.content:
                if line.strip():
                    last = json.loads(line)
            if "error" in last or last.get("done") is not True:
                tally.fail("stream ended without done")
            else:
                tally.completed += 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        tally.fail(type(e).__name__)


async def soak(url: str, gateway_pid: int, streams: int, minutes: float, sample_s: float) -> None:
    tally = Tally()
    deadline = time.monotonic() + minutes * 60
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    samples: list[tuple[float, int, int, float, int]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def client() -> None:
            while time.monotonic() < deadline:
                await one_stream(http, url, tally)

        started = time.monotonic()
        clients = [asyncio.create_task(client()) for _ in range(streams)]
        print(f"{'t_s':>6} {'completed':>10} {'failed':>7} {'rss_mib':>8} {'fds':>6}")
        while time.monotonic() < deadline:
            await asyncio.sleep(min(sample_s, max(deadline - time.monotonic(), 0.1)))
            rss, fds = proc_sample(gateway_pid)
            row = (time.monotonic() - started, tally.completed, tally.failed, rss, fds)
            samples.append(row)
            print(f"{row[0]:6.0f} {row[1]:10d} {row[2]:7d} {row[3]:8.1f} {row[4]:6d}", flush=True)
        await asyncio.gather(*clients)
    rss, fds = proc_sample(gateway_pid)
    print(f"\n{streams} streams for {minutes:g} min: {tally.completed} completed, {tally.failed} failed")
    if tally.errors:
        print("failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(tally.errors.items())))
    if len(samples) >= 2:
        first = samples[min(1, len(samples) - 1)]  # after warm-up: the first sample includes start-up
        print(f"gateway RSS {first[3]:.1f} -> {rss:.1f} MiB (x{rss / max(first[3], 0.1):.2f}), fds {first[4]} -> {fds}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams (default 100)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long (default 2)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--speed", type=float, default=50.0, help="simulator time factor (default 50)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-soak-") as tmp:
        workdir = Path(tmp)
        install_models(workdir / "models", MODEL)
        # Half the streams per backend, up to 64 slots of a short context each (the KV cache of 64 x
        # 512 tokens fits one card); streams beyond the slots wait in the gateway's queue.
        slots = max(1, min((args.streams + 1) // 2, 64))
        env = {"OLLAMA_NUM_PARALLEL": str(slots), "OLLAMA_CONTEXT_LENGTH": "512", "OLLAMA_MAX_QUEUE": "100000"}
        sims = [
            SimServer.start(workdir, env=env, speed=args.speed, models_dir=workdir / "models", name=f"g{i}")
            for i in range(2)
        ]
        port = free_port()
        config = workdir / "gateway.toml"
        lines = ["[gateway]", f'listen = "127.0.0.1:{port}"', "queue_size = 100000", "max_connections = 100000"]
        for sim in sims:
            lines += ["[[gateway.backends]]", f'url = "{sim.url}"', f"num_parallel = {slots}", "num_ctx = 512"]
        config.write_text("\n".join(lines) + "\n")
        log = (workdir / "gateway.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.commands.cli", "gateway", "--config", str(config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/api/corral/ready", log=workdir / "gateway.log")
            asyncio.run(soak(f"http://127.0.0.1:{port}", proc.pid, args.streams, args.minutes, args.sample_s))
        finally:
            stop(proc, signal.SIGTERM, timeout_s=30)
            log.close()
            for sim in sims:
                sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
