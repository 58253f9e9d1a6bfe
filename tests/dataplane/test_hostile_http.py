"""Issue 17, "fail safe and say what happened": requests and responses that Weir used to pass
on as if they were fine, each over real loopback sockets, with a raw socket as the client.

- an upstream response head over the limit (one huge header, in one write or in pieces) → 502
- a request Transfer-Encoding other than exactly ``chunked`` → 501
- ``Expect: 100-continue`` from an HTTP/1.0 client → no 100 (RFC 9110 10.1.1)
- ``Host`` with a trailing dot (and a port) → the same service as without it
- TRACE → 405, unless the service sets ``allow_trace: true``
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.config.model import Service
from proxy.control.metrics import Metrics
from proxy.dataplane.proxyserver import ProxyServer
from proxy.dataplane.upstream import MAX_RESPONSE_HEAD

from ..conftest import (
    exchange,
    make_config,
    one_service,
    read_response,
    read_until_closed,
    sample,
    wait_for,
)

StartProxy = Callable[..., Awaitable[ProxyServer]]


def get(path: str = "/", host: str = "app.test", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def exposition(proxy: ProxyServer) -> str:
    metrics = Metrics()
    metrics.attach(proxy)
    return metrics.exposition().decode()


# --- 8: an upstream response head over the limit ----------------------------------------------


@pytest.mark.parametrize("size", [200 * 1000, 1024 * 1024], ids=["200KB", "1MiB"])
@pytest.mark.parametrize("pieces", [False, True], ids=["one-write", "many-pieces"])
async def test_one_huge_upstream_header_is_502_and_closes_the_upstream(
        raw_backend: Any, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture,
        size: int, pieces: bool) -> None:
    """One header larger than the response-head limit, written at once or a kilobyte at a
    time: never relayed (nor held until the read timeout), a 502 instead, and the upstream
    connection is closed before the upstream has finished sending it."""
    outcome: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * size
                + b"\r\nContent-Length: 2\r\n\r\nok")
        sent = 0
        try:
            if pieces:
                for start in range(0, len(head), 1024):
                    writer.write(head[start:start + 1024])
                    sent += 1024
                    await writer.drain()
                    # Backend and proxy share the loop: let Weir read each piece on its own.
                    await asyncio.sleep(0)
            else:
                writer.write(head)
                await writer.drain()
                sent = len(head)
            # Whatever was sent, Weir is to close this connection, not wait for more.
            outcome["eof"] = await asyncio.wait_for(reader.read(), 5) == b""
        except (ConnectionError, TimeoutError) as exc:
            outcome["error"] = exc
        outcome["sent"] = sent
        writer.close()

    port = await raw_backend(handler)
    # A read timeout far beyond the test's: a head held until it lapses fails the test.
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"),
                              upstream={"timeouts": {"read": "60s"}})
    with caplog.at_level(logging.WARNING, logger="weir"):
        # A client that would take the huge head, so that relaying it fails the test below
        # (with the status it got) rather than in the client's reading of it.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port,
                                                       limit=4 * size)
        try:
            writer.write(get())
            response = await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()
        assert response.status == 502, response.body[:200]
        assert b"too big header" in response.body
        assert len(response.body) < 1000  # nothing of the upstream's head is relayed
        assert response.header("x-weir-version") == "stable"
        await wait_for(lambda: "sent" in outcome, timeout=10)
    assert outcome.get("eof") or isinstance(outcome.get("error"), ConnectionError), outcome
    if pieces:
        # Cut off near the limit, not after the whole header went through.
        assert outcome["sent"] < size // 2, outcome
    # Counted and logged like other upstream failures.
    pool = proxy.pools.pools[f"127.0.0.1:{port}"]
    assert pool.failures >= 1
    assert not pool.idle  # the connection is never pooled for the next request
    assert sample(exposition(proxy), "http_requests_total", service="app", version="stable",
                  method="GET", status="502") == 1.0
    assert any("too big header" in record.getMessage() for record in caplog.records)


async def test_response_head_just_under_the_limit_in_pieces_passes(
        raw_backend: Any, start_proxy: StartProxy) -> None:
    """The limit counts the head's bytes, not the body's: a head just under it, sent in small
    pieces, and a large body right behind it in the same writes, pass whole."""
    value = b"v" * (MAX_RESPONSE_HEAD - 200)
    body = b"b" * (3 * MAX_RESPONSE_HEAD)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        data = (b"HTTP/1.1 200 OK\r\nX-Big: " + value
                + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        for start in range(0, len(data), 1000):
            writer.write(data[start:start + 1000])
            await writer.drain()
        await reader.read()
        writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [response] = await exchange(proxy.port, get())
    assert response.status == 200
    assert response.header("x-big") == value.decode()
    assert response.body == body


# --- 9: Transfer-Encoding other than exactly chunked ------------------------------------------


@pytest.mark.parametrize("codings", [
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: gzip,chunked\r\n",
    b"Transfer-Encoding: deflate, chunked\r\n",
    b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: ,chunked\r\n",
], ids=["gzip-chunked", "gzip-chunked-no-space", "deflate-chunked", "two-headers",
        "empty-element"])
async def test_transfer_codings_weir_does_not_relay_get_501(
        start_backend: Any, start_proxy: StartProxy, codings: bytes) -> None:
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    body = b"1f\r\n" + b"\x1f\x8b" + b"z" * 29 + b"\r\n0\r\n\r\n"  # gzip-looking bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: app.test\r\n" + codings + b"\r\n" + body)
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == 501, response
        assert response.header("connection") == "close"
        assert await read_until_closed(reader) == b""  # and the connection is closed
    finally:
        writer.close()
    assert backend.requests == []  # the app never sees the compressed body
    assert sample(exposition(proxy), "weir_unrouted_requests_total", status="501") == 1.0


async def test_501_for_a_pipelined_request_comes_after_the_good_one(
        start_backend: Any, start_proxy: StartProxy) -> None:
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    bad = (b"POST /bad HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\n\r\n")
    responses = await exchange(proxy.port, get("/slow?delay=0.2") + bad, count=2)
    assert [r.status for r in responses] == [200, 501]
    assert responses[1].header("connection") == "close"
    assert backend.requests == []  # /slow does not record its requests; /bad would have


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"CHUNKED  "])
async def test_a_single_chunked_coding_is_relayed(
        start_backend: Any, start_proxy: StartProxy, coding: bytes) -> None:
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    request = (b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: " + coding
               + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    [response] = await exchange(proxy.port, request)
    assert response.status == 200
    assert response.json()["body_size"] == 5


# --- 10: Expect: 100-continue from an HTTP/1.0 client -----------------------------------------


async def test_no_100_continue_for_an_http10_client(
        start_backend: Any, start_proxy: StartProxy) -> None:
    """RFC 9110 10.1.1: a server must not send a 1xx to an HTTP/1.0 client. The client sends
    its body after the head; the first thing it reads must be the final answer."""
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    for keep_alive in (b"", b"Connection: keep-alive\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"PUT /x HTTP/1.0\r\nHost: app.test\r\nContent-Length: 5\r\n"
                         b"Expect: 100-continue\r\n" + keep_alive + b"\r\n")
            await writer.drain()
            writer.write(b"hello")
            response = await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()
        assert response.status == 200, response  # a 100 would have come first
        assert response.json()["body_size"] == 5


# --- 11: Host with a trailing dot -------------------------------------------------------------


async def test_host_with_a_trailing_dot_reaches_its_service(
        start_backend: Any, start_proxy: StartProxy) -> None:
    shop, wild, dotted, other = [await start_backend(n)
                                 for n in ("shop", "wild", "dotted", "other")]
    proxy = await start_proxy([
        {"name": "shop", "match": {"hosts": ["shop.example.com"]},
         "versions": {"v": {"upstreams": [shop.address]}}},
        {"name": "wild", "match": {"hosts": ["*.example.org"]},
         "versions": {"v": {"upstreams": [wild.address]}}},
        # Configured with the dot: the same name, so matched without it too.
        {"name": "dotted", "match": {"hosts": ["api.example.net."]},
         "versions": {"v": {"upstreams": [dotted.address]}}},
        {"name": "other", "versions": {"v": {"upstreams": [other.address]}}},
    ])
    cases = {
        "shop.example.com": "shop",
        "shop.example.com.": "shop",
        "SHOP.Example.COM.": "shop",
        "shop.example.com.:8080": "shop",
        "a.example.org.": "wild",
        "a.example.org.:443": "wild",
        "api.example.net": "dotted",
        "api.example.net.": "dotted",
        "shop.example.com..": "other",  # only one dot is the root's
        "elsewhere.test.": "other",
    }
    for host, backend in cases.items():
        [response] = await exchange(proxy.port, get(host=host))
        assert response.status == 200, host
        assert response.header("x-backend") == backend, host


# --- 14: TRACE --------------------------------------------------------------------------------


async def test_trace_is_refused_with_405_unless_the_service_allows_it(
        start_backend: Any, start_proxy: StartProxy) -> None:
    closed, opened = await start_backend("closed"), await start_backend("opened")
    proxy = await start_proxy([
        {"name": "closed", "match": {"hosts": ["closed.test"]},
         "versions": {"v": {"upstreams": [closed.address]}}},
        {"name": "opened", "match": {"hosts": ["opened.test"]}, "allow_trace": True,
         "versions": {"v": {"upstreams": [opened.address]}}},
    ])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(get("/t", host="closed.test", method="TRACE")
                     + get("/after", host="closed.test"))
        refused = await asyncio.wait_for(read_response(reader), 5)
        # The connection stays usable: the request after it is answered on it.
        after = await asyncio.wait_for(read_response(reader), 5)
    finally:
        writer.close()
    assert refused.status == 405
    allow = refused.header("allow")
    assert allow is not None and "GET" in allow and "TRACE" not in allow
    assert after.status == 200
    assert [r["method"] for r in closed.requests] == ["GET"]  # the TRACE never reached it

    [allowed] = await exchange(proxy.port, get("/t", host="opened.test", method="TRACE"))
    assert allowed.status == 200
    assert [r["method"] for r in opened.requests] == ["TRACE"]


def test_allow_trace_is_a_service_key_off_by_default() -> None:
    config = make_config(one_service("127.0.0.1:9"))
    assert config.services[0].allow_trace is False
    assert Service.model_json_schema()["properties"]["allow_trace"]["default"] is False
    assert make_config(one_service("127.0.0.1:9", allow_trace=True)).services[0].allow_trace
