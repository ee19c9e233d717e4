"""Routing quality on a simulated heterogeneous rig: where requests go decides how long users wait.

    .venv/bin/python -m bench.routing             # a few minutes; writes bench/results/routing.json

One workload, replayed against four set-ups built from the same simulated cards (2x RTX 4090 +
2x RTX 3090, `corral-sim serve`, a time factor so the run takes minutes, not hours):
  residency    one backend per card behind Corral's gateway, policy `residency`
  least-busy   the same backends, policy `least-busy`
  round-robin  the same backends, policy `round-robin` (what a hand-written nginx upstream does)
  stock        one `ollama serve` over all four cards (each model loaded once, Ollama's placement)
Every set-up starts cold (nothing loaded), with the models installed in its store.

The workload: five 7-14B models with Zipf-like popularity, Poisson arrivals, and a burst of the hot
model halfway through (a batch job landing on a team server). Each request streams; time to first
token is measured by the client. Reported in simulated seconds (wall time x time factor): TTFT
p50/p95 over all requests and over the burst alone, cold loads (replies whose load_duration shows a
load), evictions (from the backends' logs) and where the requests went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import gateway_process  # noqa: E402 - the repo root must be importable first
from launcher.sim.harness import SimServer, install_models  # noqa: E402

CARDS = ["RTX 4090", "RTX 4090", "RTX 3090", "RTX 3090"]
# (model, relative popularity): the everyday model, two common ones, two occasional bigger ones.
MODELS = [("llama3.1:8b", 8.0), ("qwen2.5:7b", 4.0), ("mistral:7b", 2.0), ("gemma2:9b", 1.0), ("qwen2.5:14b", 1.0)]
NUM_PARALLEL = 4
NUM_CTX = 4096
LOAD_SHOWN_S = 1.0  # a reply whose load_duration exceeds this waited for a model load


@dataclass(frozen=True)
class Arrival:
    at_s: float  # simulated seconds after the start
    model: str
    prompt_words: int
    num_predict: int
    burst: bool = False


def workload(seed: int, duration_s: float, rate_per_s: float, burst: int) -> list[Arrival]:
    """Poisson arrivals over `duration_s` simulated seconds, plus `burst` hot-model requests at half time."""
    rng = random.Random(seed)
    names = [m for m, _ in MODELS]
    weights = [w for _, w in MODELS]
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            break
        arrivals.append(Arrival(t, rng.choices(names, weights)[0], rng.randint(50, 600), rng.randint(40, 200)))
    start = duration_s / 2
    arrivals += [Arrival(start + 0.05 * i, names[0], 300, 150, burst=True) for i in range(burst)]
    return sorted(arrivals, key=lambda a: a.at_s)


@dataclass
class Result:
    setup: str
    model: str
    ttft_s: float  # simulated
    total_s: float  # simulated
    cold_load: bool
    status: int
    backend: str
    burst: bool


async def replay(url: str, arrivals: list[Arrival], speed: float, setup: str) -> tuple[list[Result], float]:
    results: list[Result] = []
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(a: Arrival, t0: float) -> None:
            await asyncio.sleep(max(0.0, t0 + a.at_s / speed - time.monotonic()))
            prompt = " ".join(words[i % len(words)] for i in range(a.prompt_words))
            body = {
                "model": a.model,
                "messages": [{"role": "user", "content": prompt}],
                "options": {"num_predict": a.num_predict, "num_ctx": NUM_CTX},
            }
            started = time.monotonic()
            ttft, final, status, backend = float("nan"), {}, 0, ""
            async with session.post(url + "/api/chat", json=body) as resp:
                status, backend = resp.status, resp.headers.get("X-Corral-Backend", "stock")
                async for line in resp.content:
                    if ttft != ttft:  # first chunk
                        ttft = time.monotonic() - started
                    if line.strip():
                        final = json.loads(line)
            total = time.monotonic() - started
            cold = final.get("load_duration", 0) > LOAD_SHOWN_S * 1e9
            results.append(Result(setup, a.model, ttft * speed, total * speed, cold, status, backend, a.burst))

        t0 = time.monotonic()
        await asyncio.gather(*(one(a, t0) for a in arrivals))
        wall = time.monotonic() - t0
    return results, wall * speed


@contextlib.contextmanager
def backends(workdir: Path, speed: float, *, stock: bool) -> Iterator[list[SimServer]]:
    env = {"OLLAMA_NUM_PARALLEL": str(NUM_PARALLEL), "OLLAMA_KEEP_ALIVE": "30m", "OLLAMA_CONTEXT_LENGTH": str(NUM_CTX)}
    sim = {"answer_tokens_min": 300, "answer_tokens_max": 300}  # num_predict decides every length
    models = workdir / "models"
    with contextlib.ExitStack() as stack:
        if stock:
            sims = [
                stack.enter_context(
                    SimServer.start(workdir, gpus=CARDS, env=env, speed=speed, name="stock", models_dir=models, sim=sim)
                )
            ]
        else:
            sims = [
                stack.enter_context(
                    SimServer.start(
                        workdir,
                        gpus=CARDS,
                        env={**env, "CUDA_VISIBLE_DEVICES": str(i)},
                        speed=speed,
                        name=f"g{i}",
                        models_dir=models,
                        sim=sim,
                    )
                )
                for i in range(len(CARDS))
            ]
        yield sims


def gateway_config_lines(sims: list[SimServer]) -> list[str]:
    lines = []
    for i, sim in enumerate(sims):
        speed = 1.008 if CARDS[i] == "RTX 4090" else 0.936  # memory bandwidth / 1 TB/s
        lines += [
            "[[gateway.backends]]",
            f'url = "{sim.url}"',
            f'id = "g{i}"',
            f'gpus = ["{CARDS[i]}"]',
            "vram_gb = 24",
            f"speed = {speed}",
            f"num_parallel = {NUM_PARALLEL}",
            f"num_ctx = {NUM_CTX}",
            'store_id = "bench"',
        ]
    return lines


def evictions(sims: list[SimServer]) -> int:
    return sum(sim.log().count("evicting ") for sim in sims)


def run_setup(setup: str, arrivals: list[Arrival], speed: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"corral-routing-{setup}-") as tmp:
        workdir = Path(tmp)
        install_models(workdir / "models", *(m for m, _ in MODELS))
        with backends(workdir, speed, stock=setup == "stock") as sims:
            if setup == "stock":
                url_cm: contextlib.AbstractContextManager[str] = contextlib.nullcontext(sims[0].url)
            else:
                url_cm = gateway_process(
                    workdir, [], policy=setup, queue_size=10000, extra_lines=gateway_config_lines(sims)
                )
            with url_cm as url:
                results, sim_wall_s = asyncio.run(replay(url, arrivals, speed, setup))
            evicted = evictions(sims)
    ok = [r for r in results if r.status == 200]
    ttfts = sorted(r.ttft_s for r in ok)

    def pct(q: float, values: list[float] = ttfts) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    burst_ttfts = sorted(r.ttft_s for r in ok if r.burst)

    per_backend: dict[str, int] = {}
    for r in ok:
        per_backend[r.backend] = per_backend.get(r.backend, 0) + 1
    return {
        "setup": setup,
        "requests": len(results),
        "ok": len(ok),
        "per_minute": 60 * len(ok) / sim_wall_s,
        "ttft_p50_s": pct(0.5),
        "ttft_p95_s": pct(0.95),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"),
        "burst_ttft_p50_s": pct(0.5, burst_ttfts),
        "burst_ttft_p95_s": pct(0.95, burst_ttfts),
        "cold_loads": sum(r.cold_load for r in ok),
        "evictions": evicted,
        "per_backend": dict(sorted(per_backend.items())),
        "results": [asdict(r) for r in results],
    }


def render(rows: list[dict[str, object]]) -> str:
    base = next((r for r in rows if r["setup"] == "round-robin"), rows[0])
    lines = [
        "| set-up | ok / sent | TTFT p50 s | TTFT p95 s | p95 vs round-robin | burst TTFT p50 / p95 s "
        "| cold loads | evictions | requests per backend |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = float(r["ttft_p95_s"]) / float(base["ttft_p95_s"])  # type: ignore[arg-type]
        per_backend = " ".join(f"{k}:{v}" for k, v in r["per_backend"].items())  # type: ignore[attr-defined]
        lines.append(
            f"| {r['setup']} | {r['ok']} / {r['requests']} "
            f"| {float(r['ttft_p50_s']):.2f} | {float(r['ttft_p95_s']):.2f} | {ratio:.2f}x "  # type: ignore[arg-type]
            f"| {float(r['burst_ttft_p50_s']):.2f} / {float(r['burst_ttft_p95_s']):.2f} "  # type: ignore[arg-type]
            f"| {r['cold_loads']} | {r['evictions']} | {per_backend} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=float, default=20.0, help="the simulated backends' time factor")
    parser.add_argument("--duration", type=float, default=600.0, help="simulated seconds of arrivals")
    parser.add_argument("--rate", type=float, default=1.0, help="arrivals per simulated second")
    parser.add_argument("--burst", type=int, default=60, help="hot-model requests landing at half time")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--setups", default="residency,least-busy,round-robin,stock")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    args = parser.parse_args(argv)

    arrivals = workload(args.seed, args.duration, args.rate, args.burst)
    print(f"{len(arrivals)} requests over {args.duration:g} simulated s at time factor {args.speed:g}", file=sys.stderr)
    rows = []
    for setup in args.setups.split(","):
        rows.append(run_setup(setup, arrivals, args.speed))
        print(f"{setup}: done, per backend {rows[-1]['per_backend']}", file=sys.stderr)
    print(render(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
