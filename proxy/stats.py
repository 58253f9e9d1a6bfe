"""Per-version request statistics, kept in plain counters on the request path and turned into
Prometheus metrics only when scraped (a prometheus_client ``labels().inc()`` costs several
microseconds; a dict increment costs a fraction of one)."""

from __future__ import annotations

from bisect import bisect_left

from .mirror import MirrorStats

# Upper bounds (seconds) of the request duration histogram; a proxy's interesting range
# starts well under the default client buckets.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)


class VersionStats:
    """Requests by (method, status) and a duration histogram for one service version."""

    __slots__ = ("buckets", "duration_sum", "requests", "service", "version")

    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        self.requests: dict[tuple[bytes, int], int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0

    def observe(self, method: bytes, status: int, seconds: float) -> None:
        key = (method, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        # bisect_left: a duration equal to a bound belongs to that bound's bucket ("le").
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        total = 0
        result = []
        for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.buckets,
                                strict=True):
            total += count
            result.append((bound, total))
        return result


class StatsRegistry:
    """One VersionStats per (service, version) for the life of the process, so counters
    survive config reloads, as Prometheus counters must."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], VersionStats] = {}
        self.unrouted: dict[int, int] = {}  # status → count, for requests no service took
        self.mirrors: dict[tuple[str, str], MirrorStats] = {}

    def for_mirror(self, service: str, version: str) -> MirrorStats:
        key = (service, version)
        stats = self.mirrors.get(key)
        if stats is None:
            stats = self.mirrors[key] = MirrorStats(service, version)
        return stats

    def for_version(self, service: str, version: str) -> VersionStats:
        key = (service, version)
        stats = self.versions.get(key)
        if stats is None:
            stats = self.versions[key] = VersionStats(service, version)
        return stats

    def count_unrouted(self, status: int) -> None:
        self.unrouted[status] = self.unrouted.get(status, 0) + 1
