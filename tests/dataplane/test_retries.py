"""Retries under a budget, end to end: a real Weir (control plane, data plane and admin API in
this event loop, started from a config file) in front of real loopback upstreams: aiohttp
backends that answer, and hand-written ones that refuse, hang up, stall or answer 503. What the
upstreams saw is compared with what the client got and with what /metrics says."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.config.loader import parse_config
from proxy.config.model import ConfigError
from proxy.dataplane.retry import BUDGET_SLOTS, RetryBudget
from proxy.dataplane.routing import build_route_table
from proxy.dataplane.stats import StatsRegistry

from ..conftest import Backend, StartWeir, Weir, free_port, sample, wait_for

# --- the service under test ------------------------------------------------------------------


def service(upstreams: list[str], retries: dict[str, Any] | None,
            timeouts: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One service on ``upstreams`` with these retries (None: the defaults) and timeouts."""
    one: dict[str, Any] = {"name": "app", "versions": {"stable": {"upstreams": upstreams}},
                           "timeouts": timeouts or {"connect": "2s", "read": "5s"}}
    if retries is not None:
        one["retries"] = retries
    return [one]


# --- hand-written upstreams -----------------------------------------------------------------

Respond = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawUpstream:
    """Reads request heads (no bodies are sent to it unless a test says so), records each
    request target, and answers with ``respond``, which says whether to keep the connection."""

    port: int = 0
    paths: list[str] = field(default_factory=list)
    closed: int = 0  # connections ended, by either side

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_raw(raw_backend: Callable[..., Awaitable[int]], respond: Respond) -> RawUpstream:
    upstream = RawUpstream()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                upstream.paths.append(head.split(b" ", 2)[1].decode())
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if length:
                    await reader.readexactly(length)
                if not await respond(reader, writer):
                    return
        finally:
            upstream.closed += 1
            writer.close()

    upstream.port = await raw_backend(handle)
    return upstream


def answer(data: bytes) -> Respond:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return True
    return respond


