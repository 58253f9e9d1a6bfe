"""The Prometheus exposition at the admin listener's /metrics, checked against the truth.

A real Weir (control plane, data plane and admin API in this event loop, started from a config
file) sits in front of real aiohttp backends. Traffic goes through the data port; /metrics is
scraped over HTTP and parsed with prometheus_client's parser, and every count is compared with
what the backends themselves recorded.
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from proxy.dataplane.stats import FINE_BUCKETS, VersionStats

from ..conftest import Backend, Scrape, StartWeir, Weir, exchange, free_port, run_all, wait_for


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over cumulative (upper bound, count) buckets: find the
    bucket holding the q-th rank and interpolate linearly inside it. A rank in the +Inf
    bucket gives the highest finite bound; the first bucket starts at 0."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    index = next(i for i, (_, count) in enumerate(buckets) if count >= rank)
    if index == len(buckets) - 1:
        return buckets[-2][0]
    upper, count = buckets[index]
    lower, below = (0.0, 0.0) if index == 0 else buckets[index - 1]
    if upper <= 0 and index == 0:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below)


def test_histogram_quantile_matches_promql() -> None:
    inf = math.inf
    buckets = [(0.1, 0.0), (0.25, 50.0), (0.5, 100.0), (inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.25)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.25 + 0.25 * 49 / 50)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1 + 0.15 * 25 / 50)
    assert histogram_quantile(0.5, [(1.0, 10.0), (inf, 10.0)]) == pytest.approx(0.5)
    assert histogram_quantile(0.99, [(1.0, 0.0), (inf, 10.0)]) == 1.0  # all in +Inf
    assert math.isnan(histogram_quantile(0.99, [(1.0, 0.0), (inf, 0.0)]))


def test_each_duration_lands_in_the_bucket_bisect_left_picks() -> None:
    # observe() searches the buckets itself (cheaper than calling bisect when compiled): a
    # duration equal to a bound belongs to that bound's bucket, as Prometheus' "le" says.
    durations = [0.0, 1e-9, FINE_BUCKETS[-1] + 1.0, 1e9]
    durations += FINE_BUCKETS
    durations += [math.nextafter(b, math.inf) for b in FINE_BUCKETS]
    durations += [math.nextafter(b, 0.0) for b in FINE_BUCKETS]
    rng = random.Random(7)
    durations += [rng.uniform(0.0, 70.0) for _ in range(500)]
    durations += [10 ** rng.uniform(-5, 2) for _ in range(500)]
    for seconds in durations:
        stats = VersionStats("svc", "v1")
        stats.observe(b"GET", 200, seconds)
        assert stats.buckets.index(1) == bisect_left(FINE_BUCKETS, seconds), seconds


def test_requests_are_counted_by_method_and_status_whatever_the_code() -> None:
    # Codes under 600 are counted in a list per method, any other in a dict: both show.
    stats = VersionStats("svc", "v1")
    for method, status in ((b"GET", 200), (b"GET", 200), (b"POST", 503), (b"GET", 499),
                           (b"GET", 0), (b"PUT", 700), (b"PUT", 700)):
        stats.observe(method, status, 0.001)
    stats.add_requests(b"GET", 200, 5)
    stats.add_requests(b"DELETE", 999, 2)
    assert stats.requests == {(b"GET", 200): 7, (b"POST", 503): 1, (b"GET", 499): 1,
                              (b"GET", 0): 1, (b"PUT", 700): 2, (b"DELETE", 999): 2}
    assert stats.total == 7


# --- what the backends saw ----------------------------------------------------------------


def status_asked(path: str) -> int:
    """The status the echo backend answered (it honours ?status=N)."""
    return int(parse_qs(urlsplit(path).query).get("status", ["200"])[0])


def backend_counts(backend: Backend) -> Counter[tuple[str, int]]:
    return Counter((r["method"], status_asked(r["path"])) for r in backend.requests)


def error_rate(counts: Counter[tuple[str, int]]) -> float:
    total = sum(counts.values())
    return sum(n for (_, status), n in counts.items() if status >= 500) / total


# --- configs ------------------------------------------------------------------------------


def split_services(stable: Backend, canary: Backend, slow: Backend,
                   weights: dict[str, int] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "name": "app",
            "match": {"hosts": ["app.test"]},
            "versions": {"stable": {"upstreams": [stable.address]},
                         "canary": {"upstreams": [canary.address]}},
            "weights": weights or {"stable": 80, "canary": 20},
            # Failing requests are steered to the canary, so its error share is known.
            "rules": [{"match": {"headers": {"x-cohort": "beta"}}, "version": "canary"}],
        },
        {
            "name": "slowsvc",
            "match": {"hosts": ["slow.test"]},
            "versions": {"v1": {"upstreams": [slow.address]}},
        },
    ]


async def send_mix(weir: Weir, count: int = 300, failures: int = 30) -> None:
    """`count` requests split by weight (every fourth a POST with a body), then `failures`
    GET ?status=500 sent to the canary by rule."""

    def call(i: int) -> Callable[[], Any]:
        if i % 4 == 0:
            return lambda: weir.request(f"/orders/{i}", method="POST", data=b"x" * (i + 1))
        return lambda: weir.request(f"/items/{i}")

    replies = await run_all(call(i) for i in range(count))
    assert all(r.status == 200 for r in replies), {r.status for r in replies}
    replies = await run_all(
        (lambda i=i: weir.request(f"/fail/{i}?status=500", headers={"x-cohort": "beta"}))
        for i in range(failures))
    assert all(r.status == 500 and r.headers["x-weir-version"] == "canary" for r in replies)


# --- (1) counts match what the backends recorded; error rate and p99 from the buckets -------


async def test_request_counts_match_backends_and_quantiles_are_plausible(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, canary, slow = (await start_backend("stable"), await start_backend("canary"),
                            await start_backend("slow"))
    w = await weir(split_services(stable, canary, slow))

    await send_mix(w, count=300, failures=30)
    replies = await run_all([lambda: w.request("/slow?delay=0.2", host="slow.test")] * 40,
                            concurrency=40)
    assert all(r.status == 200 and r.body == b"slow done" for r in replies)

    scrape = await w.scrape()
    assert scrape.types["http_requests"] == "counter"
    assert scrape.types["http_request_duration_seconds"] == "histogram"

    for backend in (stable, canary):
        expected = backend_counts(backend)
        assert scrape.requests_by("app", backend.name) == expected, backend.name
        # The histogram counts the same requests.
        count = scrape.value("http_request_duration_seconds_count", service="app",
                             version=backend.name)
        assert count == len(backend.requests)
        assert scrape.buckets("http_request_duration_seconds", service="app",
                              version=backend.name)[-1] == (math.inf, count)
    assert len(stable.requests) + len(canary.requests) == 330
    assert scrape.total("http_requests_total", service="app", method="POST") == 75
    assert scrape.total("http_requests_total", service="app") == 330
    # Both versions got weighted traffic (P(either is empty) is far below 1e-20).
    assert len(stable.requests) > 150 and len(canary.requests) > 30

    # Error rates, as the dashboards compute them: 5xx over all, per version.
    rates = {}
    for version in ("stable", "canary"):
        counts = scrape.requests_by("app", version)
        rates[version] = error_rate(counts)
    assert rates["stable"] == 0.0
    assert rates["canary"] == 30 / len(canary.requests) == error_rate(backend_counts(canary))

    # Weights are exposed as configured.
    assert scrape.value("weir_traffic_weight", service="app", version="stable") == 80
    assert scrape.value("weir_traffic_weight", service="app", version="canary") == 20
    assert scrape.value("weir_upstream_inflight", service="app", version="stable") == 0

    # p99 of the slow version: its backend takes 0.2 s per request.
    slow_buckets = scrape.buckets("http_request_duration_seconds", service="slowsvc",
                                  version="v1")
    assert slow_buckets[-1] == (math.inf, 40)
    assert scrape.value("http_requests_total", service="slowsvc", version="v1", method="GET",
                        status="200") == 40
    p99 = histogram_quantile(0.99, slow_buckets)
    assert 0.2 <= p99 <= 0.5, (p99, slow_buckets)
    mean = (scrape.value("http_request_duration_seconds_sum", service="slowsvc", version="v1")
            / 40)
    assert 0.2 <= mean < 0.5
    # The fast versions answer well under the slow one.
    fast_p50 = histogram_quantile(0.5, scrape.buckets("http_request_duration_seconds",
                                                      service="app", version="stable"))
    assert fast_p50 < 0.2


# --- (2) promtool accepts the exposition ----------------------------------------------------


async def test_promtool_check_metrics_accepts_the_exposition(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    stable, canary, slow, shadow = (await start_backend("stable"), await start_backend("canary"),
                                    await start_backend("slow"), await start_backend("shadow"))
    services = split_services(stable, canary, slow)
    services[0]["versions"]["shadow"] = {"upstreams": [shadow.address]}
    services[0]["mirror"] = [{"version": "shadow", "percent": 100, "compare": True}]
    w = await weir(services)
    # Every family gets samples: requests, errors, unrouted, mirrors, comparisons.
    await send_mix(w, count=40, failures=4)
    assert (await w.request("/", host="nowhere.test")).status == 404
    await wait_for(lambda: len(shadow.requests) == 34, timeout=5)

    text = await w.scrape_text()
    for family in ("http_requests_total", "http_request_duration_seconds_bucket",
                   "weir_traffic_weight", "weir_upstream_inflight",
                   "weir_mirror_requests_total", "weir_mirror_comparisons_total",
                   "weir_unrouted_requests_total", "weir_upstream_connect_errors_total",
                   "weir_config_reloads_total", "weir_config_generation",
                   "weir_upstream_drained"):
        assert f"\n{family}" in text, family
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode() + "\n" + text


# --- (3) counters survive reloads and never go down -----------------------------------------


MONOTONIC_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def assert_not_decreased(before: Scrape, after: Scrape) -> None:
    now = after.keyed()
    for (name, labels), value in before.keyed().items():
        if not name.endswith(MONOTONIC_SUFFIXES):
            continue
        assert (name, labels) in now, f"{name}{dict(labels)} vanished"
        later = now[(name, labels)]
        assert later >= value, f"{name}{dict(labels)} went down: {value} → {later}"


async def test_counters_survive_reloads_and_never_go_down(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, canary, slow, v3 = (await start_backend("stable"), await start_backend("canary"),
                                await start_backend("slow"), await start_backend("v3"))
    w = await weir(split_services(stable, canary, slow))
    await send_mix(w, count=60, failures=6)
    assert (await w.request("/", host="nowhere.test")).status == 404
    first = await w.scrape()
    assert first.value("weir_config_generation") == 1
    assert first.value("weir_config_reloads_total", outcome="success") == 0

    # Reload 1: new weights and a new version.
    data = yaml.safe_load(w.path.read_text())
    data["services"][0]["versions"]["v3"] = {"upstreams": [v3.address]}
    data["services"][0]["weights"] = {"stable": 50, "canary": 25, "v3": 25}
    w.rewrite(data)
    code, body = await w.reload()
    assert code == 200 and body["generation"] == 2, body
    second = await w.scrape()
    assert_not_decreased(first, second)
    assert second.value("weir_config_generation") == 2
    assert second.value("weir_config_reloads_total", outcome="success") == 1
    assert second.value("weir_traffic_weight", service="app", version="v3") == 25
    assert second.requests_by("app", "stable") == first.requests_by("app", "stable")

    await send_mix(w, count=60, failures=6)
    third = await w.scrape()
    assert_not_decreased(second, third)
    assert third.total("http_requests_total", service="app") == 132
    assert third.requests_by("app", "v3") == backend_counts(v3)

    # A failed reload changes nothing but its own counter.
    w.path.write_text("services: [", encoding="utf-8")
    code, body = await w.reload()
    assert code == 422, body
    fourth = await w.scrape()
    assert_not_decreased(third, fourth)
    assert fourth.value("weir_config_reloads_total", outcome="failure") == 1
    assert fourth.value("weir_config_generation") == 2

    # Reload 3: the canary is removed from the file; what it served is still counted.
    del data["services"][0]["versions"]["canary"]
    data["services"][0]["weights"] = {"stable": 50, "v3": 50}
    data["services"][0]["rules"] = []
    w.rewrite(data)
    code, body = await w.reload()
    assert code == 200 and body["generation"] == 3, body
    await send_mix_no_failures(w, 40)
    fifth = await w.scrape()
    assert_not_decreased(fourth, fifth)
    assert fifth.requests_by("app", "canary") == backend_counts(canary)
    assert fifth.total("http_requests_total", service="app") == 172
    for backend in (stable, canary, v3):
        assert fifth.requests_by("app", backend.name) == backend_counts(backend)


async def send_mix_no_failures(weir: Weir, count: int) -> None:
    replies = await run_all(lambda i=i: weir.request(f"/after/{i}") for i in range(count))
    assert all(r.status == 200 for r in replies)


# --- (4) requests Weir answers itself, and upstream failures --------------------------------


async def test_unrouted_refused_and_timed_out_requests_are_counted(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, slow = await start_backend("stable"), await start_backend("slow")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    w = await weir([{
        "name": "app",
        "match": {"hosts": ["app.test"]},
        "versions": {"stable": {"upstreams": [stable.address]},
                     "dead": {"upstreams": [dead]},
                     "sluggish": {"upstreams": [slow.address]}},
        "weights": {"stable": 100},
        "rules": [{"match": {"headers": {"x-to": "dead"}}, "version": "dead"},
                  {"match": {"headers": {"x-to": "sluggish"}}, "version": "sluggish"}],
    }], upstream={"timeouts": {"read": "300ms", "connect": "1s"}})

    for _ in range(3):
        assert (await w.request("/", host="nowhere.test")).status == 404
    for _ in range(4):
        reply = await w.request("/x", headers={"x-to": "dead"})
        assert reply.status == 502 and reply.headers["x-weir-version"] == "dead"
    reply = await w.request("/slow?delay=1", headers={"x-to": "sluggish"})
    assert reply.status == 504 and reply.headers["x-weir-version"] == "sluggish"
    assert reply.seconds < 0.9
    assert (await w.request("/ok")).status == 200

    scrape = await w.scrape()
    assert scrape.value("weir_unrouted_requests_total", status="404") == 3
    assert scrape.total("weir_unrouted_requests_total") == 3
    assert scrape.total("http_requests_total", service="app") == 6  # unrouted are not in it
    assert scrape.value("weir_upstream_connect_errors_total", upstream=dead) == 4
    assert scrape.value("weir_upstream_connect_errors_total", upstream=stable.address) == 0
    assert scrape.requests_by("app", "dead") == Counter({("GET", 502): 4})
    assert scrape.value("weir_upstream_timeouts_total", upstream=slow.address) == 1
    assert scrape.value("weir_upstream_timeouts_total", upstream=dead) == 0
    assert scrape.requests_by("app", "sluggish") == Counter({("GET", 504): 1})
    assert scrape.requests_by("app", "stable") == Counter({("GET", 200): 1})


async def test_request_without_host_counts_as_unrouted(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable = await start_backend("stable")
    w = await weir([{"name": "app",
                           "versions": {"stable": {"upstreams": [stable.address]}}}])
    [reply] = await exchange(w.port, b"GET / HTTP/1.1\r\n\r\n")
    assert reply.status == 400
    scrape = await w.scrape()
    assert scrape.value("weir_unrouted_requests_total", status="400") == 1
    assert scrape.total("http_requests_total") == 0


async def test_unparseable_requests_count_as_unrouted(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable = await start_backend("stable")
    w = await weir([{"name": "app",
                           "versions": {"stable": {"upstreams": [stable.address]}}}],
                         limits={"max_header_bytes": 1024})
    [reply] = await exchange(w.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.status == 400
    [reply] = await exchange(w.port, b"GET / HTTP/1.1\r\nHost: a\r\nx-big: "
                             + b"y" * 4096 + b"\r\n\r\n")
    assert reply.status == 431
    scrape = await w.scrape()
    assert scrape.value("weir_unrouted_requests_total", status="400") == 1
    assert scrape.value("weir_unrouted_requests_total", status="431") == 1
