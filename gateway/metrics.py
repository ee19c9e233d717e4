"""Prometheus metrics, owned by one app (its own CollectorRegistry; nothing global).

Counters and histograms are updated as requests pass. Fleet gauges (backend up, in-flight, queue
depth, resident models, CPU offload, backend restarts) are read from the pool's current snapshot
at scrape time, so a backend or model that disappears also disappears from /metrics instead of
leaving a stale series behind. GPU memory and the state store's health come from what the poller
last read from the store (`StoreWatch`); a scrape never does I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.fleet.storewatch import StoreWatch
from gateway.routing.snapshot import Snapshot
from launcher.facts.catalog import normalize_name

# Where prometheus_client keeps each process's values when several gateway workers share a port.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Requests range from a 20 ms embedding to a many-minute generation behind a cold 70B load.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKENS_PER_S_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


def gpus_label(gpu_names: tuple[str, ...], gpu_uuids: tuple[str, ...]) -> str:
    return ",".join(gpu_uuids or gpu_names)


class FleetCollector(Collector):
    """Gauges computed from the pool's snapshot and the admission queues on each scrape."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        queue_depths: Callable[[], Mapping[str, int]],
        watch: StoreWatch | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._queue_depths = queue_depths
        self._watch = watch or StoreWatch()

    def collect(self) -> Iterator[Metric]:
        yield from self._backend_metrics(self._snapshot())
        queued = GaugeMetricFamily("corral_queue_depth", "requests waiting at the gateway", labels=["model"])
        for model, depth in self._queue_depths().items():
            queued.add_metric([model], float(depth))
        yield queued
        yield from self._store_metrics()

    def _backend_metrics(self, snap: Snapshot) -> Iterator[Metric]:
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
        # The share of a resident model held in system memory: Ollama reports size (all of it) and
        # size_vram (the part on the GPUs); anything above 0 decodes at host-memory speed.
        cpu_offload = GaugeMetricFamily(
            "corral_model_cpu_offload_ratio",
            "share of a resident model's memory outside VRAM (0 = all on GPU, 1 = CPU only)",
            labels=["model", "backend"],
        )
        # The launcher counts its restarts of each backend process and publishes the count in the
        # record; as a counter it survives the usual rate()/increase() treatment of resets.
        restarts = CounterMetricFamily(
            "corral_backend_restarts", "times the launcher restarted the backend's process", labels=["backend"]
        )
        # Per model in any backend's store (or plan): how many healthy, ready backends could serve
        # it now. 0 means requests for it wait or fail: the "no healthy backend" alert.
        serving = GaugeMetricFamily(
            "corral_model_healthy_backends",
            "healthy, ready backends that have the model installed or planned",
            labels=["model"],
        )
        per_model: dict[str, int] = {}
        for b in snap.backends:
            ready = b.healthy and b.record.state == "ready"
            for model in b.installed | {normalize_name(m) for m in b.record.planned_models}:
                per_model[model] = per_model.get(model, 0) + (1 if ready else 0)
        for model, count in sorted(per_model.items()):
            serving.add_metric([model], float(count))
        for b in snap.backends:
            up.add_metric([b.id], 1.0 if b.healthy and b.record.state == "ready" else 0.0)
            free.add_metric([b.id], float(b.free_vram_bytes))
            restarts.add_metric([b.id], float(b.record.restarts))
            for model, count in b.in_flight.items():
                in_flight.add_metric([b.id, model], float(count))
            gpus = gpus_label(b.record.gpu_names, b.record.gpu_uuids)
            for r in b.resident:
                resident.add_metric([r.name, b.id, gpus], 1.0)
                vram.add_metric([r.name, b.id, gpus], float(r.size_vram_bytes))
                cpu_offload.add_metric([r.name, b.id], offload_ratio(r.size_bytes, r.size_vram_bytes))
        yield from (up, in_flight, resident, vram, free, cpu_offload, restarts, serving)

    def _store_metrics(self) -> Iterator[Metric]:
        watch = self._watch
        store_up = GaugeMetricFamily(
            "corral_state_store_up", "1 when the gateway's last call to the state store succeeded"
        )
        if watch.up is not None:
            store_up.add_metric([], 1.0 if watch.up else 0.0)
        yield store_up
        labels = ["gpu", "name", "host", "backend"]
        used = GaugeMetricFamily(
            "corral_gpu_memory_used_bytes", "GPU memory in use, as the launcher last read it", labels=labels
        )
        total = GaugeMetricFamily("corral_gpu_memory_total_bytes", "GPU memory of the card", labels=labels)
        for host, published in sorted(watch.gpus.items()):
            for card in published:
                key = [card.gpu.uuid, card.gpu.name, host, card.backend]
                used.add_metric(key, float(card.gpu.memory_used_bytes))
                total.add_metric(key, float(card.gpu.memory_total_bytes))
        yield from (used, total)


