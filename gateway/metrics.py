"""Prometheus metrics, owned by one app (its own CollectorRegistry; nothing global).

Counters and histograms are updated as requests pass. Fleet gauges (backend up, in-flight, queue
depth, resident models) are read from the pool's current snapshot at scrape time, so a backend or
model that disappears also disappears from /metrics instead of leaving a stale series behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway.routing.snapshot import Snapshot

# Requests range from a 20 ms embedding to a many-minute generation behind a cold 70B load.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKENS_PER_S_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


def gpus_label(gpu_names: tuple[str, ...], gpu_uuids: tuple[str, ...]) -> str:
    return ",".join(gpu_uuids or gpu_names)


class FleetCollector(Collector):
    """Gauges computed from the pool's snapshot and the admission queues on each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot], queue_depths: Callable[[], Mapping[str, int]]) -> None:
        self._snapshot = snapshot
        self._queue_depths = queue_depths

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        up = GaugeMetricFamily("corral_backend_up", "1 when the backend is healthy and ready", labels=["backend"])
        in_flight = GaugeMetricFamily(
            "corral_in_flight_requests",
            "requests the gateway fleet has sent and not finished",
            labels=["backend", "model"],
        )
        resident = GaugeMetricFamily(
            "corral_model_resident", "1 for each model loaded in a backend", labels=["model", "backend", "gpus"]
        )
        vram = GaugeMetricFamily(
            "corral_model_vram_bytes", "VRAM a resident model occupies", labels=["model", "backend", "gpus"]
        )
        free = GaugeMetricFamily(
            "corral_backend_free_vram_bytes", "estimated free VRAM of a backend's GPU group", labels=["backend"]
        )
        for b in snap.backends:
            up.add_metric([b.id], 1.0 if b.healthy and b.record.state == "ready" else 0.0)
            free.add_metric([b.id], float(b.free_vram_bytes))
            for model, count in b.in_flight.items():
                in_flight.add_metric([b.id, model], float(count))
            gpus = gpus_label(b.record.gpu_names, b.record.gpu_uuids)
            for r in b.resident:
                resident.add_metric([r.name, b.id, gpus], 1.0)
                vram.add_metric([r.name, b.id, gpus], float(r.size_vram_bytes))
        queued = GaugeMetricFamily("corral_queue_depth", "requests waiting at the gateway", labels=["model"])
        for model, depth in self._queue_depths().items():
            queued.add_metric([model], float(depth))
        yield from (up, in_flight, resident, vram, free, queued)


class Metrics:
    """Every metric the gateway exports, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "corral_requests",
            "requests answered, by model, backend and status",
            ["model", "backend", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "corral_request_duration_seconds",
            "time from request arrival to the last byte sent",
            ["model", "backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "time from request arrival to the first byte of the reply body",
            ["model", "backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.decode_rate = Histogram(
            "corral_decode_tokens_per_second",
            "decode rate reported in final chunks (eval_count / eval_duration)",
            ["model", "backend"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "corral_routing_decisions", "routing decisions by outcome and reason", ["decision", "reason"], registry=r
        )
        self.cold_loads = Counter(
            "corral_cold_loads", "replies whose load_duration shows a model load", ["model", "backend"], registry=r
        )
        self.retries = Counter("corral_retries", "requests sent again to another backend", ["model"], registry=r)
        self.failovers = Counter(
            "corral_failovers", "attempts that failed before the first byte, by failed backend", ["backend"], registry=r
        )
        self.ejections = Counter(
            "corral_ejections", "backends taken out of rotation after repeated failures", ["backend"], registry=r
        )
        self.midstream_failures = Counter(
            "corral_midstream_failures",
            "streams cut because the backend failed after the first byte",
            ["backend"],
            registry=r,
        )
        self.queue_rejections = Counter(
            "corral_queue_rejections", "requests refused with 503 at the gateway queue", ["model", "reason"], registry=r
        )
        # The one definition of this gauge (gateway/state/health.py sets it): routing goes on
        # while it is 0, on the records last seen.
        self.state_store_up = Gauge(
            "corral_state_store_up", "1 while the state store (Redis) answers, 0 during an outage", registry=r
        )
        self.state_store_up.set(1.0)

    def attach_fleet(self, collector: FleetCollector) -> None:
        self.registry.register(collector)

    def detach_fleet(self, collector: FleetCollector) -> None:
        self.registry.unregister(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_response(metrics: Metrics) -> web.Response:
    resp = web.Response(body=metrics.exposition())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp
