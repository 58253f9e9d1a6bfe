"""Prometheus metrics. Gauges are read from live objects at scrape time, so the request path
pays nothing for them; counters are bumped only off the request path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..rollout.controller import PHASES

if TYPE_CHECKING:
    from ..dataplane.proxyserver import ProxyServer
    from .plane import ControlPlane


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

    def attach_control(self, control: ControlPlane) -> None:
        self.registry.register(RolloutCollector(control))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LiveStateCollector(Collector):
    """Weights, requests in flight and draining, per service and version, as of the scrape."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        yield from self.collect_requests()
        yield from self.collect_upstreams()
        yield from self.collect_versions()
        yield from self.collect_retries()
        yield from self.collect_health()
        yield from self.collect_drained()

    def collect_requests(self) -> Iterator[Metric]:
        stats = self.proxy.stats
        requests = CounterMetricFamily(
            "http_requests", "Requests answered, by service, version, method and status.",
            labels=["service", "version", "method", "status"])
        durations = HistogramMetricFamily(
            "http_request_duration_seconds",
            "Time from a request's head arriving to its response's end.",
            labels=["service", "version"])
        grpc = CounterMetricFamily(
            "weir_grpc_responses", "gRPC calls answered, by service, version and grpc-status "
            "(the upstream's, or Weir's own when it answered the call itself).",
            labels=["service", "version", "grpc_status"])
        for (service, version), vs in sorted(stats.versions.items()):
            for (method, status), count in sorted(vs.requests.items()):
                requests.add_metric([service, version, method.decode(), str(status)], count)
            durations.add_metric([service, version], vs.cumulative_buckets(),
                                 vs.duration_sum)
            for code, count in sorted(vs.grpc.items()):
                grpc.add_metric([service, version, str(code)], count)
        unrouted = CounterMetricFamily(
            "weir_unrouted_requests", "Requests answered by Weir itself before any version "
            "was chosen (no matching service, malformed), by status.", labels=["status"])
        for status, count in sorted(stats.unrouted.items()):
            unrouted.add_metric([str(status)], count)
        limits = CounterMetricFamily(
            "weir_limit_rejections", "Connections and requests stopped by a `limits` setting: "
            "max_connections (503 at accept), header_timeout (408, or a connection that sent "
            "no request), idle_timeout (idle keep-alive connections closed), max_header_bytes "
            "(431), max_body_bytes (413), http2_abuse (HTTP/2 connections cut for rapid reset or a "
            "flood, and those refused from the same address right after).", labels=["limit"])
        for name in stats.limits.NAMES:
            limits.add_metric([name], getattr(stats.limits, name))
        mirrors = CounterMetricFamily(
            "weir_mirror_requests", "Shadow copies by outcome: success (answered, whatever "
            "the status), error, timeout, dropped (over a limit, or the shadow backing off).",
            labels=["service", "version", "outcome"])
        dropped = CounterMetricFamily(
            "weir_mirror_dropped", "Shadow copies dropped, by reason: max_concurrent, "
            "max_queued_bytes, max_body_bytes (the mirror's limits), shadow_unreachable (it "
            "refuses connections, or none of its upstreams is available).",
            labels=["service", "version", "reason"])
        comparisons = CounterMetricFamily(
            "weir_mirror_comparisons", "Shadow answers compared with the primary's (status "
            "and body digest).", labels=["service", "version", "result"])
        for (service, version), ms in sorted(stats.mirrors.items()):
            for outcome, count in ms.outcomes.items():
                mirrors.add_metric([service, version, outcome], count)
            for reason, count in ms.dropped.items():
                dropped.add_metric([service, version, reason], count)
            for result, count in ms.comparisons.items():
                comparisons.add_metric([service, version, result], count)
        yield requests
        yield durations
        yield grpc
        yield unrouted
        yield limits
        yield mirrors
        yield dropped
        yield comparisons
        yield from self._mirror_diffs(stats)

    @staticmethod
    def _mirror_diffs(stats: Any) -> Iterator[Metric]:
        """Field diffs per shadow (dataplane/diff.py): the mismatch share after noise, and the
        top fields that really differ, a handful per shadow (bounded cardinality)."""
        mismatch = GaugeMetricFamily(
            "weir_mirror_mismatch_ratio", "Share of a shadow's recent compared answers that "
            "differ from the users' in a field that is not noise.",
            labels=["service", "version"])
        fields = GaugeMetricFamily(
            "weir_mirror_field_difference_ratio", "Share of a shadow's compared answers in "
            "which this field differs from the users' answer (the top fields that are not "
            "noise).", labels=["service", "version", "field"])
        for (service, version), ms in sorted(stats.mirrors.items()):
            if not ms.diff.compared:
                continue
            report = ms.diff.report()
            if report["mismatch_rate"] is not None:
                mismatch.add_metric([service, version], report["mismatch_rate"])
            for entry in report["fields"]:
                fields.add_metric([service, version, entry["field"]], entry["rate"])
        yield mismatch
        yield fields

    def collect_upstreams(self) -> Iterator[Metric]:
        labels = ["upstream"]
        families = {
            "connect_errors": CounterMetricFamily(
                "weir_upstream_connect_errors", "Failed connection attempts.", labels=labels),
            "timeouts": CounterMetricFamily(
                "weir_upstream_timeouts", "Connect or read timeouts.", labels=labels),
            "retries": CounterMetricFamily(
                "weir_upstream_retries", "Requests retried on a fresh connection after a "
                "pooled one turned out closed.", labels=labels),
        }
        idle = GaugeMetricFamily("weir_upstream_pool_idle",
                                 "Idle keep-alive connections in the pool.", labels=labels)
        active = GaugeMetricFamily("weir_upstream_pool_active",
                                   "Requests and streams in flight.", labels=labels)
        for address, pool in sorted(self.proxy.pools.pools.items()):
            for attribute, family in families.items():
                family.add_metric([address], getattr(pool, attribute))
            idle.add_metric([address], pool.idle_count)
            active.add_metric([address], pool.inflight)
        yield from families.values()
        yield idle
        yield active

    def collect_versions(self) -> Iterator[Metric]:
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

    def collect_retries(self) -> Iterator[Metric]:
        stats = self.proxy.stats
        retries = CounterMetricFamily(
            "weir_retries", "Requests sent again under a service's retry policy, by reason "
            "(connect_failure, reset, timeout, status).",
            labels=["service", "version", "reason"])
        for (service, version, reason), count in sorted(stats.retries.items()):
            retries.add_metric([service, version, reason], count)
        exhausted = CounterMetricFamily(
            "weir_retry_budget_exhausted", "Failures relayed unretried because the service's "
            "retry budget was spent.", labels=["service", "version"])
        # Every version of a service with retries has the series from the start, at 0, so
        # that rate() and alerts on it work before the first refusal.
        counts = dict(stats.retry_budget_exhausted)
        for route in self.proxy.table.routes:
            if route.retry is not None:
                for name in route.versions:
                    counts.setdefault((route.name, name), 0)
        for (service, version), count in sorted(counts.items()):
            exhausted.add_metric([service, version], count)
        yield retries
        yield exhausted

    def collect_health(self) -> Iterator[Metric]:
        """Gauges per upstream of each version in the table; counters per address, like the
        other upstream counters, so that none vanishes when a reload moves or drops it."""
        labels = ["service", "version", "upstream"]
        healthy = GaugeMetricFamily(
            "weir_upstream_healthy", "1 while the upstream passes its health checks (or has "
            "none), 0 while it gets no new requests for failing them.", labels=labels)
        ejected = GaugeMetricFamily(
            "weir_upstream_ejected", "1 while outlier detection keeps the upstream out.",
            labels=labels)
        ejections = CounterMetricFamily(
            "weir_upstream_ejections", "Times outlier detection ejected the upstream.",
            labels=["upstream"])
        checks = CounterMetricFamily(
            "weir_health_checks", "Active health checks by outcome (success; failure: a "
            "status other than 2xx/3xx; timeout; error: no answer).",
            labels=["upstream", "outcome"])
        rejections = CounterMetricFamily(
            "weir_circuit_breaker_rejections", "Requests answered 503 because every upstream "
            "of the version that is up was at circuit_breaker.max_requests.",
            labels=["service", "version"])
        health = self.proxy.health
        for route in self.proxy.table.routes:
            for name, target in route.versions.items():
                for pool in target.balancer.pools:
                    state = health.state(pool.key)
                    key = [route.name, name, pool.key]
                    healthy.add_metric(key, 1 if state.healthy else 0)
                    ejected.add_metric(key, 1 if state.ejected_until else 0)
        for (service, version), count in sorted(health.rejections.items()):
            rejections.add_metric([service, version], count)
        for address, state in sorted(health.upstreams.items()):
            ejections.add_metric([address], state.ejections)
            if state.checked:
                for outcome, count in state.checks.items():
                    checks.add_metric([address, outcome], count)
        yield healthy
        yield ejected
        yield ejections
        yield checks
        yield rejections

    def collect_drained(self) -> Iterator[Metric]:
        """Per address, as `weir drain` takes it: every upstream of the config, and any
        address still drained that the config no longer lists."""
        drained = GaugeMetricFamily(
            "weir_upstream_drained", "1 while an operator has the upstream drained (weir "
            "drain): no new requests in any service or version; 0 otherwise.",
            labels=["upstream"])
        health = self.proxy.health
        addresses = set(health.drained)
        for service in self.proxy.config.services:
            for version in service.versions.values():
                addresses.update(version.upstreams)
        for address in sorted(addresses):
            drained.add_metric([address], 1 if address in health.drained else 0)
        yield drained

    def describe(self) -> Iterator[Metric]:
        return iter(())


