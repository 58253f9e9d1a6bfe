"""A short per-version history for the dashboard's charts, sampled off the request path.

Once a second the sampler reads the counters the data plane already keeps (VersionStats) and
records, per service and version, the request rate, the 5xx share and the p99 since the last
sample, with the weight and the requests in flight, into ring buffers of the last five minutes.
So a dashboard opened now has charts at once, and the request path pays nothing for them: the
sampler copies a few counters, it never hooks into a request.

Series follow the config: a reload that adds a version gives it a series from then on, one that
removes a version or service drops its series. The counters themselves live for the life of the
process (StatsRegistry), so the rates stay right across reloads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..dataplane.stats import VersionStats, Window
from ..tasks import cancel_and_wait

if TYPE_CHECKING:
    from ..control.plane import ControlPlane

log = logging.getLogger("weir.history")

INTERVAL = 1.0      # seconds between samples
KEEP = 300          # samples kept per series: five minutes
P99_SAMPLES = 5     # p99 over the last five seconds: one second of a slow version holds too
                    # few requests for a 99th percentile that means anything

Snapshot = tuple[int, int, list[int]]


class Series:
    """One version's samples, column by column (the JSON the page reads is the same shape)."""

    FIELDS = ("t", "rps", "error_rate", "p99", "weight", "inflight")

    def __init__(self, keep: int) -> None:
        self.columns: dict[str, deque[Any]] = {f: deque(maxlen=keep) for f in self.FIELDS}
        # The counters at each of the last few samples: rates come from the newest two, p99
        # from the oldest and the newest.
        self.snapshots: deque[tuple[float, Snapshot]] = deque(maxlen=P99_SAMPLES + 1)

    def add(self, at: float, now: float, stats: VersionStats, weight: int,
            inflight: int) -> None:
        snapshot = stats.snapshot()
        previous = self.snapshots[-1] if self.snapshots else None
        self.snapshots.append((now, snapshot))
        if previous is None:
            return  # a baseline: a rate needs two samples
        then, (total, errors, _) = previous
        requests = snapshot[0] - total
        failed = snapshot[1] - errors
        elapsed = max(now - then, 1e-6)
        window = stats_between(self.snapshots[0][1], snapshot)
        row = (
            round(at, 3),
            round(requests / elapsed, 2),
            # No requests, no error rate: a gap in the chart, not a reassuring zero.
            round(failed / requests, 5) if requests else None,
            round(window.quantile(0.99) * 1000, 2) if window.requests else None,
            weight,
            inflight,
        )
        for name, value in zip(self.FIELDS, row, strict=True):
            self.columns[name].append(value)

    def since(self, after: float) -> dict[str, list[Any]]:
        times = self.columns["t"]
        start = len(times)
        while start > 0 and times[start - 1] > after:
            start -= 1
        return {name: list(column)[start:] for name, column in self.columns.items()}


def stats_between(then: Snapshot, now: Snapshot) -> Window:
    return Window(now[0] - then[0], now[1] - then[1],
                  [b - a for a, b in zip(then[2], now[2], strict=True)])


class HistorySampler:
    """Samples every service's versions each ``interval`` seconds into bounded series."""

    def __init__(self, control: ControlPlane, interval: float = INTERVAL,
                 keep: int = KEEP) -> None:
        self.control = control
        self.interval = interval
        self.keep = keep
        self.series: dict[str, dict[str, Series]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self.sample()  # the baseline, so the first chart point comes one interval later
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            # On a fixed grid, so that a slow tick does not stretch every interval after it.
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                self.sample()
            except Exception:  # the charts must never take the admin listener down
                log.exception("history sample failed")

    def sample(self) -> None:
        proxy = self.control.proxy
        at, now = time.time(), time.monotonic()
        seen: dict[str, set[str]] = {}
        for route in proxy.table.routes:
            series = self.series.setdefault(route.name, {})
            seen[route.name] = set(route.versions)
            for name, target in route.versions.items():
                line = series.get(name)
                if line is None:
                    line = series[name] = Series(self.keep)
                # target.stats is the registry's VersionStats for the process's life.
                line.add(at, now, target.stats, route.weights.get(name, 0),
                         sum(pool.inflight for pool in target.balancer.pools))
        # What a reload removed goes with it.
        for service in list(self.series):
            if service not in seen:
                del self.series[service]
                continue
            for version in list(self.series[service]):
                if version not in seen[service]:
                    del self.series[service][version]

    def export(self, after: float = 0.0) -> dict[str, Any]:
        """The samples newer than ``after`` (a ``t`` the caller already has), per version."""
        return {
            "interval": self.interval,
            "keep_seconds": self.interval * self.keep,
            "p99_window_seconds": self.interval * P99_SAMPLES,
            "now": round(time.time(), 3),
            "services": {service: {"versions": {name: line.since(after)
                                                for name, line in versions.items()}}
                         for service, versions in self.series.items()},
        }
