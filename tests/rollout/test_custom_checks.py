"""Checks on the operator's own metrics: a PromQL query against a real Prometheus scraping Weir,
a JSON value from a web endpoint (Argo's web provider), each measured for the canary and for
stable in the same window; and dry runs, which record a failing check without failing the
rollout.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from ..conftest import free_port, serve_on_loopback
from ..rollout_harness import Load, analyses, canary_config
from .test_prometheus_analysis import prometheus, with_admin_port  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses")

# The canary's 500s over the window, less stable's: the app's own error budget in PromQL.
FIVE_HUNDREDS = ('sum(increase(http_requests_total{service="{{service}}",'
                 'version="{{version}}",status="500"}[{{window}}])) or vector(0)')


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus")
async def test_a_custom_promql_check_fails_a_canary(backends, weir, prometheus):  # noqa: F811
    stable, canary = await backends("stable"), await backends("canary", fail_every=4)
    analysis: dict[str, Any] = {
        "interval": "3s", "min_requests": 10, "failure_limit": 0, "inconclusive_limit": 10,
        "checks": {"custom": [{"name": "extra_500s", "max_increase": 2,
                               "prometheus": {"query": FIVE_HUNDREDS}}]}}
    data = canary_config(stable, canary, [{"set_weight": 50}, {"pause": {}}], analysis)
    url = await prometheus(with_admin_port(data))
    analysis["checks"]["custom"][0]["prometheus"]["url"] = url
    live = await weir(data)
    async with Load(live.port, workers=3, gap=0.01):
        await live.api.act("start")
        aborted = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=30,
                                              what="the rollback by the custom check")
    failure = analyses(aborted, "failure")[-1]
    measured = failure["custom"]["extra_500s"]
    print(f"\ncustom PromQL check: {measured}")
    assert failure["failed_checks"] == ["extra_500s"]
    assert measured["outcome"] == "failure"
    assert measured["canary"] - measured["stable"] > 2
    assert measured["stable"] == 0
    assert 'version="canary"' in measured["queries"]["canary"]
    assert 'version="stable"' in measured["queries"]["stable"]
    assert "[3s]" in measured["queries"]["canary"]
    assert "extra_500s" in aborted["reason"]
    event = [e for e in aborted["events"] if e["event"] == "analysis"][-1]
    assert "(extra_500s)" in event["message"], event["message"]
    await live.api.wait_weights({"stable": 100, "canary": 0})


@pytest.fixture
async def scores() -> AsyncIterator[dict[str, Any]]:
    """A web endpoint answering {"data": {"items": [{"score": S}]}} for ?version=V."""
    table: dict[str, Any] = {"stable": 0.99, "canary": 0.5, "port": 0, "asked": []}

    async def score(request: web.Request) -> web.Response:
        version = request.query.get("version", "")
        table["asked"].append((version, request.query.get("window")))
        return web.json_response({"data": {"items": [{"score": table.get(version)}]}})

    app = web.Application()
    app.add_routes([web.get("/score", score)])
    runner, table["port"] = await serve_on_loopback(app, shutdown_timeout=0.5)
    yield table
    await runner.cleanup()


def web_check(port: int, **extra: Any) -> dict[str, Any]:
    return {"name": "apdex", "min": 0.9, **extra,
            "http": {"url": f"http://127.0.0.1:{port}/score?version={{{{version}}}}"
                            f"&window={{{{window}}}}",
                     "json_path": "$.data.items[0].score"}}


async def rollout_to_its_end(weir: Any, stable: Any, canary: Any,
                             analysis: dict[str, Any]) -> dict[str, Any]:
    """A two-step rollout under load, to completion or abort: its record."""
    live = await weir(canary_config(stable, canary, [{"set_weight": 50},
                                                     {"pause": {"duration": "2s"}}], analysis))
    async with Load(live.port, workers=3, gap=0.01):
        await live.api.act("start")
        return await live.api.wait_rollout(lambda r: r["phase"] in ("aborted", "completed"),
                                           timeout=15, what="the rollout's end")


@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_web_check_fails_a_canary_unless_it_is_a_dry_run(backends, weir, scores,
                                                                  dry_run):
    stable, canary = await backends("stable"), await backends("canary")
    analysis = {"interval": "500ms", "min_requests": 5, "failure_limit": 0,
                "checks": {"max_error_rate": 0.01,
                           "custom": [web_check(scores["port"], dry_run=dry_run)]}}
    done = await rollout_to_its_end(weir, stable, canary, analysis)
    judged = [a for a in done["analyses"] if "custom" in a]
    assert judged, done["analyses"]
    measured = judged[-1]["custom"]["apdex"]
    assert measured["canary"] == 0.5 and measured["outcome"] == "failure"
    assert "stable" not in measured  # an absolute check asks for the canary only
    assert ("canary", "2s") in scores["asked"]  # the window, in whole seconds (at least 2)
    if dry_run:
        assert done["phase"] == "completed", done["reason"]
        assert judged[-1]["dry_run_failed"] == ["apdex"]
        assert judged[-1]["outcome"] == "success"
    else:
        assert done["phase"] == "aborted"
        assert judged[-1]["failed_checks"] == ["apdex"]
        assert any("apdex 0.5 < min 0.9 (apdex)" in e["message"] for e in done["events"])
        assert "apdex" in done["reason"]


async def test_a_builtin_check_in_dry_run_is_recorded_but_never_fails(backends, weir):
    stable, canary = await backends("stable"), await backends("canary", fail_every=5)
    analysis = {"interval": "500ms", "min_requests": 5, "failure_limit": 0,
                "checks": {"max_error_rate": 0.01, "dry_run": ["max_error_rate"]}}
    done = await rollout_to_its_end(weir, stable, canary, analysis)
    assert done["phase"] == "completed", done["reason"]
    dry = [a for a in done["analyses"] if a.get("dry_run_failed")]
    assert dry and dry[-1]["dry_run_failed"] == ["max_error_rate"], done["analyses"]
    assert dry[-1]["failed_checks"] == [] and dry[-1]["outcome"] == "success"
    event = next(e for e in done["events"] if e["event"] == "analysis"
                 and "dry run" in e["message"])
    assert "(dry run, max_error_rate)" in event["message"]


async def test_a_check_whose_source_is_down_is_inconclusive(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    analysis = {"interval": "500ms", "min_requests": 1, "inconclusive_limit": 1,
                "checks": {"custom": [web_check(free_port())]}}
    live = await weir(canary_config(stable, canary, [{"set_weight": 50},
                                                     {"pause": {"duration": "1m"}}], analysis))
    async with Load(live.port, workers=2, gap=0.01):
        await live.api.act("start")
        paused = await live.api.wait_rollout(
            lambda r: r["phase"] == "paused" and r["paused_by"] == "inconclusive", timeout=10,
            what="the inconclusive pause")
    assert paused["failures"] == 0
    last = paused["analyses"][-1]
    assert last["outcome"] == "inconclusive"
    assert "apdex: no answer from" in last["why"], last["why"]


def test_custom_check_config_errors():
    from proxy.config.model import Analysis

    def refused(checks: dict[str, Any], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            Analysis.model_validate({"checks": checks})

    refused({"dry_run": ["max_p42"]}, "dry_run names no check: max_p42")
    refused({"custom": [{"name": "x", "http": {"url": "http://h/", "json_path": "a"}}]},
            "needs a limit")
    refused({"custom": [{"name": "x", "max": 1, "prometheus": {"query": "up"}}]},
            "give it a prometheus.url, or the analysis a source.url")
    refused({"custom": [{"name": "max_p99", "max": 1,
                         "http": {"url": "http://h/", "json_path": "a"}}]},
            "differ from the built-in")
    refused({"custom": [{"name": "x", "max": 1, "http": {"url": "http://h/", "json_path": "a"},
                         "prometheus": {"query": "up", "url": "http://p/"}}]},
            "exactly one of prometheus or http")
