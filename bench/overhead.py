"""Gateway overhead: the same backends reached directly, through Corral's gateway, and through nginx.

    .venv/bin/python -m bench.overhead            # a few minutes; writes bench/results/overhead.json

Two simulated backends (`corral-sim serve`, time factor high enough that they answer at once) hold
the same resident model. Three paths, measured side by side in one run, round after round in turn
so that machine noise hits them alike:
  direct   the load generator spreads requests over the two backends itself (client-side round-robin:
           the zero-overhead baseline)
  gateway  `corral gateway` (its own process) over both backends, policy `residency`, metrics on
  gateway+auth  the same with API keys required (every request carries `Authorization: Bearer`)
  aiohttp floor  `bench/floor_proxy.py`: an aiohttp server over the gateway's upstream client,
           round-robin and nothing else (what the framework costs before Corral does any work)
  nginx    nginx round-robin over both backends (when the `nginx` binary is installed)
  gateway @REF  with `--compare REF`: the gateway of another commit (a git worktree of REF), for a
           before/after ratio measured in the same run
Scenarios: small non-streamed /api/chat at concurrency 1, 16 and 64; 64 concurrent streams of 200
chunks. Reported: requests/s (chunks/s for streams), p50/p99 latency, the ratios to direct, and the
proxy's own CPU time per request (per chunk for streams), read from /proc for its processes.
Everything runs on this one machine, load generator included, so absolute numbers are the
machine's; the ratios are the result. The CPU time is the steadiest figure on a busy machine: it
is what one hop costs whatever else runs beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import free_port, gateway_process, stop, wait_http  # noqa: E402 - the repo root must be importable first
from launcher.sim.harness import SimServer  # noqa: E402

MODEL = "qwen2.5:0.5b"
SMALL_CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hi."}],
    "stream": False,
    "options": {"num_predict": 8, "seed": 1},
}
STREAM_CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a long story."}],
    "stream": True,
    "options": {"num_predict": 200, "seed": 1},
}


# ---------------------------------------------------------------------------------------------
# Load generation


@dataclass
class RunResult:
    path: str
    scenario: str
    requests: int
    errors: int
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    chunks: int = 0
    ttft_s: list[float] = field(default_factory=list, repr=False)
    cpu_s: float | None = None  # CPU seconds the proxy's processes used during the run

    @property
    def cpu_us_per_unit(self) -> float | None:
        """Proxy CPU microseconds per request (per chunk for streams)."""
        units = self.chunks or self.requests
        return None if self.cpu_s is None or not units else self.cpu_s / units * 1e6

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_s

    def pct(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(self.latencies_s if values is None else values)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]


API_KEY = "sk-bench-overhead"
HEADERS: dict[str, dict[str, str]] = {"gateway+auth": {"Authorization": f"Bearer {API_KEY}"}}


async def run_small(path: str, scenario: str, next_url: Callable[[], str], concurrency: int, total: int) -> RunResult:
    latencies: list[float] = []
    errors = 0
    remaining = total
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS.get(path)) as session:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with session.post(next_url() + "/api/chat", json=SMALL_CHAT) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return RunResult(path, scenario, total, errors, wall, latencies)


async def run_streams(path: str, next_url: Callable[[], str], streams: int, waves: int) -> RunResult:
    latencies: list[float] = []
    ttfts: list[float] = []
    chunks = 0
    errors = 0
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS.get(path)) as session:

        async def one() -> None:
            nonlocal chunks, errors
            t0 = time.perf_counter()
            first = True
            async with session.post(next_url() + "/api/chat", json=STREAM_CHAT) as resp:
                if resp.status != 200:
                    errors += 1
                async for _line in resp.content:
                    if first:
                        ttfts.append(time.perf_counter() - t0)
                        first = False
                    chunks += 1
            latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        for _ in range(waves):
            await asyncio.gather(*(one() for _ in range(streams)))
        wall = time.perf_counter() - start
    return RunResult(path, f"stream x{streams}", streams * waves, errors, wall, latencies, chunks, ttfts)


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` and their children (nginx's workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    wanted = set(pids)
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid in wanted or ppid in wanted:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


@dataclass
class ProxyPath:
    """One way to the backends: where each request goes, and the processes doing the proxying."""

    pick: Callable[[], str]
    pids: list[int] = field(default_factory=list)


def round_robin(urls: list[str]) -> Callable[[], str]:
    state = {"i": 0}

    def pick() -> str:
        state["i"] = (state["i"] + 1) % len(urls)
        return urls[state["i"]]

    return pick


# ---------------------------------------------------------------------------------------------
# The three paths


@contextlib.contextmanager
def worktree(ref: str, where: Path) -> Iterator[Path]:
    """A detached git worktree of `ref` at `where`, removed afterwards."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True, stdout=subprocess.DEVNULL
    )
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)


