"""Routing quality on a simulated heterogeneous rig: where requests go decides how long users wait.

    .venv/bin/python -m bench.routing             # several minutes; writes bench/results/routing.json
    .venv/bin/python -m bench.routing --scenarios burst,batch

Scenarios, each replayed against set-ups built from the same simulated cards (2x RTX 4090 +
2x RTX 3090, `corral-sim serve`, a time factor so the run takes minutes, not hours), and against
the clairvoyant reference (bench/routing_reference.py) over the same arrivals:
  mixed  five models, Poisson arrivals and a burst of the hot model, every card cold at the start
  burst  (a) eight 1,500-token generations at once for a model loaded on one 1-slot card of four
  batch  (b) 400 batch-lane requests of 300 tokens (not streamed, time factor 5: a token rate the
         2-core bench machine can relay) on a model loaded on every card (4 slots),
         with interactive traffic beside it; interactive TTFT is compared with a run without the
         batch, and the batch's throughput with N x one card's (from the performance model)

Set-ups (the mixed scenario runs all four, the others residency, round-robin and stock):
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
from bench.routing_reference import Job, clairvoyant  # noqa: E402
from launcher.facts import perf  # noqa: E402
from launcher.facts.cards import find_card  # noqa: E402
from launcher.facts.catalog import find_model  # noqa: E402
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
    batch: bool = False  # sent with X-Corral-Priority: batch


@dataclass(frozen=True)
class Scenario:
    name: str
    num_parallel: int
    warm: tuple[tuple[str, ...], ...] = ()  # models loaded on card i before the replay
    setups: tuple[str, ...] = ("residency", "round-robin", "stock")


SCENARIOS = {
    "mixed": Scenario("mixed", NUM_PARALLEL, setups=("residency", "least-busy", "round-robin", "stock")),
    "burst": Scenario("burst", 1, warm=(("llama3.1:8b",),)),
    "batch": Scenario("batch", NUM_PARALLEL, warm=(("llama3.1:8b",),) * 4),
}


def burst_workload(count: int = 8) -> list[Arrival]:
    return [Arrival(0.05 * i, "llama3.1:8b", 300, 1500, burst=True) for i in range(count)]


def batch_workload(seed: int, duration_s: float, batch: int, *, with_batch: bool = True) -> list[Arrival]:
    """`batch` batch-lane requests at t=0 and interactive requests (Poisson, 0.5/s) beside them."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(0.5)
        if t >= duration_s:
            break
        arrivals.append(Arrival(t, "llama3.1:8b", rng.randint(50, 300), rng.randint(40, 120)))
    if with_batch:
        arrivals += [Arrival(0.01 * i, "llama3.1:8b", 200, 300, batch=True) for i in range(batch)]
    return sorted(arrivals, key=lambda a: a.at_s)


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
    batch: bool = False
    done_s: float = 0.0  # simulated, since the start of the replay


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
                # Batch jobs take whole answers (as `corral batch` does): no per-token relay.
                "stream": not a.batch,
            }
            started = time.monotonic()
            ttft, final, status, backend = float("nan"), {}, 0, ""
            headers = {"X-Corral-Priority": "batch"} if a.batch else {}
            async with session.post(url + "/api/chat", json=body, headers=headers) as resp:
                status, backend = resp.status, resp.headers.get("X-Corral-Backend", "stock")
                async for line in resp.content:
                    if ttft != ttft:  # first chunk
                        ttft = time.monotonic() - started
                    if line.strip():
                        final = json.loads(line)
            total = time.monotonic() - started
            cold = final.get("load_duration", 0) > LOAD_SHOWN_S * 1e9
            done = (time.monotonic() - t0) * speed
            results.append(
                Result(setup, a.model, ttft * speed, total * speed, cold, status, backend, a.burst, a.batch, done)
            )

        t0 = time.monotonic()
        await asyncio.gather(*(one(a, t0) for a in arrivals))
        wall = time.monotonic() - t0
    return results, wall * speed


@contextlib.contextmanager
def backends(
    workdir: Path, speed: float, *, stock: bool, num_parallel: int = NUM_PARALLEL
) -> Iterator[list[SimServer]]:
    env = {"OLLAMA_NUM_PARALLEL": str(num_parallel), "OLLAMA_KEEP_ALIVE": "30m", "OLLAMA_CONTEXT_LENGTH": str(NUM_CTX)}
    sim = {"answer_tokens_min": 2000, "answer_tokens_max": 2000}  # num_predict decides every length
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


def gateway_config_lines(sims: list[SimServer], num_parallel: int = NUM_PARALLEL) -> list[str]:
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
            f"num_parallel = {num_parallel}",
            f"num_ctx = {NUM_CTX}",
            'store_id = "bench"',
        ]
    return lines


def evictions(sims: list[SimServer]) -> int:
    return sum(sim.log().count("evicting ") for sim in sims)


def warm_up(sims: list[SimServer], scenario: Scenario, *, stock: bool) -> None:
    """Load the scenario's models where it says (an empty prompt only loads), before the replay."""
    import urllib.request

    for i, models in enumerate(scenario.warm):
        for model in models:
            target = sims[0] if stock else sims[i]
            body = json.dumps({"model": model, "options": {"num_ctx": NUM_CTX}}).encode()
            req = urllib.request.Request(target.url + "/api/generate", data=body, method="POST")
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()
            if stock:
                return  # one server: one copy


def run_setup(setup: str, arrivals: list[Arrival], speed: float, scenario: Scenario) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"corral-routing-{setup}-") as tmp:
        workdir = Path(tmp)
        install_models(workdir / "models", *(m for m, _ in MODELS))
        stock = setup == "stock"
        with backends(workdir, speed, stock=stock, num_parallel=scenario.num_parallel) as sims:
            warm_up(sims, scenario, stock=stock)
            if stock:
                url_cm: contextlib.AbstractContextManager[str] = contextlib.nullcontext(sims[0].url)
            else:
                lines = gateway_config_lines(sims, scenario.num_parallel)
                url_cm = gateway_process(workdir, [], policy=setup, queue_size=10000, extra_lines=lines)
            with url_cm as url:
                results, sim_wall_s = asyncio.run(replay(url, arrivals, speed, setup))
            evicted = evictions(sims)
    return summarize(setup, results, sim_wall_s, evicted)


def summarize(setup: str, results: list[Result], sim_wall_s: float, evicted: int) -> dict[str, object]:
    ok = [r for r in results if r.status == 200]
    interactive = [r for r in ok if not r.batch]
    batch = [r for r in ok if r.batch]
    ttfts = sorted(r.ttft_s for r in interactive)

    def pct(q: float, values: list[float] = ttfts) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    burst_ttfts = sorted(r.ttft_s for r in interactive if r.burst)

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
        "batch_done_s": max((r.done_s for r in batch), default=float("nan")),
        "per_backend": dict(sorted(per_backend.items())),
        "results": [asdict(r) for r in results],
    }


def reference_row(arrivals: list[Arrival], scenario: Scenario) -> dict[str, object]:
    jobs = [Job(a.at_s, a.model, a.prompt_words, a.num_predict, not a.batch) for a in arrivals]
    sched = clairvoyant(jobs, CARDS, slots=scenario.num_parallel, num_ctx=NUM_CTX, resident=scenario.warm)
    interactive = [not a.batch for a in arrivals]
    burst = [a.burst and not a.batch for a in arrivals]
    batch_done = [d for d, a in zip(sched.done_s, arrivals, strict=True) if a.batch]
    return {
        "setup": "reference",
        "requests": len(arrivals),
        "ok": len(arrivals),
        "ttft_p50_s": sched.p(0.5, interactive),
        "ttft_p95_s": sched.p(0.95, interactive),
        "burst_ttft_p50_s": sched.p(0.5, burst) if any(burst) else float("nan"),
        "burst_ttft_p95_s": sched.p(0.95, burst) if any(burst) else float("nan"),
        "cold_loads": sched.cold_loads,
        "evictions": 0,
        "batch_done_s": max(batch_done, default=float("nan")),
        "per_backend": {},
    }


def fleet_tokens_per_s(model: str, num_parallel: int) -> float:
    """N x one card: each card's batched decode throughput with every slot busy, summed."""
    spec = find_model(model)
    assert spec is not None
    total = 0.0
    for name in CARDS:
        card = find_card(name)
        assert card is not None
        placement = perf.split_layers(spec, perf.LoadOptions(num_ctx=NUM_CTX), [(card, card.vram_bytes)])
        assert placement is not None
        total += num_parallel * perf.tokens_per_second(spec, placement, batch=num_parallel)
    return total


