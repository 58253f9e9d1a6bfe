"""Zero downtime: Weir never loses a request while it is switched, re-weighted, reloaded,
drained or shut down.

Everything here runs against a real Weir process (``python -m proxy run``) in front of real
aiohttp backends on 127.0.0.1. The backends are conftest's (/slow, /stream, /ws echo, and an
echo handler for everything else) with a middleware that counts the handlers started and still
running per path, so that a test can wait until "the backend has the request".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from ..conftest import (
    AUTH,
    Backend,
    WeirProcess,
    backend_app,
    exchange,
    port_open,
    read_response,
    read_until_closed,
    wait_for,
)

SERVICE = "app"

# The load test: 20 workers, 100 switches, 50 weight shifts, 50 config rewrites.
WORKERS = 20
SWITCHES = 100
WEIGHT_SHIFTS = 50
REWRITES = 50
LOAD_CAP_SECONDS = 60.0
REQUESTS_BETWEEN_OPS = 120  # each operation happens under load: wait for this many responses
SPLITS = [(90, 10), (50, 50), (10, 90), (1, 99), (75, 25), (0, 100), (33, 67), (100, 0),
          (60, 40), (5, 95)]


# --- backends that say what they are working on ---------------------------------------------


@dataclass
class TrackedBackend:
    backend: Backend
    started: Counter[str] = field(default_factory=Counter)  # handlers started, per path
    running: Counter[str] = field(default_factory=Counter)  # handlers not yet returned

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def address(self) -> str:
        return self.backend.address


@pytest.fixture
async def tracked_backend() -> AsyncIterator[Callable[[str], Awaitable[TrackedBackend]]]:
    runners: list[web.AppRunner] = []

    async def start(name: str) -> TrackedBackend:
        tracked = TrackedBackend(Backend(name, 0))

        @web.middleware
        async def track(request: web.Request, handler: Any) -> web.StreamResponse:
            tracked.started[request.path] += 1
            tracked.running[request.path] += 1
            try:
                return await handler(request)
            finally:
                tracked.running[request.path] -= 1

        app = backend_app(tracked.backend)
        app.middlewares.append(track)
        # A short shutdown timeout: a test may leave a /slow handler sleeping behind it.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        tracked.backend.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return tracked

    yield start
    for runner in runners:
        await runner.cleanup()


# --- Weir as a real process (conftest's weir_process), as these drills run it ---------------


def drill(services: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    """The config of a drill: its file watcher on (the default), a 5 s shutdown timeout unless
    the test sets one."""
    return {"shutdown": {"timeout": "5s"}, "services": services, **top}


def blue_green(blue: TrackedBackend, green: TrackedBackend, drain: str = "10s",
               rule: bool = False) -> list[dict[str, Any]]:
    service: dict[str, Any] = {
        "name": SERVICE,
        "versions": {"blue": {"upstreams": [blue.address]},
                     "green": {"upstreams": [green.address]}},
        "weights": {"blue": 100, "green": 0},
        "drain": {"timeout": drain},
    }
    if rule:
        # Harmless: no request in these tests carries this header.
        service["rules"] = [{"match": {"headers": {"x-never-sent": "1"}}, "version": "green"}]
    return [service]


# --- small clients --------------------------------------------------------------------------


async def admin_call(session: aiohttp.ClientSession, weir: WeirProcess, method: str, path: str,
                     body: Any = None) -> tuple[int, Any]:
    async with session.request(method, weir.admin_url + path, json=body, headers=AUTH,
                               timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status, await response.json()


async def status(session: aiohttp.ClientSession, weir: WeirProcess) -> dict[str, Any]:
    code, body = await admin_call(session, weir, "GET", "/api/status")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


async def samples(session: aiohttp.ClientSession, weir: WeirProcess, name: str,
                  **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` in /metrics whose labels include ``labels``."""
    async with session.get(weir.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return [(sample.labels, float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items())]


async def metric(session: aiohttp.ClientSession, weir: WeirProcess, name: str,
                 **labels: str) -> float | None:
    """The value of one sample in /metrics, or None if there is no such sample."""
    found = await samples(session, weir, name, **labels)
    return found[0][1] if found else None


@dataclass
class Fetched:
    status: int
    body: bytes
    headers: dict[str, str]


async def fetch(session: aiohttp.ClientSession, url: str, timeout: float = 15.0) -> Fetched:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        body = await response.read()
        return Fetched(response.status, body, {k.lower(): v for k, v in response.headers.items()})


async def fetch_fresh(url: str, timeout: float = 5.0) -> Fetched:
    """One request on a new connection of its own."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        return await fetch(s, url, timeout)


# --- the load generator ---------------------------------------------------------------------


@dataclass
class LoadStats:
    ok: int = 0
    by_version: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    non_2xx: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # 2xx, but not what was asked for

    @property
    def sent(self) -> int:
        return self.ok + sum(self.non_2xx.values()) + len(self.errors)

    def summary(self) -> str:
        return (f"{self.sent} requests sent, {self.ok} ok (by version "
                f"{dict(self.by_version)}, by method {dict(self.by_method)}), "
                f"non-2xx {dict(self.non_2xx)}, errors {len(self.errors)}")

    async def advance(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` more requests have been answered."""
        target = self.sent + count
        await wait_for(lambda: self.sent >= target, timeout=timeout, interval=0.002)


async def generate_load(port: int, stats: LoadStats, stop: asyncio.Event, workers: int,
                        cap: float, in_rotation: Callable[[], bool] = lambda: True) -> None:
    """``workers`` keep-alive clients in a loop on the data port until ``stop`` or ``cap``
    (or, for a load balancer's view of Weir, until ``in_rotation()`` turns false).

    Every other request is a POST with a body: aiohttp retries an idempotent request whose
    pooled connection closes before the response, which would hide a lost GET, but it never
    retries a POST."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cap
    url = f"http://127.0.0.1:{port}/item"
    body = b"x" * 100

    async def worker(session: aiohttp.ClientSession) -> None:
        post = False
        while not stop.is_set() and loop.time() < deadline and in_rotation():
            post = not post
            method = "POST" if post else "GET"
            try:
                async with session.request(method, url, data=body if post else None,
                                           timeout=aiohttp.ClientTimeout(total=10)) as response:
                    answer = await response.read()
                    version = response.headers.get("x-weir-version", "?")
                    if not 200 <= response.status < 300:
                        stats.non_2xx[response.status] += 1
                        continue
                    stats.ok += 1
                    stats.by_version[version] += 1
                    stats.by_method[method] += 1
                    if response.headers.get("x-backend") != version:
                        stats.wrong.append(
                            f"{version} answered by {response.headers.get('x-backend')}")
                    if post and json.loads(answer)["body_size"] != len(body):
                        stats.wrong.append(f"POST body arrived as {answer[:200]!r}")
            except Exception as exc:  # every failure counts; none may happen
                stats.errors.append(f"{method}: {type(exc).__name__}: {exc}")

    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))


# --- 1. switches, weight shifts and reloads under load --------------------------------------


@pytest.mark.timeout(90)
async def test_no_request_lost_under_switches_weight_shifts_and_reloads(tracked_backend,
                                                                        weir_process):
    blue, green = await tracked_backend("blue"), await tracked_backend("green")
    proc = await weir_process(drill(blue_green(blue, green)))
    stats = LoadStats()
    stop = asyncio.Event()
    began = time.monotonic()
    load = asyncio.create_task(generate_load(proc.port, stats, stop, WORKERS,
                                             LOAD_CAP_SECONDS))
    done: Counter[str] = Counter()
    try:
        async with aiohttp.ClientSession() as session:
            await stats.advance(200)  # warm: the load is flowing before anything changes
            gen = (await status(session, proc))["generation"]
            expected: dict[str, int] = {"blue": 100, "green": 0}
            # Interleaved: switch, weights, switch, rewrite; 50 times over.
            async with asyncio.timeout(LOAD_CAP_SECONDS - 5):
                for round_ in range(REWRITES):
                    for op in ("switch", "weights", "switch", "rewrite"):
                        await stats.advance(REQUESTS_BETWEEN_OPS)
                        if op == "switch":
                            to = "green" if done["switch"] % 2 == 0 else "blue"
                            code, body = await admin_call(
                                session, proc, "POST", f"/api/services/{SERVICE}/switch",
                                {"to": to})
                            assert code == 200, body
                            other = "blue" if to == "green" else "green"
                            assert body["weights"] == {to: 100, other: 0}, body
                            expected = body["weights"]
                        elif op == "weights":
                            b, g = SPLITS[done["weights"] % len(SPLITS)]
                            code, body = await admin_call(
                                session, proc, "PUT", f"/api/services/{SERVICE}/weights",
                                {"weights": {"blue": b, "green": g}})
                            assert code == 200, body
                            assert body["weights"] == {"blue": b, "green": g}, body
                            expected = body["weights"]
                        else:
                            gen, now = await rewrite_config(session, proc, blue, green,
                                                            round_, gen, done)
                            # A reload of an unrelated change keeps the API's weights.
                            assert now == expected, (now, expected)
                        done[op] += 1
            elapsed_ops = time.monotonic() - began
            stop.set()
            await asyncio.wait_for(load, 15)

            reload_failures = await metric(session, proc, "weir_config_reloads_total",
                                           outcome="failure")
            reload_successes = await metric(session, proc, "weir_config_reloads_total",
                                            outcome="success")
            # Weir's own count, by status, of what it answered for the service.
            counted: Counter[str] = Counter()
            for labels, value in await samples(session, proc, "http_requests_total",
                                               service=SERVICE):
                counted[labels["status"]] += int(value)
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(load, 15)

    report = (f"load: {WORKERS} workers for {elapsed_ops:.1f}s: {stats.summary()}; "
              f"operations {dict(done)}; reloads: {reload_successes} ok, "
              f"{reload_failures} failed; Weir counted {dict(counted)}")
    print(report)
    assert stats.errors == [], f"{report}; first errors: {stats.errors[:5]}"
    assert not stats.non_2xx, report
    assert stats.wrong == [], stats.wrong[:5]
    assert (done["switch"], done["weights"], done["rewrite"]) == (
        SWITCHES, WEIGHT_SHIFTS, REWRITES), report
    assert stats.by_version["blue"] > 0 and stats.by_version["green"] > 0, report
    assert set(stats.by_version) == {"blue", "green"}, report
    # What the clients saw is what the backends served: nothing answered twice or lost.
    assert blue.started["/item"] == stats.by_version["blue"], report
    assert green.started["/item"] == stats.by_version["green"], report
    assert counted == {"200": stats.ok}, report
    assert reload_failures == 0, report
    assert reload_successes is not None and reload_successes >= REWRITES, report
    assert "Traceback" not in proc.output()


async def rewrite_config(session: aiohttp.ClientSession, proc: WeirProcess, blue: TrackedBackend,
                         green: TrackedBackend, index: int, generation: int,
                         done: Counter[str]) -> tuple[int, dict[str, int]]:
    """A valid, harmless change: the drain timeout alternates and a rule that nothing matches
    comes and goes. Most rewrites are atomic and followed by POST /api/reload; some are written
    in place; one in five is left to the file watcher and one in ten is followed by SIGHUP.
    Returns the generation and the service's weights now in force."""
    rule = index % 2 == 0
    config = dict(proc.data)
    config["services"] = blue_green(blue, green, drain="10s" if rule else "20s", rule=rule)
    in_place = index % 5 == 3 or index % 10 == 9
    trigger = "watcher" if index % 5 == 4 else "sighup" if index % 10 == 7 else "api"
    proc.write_config(config, atomic=not in_place)
    done["in_place"] += in_place
    done[f"by_{trigger}"] += 1
    if trigger == "sighup":
        proc.send(signal.SIGHUP)
    if trigger != "api":
        async with asyncio.timeout(10):
            while True:
                current = await status(session, proc)
                if (current["generation"] > generation
                        and current["services"][0]["rules"] == int(rule)):
                    break
                await asyncio.sleep(0.02)
    else:
        code, body = await admin_call(session, proc, "POST", "/api/reload")
        assert code == 200, body
        assert body["outcome"] == "success", body
        assert body["generation"] > generation, body
        current = await status(session, proc)
        assert current["services"][0]["rules"] == int(rule), current
    assert current["last_reload"]["outcome"] == "success", current["last_reload"]
    return int(current["generation"]), current["services"][0]["weights"]


# --- 2 and 3. SIGTERM ------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tracked_backend,
                                                                      weir_process):
    app = await tracked_backend("app")
    v1 = [{"name": SERVICE, "versions": {"v1": {"upstreams": [app.address]}}}]
    proc = await weir_process(drill(v1, shutdown={"timeout": "10s"}))
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(fetch(session, proc.url + "/slow?delay=2"))
        await wait_for(lambda: app.running["/slow"] == 1, timeout=5)
        sent = time.monotonic()
        proc.send(signal.SIGTERM)
        # No shutdown delay: the listener closes at once.
        await wait_for(lambda: not port_open(proc.port), timeout=1.5, interval=0.02)
        assert not slow.done(), "the slow request ended before its backend answered"
        response = await slow
        assert response.status == 200
        assert response.body == b"slow done"
        assert response.headers["x-weir-version"] == "v1"
        code = await proc.wait_exit(timeout=5)
        took = time.monotonic() - sent
    assert code == 0, proc.output()
    assert 1.5 < took < 5, took  # it waited for the slow request, and no longer than needed


