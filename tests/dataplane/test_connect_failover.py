"""Safe defaults with no health, retry or outlier keys: a failed connect fails over to another
upstream of the version, the upstream is out of rotation at once and a connect probe brings it
back; the last upstream of a version stays in without being preferred; slow start ramps a
joining upstream's share.

Real Weir (control plane, data plane, admin API) in the test's loop, real aiohttp upstreams on
127.0.0.1; an upstream that "restarts" is an aiohttp app started on the port of one that
refused connections.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.config.loader import parse_config
from proxy.config.model import ConfigError

from ..conftest import StartWeir, Weir, free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def app_named(name: str) -> web.Application:
    async def anything(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=name, headers={"x-backend": name})

    app = web.Application()
    app.add_routes([web.route("*", "/{tail:.*}", anything)])
    return app


@pytest.fixture
async def serve_at() -> AsyncIterator[Callable[[str, int], Awaitable[str]]]:
    """Start an upstream named ``name`` on ``port`` (0: any); returns its address."""
    runners: list[web.AppRunner] = []

    async def start(name: str, port: int = 0) -> str:
        runner = web.AppRunner(app_named(name), access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        runners.append(runner)
        return f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    yield start
    for runner in runners:
        await runner.cleanup()


def service(*upstreams: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "app", "versions": {"stable": {"upstreams": list(upstreams)}}, **extra}]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def answers(w: Weir, count: int) -> Counter[str]:
    """``count`` requests, one in three a POST with a body: who answered, or the status."""
    seen: Counter[str] = Counter()
    for i in range(count):
        post = i % 3 == 0
        reply = await w.request(f"/r{i}", method="POST" if post else "GET",
                                data=b"payload" if post else None)
        seen[reply.headers.get("x-backend") if reply.status == 200 else str(reply.status)] += 1
    return seen


def pool(w: Weir, address: str) -> Any:
    return w.control.proxy.pools.pools[address]


async def test_refused_upstream_fails_over_and_is_out_of_rotation_at_once(
        weir: StartWeir, serve_at: Callable[[str, int], Awaitable[str]]) -> None:
    a, b = await serve_at("a", 0), await serve_at("b", 0)
    dead = f"127.0.0.1:{free_port()}"
    w = await weir(service(dead, a, b))
    seen = await answers(w, 30)
    assert set(seen) == {"a", "b"} and sum(seen.values()) == 30, seen  # POSTs included
    # Taken out at the first refusal: no request tried it again.
    assert pool(w, dead).connect_errors == 1
    scrape = await w.scrape()
    assert scrape.value("weir_retries_total", service="app", version="stable",
                        reason="connect_failure") == 1
    stable = (await w.status())["services"][0]["versions"]["stable"]
    assert stable["upstream_health"][dead]["connect_ejected"] is True
    assert stable["upstream_share"] == {dead: 0.0, a: 0.5, b: 0.5}

    # The instance comes up on its port: the connect probe lets it back in, and it serves.
    await serve_at("back", port_of(dead))
    await wait_for(lambda: pool(w, dead).available, timeout=3)
    assert (await answers(w, 30))["back"] >= 5
    assert pool(w, dead).connect_errors == 1


async def test_last_upstream_stays_in_and_is_never_preferred_for_failing_fast(
        weir: StartWeir, serve_at: Callable[[str, int], Awaitable[str]]) -> None:
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    w = await weir(service(first, second))
    reply = await w.request("/")
    assert reply.status == 502  # both refused: each tried once
    assert pool(w, first).connect_errors == pool(w, second).connect_errors == 1
    states = {a: w.control.proxy.health.state(a) for a in (first, second)}
    out = [a for a, s in states.items() if s.connect_ejected]
    assert len(out) == 1, states  # a version is never left with none
    kept = second if out == [first] else first
    assert pool(w, kept).available and pool(w, kept).penalty > 0

    # The ejected one comes back: the one still refusing (and so with nothing in flight) is
    # not preferred over it, not even once.
    await serve_at("back", port_of(out[0]))
    await wait_for(lambda: pool(w, out[0]).available, timeout=3)
    errors = pool(w, kept).connect_errors
    assert await answers(w, 30) == Counter({"back": 30})
    assert pool(w, kept).connect_errors == errors


async def test_fail_over_and_ejection_can_each_be_turned_off(
        weir: StartWeir, serve_at: Callable[[str, int], Awaitable[str]]) -> None:
    a = await serve_at("a", 0)
    dead = f"127.0.0.1:{free_port()}"
    w = await weir(service(dead, a), upstream={"eject_on_connect_failure": False})
    assert await answers(w, 12) == Counter({"a": 12})  # still failed over
    assert pool(w, dead).available and pool(w, dead).connect_errors >= 2  # never taken out

    off = await weir(service(dead, a, retries={"attempts": 1}))
    seen = await answers(off, 12)
    assert seen["502"] == 1 and seen["a"] == 11, seen  # no fail-over; out after one refusal


async def test_slow_start_ramps_a_joining_upstreams_share_over_the_window(
        weir: StartWeir, serve_at: Callable[[str, int], Awaitable[str]]) -> None:
    a, b = await serve_at("a", 0), await serve_at("b", 0)
    late = f"127.0.0.1:{free_port()}"
    window = 3.0
    w = await weir(service(a, b, late, slow_start={"window": f"{window}s"}))
    await answers(w, 3)  # one refused connect: the late one is out, probed
    assert w.control.proxy.health.state(late).connect_ejected
    await serve_at("late", port_of(late))
    await wait_for(lambda: pool(w, late).available, timeout=3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    shown = (await w.status())["services"][0]["versions"]["stable"]
    assert 0.0 < shown["upstream_share"][late] < 0.2, shown["upstream_share"]
    assert shown["upstream_health"][late]["slow_start"]["window"] == window

    # Each window third's share of the late upstream, and the share after the window.
    thirds: list[Counter[str]] = [Counter(), Counter(), Counter(), Counter()]
    while loop.time() < began + window + 1.0:
        third = min(3, int((loop.time() - began) / (window / 3)))
        reply = await w.request("/")
        thirds[third][reply.headers["x-backend"]] += 1
    shares = [c["late"] / sum(c.values()) for c in thirds]
    print(f"\nlate upstream's share per third of the window, then after it: {shares}")
    assert shares[0] < 0.2, shares               # a full share is a third
    assert shares[0] < shares[2] < 0.34, shares
    assert shares[3] > 0.26, shares               # full share once the window is over
    assert not pool(w, late).ramp_window


def test_slow_start_config_is_per_service_or_version_and_checked() -> None:
    config = parse_config({"services": [{
        "name": "app", "slow_start": {"window": "30s"},
        "versions": {"stable": {"upstreams": ["127.0.0.1:1"]},
                     "canary": {"upstreams": ["127.0.0.1:2"], "slow_start": {"window": "5s"}}},
    }]}, "<test>")
    service = config.services[0]
    assert service.slow_start_for("stable").window == 30.0  # type: ignore[union-attr]
    assert service.slow_start_for("canary").window == 5.0  # type: ignore[union-attr]
    assert config.upstream.eject_on_connect_failure is True
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": [{"name": "app", "slow_start": {"window": "0s"},
                                    "versions": {"v": {"upstreams": ["127.0.0.1:1"]}}}]},
                     "<test>")
    assert "slow_start.window" in str(caught.value)
