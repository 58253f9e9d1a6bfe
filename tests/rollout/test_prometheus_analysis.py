"""Rollout analysis read from Prometheus instead of this process's own windows: a real
prometheus server (started here, scraping Weir's admin /metrics every second) and the PromQL
over Weir's metric names decides. A Prometheus that cannot be reached is inconclusive."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import free_port, port_open, wait_for
from ..rollout_harness import Load, canary_config

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="subprocesses"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus"),
]


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Any]:
    """prometheus scraping the given admin ports every second; returns its URL."""
    started: list[subprocess.Popen[bytes]] = []

    async def start(*admin_ports: int) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "weir", "static_configs": [
                {"targets": [f"127.0.0.1:{p}" for p in admin_ports]}]}]}))
        process = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        await wait_for(lambda: port_open(port) or process.poll() is not None, timeout=15,
                       interval=0.05)
        assert process.poll() is None, "prometheus did not start"
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.kill()
        process.wait()


def with_admin_port(data: dict[str, Any]) -> int:
    port = free_port()
    data["admin"]["listen"] = f"127.0.0.1:{port}"
    return port


def source(url: str) -> dict[str, Any]:
    return {"type": "prometheus", "url": url, "timeout": "2s", "labels": {"job": "weir"}}


async def test_a_canary_with_errors_is_rolled_back_from_prometheus(backends, weir, prometheus):
    stable, canary = await backends("stable"), await backends("canary", fail_every=4)
    analysis = {"interval": "3s", "min_requests": 10, "failure_limit": 0,
                "inconclusive_limit": 10, "checks": {"max_error_rate": 0.05}}
    data = canary_config(stable, canary, [{"set_weight": 50}, {"pause": {}}], analysis)
    url = await prometheus(with_admin_port(data))
    analysis["source"] = source(url)
    live = await weir(data)
    async with Load(live.port, workers=3, gap=0.01):
        await live.api.act("start")
        aborted = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=25,
                                              what="the rollback")
    failure = next(a for a in aborted["analyses"] if a["outcome"] == "failure")
    print(f"\nPrometheus analysis: {failure['values']}")
    assert failure["source"]["type"] == "prometheus"
    assert failure["source"]["url"] == url
    assert 'status=~"5.."' in failure["source"]["queries"]["canary"]["errors"]
    assert failure["failed_checks"] == ["max_error_rate"]
    assert failure["values"]["canary_error_rate"] > 0.05
    assert failure["values"]["canary_requests"] >= 10
    # "aborted" is the decision; the weights follow as soon as they are persisted.
    await live.api.wait_weights({"stable": 100, "canary": 0})


async def test_a_healthy_canary_is_promoted_from_prometheus(backends, weir, prometheus):
    stable, canary = await backends("stable"), await backends("canary")
    step_analysis = {"interval": "3s", "min_requests": 10, "inconclusive_limit": 10,
                     "checks": {"max_error_rate": 0.05, "max_p99": "1s"}}
    data = canary_config(stable, canary, [{"set_weight": 50}, {"analysis": step_analysis}])
    url = await prometheus(with_admin_port(data))
    step_analysis["source"] = source(url)
    live = await weir(data)
    async with Load(live.port, workers=3, gap=0.01):
        await live.api.act("start")
        done = await live.api.wait_rollout(lambda r: r["phase"] == "completed", timeout=25,
                                           what="the promotion")
    success = next(a for a in done["analyses"] if a["outcome"] == "success")
    assert success["source"]["type"] == "prometheus"
    assert success["values"]["canary_requests"] >= 10
    assert success["values"]["canary_error_rate"] == 0
    assert "histogram_quantile(0.99" in success["source"]["queries"]["canary"]["p99"]
    assert await live.api.weights() == {"stable": 0, "canary": 100}


async def test_an_unreachable_prometheus_is_inconclusive_not_a_failure(backends, weir):
    stable, canary = await backends("stable"), await backends("canary", fail_all=True)
    analysis = {"interval": "500ms", "min_requests": 1, "inconclusive_limit": 1,
                "checks": {"max_error_rate": 0.01},
                "source": source(f"http://127.0.0.1:{free_port()}")}
    live = await weir(canary_config(stable, canary, [{"set_weight": 50}, {"pause": {}}],
                                    analysis))
    async with Load(live.port, workers=2, gap=0.01):
        await live.api.act("start")
        paused = await live.api.wait_rollout(
            lambda r: r["phase"] == "paused" and r["paused_by"] == "inconclusive", timeout=10,
            what="the inconclusive pause")
    results = paused["analyses"]
    assert results and all(a["outcome"] == "inconclusive" for a in results), results
    assert "gave no answer" in results[-1]["why"]
    assert paused["failures"] == 0
    assert await live.api.weights() == {"stable": 50, "canary": 50}