@pytest.mark.timeout(30)
async def test_sigterm_with_shutdown_delay_keeps_serving_while_readyz_says_503(tracked_backend,
                                                                               weir_process):
    app = await tracked_backend("app")
    v1 = [{"name": SERVICE, "versions": {"v1": {"upstreams": [app.address]}}}]
    proc = await weir_process(drill(v1, shutdown={"delay": "1s", "timeout": "10s"}))
    async with aiohttp.ClientSession() as session:
        ready = await fetch(session, proc.admin_url + "/readyz")
        assert ready.status == 200
        slow = asyncio.create_task(fetch(session, proc.url + "/slow?delay=2"))
        await wait_for(lambda: app.running["/slow"] == 1, timeout=5)

        sent = time.monotonic()
        proc.send(signal.SIGTERM)
        async with asyncio.timeout(1.0):
            while (await fetch_fresh(proc.admin_url + "/readyz")).status != 503:
                await asyncio.sleep(0.01)
        # Within the delay: load balancers see 503 and stop sending, but whatever still
        # arrives on the data port is served, on new connections too.
        served = await fetch_fresh(proc.url + "/during-delay")
        assert served.status == 200
        assert served.headers["x-weir-version"] == "v1"
        raw = await exchange(proc.port, b"GET /raw HTTP/1.1\r\nHost: shop\r\n\r\n")
        assert raw[0].status == 200
        assert time.monotonic() - sent < 0.9, "too slow to check the data port within the delay"
        assert (await fetch_fresh(proc.admin_url + "/readyz")).status == 503

        await wait_for(lambda: not port_open(proc.port), timeout=2.5, interval=0.02)
        closed_after = time.monotonic() - sent
        assert closed_after >= 0.9, f"listener closed {closed_after:.2f}s after SIGTERM"
        response = await slow
        assert (response.status, response.body) == (200, b"slow done")
        code = await proc.wait_exit(timeout=5)
    assert code == 0, proc.output()


