"""Batch throughput over a 4-card simulated rig: does `corral batch` through Corral use every card?

    .venv/bin/python -m bench.batch               # a few minutes; writes bench/results/batch.json

1,000 chat items, answers of 100-300 tokens, one hot model (llama3.1:8b, resident before timing),
4x RTX 4090 simulated by `corral-sim serve`, OLLAMA_NUM_PARALLEL=4 everywhere, and one time factor
for every set-up (low enough that the machine's cores are not the bottleneck: the CPU column says
how many cores each run kept busy). Set-ups, side by side in one run:
  one card     one `corral-sim serve` on one card, the hand-written client below (the ratio's 1x)
  corral       `corral up` (one backend per card, the gateway) and `corral batch --concurrency auto`
  round-robin  one `corral-sim serve` per card and a hand-written asyncio client sending item i to
               server i mod 4, 4 in flight per server (what a team writes without Corral)
  stock        one stock `corral-sim serve` over all four cards (Ollama loads one copy of the model)
Reported: items/s and output tokens/s (wall clock), the ratio of items/s to one card, and the CPU
cores in use (user + system time of every process of the set-up, over the wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port, stop  # noqa: E402 - the repo root must be importable first
from launcher.sim.harness import SimServer, install_models  # noqa: E402

MODEL = "llama3.1:8b"
CARDS = ["RTX 4090"] * 4
NUM_PARALLEL = 4
# The context corral up plans for this model here; the stand-alone servers get the same, so every
# set-up holds the same KV cache (Ollama's own default over four 24 GB cards would be 262144).
NUM_CTX = 4096
ANSWER_TOKENS = {"answer_tokens_min": 100, "answer_tokens_max": 300}
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    setup: str
    items: int
    ok: int
    wall_s: float
    items_per_s: float
    output_tokens_per_s: float
    cpu_cores: float
    ratio_to_one_card: float = 0.0


def free_port_range(count: int) -> int:
    """A base port with `count` free ports from it (each checked by binding it)."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65536:
            continue
        socks = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(socks):
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def items(count: int) -> list[dict[str, object]]:
    return [
        {"id": i, "model": MODEL, "messages": [{"role": "user", "content": f"Summarise document {i} in a paragraph."}]}
        for i in range(count)
    ]


def cpu_s(pids: list[int]) -> float:
    """User + system seconds of these live processes and their live descendants."""
    total, seen, frontier = 0.0, set(), list(pids)
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    while frontier:
        pid = frontier.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS_PER_S
        frontier.extend(children.get(pid, []))
    return total


def self_cpu_s() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


async def round_robin(urls: list[str], work: list[dict[str, object]]) -> tuple[int, int]:
    """The hand-written client: item i to server i mod len(urls), NUM_PARALLEL in flight per server.
    Returns (ok items, output tokens)."""
    gates = [asyncio.Semaphore(NUM_PARALLEL) for _ in urls]
    ok = tokens = 0

    async def one(session: aiohttp.ClientSession, index: int, item: dict[str, object]) -> None:
        nonlocal ok, tokens
        server = index % len(urls)
        body = {k: v for k, v in item.items() if k != "id"} | {"stream": False}
        async with gates[server], session.post(urls[server] + "/api/chat", json=body) as resp:
            reply = await resp.json()
            if resp.status == 200:
                ok += 1
                tokens += int(reply.get("eval_count") or 0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session, i, item) for i, item in enumerate(work)))
    return ok, tokens


def warm(urls: list[str]) -> None:
    """Load the model on every server before timing (a hot model)."""

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            for url in urls:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "warm up"}], "stream": False}
                async with session.post(url + "/api/chat", json=body) as resp:
                    assert resp.status == 200, await resp.text()

    asyncio.run(go())


def client_run(setup: str, servers: list[SimServer], work: list[dict[str, object]]) -> RunResult:
    warm([s.url for s in servers])
    pids = [s.pid for s in servers]
    cpu0, self0, t0 = cpu_s(pids), self_cpu_s(), time.monotonic()
    ok, tokens = asyncio.run(round_robin([s.url for s in servers], work))
    wall = time.monotonic() - t0
    cpu = cpu_s(pids) - cpu0 + self_cpu_s() - self0
    return RunResult(setup, len(work), ok, wall, ok / wall, tokens / wall, cpu / wall)