def answer_and_hold(data: bytes) -> Respond:
    """Write ``data`` and then nothing more, until the proxy closes the connection."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            await reader.read()
        return False
    return respond


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    return False  # closes without a byte of a response


BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\n\r\nbusy\n"
# A 503 whose chunked body never ends: reading it to the end would never finish.
BUSY_ENDLESS = (b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nbusy\n\r\n")


async def send_and_read_until_closed(port: int, request: bytes) -> bytes:
    """Everything the proxy sends until it closes or resets the connection. Read from the
    socket itself: the kernel hands over what arrived before a reset, which a StreamReader,
    raising the reset first, would not."""
    loop = asyncio.get_running_loop()
    received = b""
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        async with asyncio.timeout(5):
            while True:
                try:
                    data = await loop.sock_recv(sock, 65536)
                except ConnectionResetError:
                    return received
                if not data:
                    return received
                received += data


def retries_of(metrics: str, reason: str) -> float:
    return sample(metrics, "weir_retries_total", service="app", version="stable",
                  reason=reason) or 0.0


def requests_of(metrics: str, status: str) -> float:
    return sample(metrics, "http_requests_total", service="app", version="stable",
                  status=status) or 0.0


def pool(w: Weir, address: str) -> Any:
    return w.control.proxy.pools.pools[address]


# --- what is retried ------------------------------------------------------------------------


async def test_get_refused_by_one_upstream_succeeds_on_the_other(
        start_backend: Callable[..., Awaitable[Backend]],
        weir: StartWeir) -> None:
    good = await start_backend("good")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    w = await weir(service([dead, good.address], {}))
    for i in range(10):
        reply = await w.request(f"/r{i}")
        assert reply.status == 200, reply.body
        assert reply.headers["x-backend"] == "good"
    assert sorted(r["path"] for r in good.requests) == sorted(f"/r{i}" for i in range(10))
    refused = pool(w, dead).connect_errors
    assert refused >= 1  # the balancer did send some requests to the dead upstream first
    metrics = await w.api.metrics()
    assert retries_of(metrics, "connect_failure") == refused
    assert sample(metrics, "weir_upstream_connect_errors_total", upstream=dead) == refused
    # The client's requests are counted once each, with the status they finally got.
    assert requests_of(metrics, "200") == 10
    assert requests_of(metrics, "502") == 0


async def test_503_is_retried_on_the_other_upstream_and_its_body_not_read(
        start_backend: Callable[..., Awaitable[Backend]], raw_backend: Callable[..., Any],
        weir: StartWeir) -> None:
    good = await start_backend("good")
    busy = await start_raw(raw_backend, answer_and_hold(BUSY_ENDLESS))
    w = await weir(service([busy.address, good.address], {"attempts": 2}))
    paths = [f"/item/{i}" for i in range(6)]
    for path in paths:
        reply = await w.request(path)
        assert reply.status == 200, reply.body
        assert reply.headers["x-backend"] == "good"
    # Every request reached the good backend once; the busy one saw some of them, each once.
    assert sorted(r["path"] for r in good.requests) == sorted(paths)
    assert busy.paths and len(set(busy.paths)) == len(busy.paths) <= len(paths)
    assert set(busy.paths) <= set(paths)
    # Its endless body was not waited for: each of its connections was closed by Weir.
    await wait_for(lambda: busy.closed == len(busy.paths))
    metrics = await w.api.metrics()
    assert retries_of(metrics, "status") == len(busy.paths)
    assert requests_of(metrics, "200") == len(paths)
    assert requests_of(metrics, "503") == 0


async def test_concurrent_retries_leave_no_request_in_flight(
        start_backend: Callable[..., Awaitable[Backend]], raw_backend: Callable[..., Any],
        weir: StartWeir) -> None:
    good = await start_backend("good")
    busy = await start_raw(raw_backend, answer(BUSY))
    dead = f"127.0.0.1:{free_port()}"
    # A budget that cannot run out here: every request reaches the good upstream.
    w = await weir(service([busy.address, dead, good.address],
                   {"attempts": 3, "budget": {"ratio": 2, "min_per_second": 100}}))
    replies = await asyncio.gather(*(w.request(f"/r{i}") for i in range(60)))
    assert [r.status for r in replies] == [200] * 60
    assert len(good.requests) == 60
    pools = w.control.proxy.pools.pools.values()
    await wait_for(lambda: all(p.inflight == 0 for p in pools))
    metrics = await w.api.metrics()
    assert retries_of(metrics, "status") == len(busy.paths)
    assert retries_of(metrics, "connect_failure") == pool(w, dead).connect_errors
    assert requests_of(metrics, "200") == 60


async def test_upstream_hanging_up_before_answering_is_retried(
        start_backend: Callable[..., Awaitable[Backend]], raw_backend: Callable[..., Any],
        weir: StartWeir) -> None:
    good = await start_backend("good")
    rude = await start_raw(raw_backend, hang_up)
    w = await weir(service([rude.address, good.address], {}))
    for i in range(6):
        assert (await w.request(f"/r{i}")).status == 200
    assert rude.paths and len(good.requests) == 6
    assert retries_of(await w.api.metrics(), "reset") == len(rude.paths)


@pytest.mark.parametrize("on_timeout", [True, False])
async def test_read_timeout_before_any_byte_is_retried_only_when_asked(
        on_timeout: bool, start_backend: Callable[..., Awaitable[Backend]],
        raw_backend: Callable[..., Any], weir: StartWeir) -> None:
    good = await start_backend("good")
    silent = await start_raw(raw_backend, answer_and_hold(b""))
    w = await weir(service([silent.address, good.address], {"on_timeout": on_timeout},
                   timeouts={"connect": "2s", "read": "300ms"}))
    statuses = [(await w.request(f"/r{i}")).status for i in range(4)]
    assert silent.paths  # some requests went to the silent upstream first
    if on_timeout:
        assert statuses == [200] * 4
        assert retries_of(await w.api.metrics(), "timeout") == len(silent.paths)
    else:
        assert sorted(statuses) == sorted([504] * len(silent.paths)
                                          + [200] * (4 - len(silent.paths)))
        assert retries_of(await w.api.metrics(), "timeout") == 0


# --- what is never retried ------------------------------------------------------------------


@pytest.mark.parametrize(("method", "body"), [("POST", b"payload"), ("PUT", b"payload"),
                                              ("POST", b"")])
async def test_requests_with_a_body_or_not_idempotent_are_never_retried(
        method: str, body: bytes, start_backend: Callable[..., Awaitable[Backend]],
        raw_backend: Callable[..., Any], weir: StartWeir) -> None:
    good = await start_backend("good")
    busy = await start_raw(raw_backend, answer(BUSY))
    w = await weir(service([busy.address, good.address], {"attempts": 3}))
    statuses = [(await w.request(f"/r{i}", method=method, data=body)).status for i in range(6)]
    # Each request reached exactly one upstream, and the client got that upstream's answer.
    assert len(busy.paths) + len(good.requests) == 6
    assert busy.paths, "the balancer never picked the busy upstream"
    assert statuses.count(503) == len(busy.paths)
    assert statuses.count(200) == len(good.requests)
    assert all(r["body_size"] == len(body) for r in good.requests)
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_retries_total") is None
    assert requests_of(metrics, "503") == len(busy.paths)


@pytest.mark.parametrize("then_close", [True, False], ids=["closes", "stalls"])
async def test_a_response_that_started_reaching_the_client_is_never_retried(
        then_close: bool, raw_backend: Callable[..., Any],
        weir: StartWeir) -> None:
    """200 with 100 bytes promised and 10 sent, then the upstream closes or stalls past the
    read timeout. With one upstream a retry would go back to it, so its count tells."""
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10
    respond = answer(head) if then_close else answer_and_hold(head)

    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await respond(reader, writer)
        return False

    partial = await start_raw(raw_backend, once)
    w = await weir(service([partial.address], {"attempts": 3, "on_timeout": True},
                   timeouts={"connect": "2s", "read": "300ms"}))
    received = await send_and_read_until_closed(
        w.port, b"GET /download HTTP/1.1\r\nHost: app\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"x" * 10)  # then closed: the body cannot be completed
    assert partial.paths == ["/download"]
    assert sample(await w.api.metrics(), "weir_retries_total") is None


# --- how much is retried --------------------------------------------------------------------


@pytest.mark.parametrize(("upstreams", "attempts"), [(1, 1), (1, 3), (2, 2), (2, 3), (3, 3)])
async def test_attempts_limit_and_spread_over_upstreams(
        upstreams: int, attempts: int, raw_backend: Callable[..., Any],
        weir: StartWeir) -> None:
    busy = [await start_raw(raw_backend, answer(BUSY)) for _ in range(upstreams)]
    w = await weir(service([b.address for b in busy], {"attempts": attempts}))
    for i in range(3):
        reply = await w.request(f"/r{i}")
        assert reply.status == 503
        assert reply.body == b"busy\n"  # the last attempt's own answer, relayed as is
        seen = [b.paths.count(f"/r{i}") for b in busy]
        assert sum(seen) == attempts
        # Each upstream is tried before any is tried twice.
        assert max(seen) - min(seen) <= 1
    metrics = await w.api.metrics()
    assert retries_of(metrics, "status") == 3 * (attempts - 1)
    assert requests_of(metrics, "503") == 3


async def test_a_single_refusing_upstream_is_tried_attempts_times(
        weir: StartWeir) -> None:
    dead = f"127.0.0.1:{free_port()}"
    w = await weir(service([dead], {"attempts": 3}))
    assert (await w.request("/")).status == 502
    assert pool(w, dead).connect_errors == 3
    metrics = await w.api.metrics()
    assert retries_of(metrics, "connect_failure") == 2
    assert requests_of(metrics, "502") == 1


async def test_budget_stops_retries_when_most_requests_fail(
        raw_backend: Callable[..., Any], weir: StartWeir) -> None:
    busy = await start_raw(raw_backend, answer(BUSY))
    ratio, min_per_second, window = 0.2, 1, 10
    w = await weir(service([busy.address], {"attempts": 2, "budget": {
        "ratio": ratio, "min_per_second": min_per_second, "window": f"{window}s"}}))
    before = await w.api.metrics()
    assert sample(before, "weir_retry_budget_exhausted_total", service="app",
                  version="stable") == 0
    requests = 100
    for i in range(requests):
        assert (await w.request(f"/r{i}")).status == 503
    retries = len(busy.paths) - requests
    # Far less than the 100 that attempts: 2 alone would allow (the run takes well under a
    # window): the ratio's share of the requests plus the reserve, and at least the reserve.
    assert min_per_second * window <= retries <= ratio * requests + min_per_second * window
    metrics = await w.api.metrics()
    assert retries_of(metrics, "status") == retries
    assert sample(metrics, "weir_retry_budget_exhausted_total", service="app",
                  version="stable") == requests - retries
    assert requests_of(metrics, "503") == requests


async def test_no_retries_block_fails_over_connects_but_retries_nothing_else(
        start_backend: Callable[..., Awaitable[Backend]], raw_backend: Callable[..., Any],
        weir: StartWeir) -> None:
    good = await start_backend("good")
    busy = await start_raw(raw_backend, answer(BUSY))
    dead = f"127.0.0.1:{free_port()}"
    w = await weir(service([busy.address, dead, good.address], None))
    statuses = [(await w.request(f"/r{i}", method="POST" if i % 2 else "GET",
                                 data=b"x" if i % 2 else None)).status for i in range(8)]
    # An answer is relayed as it is; a refused connect, POST or not, goes to another upstream.
    assert statuses.count(503) == len(busy.paths) >= 1
    assert statuses.count(502) == 0 and pool(w, dead).connect_errors >= 1
    metrics = await w.api.metrics()
    assert retries_of(metrics, "connect_failure") == pool(w, dead).connect_errors
    assert retries_of(metrics, "status") == 0
    assert sample(metrics, "weir_retry_budget_exhausted_total") is None


async def test_attempts_1_turns_every_retry_off_fail_over_included(
        start_backend: Callable[..., Awaitable[Backend]],
        weir: StartWeir) -> None:
    good = await start_backend("good")
    dead = f"127.0.0.1:{free_port()}"
    w = await weir(service([dead, good.address], {"attempts": 1}))
    # Each request picks one of the two at random: until one has met the dead upstream (six
    # requests missed it one run in 64), then five more.
    statuses: list[int] = []
    while 502 not in statuses and len(statuses) < 40:
        statuses.append((await w.request(f"/r{len(statuses)}")).status)
    statuses += [(await w.request(f"/after{i}")).status for i in range(5)]
    # The one request that met the refused connect failed; the upstream was then out.
    assert statuses.count(502) == pool(w, dead).connect_errors == 1
    assert statuses.count(200) == len(statuses) - 1
    assert sample(await w.api.metrics(), "weir_retries_total") is None


# --- the budget and the config, without sockets -----------------------------------------------


def test_budget_allows_ratio_of_requests_plus_reserve_over_a_sliding_window() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=1, window=10)
    now = 1000.0
    for _ in range(10):
        budget.deposit(now)
    granted = 0
    while budget.try_withdraw(now):
        granted += 1
    assert granted == 0.5 * 10 + 1 * 10
    # Half a window later, new requests add their share; the spent retries still count.
    now += 5
    for _ in range(4):
        budget.deposit(now)
    assert [budget.try_withdraw(now) for _ in range(3)] == [True, True, False]
    # Once the window has slid past the first burst, its requests and retries are forgotten.
    now += 10 - 10 / BUDGET_SLOTS / 2
    assert budget.try_withdraw(now)  # 4 requests → 2 + reserve 10, minus the 2 still in it
    granted = 1
    while budget.try_withdraw(now):
        granted += 1
    assert granted == 0.5 * 4 + 10 - 2
    # Long idle: everything is forgotten, the reserve is whole again.
    now += 3600
    granted = 0
    while budget.try_withdraw(now):
        granted += 1
    assert granted == 10


def test_retries_config_defaults_validation_and_budget_kept_across_rebuilds() -> None:
    def config(retries: Any) -> Any:
        service: dict[str, Any] = {"name": "app",
                                   "versions": {"stable": {"upstreams": ["127.0.0.1:9001"]}}}
        if retries is not None:
            service["retries"] = retries
        return parse_config({"services": [service]})

    retries = config({}).services[0].retries
    assert retries is not None
    assert (retries.attempts, retries.on_statuses, retries.on_connect_failure,
            retries.on_reset, retries.on_timeout) == (2, [502, 503, 504], True, True, False)
    assert (retries.budget.ratio, retries.budget.min_per_second, retries.budget.window) == (
        0.2, 10.0, 10.0)
    assert config(None).services[0].retries is None
    with pytest.raises(ConfigError) as error:
        config({"attempts": 0, "on_statuses": [200], "budget": {"window": "0s", "ratio": -1}})
    text = str(error.value)
    for field_path in ("retries.attempts", "retries.on_statuses[0]", "retries.budget.window",
                       "retries.budget.ratio"):
        assert field_path in text, text

    # Each reload or weight change builds a new table; the service's budget carries over.
    def no_balancer(addresses: tuple[str, ...], tls: Any = None, protocol: str = "") -> Any:
        return object()

    stats = StatsRegistry()
    first = build_route_table(config({"budget": {"ratio": 0.5}}), no_balancer, stats=stats)
    second = build_route_table(config({"budget": {"ratio": 0.1}}), no_balancer, stats=stats)
    policies = [t.routes[0].retry for t in (first, second)]
    assert policies[0] is not None and policies[1] is not None
    assert policies[0].budget is policies[1].budget and policies[1].budget.ratio == 0.1
    plain = build_route_table(config(None), no_balancer, stats=stats)
    assert plain.routes[0].retry is None