@pytest.mark.timeout(30)
async def test_second_sigterm_forces_exit_during_a_long_shutdown(tracked_backend, weir_process):
    app = await tracked_backend("app")
    v1 = [{"name": SERVICE, "versions": {"v1": {"upstreams": [app.address]}}}]
    proc = await weir_process(drill(v1, shutdown={"timeout": "30s"}))
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(fetch(session, proc.url + "/slow?delay=8"))
        await wait_for(lambda: app.running["/slow"] == 1, timeout=5)
        proc.send(signal.SIGTERM)
        await wait_for(lambda: not port_open(proc.port), timeout=1.5, interval=0.02)
        assert proc.process.poll() is None, "exited while a request was in flight"
        assert not slow.done()

        sent = time.monotonic()
        proc.send(signal.SIGTERM)
        code = await proc.wait_exit(timeout=2.0)
        print(f"forced exit after {time.monotonic() - sent:.2f}s with code {code}")
        assert app.running["/slow"] == 1, "the slow request was no longer open"
        # The client of the abandoned request sees the connection go, not a made-up answer.
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(slow, 5)


@pytest.mark.timeout(30)
async def test_sigterm_under_load_loses_nothing_for_a_client_that_watches_readyz(
        tracked_backend, weir_process):
    """What shutdown.delay is for: a load balancer polling /readyz takes Weir out of rotation
    before the listener closes, and every request it sent on the way is answered."""
    app = await tracked_backend("v1")  # named as its version: responses are checked so
    v1 = [{"name": SERVICE, "versions": {"v1": {"upstreams": [app.address]}}}]
    proc = await weir_process(drill(v1, shutdown={"delay": "1s", "timeout": "10s"}))
    rotation = {"in": True, "left_after": 0.0}
    signalled = 0.0

    async def readiness_probe() -> None:
        async with aiohttp.ClientSession() as probe:
            while True:
                try:
                    ready = (await fetch(probe, proc.admin_url + "/readyz", timeout=1)).status
                except aiohttp.ClientError:
                    ready = 0
                if ready != 200:
                    rotation["in"] = False
                    rotation["left_after"] = time.monotonic() - signalled
                    return
                await asyncio.sleep(0.1)

    stats = LoadStats()
    stop = asyncio.Event()
    probe = asyncio.create_task(readiness_probe())
    load = asyncio.create_task(generate_load(proc.port, stats, stop, WORKERS, 20,
                                             in_rotation=lambda: rotation["in"]))
    try:
        await stats.advance(500)
        before = stats.sent
        signalled = time.monotonic()
        proc.send(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(probe, load), 5)
        code = await proc.wait_exit(timeout=5)
    finally:
        stop.set()
        probe.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.gather(probe, load), 5)
    print(f"SIGTERM under load: {stats.summary()}; {stats.sent - before} sent after the "
          f"signal; out of rotation after {rotation['left_after']:.2f}s")
    assert code == 0, proc.output()
    assert stats.errors == [], stats.errors[:5]
    assert not stats.non_2xx
    assert stats.wrong == [], stats.wrong[:5]
    assert stats.sent > before, "no request was sent after SIGTERM: nothing was tested"
    assert rotation["left_after"] < 0.9, "the probe saw 503 too late to mean anything"
    assert app.started["/item"] == stats.ok


