"""A worker's periodic report to its supervisor, and the supervisor's sum of them.

A worker counts on its request path exactly as a single process does (plain ints in
``StatsRegistry``, ``UpstreamPool`` and ``HealthMonitor``); every ``REPORT_INTERVAL`` it sends
what those counters gained since its last report, and its gauges as they are. The supervisor
adds the deltas into its own registry, so its counters are the sum over every worker that ever
ran: a worker's death costs at most the counts of its last unreported interval, and counters
never go down. Gauges (requests in flight, idle connections) are kept per worker and summed at
read time, so a dead worker's drop out at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..dataplane.diff import DiffStats
    from ..dataplane.proxyserver import ProxyServer
    from ..dataplane.stats import VersionStats

REPORT_INTERVAL = 0.25
POOL_COUNTERS = ("connect_errors", "timeouts", "retries")


class VersionGain(NamedTuple):
    """What one version's counters gained since the worker's last report."""

    key: tuple[str, ...]                 # (service, version), or (.., "mirror"): its copies
    requests: int
    errors: int
    duration: float                      # seconds, summed
    by_status: dict[Any, int]            # (method, status) -> requests
    buckets: dict[int, int]              # latency histogram bucket index -> requests
    grpc: dict[int, int] = {}            # grpc-status -> calls


class MirrorGain(NamedTuple):
    """What one shadow version's counters gained since the last report."""

    key: tuple[str, str]                 # (service, shadow version)
    outcomes: dict[str, int]
    comparisons: dict[str, int]
    mismatches: list[Any]                # the newest mismatch examples
    dropped: dict[str, int] = {}         # dropped copies by reason
    diff: DiffGain | None = None         # field diffs (dataplane/diff.py)


class DiffGain(NamedTuple):
    """What one shadow's field diffs gained since the last report."""

    compared: int
    baseline_compared: int
    differing: dict[str, int]
    noise: dict[str, int]
    recent: list[frozenset[str]]         # the new comparisons' differing fields
    examples: dict[str, dict[str, str]]  # examples of fields not reported before


@dataclass
class WorkerReport:
    """One worker's report (pickled over the supervisor's socketpair, see ipc.py): counter
    gains since the last report, and gauges as they are."""

    requests: int
    versions: list[VersionGain]
    unrouted: dict[int, int]
    mirrors: list[MirrorGain]
    retries: dict[Any, int]
    retry_budget_exhausted: dict[Any, int]
    pool_counters: dict[str, dict[Any, int]]     # counter name -> pool key -> gain
    gauges: dict[Any, tuple[int, int]]           # pool key -> (active, idle)
    rejections: dict[Any, int]
    ejections: dict[Any, int]
    # The drained upstreams the worker had applied when it read its gauges: `weir drain
    # --wait` trusts a count of 0 in flight only once every worker reports the drain.
    drained: list[str] = field(default_factory=list)


def _gain(now: dict[Any, int], then: dict[Any, int]) -> dict[Any, int]:
    return {key: count - then.get(key, 0) for key, count in now.items()
            if count != then.get(key, 0)}


