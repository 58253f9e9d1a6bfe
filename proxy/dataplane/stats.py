"""Per-version request statistics, kept in plain counters on the request path and turned into
Prometheus metrics only when scraped (a prometheus_client ``labels().inc()`` costs several
microseconds; a dict increment costs a fraction of one)."""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from .diff import DiffStats
from .retry import RetryBudget

# Upper bounds (seconds) of the exported request duration histogram; a proxy's interesting
# range starts well under the default client buckets.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)

# What is counted is finer: bounds 10% apart from 0.1 ms to 60 s, plus the exported ones, so
# the controller's percentiles are within a few percent; exported buckets are sums of these.
FINE_BUCKETS: Final = tuple(sorted({round(0.0001 * 1.1 ** i, 7) for i in range(141)}
                            | set(DURATION_BUCKETS)))
_EXPORTED_INDEX: Final = tuple(FINE_BUCKETS.index(b) for b in DURATION_BUCKETS)
_FINE_COUNT: Final = len(FINE_BUCKETS)

# Requests are counted per method in a list indexed by status code: one list item to update
# per request, where a dict of codes would take a lookup and a store. Weir counts no code
# over 599 (an upstream's other codes are answered with 502); any other goes to a dict.
_STATUS_SLOTS: Final = 600

# The gRPC status codes that count as errors unless a service says otherwise (its
# ``grpc.error_codes``): UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and
# DATA_LOSS, the server-side failures; the rest (NOT_FOUND, INVALID_ARGUMENT, ...) are
# answers about the request.
DEFAULT_GRPC_ERRORS: Final = frozenset({2, 4, 12, 13, 14, 15})


class Window:
    """Counts between two snapshots of a VersionStats: what analysis judges."""

    __slots__ = ("buckets", "errors", "requests")

    def __init__(self, requests: int, errors: int, buckets: list[int]) -> None:
        self.requests = requests
        self.errors = errors
        self.buckets = buckets

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        """Like PromQL's histogram_quantile: linear within the bucket holding the rank."""
        total = sum(self.buckets)
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        lower = 0.0
        for index, count in enumerate(self.buckets):
            upper = FINE_BUCKETS[index] if index < len(FINE_BUCKETS) else lower
            if count and seen + count >= rank:
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
            lower = upper
        return lower