async def test_keep_alive_clients_are_told_to_reconnect_during_shutdown_delay(tracked_backend,
                                                                              weir_process):
    app = await tracked_backend("app")
    v1 = [{"name": SERVICE, "versions": {"v1": {"upstreams": [app.address]}}}]
    proc = await weir_process(drill(v1, shutdown={"delay": "2s", "timeout": "10s"}))
    reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    try:
        writer.write(b"GET /before HTTP/1.1\r\nHost: shop\r\n\r\n")
        first = await asyncio.wait_for(read_response(reader), 5)
        assert first.status == 200
        assert (first.header("connection") or "").lower() != "close"

        proc.send(signal.SIGTERM)
        async with asyncio.timeout(1.5):
            while (await fetch_fresh(proc.admin_url + "/readyz")).status != 503:
                await asyncio.sleep(0.01)
        writer.write(b"GET /during-delay HTTP/1.1\r\nHost: shop\r\n\r\n")
        second = await asyncio.wait_for(read_response(reader), 5)
        assert second.status == 200
        assert (second.header("connection") or "").lower() == "close", second.headers
        assert await read_until_closed(reader, timeout=1) == b""
    finally:
        writer.close()


# --- 4. draining on switch --------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_websocket_to_blue_survives_switch_then_closes_after_drain_timeout(
        tracked_backend, weir_process):
    blue, green = await tracked_backend("blue"), await tracked_backend("green")
    proc = await weir_process(drill(blue_green(blue, green, drain="1s")))
    async with aiohttp.ClientSession() as session:
        async with ws_connect(f"ws://127.0.0.1:{proc.port}/ws", open_timeout=5) as ws:
            assert ws.response is not None
            assert ws.response.headers["x-weir-version"] == "blue"
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 2) == "blue:hello"
            await wait_for(lambda: blue.running["/ws"] == 1, timeout=5)

            code, body = await admin_call(session, proc, "POST",
                                          f"/api/services/{SERVICE}/switch", {"to": "green"})
            switched = time.monotonic()
            assert code == 200, body
            # The stream on blue carries on...
            await ws.send("still there")
            assert await asyncio.wait_for(ws.recv(), 0.5) == "blue:still there"
            # ...while new requests go to green...
            fresh = await fetch_fresh(proc.url + "/new")
            assert (fresh.status, fresh.headers["x-weir-version"]) == (200, "green")
            # ...and blue counts as draining, with the one stream still open.
            assert await metric(session, proc, "weir_draining_requests",
                                service=SERVICE, version="blue") == 1
            assert time.monotonic() - switched < 0.9, "checks took longer than the drain"

            # After blue's drain timeout Weir closes the stream.
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            closed_after = time.monotonic() - switched
        assert 0.8 <= closed_after < 3, f"closed {closed_after:.2f}s after the switch"
        # The upstream side is closed too, and the gauge falls back.
        await wait_for(lambda: blue.running["/ws"] == 0, timeout=5)
        async with asyncio.timeout(5):
            while await metric(session, proc, "weir_draining_requests", service=SERVICE,
                               version="blue") not in (0, None):
                await asyncio.sleep(0.02)
        # Green keeps serving, WebSockets included.
        async with ws_connect(f"ws://127.0.0.1:{proc.port}/ws", open_timeout=5) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 2) == "green:hi"


