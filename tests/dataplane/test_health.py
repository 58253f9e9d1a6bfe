"""Upstream health: active checks, outlier ejection, circuit breakers, and what they show.

A real Weir (control plane, data plane, admin API) in this event loop in front of real aiohttp
backends whose /healthz answer the test flips, plus hand-written upstreams that hang or refuse.
What each backend received is counted by the backend itself; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from proxy.config.loader import parse_config
from proxy.config.model import ConfigError, json_schema
from proxy.dataplane.health import UpstreamHealth

from ..conftest import TOKEN, StartWeir, Weir, free_port, sample, serve_on_loopback, wait_for

# --- backends whose health the test controls --------------------------------------------------


@dataclass
class App:
    name: str
    port: int = 0
    health_status: int = 200
    health_gate: asyncio.Event | None = None  # /healthz waits for it when set
    status: int = 200                # of everything else
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # /hold waits for it
    served: int = 0                  # requests other than health checks
    checks: int = 0
    failed_checks: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def app_for(backend: App) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        backend.checks += 1
        if backend.health_gate is not None:
            await backend.health_gate.wait()
        if backend.health_status >= 400:
            backend.failed_checks += 1
        return web.Response(status=backend.health_status, text="health")

    async def hold(request: web.Request) -> web.Response:
        backend.served += 1
        await backend.hold.wait()
        return web.Response(text=backend.name, headers={"x-backend": backend.name})

    async def anything(request: web.Request) -> web.Response:
        backend.served += 1
        return web.Response(status=backend.status, text=backend.name,
                            headers={"x-backend": backend.name})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/hold", hold),
                    web.route("*", "/{tail:.*}", anything)])
    return app


@pytest.fixture
async def start_app() -> AsyncIterator[Callable[[str], Awaitable[App]]]:
    runners: list[web.AppRunner] = []
    apps: list[App] = []

    async def start(name: str) -> App:
        backend = App(name)
        runner, backend.port = await serve_on_loopback(app_for(backend), shutdown_timeout=1)
        runners.append(runner)
        apps.append(backend)
        return backend

    yield start
    for backend in apps:  # nothing may stay parked on an event at cleanup
        backend.hold.set()
        if backend.health_gate is not None:
            backend.health_gate.set()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def hung_upstream() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Accepts TCP connections and reads, but never answers."""
    servers: list[asyncio.Server] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    async def start() -> str:
        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


# Refused connects exercise outlier detection only once the default ejection of upstreams
# whose connects fail (test_rolling_restart.py) is off; retries: {attempts: 1} turns off the
# default fail-over where a test must see the 502s.
OUTLIERS_ONLY = {"eject_on_connect_failure": False}


def refused() -> str:
    """An address nothing listens on: connections are refused at once."""
    return f"127.0.0.1:{free_port()}"


def service(*upstreams: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "app", "versions": {"stable": {"upstreams": list(upstreams)}}, **extra}]


async def reload_with(weir: Weir, services: list[dict[str, Any]]) -> None:
    weir.rewrite({"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
                  "watch": False, "services": services})
    status, result = await weir.reload()
    assert status == 200 and result["outcome"] == "success", result


def health(weir: Weir, address: str) -> UpstreamHealth:
    return weir.control.proxy.health.state(address)


async def send(weir: Weir, count: int, path: str = "/") -> list[str]:
    """`count` requests one after another; which backend answered each (or the status)."""
    answers = []
    for _ in range(count):
        reply = await weir.request(path)
        answers.append(reply.headers.get("x-backend") or str(reply.status))
    return answers


async def send_until(weir: Weir, done: Callable[[], bool], limit: int = 50) -> list[int]:
    """Requests one after another until `done()` holds; the statuses seen."""
    statuses = []
    for _ in range(limit):
        if done():
            return statuses
        statuses.append((await weir.request("/")).status)
    assert done(), f"condition not reached after {limit} requests: {statuses}"
    return statuses


FAST_CHECK = {"interval": "50ms", "timeout": "500ms", "unhealthy_threshold": 2,
              "healthy_threshold": 2}


# --- active health checks ---------------------------------------------------------------------


