"""Prometheus metrics. Gauges are read from live objects at scrape time, so the request path
pays nothing for them; counters are bumped only off the request path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .app import ProxyServer


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.config_reloads = Counter(
            "weir_config_reloads", "Config reloads by outcome (success or failure).",
            ["outcome"], registry=self.registry)
        for outcome in ("success", "failure"):
            self.config_reloads.labels(outcome)

    def attach(self, proxy: ProxyServer) -> None:
        self.registry.register(LiveStateCollector(proxy))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LiveStateCollector(Collector):
    """Weights, requests in flight and draining, per service and version, as of the scrape."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["service", "version"]
        weight = GaugeMetricFamily("weir_traffic_weight",
                                   "Configured weight of each version.", labels=labels)
        inflight = GaugeMetricFamily("weir_upstream_inflight",
                                     "Requests in flight to each version's upstreams.",
                                     labels=labels)
        draining = GaugeMetricFamily(
            "weir_draining_requests",
            "Requests and streams still open to a version that has lost its traffic.",
            labels=labels)
        generation = GaugeMetricFamily("weir_config_generation",
                                       "Generation of the config in force.")
        table = self.proxy.table
        generation.add_metric([], table.generation)
        for route in table.routes:
            for name, target in route.versions.items():
                key = [route.name, name]
                weight.add_metric(key, route.weights.get(name, 0))
                inflight.add_metric(key, sum(p.inflight for p in target.balancer.pools))
        # Draining upstreams may be gone from the table (removed from the file), so they are
        # labelled with the version they were serving when they lost their traffic.
        open_by_version: dict[tuple[str, str], int] = {}
        for pool in self.proxy.pools.pools.values():
            if pool.draining:
                label = pool.drain_label
                open_by_version[label] = open_by_version.get(label, 0) + pool.inflight
        for label, count in sorted(open_by_version.items()):
            draining.add_metric(list(label), count)
        yield weight
        yield inflight
        yield draining
        yield generation

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
