"""Analysis from Prometheus: the same checks as the in-process windows, computed with PromQL
over Weir's own metric names, so every instance's traffic counts (each instance only sees
its own in process).

A window is the analysis interval ending when it is measured; the counts are
``increase()`` over that range, the percentiles ``histogram_quantile()`` over ``rate()`` of the
exported buckets. An unreachable Prometheus, an error answer or no data at all make the
measurement inconclusive, never a failure: an outage of the monitoring must not roll back a
healthy canary.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from ..config.model import Analysis, AnalysisSource

if TYPE_CHECKING:
    from .controller import RolloutController

QUANTILES = (0.5, 0.95, 0.99)


class Measured:
    """What ``judge`` reads from a window, filled from query results."""

    def __init__(self, requests: float, errors: float, quantiles: dict[float, float]) -> None:
        self.requests = round(requests)
        self.errors = round(errors)
        self._quantiles = quantiles

    @property
    def error_rate(self) -> float:
        return min(1.0, self.errors / self.requests) if self.requests else 0.0

    def quantile(self, q: float) -> float:
        return self._quantiles.get(q, 0.0)


def selector(source: AnalysisSource, service: str, version: str, extra: str = "") -> str:
    labels = {**source.labels, "service": service, "version": version}
    matchers = [f'{k}="{escape(v)}"' for k, v in sorted(labels.items())]
    if extra:
        matchers.append(extra)
    return "{" + ",".join(matchers) + "}"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def queries(source: AnalysisSource, service: str, version: str, seconds: int,
            grpc_errors: list[int] | None = None) -> dict[str, str]:
    """``grpc_errors``: the gRPC statuses that count as errors; gRPC calls answered with one
    (over HTTP 200) are added to the 5xx answers."""
    window = f"[{seconds}s]"
    every = selector(source, service, version)
    errors = selector(source, service, version, 'status=~"5.."')
    error_sum = f"sum(increase(http_requests_total{errors}{window}))"
    if grpc_errors:
        codes = "|".join(str(code) for code in sorted(grpc_errors))
        failed = selector(source, service, version, f'grpc_status=~"{codes}"')
        # "or vector(0)": a version with no gRPC calls has no such series to add.
        error_sum = (f"{error_sum} + (sum(increase(weir_grpc_responses_total{failed}"
                     f"{window})) or vector(0))")
    found = {"requests": f"sum(increase(http_requests_total{every}{window}))",
             "errors": error_sum}
    for q in QUANTILES:
        found[f"p{round(q * 100)}"] = (
            f"histogram_quantile({q}, sum by (le) "
            f"(rate(http_request_duration_seconds_bucket{every}{window})))")
    return found


class PrometheusUnavailable(Exception):
    pass


async def instant_query(controller: RolloutController, base_url: str, promql: str, at: float,
                        timeout: float) -> dict[str, Any]:
    """One instant query at ``at``: the answer's ``data`` (``resultType``, ``result``).
    PrometheusUnavailable when no answer came, or an error answer did."""
    import aiohttp

    session = await controller.client()
    url = f"{base_url.rstrip('/')}/api/v1/query"
    try:
        async with session.get(url, params={"query": promql, "time": f"{at:.3f}"},
                               # The shared session leaves bodies as they come.
                               headers={"Accept-Encoding": "identity"},
                               timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise PrometheusUnavailable(str(exc) or type(exc).__name__) from None
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else body
        raise PrometheusUnavailable(f"query failed: {error}")
    data = body.get("data")
    return data if isinstance(data, dict) else {}


class PrometheusWindow:
    """The same face as MeasurementWindow: ``due()``, then ``await measure()``."""

    def __init__(self, controller: RolloutController, source: AnalysisSource, service: str,
                 canary: str, stable: str | None, interval: float,
                 grpc_errors: list[int] | None = None) -> None:
        self.controller = controller
        self.grpc_errors = grpc_errors
        self.source = source
        self.service = service
        self.canary = canary
        self.stable = stable
        # A range below two scrapes has no increase to show: whole seconds, at least 2.
        self.seconds = max(2, math.ceil(interval))
        self.ends_at = time.monotonic() + interval

    def due(self) -> bool:
        return time.monotonic() >= self.ends_at

    async def measure(self, analysis: Analysis) -> dict[str, Any]:
        from .analysis import judge

        at = time.time()
        asked = {"canary": queries(self.source, self.service, self.canary, self.seconds,
                                   self.grpc_errors)}
        if self.stable is not None:
            asked["stable"] = queries(self.source, self.service, self.stable, self.seconds,
                                      self.grpc_errors)
        answers: dict[str, dict[str, float | None]] = {}
        why = None
        try:
            for role, named in asked.items():
                answers[role] = {name: await self.query(promql, at)
                                 for name, promql in named.items()}
        except PrometheusUnavailable as exc:
            why = f"Prometheus at {self.source.url} gave no answer: {exc}"
        if why is None and answers["canary"]["requests"] is None:
            why = f"Prometheus has no data for {self.service}/{self.canary} yet"
        source = {"type": "prometheus", "url": self.source.url, "range": f"{self.seconds}s",
                  "queries": asked, "answers": answers}
        if why is not None:
            return {"at": at, "outcome": "inconclusive", "why": why, "values": {},
                    "thresholds": analysis.checks.thresholds(),
                    "min_requests": analysis.min_requests, "failed_checks": [],
                    "dry_run_failed": [], "source": source}
        canary = self.measured(answers["canary"])
        stable = self.measured(answers["stable"]) if "stable" in answers else None
        result = judge(analysis, canary, stable)  # type: ignore[arg-type]
        result["source"] = source
        return result

    @staticmethod
    def measured(answer: dict[str, float | None]) -> Measured:
        return Measured(answer["requests"] or 0.0, answer["errors"] or 0.0,
                        {q: answer[f"p{round(q * 100)}"] or 0.0 for q in QUANTILES})

    async def query(self, promql: str, at: float) -> float | None:
        """One instant query; None for an empty result (or NaN: no requests to rank)."""
        data = await instant_query(self.controller, self.source.url or "", promql, at,
                                   self.source.timeout)
        result = data.get("result") or []
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value