def offload_ratio(size_bytes: int, size_vram_bytes: int) -> float:
    if size_bytes <= 0:
        return 0.0
    return min(max((size_bytes - size_vram_bytes) / size_bytes, 0.0), 1.0)


M = TypeVar("M", Counter, Histogram)


class Labelled(Generic[M]):
    """A labelled metric whose children are found in a dict after their first use.

    Why: prometheus_client's `labels()` checks its arguments and takes the metric's lock on every
    call, several times per request on the hot path, for children that never go away (nothing
    here removes a label set)."""

    __slots__ = ("_children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every metric the gateway exports, registered in `self.registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, worker: str = "1/1") -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # Collectors read at scrape time from this process alone (not summed over workers).
        self._own: list[Collector] = [WorkerInfo(worker)]
        r.register(self._own[0])

        def counter(name: str, doc: str, labels: list[str]) -> Labelled[Counter]:
            return Labelled(Counter(name, doc, labels, registry=r))

        def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Labelled[Histogram]:
            return Labelled(Histogram(name, doc, labels, buckets=buckets, registry=r))

        self.requests = counter(
            "corral_requests", "requests answered, by model, backend and status", ["model", "backend", "status"]
        )
        self.request_duration = histogram(
            "corral_request_duration_seconds",
            "time from request arrival to the last byte sent",
            ["model", "backend"],
            LATENCY_BUCKETS_S,
        )
        self.ttft = histogram(
            "corral_time_to_first_token_seconds",
            "time from request arrival to the first byte of the reply body",
            ["model", "backend"],
            LATENCY_BUCKETS_S,
        )
        self.decode_rate = histogram(
            "corral_decode_tokens_per_second",
            "decode rate reported in final chunks (eval_count / eval_duration)",
            ["model", "backend"],
            TOKENS_PER_S_BUCKETS,
        )
        self.decisions = counter(
            "corral_routing_decisions", "routing decisions by outcome and reason", ["decision", "reason"]
        )
        self.cold_loads = counter(
            "corral_cold_loads", "replies whose load_duration shows a model load", ["model", "backend"]
        )
        self.retries = counter("corral_retries", "requests sent again to another backend", ["model"])
        self.failovers = counter(
            "corral_failovers", "attempts that failed before the first byte, by failed backend", ["backend"]
        )
        self.ejections = counter(
            "corral_ejections", "backends taken out of rotation after repeated failures", ["backend"]
        )
        self.midstream_failures = counter(
            "corral_midstream_failures", "streams cut because the backend failed after the first byte", ["backend"]
        )
        self.queue_rejections = counter(
            "corral_queue_rejections", "requests refused with 503 at the gateway queue", ["model", "reason"]
        )
        self.planned_evictions = counter(
            "corral_planned_evictions",
            "sends that evict the only copy of a planned model because nothing else can serve the request",
            ["model", "backend"],
        )
        self.context_fits = counter(
            "corral_context_fits",
            'requests served at the loaded context instead of a larger num_ctx (context_policy "fit")',
            ["model"],
        )

    def attach_fleet(self, collector: FleetCollector) -> None:
        self.registry.register(collector)
        self._own.append(collector)

    def detach_fleet(self, collector: FleetCollector) -> None:
        self.registry.unregister(collector)
        self._own.remove(collector)

    def exposition(self) -> bytes:
        """The text a scrape gets. Under `corral gateway --workers` (PROMETHEUS_MULTIPROC_DIR set by
        the supervisor) counters and histograms are every worker's summed, from prometheus_client's
        per-process files, so a scrape through the shared port reads the same totals whichever
        worker answers; the fleet gauges are this worker's view (the in-flight ones come from the
        shared store)."""
        directory = os.environ.get(MULTIPROC_DIR_ENV)
        if not directory:
            return generate_latest(self.registry)
        merged = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(merged, path=directory)
        for collector in self._own:
            merged.register(collector)
        return generate_latest(merged)


class WorkerInfo(Collector):
    """corral_gateway_worker_info{worker="i/n"} 1: which of `corral gateway --workers n` answered."""

    def __init__(self, worker: str) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "corral_gateway_worker_info", "which gateway worker answered this scrape", labels=["worker"]
        )
        info.add_metric([self._worker], 1.0)
        yield info


async def metrics_response(metrics: Metrics) -> web.Response:
    resp = web.Response(body=metrics.exposition())
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp
