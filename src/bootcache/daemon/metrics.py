"""Prometheus metrics of a running daemon (``serve --metrics HOST:PORT``).

Nothing is counted twice: at each scrape a collector reads the counters the
layers and the NBD server keep anyway (the export's read counters, each
cache's ``stats()``, each remote source's request statistics) and turns them
into metric families. The exposition is ``prometheus_client``'s own.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bootcache.daemon.view import NodeView
from bootcache.nbd.server import LATENCY_BUCKETS

# Cache counters as (stats key, metric name, help); all are totals but the last three.
_CACHE_COUNTERS = [
    ("hits", "hits", "Reads served wholly from the cache"),
    ("misses", "misses", "Reads that needed the base"),
    ("bytes_from_cache", "bytes_from_cache", "Bytes read from the cache image"),
    ("bytes_from_base", "bytes_from_base", "Bytes fetched from the base"),
    ("evictions", "evictions", "Clusters evicted to stay under the quota"),
    ("resets", "resets", "Times the cache was dropped because the base changed"),
    ("background_errors", "background_errors", "Background stores, flushes or checks that failed"),
    ("prefetched_bytes", "prefetched_bytes", "Bytes fetched ahead from the boot profile"),
    ("prefetch_hits", "prefetch_hits", "Reads served from clusters a prefetch fetched"),
    ("no_space", "no_space", "Stores or flushes refused for lack of disk space (served from base)"),
]
_CACHE_GAUGES = [
    ("quota", "quota_bytes", "Cache quota"),
    ("used_bytes", "used_bytes", "Bytes the cache holds"),
    ("fetches_in_flight", "fetches_in_flight", "Clusters being fetched from the base"),
]
_SOURCE_COUNTERS = [
    ("requests", "requests", "Requests sent to the base's server"),
    ("retries", "retries", "Requests that retried a failed one"),
    ("errors", "errors", "Requests that failed"),
    ("failures", "failures", "Reads that failed after every retry"),
    ("bytes", "bytes", "Bytes received from the base's server"),
]


class NodeCollector(Collector):
    """Reads the daemon's counters at scrape time."""

    def __init__(self, daemon: NodeView) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        yield from self._exports()
        caches, sources = self._nodes()
        yield from caches
        yield from sources

    def _exports(self) -> Iterator[Metric]:
        labels = ["export"]
        conns = GaugeMetricFamily("bootcache_export_connections", "Connected NBD clients",
                                  labels=labels)
        reads = CounterMetricFamily("bootcache_export_reads", "NBD reads served",
                                    labels=labels)
        read_bytes = CounterMetricFamily("bootcache_export_read_bytes", "Bytes read by clients",
                                         labels=labels)
        errors = CounterMetricFamily("bootcache_export_read_errors", "NBD reads that failed",
                                     labels=labels)
        latency = HistogramMetricFamily("bootcache_export_read_seconds",
                                        "Time from a read's arrival to its reply",
                                        labels=labels)
        for entry in self.daemon.exports.entries():
            c = entry.export.counters
            name = [entry.name]
            conns.add_metric(name, len(entry.connections))
            reads.add_metric(name, c.reads)
            read_bytes.add_metric(name, c.bytes)
            errors.add_metric(name, c.errors)
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip([*LATENCY_BUCKETS, float("inf")], c.buckets, strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric(name, buckets, c.seconds)
        yield from (conns, reads, read_bytes, errors, latency)

    def _nodes(self) -> tuple[list[Metric], list[Metric]]:
        cache_labels, source_labels = ["image"], ["image", "source"]
        counters = {key: CounterMetricFamily(f"bootcache_cache_{name}", doc, labels=cache_labels)
                    for key, name, doc in _CACHE_COUNTERS}
        gauges = {key: GaugeMetricFamily(f"bootcache_cache_{name}", doc, labels=cache_labels)
                  for key, name, doc in _CACHE_GAUGES}
        sources = {key: CounterMetricFamily(f"bootcache_base_{name}", doc, labels=source_labels)
                   for key, name, doc in _SOURCE_COUNTERS}
        in_flight = GaugeMetricFamily("bootcache_base_requests_in_flight",
                                      "Requests to the base's server in flight",
                                      labels=source_labels)
        for key, stats in self.daemon.node_metrics():
            if "quota" in stats:
                for k, fam in counters.items():
                    fam.add_metric([key], float(stats.get(k, 0)))
                for k, gauge in gauges.items():
                    gauge.add_metric([key], float(stats.get(k, 0)))
            source: dict[str, Any] | None = stats.get("source")
            if source:
                labels = [key, str(source.get("name", ""))]
                for k, fam in sources.items():
                    fam.add_metric(labels, float(source.get(k, 0)))
                in_flight.add_metric(labels, float(source.get("in_flight", 0)))
        return [*counters.values(), *gauges.values()], [*sources.values(), in_flight]


class MetricsServer:
    """Serves /metrics over HTTP on TCP."""

    def __init__(self, daemon: NodeView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(daemon))
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        app = web.Application()
        app.add_routes([web.get("/metrics", self._scrape)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # Bound here, so that the address (port 0: any free one) is known.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        await web.SockSite(self._runner, sock).start()
        addr = sock.getsockname()
        self.address = (str(addr[0]), int(addr[1]))
        return self.address

    async def _scrape(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


__all__ = ["MetricsServer", "NodeCollector"]