async def test_failing_health_check_takes_upstream_out_and_passes_bring_it_back(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    a, b = await start_app("a"), await start_app("b")
    w = await weir(service(a.address, b.address,
                                 health_check={**FAST_CHECK, "interval": "100ms"}))
    # Upstreams present at start begin healthy.
    assert set(await send(w, 10)) == {"a", "b"}

    a.health_status = 503
    await wait_for(lambda: health(w, a.address).checks["failure"] >= 1, timeout=5)
    # One failure is below unhealthy_threshold (2); the next check is 100 ms away.
    assert health(w, a.address).healthy
    await wait_for(lambda: not health(w, a.address).healthy, timeout=5)
    assert a.failed_checks >= 2

    served_before = a.served
    assert set(await send(w, 20)) == {"b"}
    assert a.served == served_before  # none reached a, not even to be refused

    a.health_status = 200
    await wait_for(lambda: health(w, a.address).passes >= 1, timeout=5)
    assert not health(w, a.address).healthy  # one pass is below healthy_threshold (2)
    await wait_for(lambda: health(w, a.address).healthy, timeout=5)
    assert health(w, a.address).passes >= 2
    assert "a" in set(await send(w, 10))


async def test_redirect_passes_and_a_slow_answer_is_a_timeout(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    a, b = await start_app("a"), await start_app("b")
    w = await weir(service(a.address, b.address, health_check={
        **FAST_CHECK, "timeout": "100ms", "unhealthy_threshold": 1}))
    a.health_status = 302  # 3xx passes, and is not followed
    await wait_for(lambda: health(w, a.address).checks["success"] >= 2, timeout=5)
    assert health(w, a.address).healthy

    a.health_gate = asyncio.Event()  # answers only when released: later than the timeout
    await wait_for(lambda: not health(w, a.address).healthy, timeout=5)
    assert health(w, a.address).last_check == "timeout"
    assert set(await send(w, 5)) == {"b"}


async def test_health_and_ejections_survive_a_reload_when_the_address_stays(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    sick, broken, good = await start_app("sick"), await start_app("broken"), await start_app("ok")
    broken.status = 500
    # One failed check takes `sick` out, and it would take 1000 passes to bring it back: if a
    # reload reset its health, it would be in again at once.
    services = service(sick.address, broken.address, good.address,
                       health_check={**FAST_CHECK, "unhealthy_threshold": 1,
                                     "healthy_threshold": 1000},
                       outlier_detection={"consecutive_failures": 1,
                                          "base_ejection_time": "30s"})
    w = await weir(services)
    sick.health_status = 500
    await wait_for(lambda: not health(w, sick.address).healthy, timeout=5)
    sick.health_status = 200
    await wait_for(lambda: health(w, sick.address).passes >= 1, timeout=5)
    await send_until(w, lambda: bool(health(w, broken.address).ejected_until))
    until = health(w, broken.address).ejected_until

    services[0]["versions"]["stable"]["revision"] = "r2"  # any change: a new generation
    await reload_with(w, services)
    assert w.control.generation == 2
    assert not health(w, sick.address).healthy
    assert health(w, broken.address).ejected_until == until
    assert set(await send(w, 10)) == {"ok"}


async def test_upstream_added_by_reload_gets_no_traffic_before_its_first_passing_check(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    a, cold = await start_app("a"), await start_app("cold")
    # A long interval: the new upstream's first check must run at once, not after it; and a
    # healthy_threshold of 3 that the first pass does not have to meet.
    check = {"interval": "60s", "timeout": "5s", "healthy_threshold": 3}
    w = await weir(service(a.address, health_check=check))
    await wait_for(lambda: a.checks >= 1, timeout=5)

    cold.health_gate = asyncio.Event()  # its first check is held until we let it answer
    await reload_with(w, service(a.address, cold.address, health_check=check))
    assert not health(w, cold.address).healthy
    await wait_for(lambda: cold.checks >= 1, timeout=5)  # at once: the interval is 60 s

    assert set(await send(w, 20)) == {"a"}
    assert cold.served == 0
    assert health(w, a.address).healthy  # present before the reload: still in

    cold.health_gate.set()
    await wait_for(lambda: health(w, cold.address).healthy, timeout=5)
    assert health(w, cold.address).passes == 1
    assert "cold" in set(await send(w, 10))


# --- outlier detection ------------------------------------------------------------------------


async def test_hung_upstream_is_ejected_and_stops_costing_latency(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]],
        hung_upstream: Callable[[], Awaitable[str]]) -> None:
    good, hung = await start_app("good"), await hung_upstream()
    read_timeout = 0.8
    w = await weir(service(
        hung, good.address, timeouts={"connect": "1s", "read": f"{read_timeout}s"},
        outlier_detection={"consecutive_failures": 2, "base_ejection_time": "30s"}))

    statuses = await send_until(w, lambda: bool(health(w, hung).ejected_until), limit=10)
    assert statuses.count(504) == 2, statuses  # the two read timeouts that ejected it

    latencies = []
    for _ in range(20):
        reply = await w.request("/")
        assert reply.status == 200 and reply.headers["x-backend"] == "good"
        latencies.append(reply.seconds)
    assert max(latencies) < read_timeout / 4, latencies


async def test_max_ejection_percent_is_respected(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    good = await start_app("good")
    dead = [refused(), refused(), refused()]
    w = await weir(service(
        *dead, good.address,
        outlier_detection={"consecutive_failures": 1, "base_ejection_time": "30s",
                           "max_ejection_percent": 50},
        retries={"attempts": 1}), upstream=OUTLIERS_ONLY)
    pools = w.control.proxy.pools.pools

    def ejected() -> int:
        return sum(1 for a in dead if health(w, a).ejected_until)

    await send_until(w, lambda: ejected() == 2)
    kept = next(a for a in dead if not health(w, a).ejected_until)
    errors_before = pools[kept].connect_errors
    statuses = await send(w, 20)
    # Half of four may be out at once: the third dead upstream stays in and keeps failing.
    assert ejected() == 2
    assert pools[kept].connect_errors > errors_before
    assert "502" in statuses and "good" in statuses


async def test_ejection_time_grows_with_each_ejection_up_to_the_cap(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    good, dead = await start_app("good"), refused()
    w = await weir(service(
        dead, good.address,
        outlier_detection={"consecutive_failures": 1, "base_ejection_time": "200ms",
                           "max_ejection_time": "500ms"}), upstream=OUTLIERS_ONLY)
    state = health(w, dead)
    loop = asyncio.get_running_loop()
    for ejection, expected in enumerate((0.2, 0.4, 0.5), start=1):
        await send_until(w, lambda: bool(state.ejected_until))
        until = state.ejected_until
        assert state.times_ejected == ejection
        assert state.ejected_for == pytest.approx(expected)
        (body,) = [v for v in (await w.status())["services"][0]["versions"].values()]
        shown = body["upstream_health"][dead]
        assert shown["ejected"] and shown["ejection_seconds"] == pytest.approx(expected)
        assert shown["ejected_until"] == pytest.approx(time.time() + expected, abs=0.15)
        # It comes back by itself when its time is up, not before.
        await wait_for(lambda: not state.ejected_until, timeout=5)
        assert loop.time() >= until - 0.005  # the loop clock has millisecond resolution
    assert state.ejections == 3


# --- no upstream left, circuit breaker ----------------------------------------------------------


async def test_version_with_every_upstream_down_answers_503_at_once(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    sick, broken = await start_app("sick"), await start_app("broken")
    broken.status = 500  # passes its health checks, fails real requests
    w = await weir(service(
        sick.address, broken.address,
        health_check={**FAST_CHECK, "unhealthy_threshold": 1},
        outlier_detection={"consecutive_failures": 2, "base_ejection_time": "30s"}))
    sick.health_status = 503
    await wait_for(lambda: not health(w, sick.address).healthy, timeout=5)
    statuses = await send_until(w, lambda: bool(health(w, broken.address).ejected_until))
    assert statuses == [500, 500]  # consecutive 5xx answers eject too

    served = sick.served, broken.served
    reply = await w.request("/")
    assert reply.status == 503
    assert reply.seconds < 0.25
    text = reply.body.decode()
    assert "service 'app' version 'stable' has no healthy upstream" in text, text
    assert "1 failing health checks" in text and "1 ejected" in text, text
    assert "Retry-After" not in reply.headers
    assert reply.headers["x-weir-version"] == "stable"
    assert (sick.served, broken.served) == served  # nothing was tried


async def test_single_refused_upstream_is_ejected_and_not_connected_to(
        weir: StartWeir) -> None:
    dead = refused()
    # A version of one upstream: at least one may always be ejected, whatever the percent.
    w = await weir(service(dead, outlier_detection={"consecutive_failures": 3,
                                                          "max_ejection_percent": 10}))
    statuses = await send_until(w, lambda: bool(health(w, dead).ejected_until))
    assert statuses == [502, 502, 502]
    pool = w.control.proxy.pools.pools[dead]
    connects = pool.connect_errors
    for _ in range(5):
        reply = await w.request("/")
        assert reply.status == 503 and reply.seconds < 0.25
    assert pool.connect_errors == connects


async def test_circuit_breaker_answers_503_with_retry_after_when_all_are_full(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    a, b = await start_app("a"), await start_app("b")
    w = await weir(service(a.address, b.address, circuit_breaker={"max_requests": 1}))
    pools = w.control.proxy.pools.pools
    held = [asyncio.create_task(w.request("/hold")) for _ in range(2)]
    # Least in flight: one held request on each upstream fills both.
    await wait_for(lambda: a.served == 1 and b.served == 1, timeout=5)
    assert pools[a.address].inflight == pools[b.address].inflight == 1

    reply = await w.request("/")
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "1"
    assert reply.seconds < 0.25
    assert "service 'app' version 'stable'" in reply.body.decode()
    assert "circuit breaker" in reply.body.decode()

    a.hold.set()
    b.hold.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert (await w.request("/")).status == 200
    text = await w.scrape_text()
    assert sample(text, "weir_circuit_breaker_rejections_total", service="app",
                  version="stable") == 1


# --- visibility -------------------------------------------------------------------------------


async def test_health_shows_in_metrics_and_status(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    sick, good, broken = await start_app("sick"), await start_app("good"), await start_app("x")
    broken.status = 502
    dead = refused()
    w = await weir([{
        "name": "app",
        "versions": {"stable": {"upstreams": [sick.address, good.address, broken.address]},
                     "canary": {"upstreams": [dead]}},
        "weights": {"stable": 100},
        "health_check": FAST_CHECK,
        "outlier_detection": {"consecutive_failures": 2, "base_ejection_time": "30s"},
        "circuit_breaker": {"max_requests": 100},
    }])
    sick.health_status = 503
    await wait_for(lambda: not health(w, sick.address).healthy
                   and not health(w, dead).healthy, timeout=5)
    await send_until(w, lambda: bool(health(w, broken.address).ejected_until))

    text = await w.scrape_text()
    stable = {"service": "app", "version": "stable"}
    assert sample(text, "weir_upstream_healthy", upstream=sick.address, **stable) == 0
    assert sample(text, "weir_upstream_healthy", upstream=good.address, **stable) == 1
    assert sample(text, "weir_upstream_ejected", upstream=broken.address, **stable) == 1
    assert sample(text, "weir_upstream_ejected", upstream=good.address, **stable) == 0
    # Counters are per address, like the other upstream counters.
    assert sample(text, "weir_upstream_ejections_total", upstream=broken.address) == 1
    assert sample(text, "weir_upstream_ejections_total", upstream=good.address) == 0
    assert (sample(text, "weir_health_checks_total", upstream=sick.address,
                   outcome="failure") or 0) >= 2
    assert (sample(text, "weir_health_checks_total", upstream=good.address,
                   outcome="success") or 0) >= 1
    # A refused probe is an error (no answer), not a failure (a bad answer).
    assert sample(text, "weir_upstream_healthy", service="app", version="canary",
                  upstream=dead) == 0
    assert (sample(text, "weir_health_checks_total", upstream=dead, outcome="error")
            or 0) >= 2
    assert sample(text, "weir_circuit_breaker_rejections_total", **stable) == 0

    versions = (await w.status())["services"][0]["versions"]
    shown = versions["stable"]["upstream_health"]
    assert shown[sick.address]["healthy"] is False
    assert shown[sick.address]["available"] is False
    assert shown[sick.address]["last_check"] == "failure"
    assert shown[good.address]["healthy"] is True
    assert shown[good.address]["available"] is True
    assert shown[good.address]["ejected"] is False
    assert shown[good.address]["ejected_until"] is None
    assert shown[good.address]["consecutive_failures"] == 0
    assert shown[good.address]["max_requests"] == 100
    assert shown[broken.address]["ejected"] is True
    assert shown[broken.address]["ejected_until"] > time.time() + 20
    assert shown[broken.address]["times_ejected"] == 1
    assert shown[broken.address]["available"] is False
    assert versions["canary"]["upstream_health"][dead]["last_check"] == "error"


async def test_consecutive_failures_are_reset_by_a_success(
        weir: StartWeir, start_app: Callable[[str], Awaitable[App]]) -> None:
    flaky = await start_app("flaky")
    w = await weir(service(flaky.address,
                                 outlier_detection={"consecutive_failures": 3}))
    for _ in range(4):  # 5xx, 5xx, success: never three in a row
        flaky.status = 500
        assert [r.status for r in [await w.request("/"), await w.request("/")]] == [500, 500]
        assert (await w.status())["services"][0]["versions"]["stable"][
            "upstream_health"][flaky.address]["consecutive_failures"] == 2
        flaky.status = 200
        assert (await w.request("/")).status == 200
        assert health(w, flaky.address).ejections == 0
        assert w.control.proxy.pools.pools[flaky.address].failures == 0


# --- config -----------------------------------------------------------------------------------


def errors_of(services: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"services": services})
    return info.value.errors


def test_health_config_defaults_and_version_override() -> None:
    config = parse_config({"services": [{
        "name": "app",
        "versions": {"stable": {"upstreams": ["127.0.0.1:9001"]},
                     "canary": {"upstreams": ["127.0.0.1:9002"],
                                "health_check": {"path": "/ready", "interval": "1s"}}},
        "health_check": {"timeout": "2s"},
        "outlier_detection": {},
        "circuit_breaker": {},
    }]})
    svc = config.services[0]
    stable, canary = svc.health_check_for("stable"), svc.health_check_for("canary")
    assert stable is not None and canary is not None
    assert (stable.path, stable.interval, stable.timeout) == ("/healthz", 5.0, 2.0)
    assert (stable.healthy_threshold, stable.unhealthy_threshold) == (2, 3)
    # The version's own fields win; the rest come from the service's block.
    assert (canary.path, canary.interval, canary.timeout) == ("/ready", 1.0, 2.0)
    outlier = svc.outlier_detection
    assert outlier is not None
    assert (outlier.consecutive_failures, outlier.base_ejection_time,
            outlier.max_ejection_time, outlier.max_ejection_percent) == (5, 30.0, 300.0, 50)
    assert svc.circuit_breaker is not None and svc.circuit_breaker.max_requests == 1024
    bare = parse_config({"services": service("127.0.0.1:9001")}).services[0]
    assert bare.health_check_for("stable") is None and bare.outlier_detection is None


def test_bad_health_values_name_their_fields() -> None:
    errors = errors_of([{
        "name": "app",
        "versions": {"stable": {"upstreams": ["127.0.0.1:9001"],
                                "health_check": {"path": "healthz"}}},
        "health_check": {"interval": "0s", "unhealthy_threshold": 0},
        "outlier_detection": {"base_ejection_time": "1m", "max_ejection_time": "10s",
                              "max_ejection_percent": 150},
        "circuit_breaker": {"max_requests": 0},
    }])
    text = "\n".join(errors)
    for path in ("services[0].versions.stable.health_check.path: path must start with '/'",
                 "services[0].health_check.interval: must be above 0",
                 "services[0].health_check.unhealthy_threshold:",
                 "services[0].outlier_detection.max_ejection_percent:",
                 "services[0].circuit_breaker.max_requests:"):
        assert path in text, text
    assert len(errors) == 5, errors  # the cross-field check waits for valid fields
    (ordering,) = errors_of([{"name": "app", "versions": {"s": {"upstreams": ["h:1"]}},
                              "outlier_detection": {"base_ejection_time": "1m",
                                                    "max_ejection_time": "10s"}}])
    assert ordering.startswith("services[0].outlier_detection: max_ejection_time (10s) "
                               "must not be below base_ejection_time (60s)"), ordering


def test_schema_describes_health_keys() -> None:
    schema = json_schema()
    service_props = schema["$defs"]["Service"]["properties"]
    assert {"health_check", "outlier_detection", "circuit_breaker"} <= set(service_props)
    assert "health_check" in schema["$defs"]["VersionConfig"]["properties"]
    assert schema["$defs"]["HealthCheck"]["properties"]["path"]["default"] == "/healthz"
