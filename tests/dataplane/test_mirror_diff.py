"""Diffs without noise (issue 21): a shadow's JSON answers compared with the users' field by
field, and the fields that differ between two answers of the primary itself (the mirror's
`baseline`) recognised as noise without being configured. Real aiohttp apps play the primary
and the candidate; the Weir is conftest's, in this loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..conftest import StartWeir, run_all, serve_on_loopback, wait_for

REQUESTS = 500


async def json_app(changes_every: int = 0, instance: str = "") -> tuple[web.AppRunner, int]:
    """Answers GET /item/N with {"id": N, "value": ..., "ts": <now, ns>, "tags": [...]}:
    "value" is "a", or "b" for every `changes_every`th N; "ts" differs in every answer; with
    `instance`, also {"instance": instance}."""

    async def item(request: web.Request) -> web.Response:
        number = int(request.match_info["n"])
        changed = changes_every and number % changes_every == 0
        answer: dict[str, Any] = {"id": number, "value": "b" if changed else "a",
                                  "ts": time.time_ns(), "tags": ["x", "y"]}
        if instance:
            answer["instance"] = instance
        return web.json_response(answer)

    app = web.Application()
    app.add_routes([web.get("/item/{n}", item)])
    return await serve_on_loopback(app, shutdown_timeout=0.5)


def diffed(primary: int, candidate: int, **mirror: Any) -> list[dict[str, Any]]:
    return [{"name": "app",
             "versions": {"stable": {"upstreams": [f"127.0.0.1:{primary}"]},
                          "shadow": {"upstreams": [f"127.0.0.1:{candidate}"]}},
             "weights": {"stable": 100, "shadow": 0},
             "mirror": [{"version": "shadow", "percent": 100, **mirror}]}]


async def run_requests(weir: Any) -> None:
    replies = await run_all([(lambda i=i: weir.request(f"/item/{i}")) for i in range(REQUESTS)],
                            concurrency=8)
    assert all(r.status == 200 for r in replies)


def settled(weir: Any, compared: Callable[[], int]) -> Callable[[], bool]:
    return lambda: compared() >= REQUESTS


async def shadow_diff(weir: Any) -> dict[str, Any]:
    service = await weir.api.service()
    return next(m for m in service["mirror"] if m["version"] == "shadow")["diff"]


async def test_a_changed_field_is_reported_and_a_timestamp_is_noise(weir: StartWeir) -> None:
    primary, primary_port = await json_app()
    candidate, candidate_port = await json_app(changes_every=10)  # "value" differs in 10%
    try:
        w = await weir(diffed(primary_port, candidate_port, baseline="stable",
                              baseline_percent=50))
        await run_requests(w)
        diff_stats = w.control.proxy.stats.for_mirror("app", "shadow").diff
        await wait_for(lambda: diff_stats.compared >= REQUESTS
                       and diff_stats.baseline_compared >= 100, timeout=10)
        report = await shadow_diff(w)
    finally:
        await primary.cleanup()
        await candidate.cleanup()
    print(f"\ndiff: mismatch {report['mismatch_rate']}, fields {report['fields']}, "
          f"noise {[(f['field'], f['rate'], f['noise_rate']) for f in report['noise']]}")
    assert report["compared"] == REQUESTS
    fields = {f["field"]: f for f in report["fields"]}
    assert set(fields) == {"body.value"}, report["fields"]
    assert abs(fields["body.value"]["rate"] - 0.10) <= 0.02
    assert fields["body.value"]["example"]["primary"] == '"a"'
    assert fields["body.value"]["example"]["shadow"] == '"b"'
    assert fields["body.value"]["example"]["request"].startswith("GET /item/")
    noise = {f["field"]: f for f in report["noise"]}
    assert "body.ts" in noise and noise["body.ts"]["rate"] > 0.9, report["noise"]
    assert noise["body.ts"]["noise_rate"] > 0.9
    assert abs(report["mismatch_rate"] - 0.10) <= 0.02
    scrape = await w.scrape()
    assert abs(scrape.value("weir_mirror_mismatch_ratio", service="app",
                            version="shadow") - report["mismatch_rate"]) < 1e-9
    assert scrape.value("weir_mirror_field_difference_ratio", service="app", version="shadow",
                        field="body.value") == fields["body.value"]["rate"]
    assert not scrape.matching("weir_mirror_field_difference_ratio", field="body.ts")


async def test_without_a_baseline_nothing_is_noise_and_ignored_paths_are_never_compared(
        weir: StartWeir) -> None:
    primary, primary_port = await json_app()
    candidate, candidate_port = await json_app(changes_every=10)
    try:
        w = await weir(diffed(primary_port, candidate_port, compare=True,
                              ignore={"json_paths": ["$.value"], "headers": ["Date"]}))
        await run_requests(w)
        diff_stats = w.control.proxy.stats.for_mirror("app", "shadow").diff
        await wait_for(lambda: diff_stats.compared >= REQUESTS, timeout=10)
        report = await shadow_diff(w)
    finally:
        await primary.cleanup()
        await candidate.cleanup()
    fields = {f["field"] for f in report["fields"]}
    assert "body.value" not in fields and "header.date" not in fields
    assert "body.ts" in fields  # no baseline: a timestamp counts against the candidate
    assert report["noise"] == [] and report["baseline_compared"] == 0
    assert report["mismatch_rate"] > 0.9


async def test_baseline_copies_go_to_another_upstream_of_the_primary(weir: StartWeir) -> None:
    """What differs between two instances of the primary (a hostname in the answer) is noise
    too: a baseline copy goes to another upstream than the one that answered the user."""
    one, one_port = await json_app(instance="one")
    two, two_port = await json_app(instance="two")
    candidate, candidate_port = await json_app(instance="three")
    try:
        config = diffed(one_port, candidate_port, baseline="stable", baseline_percent=100)
        config[0]["versions"]["stable"]["upstreams"].append(f"127.0.0.1:{two_port}")
        w = await weir(config)
        await run_requests(w)
        diff_stats = w.control.proxy.stats.for_mirror("app", "shadow").diff
        await wait_for(lambda: diff_stats.compared >= REQUESTS
                       and diff_stats.baseline_compared >= REQUESTS, timeout=10)
        report = await shadow_diff(w)
    finally:
        for runner in (one, two, candidate):
            await runner.cleanup()
    assert diff_stats.noise_rate("body.instance") == 1.0  # never the same instance twice
    assert "body.instance" in {f["field"] for f in report["noise"]}
    assert report["fields"] == [] and report["mismatch_rate"] == 0.0, report