def _f(value: object) -> float:
    return float(value)  # type: ignore[arg-type]


def render(rows: list[dict[str, object]]) -> str:
    by_setup = {str(r["setup"]): r for r in rows}
    rr, stock, ref = by_setup.get("round-robin"), by_setup.get("stock"), by_setup.get("reference")

    def ratio(r: dict[str, object], base: dict[str, object] | None) -> str:
        if base is None or not _f(base["ttft_p95_s"]):
            return "-"
        return f"{_f(r['ttft_p95_s']) / _f(base['ttft_p95_s']):.2f}x"

    lines = [
        "| set-up | ok / sent | TTFT p50 s | TTFT p95 s | p95 vs round-robin | p95 vs stock | p95 vs reference "
        "| burst TTFT p50 / p95 s | cold loads | evictions | batch done s | requests per backend |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        per_backend = " ".join(f"{k}:{v}" for k, v in r["per_backend"].items())  # type: ignore[attr-defined]
        lines.append(
            f"| {r['setup']} | {r['ok']} / {r['requests']} "
            f"| {_f(r['ttft_p50_s']):.2f} | {_f(r['ttft_p95_s']):.2f} | {ratio(r, rr)} | {ratio(r, stock)} "
            f"| {ratio(r, ref)} | {_f(r['burst_ttft_p50_s']):.2f} / {_f(r['burst_ttft_p95_s']):.2f} "
            f"| {r['cold_loads']} | {r['evictions']} | {_f(r.get('batch_done_s', float('nan'))):.0f} | {per_backend} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", type=float, default=20.0, help="the simulated backends' time factor")
    parser.add_argument("--duration", type=float, default=600.0, help="simulated seconds of arrivals (mixed)")
    parser.add_argument("--rate", type=float, default=1.0, help="arrivals per simulated second (mixed)")
    parser.add_argument("--burst", type=int, default=60, help="hot-model requests landing at half time (mixed)")
    parser.add_argument("--batch", type=int, default=400, help="batch-lane requests (batch)")
    parser.add_argument(
        "--batch-speed", type=float, default=5.0, help="time factor of the batch scenario (its token rate is CPU bound)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scenarios", default="mixed,burst,batch")
    parser.add_argument("--setups", default="", help="override the set-ups every scenario runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    args = parser.parse_args(argv)

    report: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    for name in args.scenarios.split(","):
        scenario = SCENARIOS[name]
        if name == "mixed":
            arrivals = workload(args.seed, args.duration, args.rate, args.burst)
        elif name == "burst":
            arrivals = burst_workload()
        else:
            arrivals = batch_workload(args.seed, 120.0, args.batch)
        setups = args.setups.split(",") if args.setups else list(scenario.setups)
        speed = args.batch_speed if name == "batch" else args.speed
        print(f"{name}: {len(arrivals)} requests at time factor {speed:g}", file=sys.stderr)
        rows = [reference_row(arrivals, scenario)]
        for setup in setups:
            rows.append(run_setup(setup, arrivals, speed, scenario))
            print(f"{name}/{setup}: done, per backend {rows[-1]['per_backend']}", file=sys.stderr)
        if name == "batch":
            alone = batch_workload(args.seed, 120.0, args.batch, with_batch=False)
            row = run_setup("residency", alone, speed, scenario)
            row["setup"] = "residency, no batch"
            rows.append(row)
            fleet = fleet_tokens_per_s("llama3.1:8b", scenario.num_parallel)
            for r in rows:
                done = _f(r.get("batch_done_s", float("nan")))
                r["batch_tokens_per_s"] = args.batch * 300 / done if done == done and done > 0 else float("nan")
                r["batch_vs_fleet"] = _f(r["batch_tokens_per_s"]) / fleet
            print(f"batch: N x one card = {fleet:.0f} tokens/s", file=sys.stderr)
        print(f"\n### {name}\n")
        print(render(rows))
        if name == "batch":
            print(
                "\nbatch throughput vs N x one card: "
                + ", ".join(
                    f"{r['setup']} {_f(r['batch_vs_fleet']):.2f}"
                    for r in rows
                    if r.get("batch_vs_fleet") == r.get("batch_vs_fleet")
                )
            )
        report[name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
