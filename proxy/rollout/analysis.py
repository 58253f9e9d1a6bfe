"""Judging a canary: one measurement window of Weir's own per-version counts, and the
checks that make it a success, a failure or inconclusive."""

from __future__ import annotations

import time
from typing import Any

from ..config.model import Analysis
from ..dataplane.stats import VersionStats, Window


def judge(analysis: Analysis, canary: Window, stable: Window | None) -> dict[str, Any]:
    """One measurement: success, failure or inconclusive, with the numbers behind it."""
    checks = analysis.checks
    values: dict[str, Any] = {
        "canary_requests": canary.requests, "canary_error_rate": round(canary.error_rate, 5),
        "canary_p50": round(canary.quantile(0.50), 5),
        "canary_p95": round(canary.quantile(0.95), 5),
        "canary_p99": round(canary.quantile(0.99), 5),
    }
    if stable is not None:
        values.update({"stable_requests": stable.requests,
                       "stable_error_rate": round(stable.error_rate, 5),
                       "stable_p99": round(stable.quantile(0.99), 5)})
    result: dict[str, Any] = {"at": time.time(), "values": values,
                              "thresholds": checks.thresholds(),
                              "min_requests": analysis.min_requests, "failed_checks": [],
                              "dry_run_failed": []}
    if canary.requests < analysis.min_requests:
        result["outcome"] = "inconclusive"
        result["why"] = f"{canary.requests} canary requests, fewer than {analysis.min_requests}"
        return result
    relative = (checks.max_error_rate_increase is not None or checks.max_p99_ratio is not None)
    failed = Failures(result["failed_checks"], result["dry_run_failed"], checks.dry_run)
    if checks.max_error_rate is not None and canary.error_rate > checks.max_error_rate:
        failed.append("max_error_rate")
    if checks.max_p99 is not None and values["canary_p99"] > checks.max_p99:
        failed.append("max_p99")
    if checks.max_p95 is not None and values["canary_p95"] > checks.max_p95:
        failed.append("max_p95")
    if checks.max_p50 is not None and values["canary_p50"] > checks.max_p50:
        failed.append("max_p50")
    if relative:
        if stable is None or stable.requests < analysis.min_requests:
            if not failed:
                result["outcome"] = "inconclusive"
                result["why"] = "too few stable requests to compare with"
                return result
        else:
            increase = canary.error_rate - stable.error_rate
            values["error_rate_increase"] = round(increase, 5)
            if (checks.max_error_rate_increase is not None
                    and increase > checks.max_error_rate_increase):
                failed.append("max_error_rate_increase")
            stable_p99 = stable.quantile(0.99)
            ratio = values["canary_p99"] / stable_p99 if stable_p99 > 0 else 1.0
            values["p99_ratio"] = round(ratio, 4)
            if checks.max_p99_ratio is not None and ratio > checks.max_p99_ratio:
                failed.append("max_p99_ratio")
    result["outcome"] = "failure" if failed else "success"
    return result


class Failures:
    """The failed checks of one measurement; a dry-run check's failure goes to its own list,
    shown but never failing the rollout."""

    def __init__(self, failed: list[str], dry: list[str], dry_run: list[str]) -> None:
        self.failed, self.dry, self.dry_run = failed, dry, dry_run

    def append(self, name: str) -> None:
        (self.dry if name in self.dry_run else self.failed).append(name)

    def __bool__(self) -> bool:
        return bool(self.failed)


class MeasurementWindow:
    """Counts of the canary (and its baseline) from a start time to now."""

    def __init__(self, canary: VersionStats, stable: VersionStats | None,
                 interval: float) -> None:
        self.canary = canary
        self.stable = stable
        self.canary_start = canary.snapshot()
        self.stable_start = stable.snapshot() if stable is not None else None
        self.ends_at = time.monotonic() + interval

    def due(self) -> bool:
        return time.monotonic() >= self.ends_at

    async def measure(self, analysis: Analysis) -> dict[str, Any]:
        stable = (self.stable.since(self.stable_start)
                  if self.stable is not None and self.stable_start is not None else None)
        return judge(analysis, self.canary.since(self.canary_start), stable)