@pytest.mark.timeout(30)
async def test_slow_request_to_blue_in_flight_during_switch_completes(tracked_backend,
                                                                      weir_process):
    blue, green = await tracked_backend("blue"), await tracked_backend("green")
    proc = await weir_process(drill(blue_green(blue, green, drain="10s")))
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(fetch(session, proc.url + "/slow?delay=1.5"))
        await wait_for(lambda: blue.running["/slow"] == 1, timeout=5)
        code, body = await admin_call(session, proc, "POST",
                                      f"/api/services/{SERVICE}/switch", {"to": "green"})
        assert code == 200, body
        for _ in range(10):
            fresh = await fetch_fresh(proc.url + "/after-switch")
            assert (fresh.status, fresh.headers["x-weir-version"]) == (200, "green")
        assert await metric(session, proc, "weir_draining_requests",
                            service=SERVICE, version="blue") == 1
        assert not slow.done()
        response = await slow
        assert (response.status, response.body) == (200, b"slow done")
        assert response.headers["x-weir-version"] == "blue"
        async with asyncio.timeout(5):
            while await metric(session, proc, "weir_draining_requests", service=SERVICE,
                               version="blue") not in (0, None):
                await asyncio.sleep(0.02)
        assert green.started["/after-switch"] == 10
        assert blue.started["/after-switch"] == 0


