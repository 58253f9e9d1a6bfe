"""HTTP/1.1 behaviour of the data plane, over real loopback sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import websockets

from ..conftest import exchange, one_service, read_response, read_until_closed, wait_for


def get(path: str = "/", host: str = "app.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def test_proxies_and_labels_version(start_backend, start_proxy):
    backend = await start_backend("b1")
    proxy = await start_proxy(one_service(backend.address))
    [response] = await exchange(proxy.port, get("/hello?x=1"))
    assert response.status == 200
    assert response.header("x-weir-version") == "stable"
    assert response.header("via") == "1.1 weir"
    assert response.json()["path"] == "/hello?x=1"
    assert response.json()["headers"]["host"] == "app.test"


async def test_version_header_can_be_turned_off(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), version_header=False)
    [response] = await exchange(proxy.port, get())
    assert response.status == 200
    assert response.header("x-weir-version") is None


async def test_client_keep_alive_and_pooled_upstream(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    responses = await exchange(proxy.port, get("/a") + get("/b") + get("/c"), count=3)
    assert [r.json()["path"] for r in responses] == ["/a", "/b", "/c"]
    # Sequential requests over one client connection reuse one upstream connection.
    for _ in range(5):
        await exchange(proxy.port, get("/again"))
    assert len(backend.peers) == 1


async def test_idle_upstream_connections_are_closed(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address),
                              upstream={"idle_timeout": "200ms"})
    await exchange(proxy.port, get())
    pool = proxy.pools.pools[backend.address]
    assert len(pool.idle) == 1
    await wait_for(lambda: not pool.idle, timeout=3)
    await exchange(proxy.port, get())
    assert len(backend.peers) == 2  # a fresh connection after the idle one was closed


async def test_stale_pooled_connection_is_retried_for_idempotent(raw_backend, start_proxy):
    """An upstream that drops a kept-alive connection on its second request (the classic
    keep-alive race): GET is retried on a fresh connection, POST is not."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # a second request on this connection...
        writer.close()  # ...is dropped unanswered

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [first] = await exchange(proxy.port, get())
    assert first.status == 200
    [second] = await exchange(proxy.port, get())
    assert second.status == 200 and second.body == b"ok"
    assert connections == 2
    [post] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert post.status == 502