class RolloutCollector(Collector):
    """The controller's phase and step per service, its analysis outcomes and notifications."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def collect(self) -> Iterator[Metric]:
        step = GaugeMetricFamily("weir_rollout_step", "Current step of the rollout.",
                                 labels=["service"])
        phase = GaugeMetricFamily("weir_rollout_phase", "1 for the rollout's current phase.",
                                  labels=["service", "phase"])
        analyses = CounterMetricFamily(
            "weir_analysis_runs", "Analysis measurements by outcome (success, failure, "
            "inconclusive).", labels=["service", "outcome"])
        rollouts = self.control.rollouts
        for name, rollout in sorted(rollouts.rollouts.items()):
            step.add_metric([name], rollout.record.step)
            for value in PHASES:
                phase.add_metric([name, value], 1 if rollout.record.phase == value else 0)
            for outcome in ("success", "failure", "inconclusive"):
                analyses.add_metric([name, outcome],
                                    rollouts.analysis_outcomes.get((name, outcome), 0))
        store = self.control.store
        leader = GaugeMetricFamily(
            "weir_controller_leader", "1 while this instance runs the rollout controller "
            "(always, with the file store; the lock holder, with a shared store).")
        leader.add_metric([], 1 if store.leading else 0)
        connected = GaugeMetricFamily(
            "weir_state_store_connected", "1 while the runtime state store can be reached.",
            labels=["type"])
        connected.add_metric([store.kind], 1 if store.connected else 0)
        control = self.control
        unsaved = GaugeMetricFamily(
            "weir_state_unsaved", "1 while runtime changes are in force here but not yet "
            "saved to the state file or store (Weir keeps retrying the save).")
        unsaved.add_metric([], 1 if control.unsaved is not None else 0)
        save_failures = CounterMetricFamily(
            "weir_state_save_failures", "Attempts to save the runtime state that failed.")
        save_failures.add_metric([], control.save_failures)
        notifications = CounterMetricFamily(
            "weir_notifications", "Rollout event notifications by outcome: sent, retried (a "
            "try that failed and was tried again), failed (given up after its tries), dropped "
            "(the receiver's queue was full).", labels=["outcome"])
        for outcome, count in rollouts.notifier.outcomes.items():
            notifications.add_metric([outcome], count)
        yield notifications
        yield unsaved
        yield save_failures
        yield step
        yield phase
        yield analyses
        yield leader
        yield connected

    def describe(self) -> Iterator[Metric]:
        return iter(())