class ReportBuilder:
    """Worker side: remembers what was last reported, and reports the difference."""

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self._versions: dict[tuple[str, ...], tuple[int, int, float, dict[Any, int],
                                                    list[int], dict[int, int]]] = {}
        self._flat: dict[str, dict[Any, int]] = {}
        self._diffs: dict[tuple[str, str], tuple[int, int]] = {}
        self._examples_sent: dict[tuple[str, str], set[str]] = {}

    def _flat_gain(self, name: str, now: dict[Any, int]) -> dict[Any, int]:
        gain = _gain(now, self._flat.get(name, {}))
        if gain:
            self._flat[name] = dict(now)
        return gain

    def _diff_gain(self, key: tuple[str, str], diff: DiffStats) -> DiffGain | None:
        compared, baseline = self._diffs.get(key, (0, 0))
        if (diff.compared, diff.baseline_compared) == (compared, baseline):
            return None
        self._diffs[key] = (diff.compared, diff.baseline_compared)
        new = diff.compared - compared
        sent = self._examples_sent.setdefault(key, set())
        examples = {k: v for k, v in diff.examples.items() if k not in sent}
        sent.update(examples)
        return DiffGain(new, diff.baseline_compared - baseline,
                        self._flat_gain(f"diff.differing.{key}", diff.differing),
                        self._flat_gain(f"diff.noise.{key}", diff.noise),
                        list(diff.recent)[-new:] if new > 0 else [], examples)

    def build(self) -> WorkerReport:
        stats = self.proxy.stats
        versions = []
        requests = 0
        # A shadow's answers (MirrorStats.answers) travel as a version's, keyed (service,
        # version, "mirror").
        counted: list[tuple[Any, VersionStats]] = list(stats.versions.items())
        counted += [((*key, "mirror"), ms.answers) for key, ms in stats.mirrors.items()]
        for key, vs in counted:
            then = self._versions.get(key)
            if then is not None and then[0] == vs.total:
                continue  # nothing new; the usual case for most versions
            total, errors, duration, by_status, buckets, grpc = then or (0, 0, 0.0, {}, [], {})
            now_buckets = list(vs.buckets)
            bucket_gain = {i: n - (buckets[i] if buckets else 0)
                           for i, n in enumerate(now_buckets)
                           if n != (buckets[i] if buckets else 0)}
            versions.append(VersionGain(key, vs.total - total, vs.errors - errors,
                                        vs.duration_sum - duration,
                                        _gain(vs.requests, by_status), bucket_gain,
                                        _gain(vs.grpc, grpc)))
            requests += vs.total - total
            self._versions[key] = (vs.total, vs.errors, vs.duration_sum, dict(vs.requests),
                                   now_buckets, dict(vs.grpc))
        unrouted = self._flat_gain("unrouted", stats.unrouted)
        requests += sum(unrouted.values())
        mirrors = []
        for key, ms in list(stats.mirrors.items()):
            outcomes = self._flat_gain(f"mirror.outcomes.{key}", ms.outcomes)
            comparisons = self._flat_gain(f"mirror.comparisons.{key}", ms.comparisons)
            dropped = self._flat_gain(f"mirror.dropped.{key}", ms.dropped)
            diff = self._diff_gain(key, ms.diff)
            if outcomes or comparisons or diff:
                new = comparisons.get("mismatch", 0)
                mismatches = list(ms.mismatches)[-new:] if new else []
                mirrors.append(MirrorGain(key, outcomes, comparisons, mismatches, dropped,
                                          diff))
        pools = self.proxy.pools.pools
        health = self.proxy.health
        return WorkerReport(
            requests=requests,
            versions=versions,
            unrouted=unrouted,
            mirrors=mirrors,
            retries=self._flat_gain("retries", stats.retries),
            retry_budget_exhausted=self._flat_gain("exhausted", stats.retry_budget_exhausted),
            pool_counters={
                name: self._flat_gain(f"pool.{name}",
                                      {key: getattr(pool, name) for key, pool in pools.items()})
                for name in POOL_COUNTERS},
            gauges={key: (len(pool.active), len(pool.idle)) for key, pool in pools.items()
                    if pool.active or pool.idle},
            rejections=self._flat_gain("rejections", health.rejections),
            ejections=self._flat_gain("ejections", {k: s.ejections
                                                    for k, s in health.upstreams.items()}),
        )


def merge(proxy: ProxyServer, worker: int, report: WorkerReport) -> None:
    """Supervisor side: add one worker's report into the supervisor's registries."""
    stats = proxy.stats
    for gain in report.versions:
        vs = (stats.for_version(*gain.key) if len(gain.key) == 2
              else stats.for_mirror(*gain.key[:2]).answers)
        vs.total += gain.requests
        vs.errors += gain.errors
        vs.duration_sum += gain.duration
        for (method, status), count in gain.by_status.items():
            vs.add_requests(method, status, count)
        for index, count in gain.buckets.items():
            vs.buckets[index] += count
        _add(vs.grpc, gain.grpc)
    _add(stats.unrouted, report.unrouted)
    for mirror in report.mirrors:
        ms = stats.for_mirror(*mirror.key)
        _add(ms.outcomes, mirror.outcomes)
        _add(ms.comparisons, mirror.comparisons)
        _add(ms.dropped, mirror.dropped)
        if mirror.diff is not None:
            ms.diff.merge(*mirror.diff)
        ms.mismatches.extend(mirror.mismatches)
    _add(stats.retries, report.retries)
    _add(stats.retry_budget_exhausted, report.retry_budget_exhausted)
    pools = proxy.pools.pools
    for attribute, gains in report.pool_counters.items():
        for key, count in gains.items():
            pool = pools.get(key)
            if pool is not None:
                setattr(pool, attribute, getattr(pool, attribute) + count)
    gauges = report.gauges
    for key, pool in pools.items():
        active, idle = gauges.get(key, (0, 0))
        pool.reported[worker] = (active, idle)
    health = proxy.health
    _add(health.rejections, report.rejections)
    for key, count in report.ejections.items():
        health.state(key).ejections += count


def forget_worker(proxy: ProxyServer, worker: int) -> None:
    """A worker is gone: its in-flight and idle gauges drop out (its counters stay)."""
    for pool in proxy.pools.pools.values():
        pool.reported.pop(worker, None)


def _add(into: dict[Any, int], gains: dict[Any, int]) -> None:
    for key, count in gains.items():
        into[key] = into.get(key, 0) + count
