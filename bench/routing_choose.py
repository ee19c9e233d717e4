"""What one routing decision costs: `choose()` over a snapshot of 8 and of 64 backends.

    .venv/bin/python -m bench.routing_choose

The fleet: single-card backends (RTX 4090-like, 4 slots), a catalog of 20 models with each model
installed on a quarter of the backends and resident on a few, some slots busy, a few waiters.
Requests draw models with Zipf-like popularity; a third carry a num_ctx. Reported: median and p99
microseconds per decision, over `--decisions` decisions after a warm-up (the snapshot is built once:
this measures the router, not the pool).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.record import BackendRecord  # noqa: E402 - the repo root must be importable first
from gateway.routing.policy import ResidencyPolicy, RouteRequest, choose  # noqa: E402
from gateway.routing.snapshot import (  # noqa: E402
    BackendView,
    LoadOptions,
    ModelFacts,
    ObservedStats,
    ResidentModel,
    Snapshot,
    WorkItem,
)

GIB = 1024**3
NOW = 1_700_000_000.0


def fleet(backends: int, models: int, seed: int) -> Snapshot:
    rng = random.Random(seed)
    names = [f"model{i}:7b" for i in range(models)]
    facts = {n: ModelFacts(n, int(4.5e9), 131072, 600 * 1024**2, 32768) for n in names}
    views = []
    for b in range(backends):
        record = BackendRecord(
            id=f"g{b:02d}", url=f"http://127.0.0.1:{11500 + b}", num_parallel=4, vram_total_bytes=24 * GIB, speed=1.0
        )
        installed = frozenset(rng.sample(names, max(1, models // 4)))
        resident_names = rng.sample(sorted(installed), min(2, len(installed)))
        resident = tuple(ResidentModel(n, int(4.5e9), int(5.5e9), 4096, NOW + 300) for n in resident_names)
        in_flight = {n: rng.randint(0, 4) for n in resident_names}
        work = {
            n: tuple(WorkItem(256, rng.randint(0, 200), 1.0, True, False) for _ in range(count))
            for n, count in in_flight.items()
        }
        observed = {n: ObservedStats(tokens_per_s=90.0, load_s=3.0, service_s=3.0, samples=10) for n in resident_names}
        views.append(
            BackendView(
                record=record,
                healthy=True,
                installed=installed,
                resident=resident,
                in_flight={n: c for n, c in in_flight.items() if c},
                free_vram_bytes=24 * GIB - sum(r.size_vram_bytes for r in resident),
                observed=observed,
                work=work,
                last_used={n: NOW - rng.uniform(0, 600) for n in resident_names},
            )
        )
    return Snapshot(backends=tuple(views), models=facts, now=NOW)


def measure(backends: int, decisions: int, seed: int = 1) -> dict[str, float]:
    snapshot = fleet(backends, 20, seed)
    rng = random.Random(seed)
    names = sorted(snapshot.models)
    weights = [1.0 / (i + 1) for i in range(len(names))]
    requests = [
        RouteRequest(
            rng.choices(names, weights)[0],
            options=LoadOptions(num_ctx=4096) if rng.random() < 0.33 else LoadOptions(),
            prompt_tokens=rng.randint(20, 800),
            num_predict=rng.choice([None, 128, 512]),
            ahead=rng.choice([0, 0, 0, 1, 3]),
        )
        for _ in range(decisions)
    ]
    policy = ResidencyPolicy()
    for r in requests[:200]:  # warm-up
        choose(r, snapshot, policy)
    samples = []
    for r in requests:
        t0 = time.perf_counter_ns()
        choose(r, snapshot, policy)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return {
        "backends": backends,
        "median_us": statistics.median(samples),
        "p99_us": samples[int(0.99 * (len(samples) - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing_choose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=5000)
    args = parser.parse_args(argv)
    print("| backends | choose() median us | p99 us | target |")
    print("|---:|---:|---:|---|")
    for n in (8, 64):
        row = measure(n, args.decisions)
        print(f"| {n} | {row['median_us']:.0f} | {row['p99_us']:.0f} | {'<= 100 us' if n == 64 else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