async def test_chunked_request_and_response(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    request = (b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    [response] = await exchange(proxy.port, request)
    assert response.json()["body_size"] == 11
    [streamed] = await exchange(proxy.port, get("/stream?size=300000"))
    assert streamed.header("transfer-encoding") == "chunked"
    assert len(streamed.body) == 300000
    [sized] = await exchange(proxy.port, get("/stream?size=70000&length=1"))
    assert sized.header("content-length") == "70000" and len(sized.body) == 70000


async def test_head_204_304_have_no_body_and_connection_stays_usable(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"HEAD /stream?size=5000&length=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await asyncio.wait_for(read_response(reader, head_request=True), 5)
        assert head.status == 200 and head.header("content-length") == "5000"
        for status in (204, 304):
            writer.write(get(f"/?status={status}"))
            response = await asyncio.wait_for(read_response(reader), 5)
            assert response.status == status and response.body == b""
        writer.write(get("/after"))
        after = await asyncio.wait_for(read_response(reader), 5)
        assert after.json()["path"] == "/after"
    finally:
        writer.close()
    # The upstream connection that answered HEAD was reused, not poisoned.
    assert len(backend.peers) == 1


async def test_expect_100_continue(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"max_body_bytes": 1000})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == 200 and response.json()["body_size"] == 5
        assert "expect" not in response.json()["headers"]
    finally:
        writer.close()
    # Too large: refused before the client sends the body.
    [refused] = await exchange(proxy.port, b"PUT /x HTTP/1.1\r\nHost: a\r\n"
                               b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    assert refused.status == 413


async def test_hop_by_hop_headers_removed(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    [response] = await exchange(proxy.port, get(extra=(
        "Connection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\n"
        "TE: trailers\r\nProxy-Authorization: Basic eA==\r\nX-Normal: ok\r\n")))
    seen = response.json()["headers"]
    for name in ("x-private", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-normal"] == "ok"
    [hop] = await exchange(proxy.port, get("/hop"))
    assert hop.header("x-secret") is None and hop.header("keep-alive") is None
    assert hop.header("x-kept") == "yes"


async def test_forwarding_headers_untrusted_client(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    [response] = await exchange(proxy.port, get(extra=(
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n")))
    seen = response.json()["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "app.test"
    assert seen["via"] == "1.1 weir"


async def test_forwarding_headers_trusted_proxy(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), trusted_proxies=["127.0.0.0/8"])
    [response] = await exchange(proxy.port, get(extra=(
        "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
        "X-Forwarded-Host: shop.example.com\r\n")))
    seen = response.json()["headers"]
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "shop.example.com"


async def test_websocket_is_tunnelled_to_chosen_version(start_backend, start_proxy):
    stable = await start_backend("stable")
    canary = await start_backend("canary")
    proxy = await start_proxy([{
        "name": "app",
        "versions": {"stable": {"upstreams": [stable.address]},
                     "canary": {"upstreams": [canary.address]}},
        "weights": {"stable": 100, "canary": 0},
        "rules": [{"match": {"headers": {"x-beta": "1"}}, "version": "canary"}],
    }])
    uri = f"ws://127.0.0.1:{proxy.port}/ws"
    async with websockets.connect(uri, additional_headers={"x-beta": "1"}) as ws:
        assert ws.response.headers["x-weir-version"] == "canary"
        for i in range(3):
            await ws.send(f"hi{i}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"canary:hi{i}"
        payload = bytes(range(256)) * 1000
        await ws.send(payload)
        assert await asyncio.wait_for(ws.recv(), 5) == payload
    async with websockets.connect(uri) as ws:
        await ws.send("x")
        assert await asyncio.wait_for(ws.recv(), 5) == "stable:x"


async def test_refused_upgrade_does_not_pool_the_upstream_connection(raw_backend, start_proxy):
    """Regression, found by tests/test_fuzz.py: after an Upgrade request answered with a 200
    the upstream connection went back to the pool, but a server may already read what follows
    as the new protocol (aiohttp takes it as the request's body until EOF): the next request
    pooled onto it got no answer, and a 504 at the read timeout."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                if b"upgrade:" in head.lower():
                    await reader.read()  # "the new protocol" from here on: never answered
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"),
                              upstream={"timeouts": {"read": "1s"}})
    [refused] = await exchange(proxy.port, get(extra="Connection: upgrade\r\n"
                                                     "Upgrade: websocket\r\n"))
    assert refused.status == 200 and refused.header("connection") == "close"
    [after] = await exchange(proxy.port, get("/after"))
    assert after.status == 200 and after.body == b"ok"
    assert connections == 2

@pytest.mark.parametrize("request_bytes", [
    # Content-Length and Transfer-Encoding together: the classic CL.TE smuggling shape.
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    # Two different lengths.
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    # Duplicate identical lengths are still ambiguous to some servers.
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    # Not a number.
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    # A chunk size that is not hex.
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    # Transfer-Encoding that does not end in chunked.
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    # Obsolete line folding and whitespace before the colon.
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    # Two Host headers, and none at all in HTTP/1.1.
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    # Garbage.
    b"\x00\x01\x02 nonsense\r\n\r\n",
])
async def test_malformed_and_smuggling_requests_get_400(start_backend, start_proxy,
                                                        request_bytes):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request_bytes)
    data = await read_until_closed(reader)  # 400, then the proxy closes the connection
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 "), data[:80]
    assert backend.requests == []


async def test_oversized_headers_get_431(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"max_header_bytes": 4096})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
    data = await read_until_closed(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431 ")
    # Under the limit still works.
    [ok] = await exchange(proxy.port, get(extra="X-Small: " + "a" * 1000 + "\r\n"))
    assert ok.status == 200


async def test_413_reaches_a_client_that_is_still_sending(start_backend, start_proxy):
    """Closing at once with the client's bytes unread makes the kernel reset the connection,
    and the client can lose the 413 before reading it: Weir ends its side after the answer
    and reads on (lingering close) instead."""
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"max_body_bytes": "1KiB"})
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
        answer = asyncio.ensure_future(reader.read())  # all of it, up to Weir's FIN
        sent = 0
        try:
            while not answer.done() and sent < 8_000_000:
                writer.write(b"x" * 65536)
                sent += 65536
                await writer.drain()
        except ConnectionError:
            pass
        data = await asyncio.wait_for(answer, 10)
        assert data.startswith(b"HTTP/1.1 413 "), data[:80]
        assert data.endswith(b"bytes\n") or b"larger than 1024 bytes" in data
        writer.close()
    # Each connection is closed once its client closes, not held for the linger time.
    await wait_for(lambda: not proxy.connections, timeout=5)
    assert backend.requests == []


async def test_body_over_limit_gets_413(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"max_body_bytes": "1KiB"})
    [sized] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000"
                             b"\r\n\r\n" + b"x" * 2000)
    assert sized.status == 413
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    [chunked] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n")
    assert chunked.status == 413
    [fits] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1024"
                            b"\r\n\r\n" + b"z" * 1024)
    assert fits.status == 200 and fits.json()["body_size"] == 1024


async def test_pipelined_request_over_body_limit_is_answered_in_turn(start_backend,
                                                                     start_proxy):
    """Regression: a request queued behind a slow one, whose chunked body went over
    max_body_bytes, got its 413 written at once, ahead of the first request's response (so
    the client took it as that response), and its next chunk reset the connection, losing
    the first response altogether."""
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"max_body_bytes": "1KiB"})
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    first, second, third = await exchange(
        proxy.port,
        get("/slow?delay=0.3")
        + b"POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk * 3 + b"0\r\n\r\n"
        + get("/after"), count=3)
    assert first.status == 200 and first.body == b"slow done"
    assert second.status == 413
    assert third.status == 200 and third.json()["path"] == "/after"
    assert [r["path"] for r in backend.requests] == ["/after"]  # /slow is not echoed

async def test_unknown_host_without_catch_all_is_404(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address, match={"hosts": ["shop.test"]}))
    [miss] = await exchange(proxy.port, get(host="other.test"))
    assert miss.status == 404
    [hit] = await exchange(proxy.port, get(host="shop.test:8080"))
    assert hit.status == 200


async def test_upstream_refused_is_502(start_proxy, unused_tcp_port):
    proxy = await start_proxy(one_service(f"127.0.0.1:{unused_tcp_port}"))
    [response] = await exchange(proxy.port, get())
    assert response.status == 502
    assert response.header("x-weir-version") == "stable"


async def test_upstream_read_timeout_is_504(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address),
                              upstream={"timeouts": {"read": "300ms"}})
    started = asyncio.get_running_loop().time()
    [response] = await exchange(proxy.port, get("/slow?delay=3"))
    assert response.status == 504
    assert asyncio.get_running_loop().time() - started < 2
    [fast] = await exchange(proxy.port, get("/slow?delay=0.01"))
    assert fast.status == 200


async def test_upstream_connect_timeout_is_504(start_proxy):
    # A listener whose accept queue is full drops new SYNs: connects hang like a dead host.
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(0)
    port = blocker.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        proxy = await start_proxy(one_service(f"127.0.0.1:{port}"),
                                  upstream={"timeouts": {"connect": "300ms"}})
        [response] = await exchange(proxy.port, get())
        assert response.status == 504
    finally:
        for s in fillers:
            s.close()
        blocker.close()


async def test_slow_header_client_is_cut_off(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"header_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    started = asyncio.get_running_loop().time()
    data = await read_until_closed(reader, timeout=3)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ")
    assert asyncio.get_running_loop().time() - started < 2


async def test_idle_client_connection_is_closed(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"idle_timeout": "200ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(get())
    first = await asyncio.wait_for(read_response(reader), 5)
    assert first.status == 200
    assert await read_until_closed(reader, timeout=3) == b""
    writer.close()


async def test_http10_client(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /stream?size=1000 HTTP/1.0\r\n\r\n")
    data = await read_until_closed(reader)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"transfer-encoding" not in head.lower()  # HTTP/1.0 gets a close-delimited body
    assert len(body) == 1000
    [kept] = await exchange(proxy.port, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert kept.header("connection") == "keep-alive"


async def test_response_delimited_by_close_is_rechunked(raw_backend, start_proxy):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close body")
        await writer.drain()
        writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [first, second] = await exchange(proxy.port, get() + get(), count=2)
    assert first.header("transfer-encoding") == "chunked"
    assert first.body == second.body == b"until-close body"


async def test_broken_body_after_the_whole_answer_closes_the_connection(start_backend,
                                                                        start_proxy):
    """The upstream answered in full without reading the body; then the body turns out
    malformed (a bad chunk size). That request can never complete: Weir must close, not
    wait for it (randomised fuzzing found the connection held open for good)."""
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /stream?size=5000&length=1 HTTP/1.1\r\nHost: app.test\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    response = await asyncio.wait_for(read_response(reader), 5)
    assert (response.status, len(response.body)) == (200, 5000)
    writer.write(b"zz\r\nhello\r\n0\r\n\r\n")
    assert await read_until_closed(reader) == b""  # closed, with no answer after the 200
    writer.close()


async def test_broken_body_during_the_answer_lets_it_finish_then_closes(raw_backend,
                                                                        start_proxy):
    finish = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await finish.wait()
        writer.write(b"world")
        await reader.read()  # until Weir closes its side: it must not reuse this one
        writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked"
                 b"\r\n\r\n5\r\nfirst\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(5) == b"hello"
    writer.write(b"zz\r\n")  # the body breaks while the answer is in progress
    await asyncio.sleep(0)  # (no wait on timing: the order below holds either way)
    finish.set()
    async with asyncio.timeout(5):
        assert await reader.readexactly(5) == b"world"
    assert await read_until_closed(reader) == b""
    writer.close()


async def test_response_broken_in_the_read_that_brought_its_head_becomes_502(raw_backend,
                                                                             start_proxy):
    """Found by tests/test_fuzz_upstream.py: a head and a broken chunk in one read. The head
    was held to go out with the body, and the failure dropped it, so the client got a close
    and no answer at all; nothing had reached it, so it gets a 502."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [response] = await exchange(proxy.port, get())
    assert response.status == 502


async def test_truncated_upstream_response_is_not_passed_off_as_whole(raw_backend, start_proxy):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
        await writer.drain()
        writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(get())
    data = await read_until_closed(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"only-part")


async def test_endless_upstream_response_head_is_cut_off_with_502(raw_backend, start_proxy):
    """A response head is held whole until it ends, so an upstream that never ends it must
    not make Weir hold more and more of it."""
    sent = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        try:
            while sent < 4 * 1024 * 1024:
                line = b"x-filler-%d: %s\r\n" % (sent, b"y" * 1000)
                writer.write(line)
                sent += len(line)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [response] = await exchange(proxy.port, get())
    assert response.status == 502
    assert b"over 32 KiB" in response.body


async def test_large_response_head_under_the_limit_passes(raw_backend, start_proxy):
    cookies = b"".join(b"set-cookie: c%d=%s\r\n" % (i, b"v" * 900) for i in range(20))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"z" * 300_000
        writer.write(b"HTTP/1.1 200 OK\r\n" + cookies + b"Content-Length: %d\r\n\r\n" % len(body)
                     + body)
        await writer.drain()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [response] = await exchange(proxy.port, get())
    assert response.status == 200
    assert len(response.body) == 300_000
    assert sum(1 for name, _ in response.headers if name.lower() == "set-cookie") == 20


async def test_malformed_request_pipelined_behind_a_good_one_is_answered_in_turn(
        start_backend, start_proxy):
    # The good request is waiting on a slow upstream when the bad one arrives: it still gets
    # its answer, and the 400 follows it before the connection closes.
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    responses = await exchange(proxy.port, get("/slow?delay=0.3") + b"NOT A REQUEST\r\n\r\n",
                               count=2)
    assert [r.status for r in responses] == [200, 400]
    assert responses[0].body == b"slow done"
    assert responses[1].header("connection") == "close"


async def test_pipelined_requests_answered_in_order(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    requests = b"".join(
        b"POST /p%d HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" % i for i in range(5))
    responses = await exchange(proxy.port, requests + get("/last"), count=6)
    assert [r.json()["path"] for r in responses] == [f"/p{i}" for i in range(5)] + ["/last"]
    assert all(r.json()["body_size"] == 3 for r in responses[:5])


async def test_invalid_upstream_response_is_502(raw_backend, start_proxy):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [response] = await exchange(proxy.port, get())
    assert response.status == 502


async def test_weirs_own_answers_to_head_have_no_body(raw_backend, start_proxy):
    """Regression, found by tests/test_fuzz_upstream.py: Weir's own answers (a 502 for an
    invalid upstream response, a 404 for no route) to HEAD carried their text body. A client
    reads no body after a response to HEAD (RFC 9110 9.3.2), so on a kept-alive connection it
    took that text for the start of the next response."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}", match={"hosts": ["app.test"]}))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for host, status in (("app.test", 502), ("nowhere.test", 404)):
            writer.write(f"HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(read_response(reader, head_request=True), 5)
            assert head.status == status and int(head.header("content-length") or 0) > 0
        writer.write(get("/after", host="nowhere.test"))
        after = await asyncio.wait_for(read_response(reader), 5)
        assert after.status == 404 and after.body.startswith(b"404 Not Found")
    finally:
        writer.close()


async def invalid_answer_is_502_and_its_connection_not_reused(raw_backend: Any,
                                                              start_proxy: Any,
                                                              invalid: bytes) -> None:
    """The upstream answers GET /invalid with ``invalid`` and anything else with 200 ok: the
    client gets a 502, and its next request is answered on a new upstream connection."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(invalid if b"/invalid" in head else
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()
        finally:
            writer.close()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(get("/invalid"))
        response = await asyncio.wait_for(read_response(reader), 5)
        assert response.status == 502
        writer.write(get("/after"))
        after = await asyncio.wait_for(read_response(reader), 5)
        assert (after.status, after.body) == (200, b"ok") and connections == 2
    finally:
        writer.close()


@pytest.mark.parametrize("switch", [
    b"HTTP/1.1 101 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    b"raw bytes of another protocol",
])
async def test_101_for_a_request_without_upgrade_is_502(raw_backend, start_proxy, switch):
    """Regression, found by tests/test_fuzz_upstream.py: a 101 answering a request that asked
    for no upgrade was relayed and the client connection became a raw tunnel to the upstream
    (what the client sent next bypassed Weir). A server must not switch to a protocol the
    client did not ask for (RFC 9110 7.8, 15.2.2): the response is invalid, a 502, and the
    upstream connection is not reused."""
    await invalid_answer_is_502_and_its_connection_not_reused(raw_backend, start_proxy,
                                                              switch)


def first_answer_then_good(first: bytes) -> tuple[Any, list[int]]:
    """An upstream handler that answers the first request it gets, on any connection, with
    ``first`` and every later one with 200 good; and the count of its answers so far."""
    answers = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answers[0] += 1
                writer.write(first if answers[0] == 1 else
                             b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handler, answers


GHOSTS = [
    # The start of a response nobody asked for, after the end of one: pooled, the connection
    # read the next response's status line and headers as the rest of this head.
    b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nX-Rest: ",
    # A whole head with a length and no body: the next response became its body.
    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
    # A whole response without a body: the answer to the next request.
    b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("ghost", GHOSTS)
async def test_bytes_after_a_response_never_answer_the_next_request(raw_backend, start_proxy,
                                                                   ghost, pipelined):
    """Regression, found by tests/test_fuzz_upstream.py: an upstream that sent a response and,
    in the same read, the start of another one (a backend bug, or a header injection that
    splits a response) had its connection pooled, and the next request, from any client, got
    that other response (a 302 to anywhere) or its own answer mangled. Pipelined requests took
    the connection during that same read and got it too."""
    handler, _ = first_answer_then_good(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                        + ghost)
    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    if pipelined:
        responses = await exchange(proxy.port, get("/1") + get("/2"), count=2)
    else:
        responses = [*await exchange(proxy.port, get("/1")),
                     *await exchange(proxy.port, get("/2"))]
    assert [(r.status, r.body) for r in responses] == [(200, b"ok"), (200, b"good")]


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
async def test_status_code_outside_100_to_599_is_502(raw_backend, start_proxy, status):
    """Regression, found by tests/test_fuzz_upstream.py: llhttp takes any three digits, and
    Weir relayed them, writing ``HTTP/1.1 0 Unknown`` (not three digits) for 000. Codes outside
    100..599 are invalid (RFC 9110 15): a 502, and the connection is not reused."""
    await invalid_answer_is_502_and_its_connection_not_reused(
        raw_backend, start_proxy, b"HTTP/1.1 " + status + b" X\r\nContent-Length: 2\r\n\r\nok")


async def test_trailers_do_not_reach_the_next_response(raw_backend, start_proxy):
    """Regression, found by tests/test_fuzz_upstream.py: the trailer fields of a chunked
    response were added to the connection's list of header lines after the head had gone, and
    the next response on that pooled connection, to any client, went out with them."""
    handler, answers = first_answer_then_good(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nSet-Cookie: session=of-the-first\r\n\r\n")
    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    [first] = await exchange(proxy.port, get())
    [second] = await exchange(proxy.port, get())
    assert (first.status, first.body, second.status, second.body) == (200, b"ok", 200, b"good")
    assert first.header("set-cookie") is None and second.header("set-cookie") is None
    assert answers == [2]


async def test_aiohttp_client_through_proxy(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            async with session.post(f"http://127.0.0.1:{proxy.port}/n{i}",
                                    data=b"q" * (i * 1000)) as response:
                assert response.status == 200
                assert (await response.json())["body_size"] == i * 1000


async def test_absolute_form_target_sets_host_and_goes_out_in_origin_form(start_backend,
                                                                           start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address, match={"hosts": ["shop.test"]}))
    [response] = await exchange(proxy.port, b"GET http://shop.test/cart?id=1 HTTP/1.1\r\n"
                                b"Host: ignored.test\r\n\r\n")
    assert response.status == 200
    assert response.json()["path"] == "/cart?id=1"
    assert response.json()["headers"]["host"] == "shop.test"


async def test_service_timeouts_override_the_global_ones(start_backend, start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address, timeouts={"read": "300ms"}),
                              upstream={"timeouts": {"read": "60s"}})
    started = asyncio.get_running_loop().time()
    [response] = await exchange(proxy.port, get("/slow?delay=3"))
    assert response.status == 504
    assert asyncio.get_running_loop().time() - started < 2


def test_header_names_lowered_from_a_bounded_table() -> None:
    # Clients choose header names: a flood of new ones must not grow the table without end.
    from proxy.dataplane import http11

    assert http11.lowered(b"Content-LENGTH") == b"content-length"
    for i in range(3000):
        assert http11.lowered(b"X-Junk-%d" % i) == b"x-junk-%d" % i
    long_name = b"X-" + b"A" * 200
    assert http11.lowered(long_name) == long_name.lower()
    assert long_name not in http11._LOWERED
    assert len(http11._LOWERED) <= http11._LOWERED_MAX_ENTRIES


def test_names_taken_without_lowering_are_what_lowering_would_give() -> None:
    # The data plane compares Host, Content-Length and Connection as sent before it lowers a
    # name, and acts on what it knows of them: Content-Length is noted and passed on,
    # Connection noted and rewritten, Host passed on.
    from proxy.dataplane import http11

    for spelling, known in ((b"Host", http11.HOST), (b"Content-Length", http11.CONTENT_LENGTH),
                            (b"Connection", http11.CONNECTION)):
        assert http11.lowered(spelling) is known
    assert http11.CONTENT_LENGTH in http11.RESPONSE_NOTED
    assert http11.CONTENT_LENGTH not in http11.RESPONSE_REWRITTEN
    assert http11.CONNECTION in http11.RESPONSE_NOTED
    assert http11.CONNECTION in http11.RESPONSE_REWRITTEN
    assert http11.HOST not in http11.REQUEST_REWRITTEN