def resident_fleet(stack: contextlib.ExitStack, workdir: Path, speed: float) -> list[SimServer]:
    """The two simulated backends every path reaches, `MODEL` pulled and resident on both, so every
    path serves from loaded models; they stop with `stack`."""
    env = {"OLLAMA_NUM_PARALLEL": "64", "OLLAMA_KEEP_ALIVE": "-1"}
    sims = [
        stack.enter_context(
            SimServer.start(
                workdir,
                gpus=["RTX 4090"],
                env=env,
                speed=speed,
                name=f"b{i}",
                models_dir=workdir / "models",
                # Every answer runs to num_predict: small chats 8 tokens, streams 200 chunks.
                sim={"answer_tokens_min": 1000, "answer_tokens_max": 1000},
            )
        )
        for i in range(2)
    ]
    sims[0].pull(MODEL)
    for sim in sims:
        sim.json("POST", "/api/generate", {"model": MODEL, "prompt": "", "keep_alive": -1})
    return sims


@contextlib.contextmanager
def floor_process(workdir: Path, backends: list[str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    log_path = workdir / "floor.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.floor_proxy", str(port), *backends],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/", log=log_path)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        stop(proc, signal.SIGTERM, timeout_s=10)


@contextlib.contextmanager
def nginx_process(workdir: Path, backends: list[str]) -> Iterator[tuple[str, int] | None]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        yield None
        return
    port = free_port()
    prefix = workdir / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"    server {url.removeprefix('http://')};" for url in backends)
    conf = prefix / "nginx.conf"
    # One worker, like the gateway's one process; upstream keepalive like the gateway's pooled session.
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  upstream ollama {{
{servers}
    keepalive 128;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://ollama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1;
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""
    )
    with (prefix / "stderr.log").open("wb") as stderr:
        proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_http(f"http://127.0.0.1:{port}/", log=prefix / "error.log")
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        stop(proc, signal.SIGQUIT, timeout_s=10)  # SIGQUIT: nginx's graceful shutdown


# ---------------------------------------------------------------------------------------------


def summarize(results: list[RunResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Median over rounds of each (scenario, path) figure."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    keys = sorted({(r.scenario, r.path) for r in results})
    for scenario, path in keys:
        runs = [r for r in results if r.scenario == scenario and r.path == path]
        row = {
            "rps": statistics.median(r.rps for r in runs),
            "p50_ms": statistics.median(r.pct(0.50) for r in runs) * 1000,
            "p99_ms": statistics.median(r.pct(0.99) for r in runs) * 1000,
            "errors": float(sum(r.errors for r in runs)),
            "rounds": float(len(runs)),
        }
        cpu = [c for c in (r.cpu_us_per_unit for r in runs) if c is not None]
        if cpu:
            row["cpu_us"] = statistics.median(cpu)
        if runs[0].chunks:
            row["chunks_per_s"] = statistics.median(r.chunks_per_s for r in runs)
            row["ttft_p50_ms"] = statistics.median(r.pct(0.5, r.ttft_s) for r in runs) * 1000
        table.setdefault(scenario, {})[path] = row
    return table


def render(table: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| scenario | path | req/s | chunks/s | p50 ms | p99 ms | vs direct (rate) | p50 added ms "
        "| proxy CPU µs | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario, paths in table.items():
        direct = paths.get("direct")
        order = ["direct", "gateway", "gateway+auth"]
        order += [*sorted(p for p in paths if p.startswith("gateway @")), "aiohttp floor", "nginx"]
        for path in order:
            row = paths.get(path)
            if row is None:
                continue
            rate_key = "chunks_per_s" if "chunks_per_s" in row else "rps"
            ratio = row[rate_key] / direct[rate_key] if direct else float("nan")
            added = row["p50_ms"] - direct["p50_ms"] if direct else float("nan")
            chunks = f"{row['chunks_per_s']:.0f}" if "chunks_per_s" in row else "-"
            cpu = f"{row['cpu_us']:.0f}" if "cpu_us" in row else "-"
            lines.append(
                f"| {scenario} | {path} | {row['rps']:.0f} | {chunks} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
                f"| {ratio:.2f}x | {added:+.2f} | {cpu} | {row['errors']:.0f} |"
            )
    return "\n".join(lines)


async def measure(paths: dict[str, ProxyPath], args: argparse.Namespace) -> list[RunResult]:
    results: list[RunResult] = []
    # Warm every path (connections, the gateway's first polls, nginx's upstream keepalive).
    for name, path in paths.items():
        await run_small(name, "warmup", path.pick, 16, 300)

    async def timed(path: ProxyPath, run: Awaitable[RunResult]) -> RunResult:
        before = process_cpu_s(path.pids) if path.pids else None
        result = await run
        if before is not None:
            result.cpu_s = process_cpu_s(path.pids) - before
        return result

    for round_no in range(args.rounds):
        for name, path in paths.items():
            # c=1 shows the hop's own latency on an idle machine; c=16 and c=64 load it.
            requests = max(args.requests // 4, 100)
            results.append(await timed(path, run_small(name, "chat c=1", path.pick, 1, requests)))
            for concurrency in (16, 64):
                run = run_small(name, f"chat c={concurrency}", path.pick, concurrency, args.requests)
                results.append(await timed(path, run))
            results.append(await timed(path, run_streams(name, path.pick, 64, args.waves)))
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario per path (median is reported)")
    parser.add_argument("--requests", type=int, default=2000, help="non-streamed requests per run")
    parser.add_argument("--waves", type=int, default=4, help="waves of 64 streams per run")
    parser.add_argument("--speed", type=float, default=100000.0, help="the simulated backends' time factor")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    parser.add_argument(
        "--compare", metavar="REF", help="also run the gateway of git commit REF (e.g. HEAD~3) beside this one"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            sims = resident_fleet(stack, workdir, args.speed)
            backends = [s.url for s in sims]
            gateway_url = stack.enter_context(gateway_process(workdir, backends))
            auth_url = stack.enter_context(gateway_process(workdir, backends, api_keys=[API_KEY], name="gateway-auth"))
            floor_url, floor_pid = stack.enter_context(floor_process(workdir, backends))
            nginx = stack.enter_context(nginx_process(workdir, backends))
            compare_url = None
            if args.compare:
                checkout = stack.enter_context(worktree(args.compare, workdir / "compare"))
                compare_url = stack.enter_context(
                    gateway_process(workdir, backends, name="gateway-compare", root=checkout)
                )

            def pid_of(name: str) -> list[int]:
                return [int((workdir / f"{name}.pid").read_text())]

            paths: dict[str, ProxyPath] = {
                "direct": ProxyPath(round_robin(backends)),
                "gateway": ProxyPath(lambda: gateway_url, pid_of("gateway")),
                "gateway+auth": ProxyPath(lambda: auth_url, pid_of("gateway-auth")),
            }
            if compare_url is not None:
                paths[f"gateway @{args.compare}"] = ProxyPath(lambda: compare_url, pid_of("gateway-compare"))
            paths["aiohttp floor"] = ProxyPath(lambda: floor_url, [floor_pid])
            if nginx is not None:
                nginx_url, nginx_pid = nginx
                paths["nginx"] = ProxyPath(lambda: nginx_url, [nginx_pid])
            else:
                print("nginx not installed: measuring direct and gateway only", file=sys.stderr)
            results = asyncio.run(measure(paths, args))

    table = summarize(results)
    print(render(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.write_text(json.dumps({"meta": meta, "table": table, "runs": [asdict(r) for r in results]}, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