# --- 5. removing an upstream from the config file --------------------------------------------


@pytest.mark.timeout(30)
async def test_upstream_removed_from_config_file_drains(tracked_backend, weir_process):
    first, second = await tracked_backend("first"), await tracked_backend("second")
    service = {"name": SERVICE,
               "versions": {"v1": {"upstreams": [first.address, second.address]}},
               "drain": {"timeout": "10s"}}
    proc = await weir_process(drill([service]))
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(fetch(session, proc.url + "/slow?delay=1.5"))
        await wait_for(lambda: first.running["/slow"] + second.running["/slow"] == 1,
                       timeout=5)
        removed, kept = (first, second) if first.running["/slow"] else (second, first)

        config = dict(proc.data)
        config["services"] = [{**service, "versions": {"v1": {"upstreams": [kept.address]}}}]
        proc.write_config(config)
        code, body = await admin_call(session, proc, "POST", "/api/reload")
        assert (code, body["outcome"]) == (200, "success"), body

        current = await status(session, proc)
        assert current["services"][0]["versions"]["v1"]["upstreams"] == [kept.address]
        assert [(d["upstream"], d["open"]) for d in current["draining"]] == [
            (removed.address, 1)], current["draining"]
        for _ in range(10):
            fresh = await fetch_fresh(proc.url + "/after-reload")
            assert (fresh.status, fresh.headers["x-backend"]) == (200, kept.name)
        assert not slow.done()
        response = await slow
        assert (response.status, response.body) == (200, b"slow done")
        assert response.headers["x-backend"] == removed.name
        assert removed.started["/after-reload"] == 0
        async with asyncio.timeout(5):
            while any(d["open"] for d in (await status(session, proc))["draining"]):
                await asyncio.sleep(0.02)