class VersionStats:
    """Requests by (method, status) and a duration histogram for one service version."""

    __slots__ = ("buckets", "by_method", "duration_sum", "errors", "grpc", "grpc_errors",
                 "odd_statuses", "service", "total", "version")

    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        # Requests by method, then status (see _STATUS_SLOTS): a key of (method, status) would
        # build and hash a tuple for every request. llhttp accepts only known methods.
        self.by_method: dict[bytes, list[int]] = {}
        self.odd_statuses: dict[tuple[bytes, int], int] = {}
        self.buckets = [0] * (len(FINE_BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0
        self.total = 0
        self.errors = 0  # 5xx, including Weir's own 502 and 504 for upstream failures
        # gRPC answers by grpc-status, and which of those are errors (the service's setting,
        # replaced on reload): one with an HTTP 200 counts in ``errors`` too.
        self.grpc: dict[int, int] = {}
        self.grpc_errors = DEFAULT_GRPC_ERRORS

    def observe(self, method: bytes, status: int, seconds: float) -> None:
        counts = self.by_method.get(method)
        if counts is not None and 0 <= status < _STATUS_SLOTS:
            # Read, then stored: compiled, ``+=`` on a list item is a generic call instead.
            counts[status] = counts[status] + 1
        else:
            self.add_requests(method, status, 1)
        self.total += 1
        if status >= 500:
            self.errors += 1
        # bisect_left, written out (native when compiled, where calling the C one costs
        # more): a duration equal to a bound belongs to that bound's bucket ("le").
        low = 0
        high = _FINE_COUNT
        while low < high:
            middle = (low + high) >> 1
            if FINE_BUCKETS[middle] < seconds:
                low = middle + 1
            else:
                high = middle
        buckets = self.buckets
        buckets[low] = buckets[low] + 1
        self.duration_sum += seconds

    def observe_grpc(self, code: int, status: int) -> None:
        """A gRPC answer, after ``observe`` counted its HTTP status."""
        self.grpc[code] = self.grpc.get(code, 0) + 1
        if status < 500 and code in self.grpc_errors:
            self.errors += 1

    @property
    def requests(self) -> dict[tuple[bytes, int], int]:
        """Requests by (method, status), for exposition and reports (off the request path)."""
        counted = {(method, status): count for method, counts in self.by_method.items()
                   for status, count in enumerate(counts) if count}
        counted.update(self.odd_statuses)
        return counted

    def add_requests(self, method: bytes, status: int, count: int) -> None:
        if not 0 <= status < _STATUS_SLOTS:
            key = (method, status)
            self.odd_statuses[key] = self.odd_statuses.get(key, 0) + count
            return
        counts = self.by_method.get(method)
        if counts is None:
            counts = self.by_method[method] = [0] * _STATUS_SLOTS
        counts[status] += count

    def snapshot(self) -> tuple[int, int, list[int]]:
        return self.total, self.errors, list(self.buckets)

    def since(self, snapshot: tuple[int, int, list[int]]) -> Window:
        total, errors, buckets = snapshot
        return Window(self.total - total, self.errors - errors,
                      [now - then for now, then in zip(self.buckets, buckets, strict=True)])

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """The exported (coarse) buckets, cumulative, as Prometheus wants them."""
        cumulative = []
        running = 0
        fine = self.buckets
        start = 0
        for bound, index in zip(DURATION_BUCKETS, _EXPORTED_INDEX, strict=True):
            running += sum(fine[start:index + 1])
            start = index + 1
            cumulative.append((str(bound), running))
        cumulative.append(("+Inf", running + sum(fine[start:])))
        return cumulative


class LimitStats:
    """Connections and requests stopped by each ``limits`` setting: plain integer attributes,
    so that counting one costs an attribute increment, on paths that are already off the
    normal request path (a 408, 413, 431 or 503 answered by Weir, an idle close)."""

    NAMES = ("max_connections", "header_timeout", "idle_timeout", "max_header_bytes",
             "max_body_bytes", "http2_abuse")
    __slots__ = (*NAMES, "last_warning")

    def __init__(self) -> None:
        self.max_connections = 0    # refused with 503 at accept
        self.header_timeout = 0     # a head not complete in time (408), or no request at all
        self.idle_timeout = 0       # keep-alive connections closed while idle between requests
        self.max_header_bytes = 0   # 431
        self.max_body_bytes = 0     # 413 (or a reset when the response had already started)
        # HTTP/2 connections cut for abuse (rapid reset, floods), and the ones refused at
        # once from an address cut a moment before (see context.Penalties)
        self.http2_abuse = 0
        self.last_warning = 0.0     # loop time of the last "max_connections reached" log line


MIRROR_OUTCOMES = ("success", "error", "timeout", "dropped")
# Why copies were dropped: only ever at a configured limit, or while the shadow cannot be
# reached (max_concurrent copies in flight, max_queued_bytes of their bodies, a body over
# max_body_bytes; the shadow refusing connections, or none of its upstreams available).
DROP_REASONS = ("max_concurrent", "max_queued_bytes", "max_body_bytes", "shadow_unreachable")
MISMATCHES_KEPT = 20


class MirrorStats:
    """Counters for one (service, shadow version); lives as long as the process."""

    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        self.outcomes = dict.fromkeys(MIRROR_OUTCOMES, 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)  # outcomes["dropped"], by reason
        self.comparisons = {"match": 0, "mismatch": 0}
        self.mismatches: deque[dict[str, Any]] = deque(maxlen=MISMATCHES_KEPT)
        self.diff = DiffStats()  # field by field, with the noise learnt (see diff.py)
        # The shadow's answers as a version's requests (status, duration; a copy that failed
        # or timed out as 502 or 504): what a rollout's mirror step judges the canary on.
        self.answers = VersionStats(service, version)


class StatsRegistry:
    """One VersionStats per (service, version) for the life of the process, so counters
    survive config reloads, as Prometheus counters must."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], VersionStats] = {}
        self.unrouted: dict[int, int] = {}  # status → count, for requests no service took
        self.mirrors: dict[tuple[str, str], MirrorStats] = {}
        # Retries: (service, version, reason) → count, and refusals by the budget per
        # (service, version). Bumped only when a request fails, never on the usual path.
        self.retries: dict[tuple[str, str, str], int] = {}
        self.retry_budget_exhausted: dict[tuple[str, str], int] = {}
        self.retry_budgets: dict[str, RetryBudget] = {}  # per service, across reloads
        self.limits = LimitStats()

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

    def count_retry(self, service: str, version: str, reason: str) -> None:
        key = (service, version, reason)
        self.retries[key] = self.retries.get(key, 0) + 1

    def count_retry_budget_exhausted(self, service: str, version: str) -> None:
        key = (service, version)
        self.retry_budget_exhausted[key] = self.retry_budget_exhausted.get(key, 0) + 1
