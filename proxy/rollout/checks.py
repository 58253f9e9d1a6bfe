"""Checks on the operator's own metrics (``analysis.checks.custom``): a PromQL query or a JSON
value over HTTP (Argo's web provider), measured for the canary and for stable over the window
just judged, and folded into that window's result with the built-in checks' rules.

No data, an error answer or no answer at all make a check inconclusive, never a failure: an
outage of the monitoring must not roll back a healthy canary.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING, Any

from ..config.model import Analysis, CustomCheck
from .prometheus import PrometheusUnavailable, instant_query

if TYPE_CHECKING:
    from .controller import RolloutController


class Unmeasured(Exception):
    """The check's source gave no usable number; the message says why."""


def render(template: str, service: str, version: str, seconds: int) -> str:
    return (template.replace("{{service}}", service).replace("{{version}}", version)
            .replace("{{window}}", f"{seconds}s"))


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def json_value(document: Any, path: str) -> Any:
    """The value at a dotted path (``data.value``, ``$.items[0].score``); Unmeasured if the
    path leads nowhere."""
    value = document
    text = path[1:] if path.startswith("$") else path
    for key, index in _PATH_PART.findall(text):
        if key:
            if not isinstance(value, dict) or key not in value:
                raise Unmeasured(f"the answer has nothing at {path!r} ({key!r} missing)")
            value = value[key]
        else:
            if not isinstance(value, list) or int(index) >= len(value):
                raise Unmeasured(f"the answer has nothing at {path!r} (no item {index})")
            value = value[int(index)]
    return value


def number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise Unmeasured(f"{where} is a boolean, not a number")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise Unmeasured(f"{where} is {value!r:.60}, not a number") from None
    if math.isnan(result) or math.isinf(result):
        raise Unmeasured(f"{where} is {result}")
    return result


class CustomChecks:
    """Measures a window's custom checks through the controller's HTTP client."""

    def __init__(self, controller: RolloutController) -> None:
        self.controller = controller

    async def apply(self, analysis: Analysis, result: dict[str, Any], service: str,
                    canary: str, stable: str | None) -> None:
        """Measure each custom check and fold it into ``result`` (its values under
        ``custom``, a failure into ``failed_checks``, a dry run's into ``dry_run_failed``)."""
        checks = analysis.checks.custom
        if not checks:
            return
        seconds = max(2, math.ceil(analysis.interval))
        at = time.time()
        measured: dict[str, dict[str, Any]] = {}
        inconclusive: list[str] = []
        for check in checks:
            entry = await self.measure(analysis, check, service, canary, stable, seconds, at)
            measured[check.name] = entry
            if entry["outcome"] == "failure":
                key = "dry_run_failed" if check.dry_run else "failed_checks"
                result.setdefault(key, []).append(check.name)
            elif entry["outcome"] == "inconclusive" and not check.dry_run:
                inconclusive.append(f"{check.name}: {entry['why']}")
        result["custom"] = measured
        if result.get("failed_checks"):
            result["outcome"] = "failure"
        elif inconclusive:
            why = "; ".join(inconclusive)
            result["outcome"] = "inconclusive"
            result["why"] = f"{result['why']}; {why}" if result.get("why") else why

    async def measure(self, analysis: Analysis, check: CustomCheck, service: str, canary: str,
                      stable: str | None, seconds: int, at: float) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "limits": {k: v for k, v in (("max", check.max), ("min", check.min),
                                         ("max_increase", check.max_increase),
                                         ("max_ratio", check.max_ratio)) if v is not None},
            "dry_run": check.dry_run}
        try:
            entry["canary"] = await self.value(analysis, check, service, canary, seconds, at,
                                               entry)
            if check.relative:
                if stable is None:
                    raise Unmeasured("no stable version to compare with in this window")
                entry["stable"] = await self.value(analysis, check, service, stable, seconds,
                                                   at, entry)
        except Unmeasured as exc:
            entry.update(outcome="inconclusive", why=str(exc))
            return entry
        value, base = entry["canary"], entry.get("stable")
        failed = []
        if check.max is not None and value > check.max:
            failed.append(f"{value:g} > max {check.max:g}")
        if check.min is not None and value < check.min:
            failed.append(f"{value:g} < min {check.min:g}")
        if check.max_increase is not None and value - base > check.max_increase:
            failed.append(f"{value:g} - stable {base:g} > max_increase {check.max_increase:g}")
        if check.max_ratio is not None:
            ratio = value / base if base else (1.0 if value == 0 else math.inf)
            entry["ratio"] = round(ratio, 4) if math.isfinite(ratio) else None
            if ratio > check.max_ratio:
                failed.append(f"{value:g} / stable {base:g} > max_ratio {check.max_ratio:g}")
        entry["outcome"] = "failure" if failed else "success"
        if failed:
            entry["why"] = "; ".join(failed)
        return entry

    async def value(self, analysis: Analysis, check: CustomCheck, service: str, version: str,
                    seconds: int, at: float, entry: dict[str, Any]) -> float:
        if check.prometheus is not None:
            query = render(check.prometheus.query, service, version, seconds)
            entry.setdefault("queries", {})[version] = query
            url = check.prometheus.url or analysis.source.url or ""
            return await self.prometheus(url, query, at, check.timeout)
        assert check.http is not None
        url = render(check.http.url, service, version, seconds)
        entry.setdefault("urls", {})[version] = url
        document = await self.get_json(url, check.http.headers, check.timeout)
        return number(json_value(document, check.http.json_path),
                      f"{check.http.json_path} of {url}")

    async def prometheus(self, base: str, query: str, at: float, timeout: float) -> float:
        try:
            data = await instant_query(self.controller, base, query, at, timeout)
        except PrometheusUnavailable as exc:
            raise Unmeasured(f"Prometheus at {base} gave no answer: {exc}"[:300]) from None
        result = data.get("result")
        if data.get("resultType") == "scalar" and isinstance(result, list):
            return number(result[1], "the query's value")
        if not result:
            raise Unmeasured("the query returned no data")
        if len(result) > 1:
            raise Unmeasured(f"the query returned {len(result)} series; aggregate it to one "
                             f"(sum, avg, max)")
        return number(result[0]["value"][1], "the query's value")

    async def get_json(self, url: str, headers: dict[str, str], timeout: float) -> Any:
        import aiohttp

        session = await self.controller.client()
        try:
            async with session.get(url,
                                   # The shared session leaves bodies as they come.
                                   headers={"Accept": "application/json",
                                            "Accept-Encoding": "identity", **headers},
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status >= 400:
                    raise Unmeasured(f"{url} answered {response.status}")
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise Unmeasured(f"no answer from {url}: {str(exc) or type(exc).__name__}") from None