def sim_run(setup: str, tmp: Path, cards: list[list[int]], speed: float, work: list[dict[str, object]]) -> RunResult:
    """Servers over the given card groups (indices into CARDS), one shared store, the hand-written client."""
    install_models(tmp / "models", MODEL)
    servers: list[SimServer] = []
    try:
        for n, group in enumerate(cards):
            env = {
                "OLLAMA_NUM_PARALLEL": str(NUM_PARALLEL),
                "OLLAMA_CONTEXT_LENGTH": str(NUM_CTX),
                "CUDA_VISIBLE_DEVICES": ",".join(map(str, group)),
            }
            servers.append(
                SimServer.start(
                    tmp, gpus=CARDS, env=env, speed=speed, models_dir=tmp / "models", name=f"sim{n}", sim=ANSWER_TOKENS
                )
            )
        return client_run(setup, servers, work)
    finally:
        for server in servers:
            server.stop()


def corral_run(tmp: Path, speed: float, work: list[dict[str, object]]) -> RunResult:
    install_models(tmp / "models", MODEL)
    base_port = free_port_range(len(CARDS) + 1)
    port = base_port + len(CARDS)  # the gateway just above the backends: no clash
    config = tmp / "config.toml"
    gpus = "".join(f'[[sim.gpus]]\nname = "{card}"\n' for card in CARDS)
    tokens = "".join(f"{k} = {v}\n" for k, v in ANSWER_TOKENS.items())
    config.write_text(
        f'[launcher]\nollama_bin = "sim"\nmodels_dir = "{tmp / "models"}"\nbase_port = {base_port}\n'
        f'num_parallel = {NUM_PARALLEL}\nstart_timeout_s = 120\n\n[[models]]\nname = "{MODEL}"\nhot = true\n\n'
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nqueue_size = 4096\n\n[sim]\n{tokens}{gpus}'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    log_path = tmp / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "launcher.commands.cli", "up", "--config", str(config)],
            cwd=ROOT, env=env | {"CORRAL_SIM_SPEED": str(speed)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "ready: " not in log_path.read_text():
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("corral up did not become ready:\n" + log_path.read_text()[-3000:])
            time.sleep(0.1)
        inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
        inp.write_text("".join(json.dumps(item) + "\n" for item in work))
        cpu0, self0, t0 = cpu_s([up.pid]), self_cpu_s(), time.monotonic()
        with (tmp / "batch.log").open("wb") as batch_log:
            subprocess.run(
                [sys.executable, "-m", "launcher.commands.cli", "batch", str(inp), "-o", str(out), "--overwrite"],
                cwd=ROOT, env=env | {"OLLAMA_HOST": f"127.0.0.1:{port}"}, check=False, stdout=batch_log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        process_wall = time.monotonic() - t0
        cpu = cpu_s([up.pid]) - cpu0 + self_cpu_s() - self0
        # The batch's own wall time (from its summary): from reading the fleet's capacity to the last
        # answer, as the in-process client above is timed; the interpreter's start is not the fleet's.
        reported = re.search(r"(?m)^wall: ([0-9.]+)s", (tmp / "batch.log").read_text())
        wall = float(reported.group(1)) if reported else process_wall
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        ok = [r for r in rows if r["ok"]]
        tokens_out = sum(int(r["response"].get("eval_count") or 0) for r in ok)
        return RunResult("corral", len(work), len(ok), wall, len(ok) / wall, tokens_out / wall, cpu / process_wall)
    finally:
        stop(up, signal.SIGTERM, timeout_s=30)


def table(results: list[RunResult]) -> str:
    lines = [
        "| set-up | items ok | wall s | items/s | output tokens/s | x one card | CPU cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.setup} | {r.ok}/{r.items} | {r.wall_s:.1f} | {r.items_per_s:.2f} | {r.output_tokens_per_s:.0f} "
            f"| {r.ratio_to_one_card:.2f} | {r.cpu_cores:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000, help="chat items per set-up")
    parser.add_argument("--speed", type=float, default=4.0, help="the simulated backends' time factor (all set-ups)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batch.json")
    args = parser.parse_args(argv)
    work = items(args.items)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-batch-") as tmp_name:
        tmp = Path(tmp_name)
        results.append(sim_run("one card", tmp / "one", [[0]], args.speed, work))
        results.append(corral_run(tmp / "corral", args.speed, work))
        results.append(sim_run("round-robin", tmp / "rr", [[0], [1], [2], [3]], args.speed, work))
        results.append(sim_run("stock", tmp / "stock", [[0, 1, 2, 3]], args.speed, work))
    base = results[0].items_per_s
    for r in results:
        r.ratio_to_one_card = r.items_per_s / base if base else 0.0
    print(f"{args.items} chat items, 100-300 output tokens, {MODEL} hot, 4x RTX 4090, speed x{args.speed:g}")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"speed": args.speed, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
