"""What a batch did so far: counts, rates, latencies and requests per backend, and its summary text."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from launcher.batch.types import ItemResult


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


@dataclass
class BatchStats:
    total: int = 0  # items this run will attempt (0: unknown)
    skipped: int = 0  # already answered in the output (--resume)
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    per_backend: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def add(self, result: ItemResult) -> None:
        if result.ok:
            self.ok += 1
            self.latencies_s.append(result.seconds)
            self.prompt_tokens += result.prompt_tokens
            self.output_tokens += result.output_tokens
        else:
            self.failed += 1

    def note_request(self, backend: str | None) -> None:
        """One reply came back (any status) from `backend` (None: no Corral header)."""
        self.per_backend[backend or "direct"] += 1

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def rate(self, count: float) -> float:
        wall = self.wall_s
        return count / wall if wall > 0 else 0.0

    def backends_text(self) -> str:
        return " ".join(f"{b}={n}" for b, n in sorted(self.per_backend.items())) or "-"

    def progress_line(self) -> str:
        """One line for logs (no terminal): done/total, rates, failures, backends."""
        total = f"/{self.total}" if self.total else ""
        return (
            f"batch: {self.done}{total} done, {self.failed} failed, {self.rate(self.done):.1f} items/s, "
            f"{self.rate(self.output_tokens):.0f} output tokens/s, requests per backend: {self.backends_text()}"
        )

    def summary_lines(self) -> list[str]:
        ordered = sorted(self.latencies_s)
        return [
            f"items: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already answered)",
            f"wall: {self.wall_s:.1f}s, {self.rate(self.done):.2f} items/s",
            f"tokens/s: {self.rate(self.prompt_tokens):.0f} prompt, {self.rate(self.output_tokens):.0f} output",
            f"latency: p50 {percentile(ordered, 0.5):.2f}s, p95 {percentile(ordered, 0.95):.2f}s",
            f"requests per backend: {self.backends_text()}",
        ]
