"""HTTP/2 to upstreams (``protocol: h2c`` and ``h2`` on a version): HTTP/1.1 and HTTP/2
clients reach an HTTP/2 server (tests/h2_backend.py, on the h2 package) through multiplexed,
pooled connections bounded by the server's SETTINGS; trailers pass; a GOAWAY, a slow reader,
a read timeout and a server that does not speak HTTP/2 are handled as the module says.
gRPC through real grpcio servers is in test_grpc.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from ..conftest import exchange, read_response, wait_for
from ..h2_backend import H2Backend, start_h2_backend


@pytest.fixture
async def h2_backend() -> AsyncIterator[Callable[..., Awaitable[H2Backend]]]:
    backends: list[H2Backend] = []

    async def start(name: str, tls: ssl.SSLContext | None = None, **settings: Any) -> H2Backend:
        backend = await start_h2_backend(name, tls, **settings)
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        assert backend.server is not None
        backend.server.close()


def h2_service(*upstreams: str, protocol: str = "h2c", **version: Any) -> list[dict[str, Any]]:
    return [{"name": "app", "versions": {"stable": {"upstreams": list(upstreams),
                                                    "protocol": protocol, **version}}}]


def get(path: str, host: str = "app", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def test_http11_clients_reach_an_h2c_upstream_with_the_request_as_sent(
        h2_backend, start_proxy):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address))
    body = b"y" * 300_000
    request = (b"POST /echo?q=1 HTTP/1.1\r\nHost: app.example\r\nContent-Length: %d\r\n"
               b"X-Custom: Kept\r\nConnection: keep-alive, x-hop\r\nX-Hop: dropped\r\n"
               b"TE: trailers\r\n\r\n" % len(body)) + body
    chunked = (b"PUT /echo HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    answers = await exchange(proxy.port, request + chunked + get("/stream?size=70000"), 3)
    posted, put, streamed = (answer.json() if i < 2 else answer
                             for i, answer in enumerate(answers))
    assert answers[0].status == 200
    assert posted["method"] == "POST" and posted["path"] == "/echo?q=1"
    assert posted["authority"] == "app.example" and posted["scheme"] == "http"
    assert posted["body_size"] == len(body)
    assert posted["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = posted["headers"]
    assert headers["x-custom"] == "Kept"
    assert "x-hop" not in headers and "connection" not in headers and "host" not in headers
    assert headers["te"] == "trailers"  # the one TE HTTP/2 carries, which gRPC needs
    assert headers["x-forwarded-for"] == "127.0.0.1" and headers["via"] == "1.1 weir"
    assert put["method"] == "PUT" and put["body_size"] == 11
    assert put["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    # No content-length from the upstream: chunked to the HTTP/1.1 client, whole.
    assert streamed.status == 200 and streamed.header("transfer-encoding") == "chunked"
    assert streamed.body == b"x" * 70000
    assert backend.connections == 1  # one pooled connection carried all three


async def test_http2_clients_get_trailers_and_share_few_upstream_connections(
        h2_backend, start_proxy, h2_client):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address))
    client = await h2_client(proxy.port)
    trailed = await client.request("/trailers")
    assert trailed.status == 200 and json.loads(trailed.body)["path"] == "/trailers"
    assert trailed.trailers == {b"x-trailer-one": b"1", b"grpc-status": b"0"}
    answers = await asyncio.gather(*(client.request(f"/slow?ms=50&n={i}") for i in range(40)))
    assert all(answer.status == 200 for answer in answers)
    assert sorted(json.loads(a.body)["path"] for a in answers) == sorted(
        f"/slow?ms=50&n={i}" for i in range(40))
    assert backend.max_open > 1  # multiplexed, not one at a time
    assert backend.connections == 1


async def test_the_upstreams_stream_limit_bounds_each_connection(h2_backend, start_proxy):
    backend = await h2_backend("stable", max_streams=5)
    proxy = await start_proxy(h2_service(backend.address))
    answers = await asyncio.gather(*(exchange(proxy.port, get(f"/slow?ms=100&n={i}"))
                                     for i in range(20)))
    assert [a[0].status for a in answers] == [200] * 20
    assert backend.max_open <= 5 * backend.connections
    assert 1 < backend.connections <= 4  # 20 at once, 5 a connection


async def test_a_goaway_lets_the_named_streams_finish_and_the_rest_go_to_a_new_connection(
        h2_backend, start_proxy):
    backend = await h2_backend("stable", goaway_after=3)
    proxy = await start_proxy(h2_service(backend.address))
    for i in range(10):
        (answer,) = await exchange(proxy.port, get(f"/echo?n={i}"))
        assert answer.status == 200, answer.body
    answers = await asyncio.gather(*(exchange(proxy.port, get(f"/slow?ms=30&m={i}"))
                                     for i in range(12)))
    assert [a[0].status for a in answers] == [200] * 12
    assert backend.connections >= 4


async def test_a_slow_reader_stalls_only_its_own_stream(h2_backend, start_proxy):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(get("/stream?size=30000000"))  # 30 MB, and nobody reads it
        await writer.drain()
        await wait_for(lambda: len(backend.requests) == 1)
        for i in range(5):
            (answer,) = await exchange(proxy.port, get(f"/echo?other={i}"))
            assert answer.status == 200
        assert backend.connections == 1  # the same connection carried the others
        pools = list(proxy.pools.pools.values())
        stream = next(iter(pools[0].connections[0].streams.values()))
        # The slow reader's stream is not being acknowledged: the upstream holds the rest.
        await wait_for(lambda: stream.paused and stream.unacked > 0)
        # The reader catches up: the whole answer arrives.
        answer = await asyncio.wait_for(read_response(reader), 30)
        assert len(answer.body) == 30_000_000
    finally:
        writer.close()


async def test_a_stream_that_times_out_gets_504_and_the_connection_serves_on(
        h2_backend, start_proxy):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address),
                              upstream={"timeouts": {"read": 0.3}})
    slow, fast = await asyncio.gather(exchange(proxy.port, get("/slow?ms=2000")),
                                      exchange(proxy.port, get("/echo")))
    assert slow[0].status == 504
    assert fast[0].status == 200
    (again,) = await exchange(proxy.port, get("/echo"))
    assert again.status == 200
    assert backend.connections == 1


async def test_an_upgrade_to_an_h2_version_is_refused_with_a_reason(h2_backend, start_proxy):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address))
    (answer,) = await exchange(proxy.port, get(
        "/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"))
    assert answer.status == 502
    assert b"HTTP/2" in answer.body and b"WebSocket" in answer.body


async def test_an_upstream_that_does_not_speak_http2_gets_a_502_that_says_so(
        start_backend, start_proxy, caplog):
    plain = await start_backend("plain")  # aiohttp: HTTP/1.1 only
    proxy = await start_proxy(h2_service(plain.address))
    with caplog.at_level(logging.WARNING):
        (answer,) = await exchange(proxy.port, get("/echo"))
    assert answer.status == 502
    assert b"does not speak HTTP/2" in answer.body


async def test_status_answers_and_heads_pass(h2_backend, start_proxy):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address))
    (missing,) = await exchange(proxy.port, get("/status?code=404"))
    assert missing.status == 404 and missing.body == b"status 404\n"
    (head,) = await exchange(proxy.port, b"HEAD /echo HTTP/1.1\r\nHost: app\r\n\r\n",
                             head_request=True)
    assert head.status == 200 and head.body == b""
    (after,) = await exchange(proxy.port, get("/echo"))
    assert after.status == 200


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_h2_over_tls_offers_only_h2_and_verifies_the_certificate(
        h2_backend, start_proxy, ca: trustme.CA, tmp_path: Path):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    server.set_alpn_protocols(["h2"])
    backend = await h2_backend("secure", tls=server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = await start_proxy(h2_service(
        f"localhost:{backend.port}", protocol="h2", tls={"ca_file": str(ca_file)}))
    (answer,) = await exchange(proxy.port, get("/echo"))
    assert answer.status == 200
    assert answer.json()["scheme"] == "https"
    # Without the private CA the certificate is refused: a 502, not a request sent.
    strict = await start_proxy(h2_service(f"localhost:{backend.port}", protocol="h2"))
    (refused,) = await exchange(strict.port, get("/echo"))
    assert refused.status == 502 and b"certificate" in refused.body
    assert len(backend.requests) == 1


async def test_health_checks_speak_http2_to_an_h2c_upstream(h2_backend, start_proxy):
    up = await h2_backend("up")
    down = await h2_backend("down")
    check = {"interval": 0.1, "timeout": 1, "unhealthy_threshold": 2, "healthy_threshold": 1}
    proxy = await start_proxy([{
        "name": "app",
        "versions": {
            "stable": {"upstreams": [up.address], "protocol": "h2c",
                       "health_check": {**check, "path": "/echo?probe=1"}},
            "canary": {"upstreams": [down.address], "protocol": "h2c",
                       "health_check": {**check, "path": "/status?code=503"}}},
        "weights": {"stable": 50, "canary": 50}}])
    health = proxy.health
    await wait_for(lambda: not health.state(f"h2c://{down.address}").healthy)
    assert health.state(f"h2c://{up.address}").healthy
    probes = [r for r in up.requests if r["path"] == "/echo?probe=1"]
    assert probes and probes[0]["headers"]["user-agent"] == "weir-health-check"
    assert probes[0]["authority"] == up.address


async def test_grpc_health_checks_follow_the_servers_serving_status(start_proxy):
    import grpc
    from grpc import aio

    serving = {"": b"\x08\x01"}  # HealthCheckResponse{status: SERVING}

    async def check(request: bytes, context: Any) -> bytes:
        asked = request[2:].decode() if request else ""
        return serving.get(asked, b"\x08\x02")  # NOT_SERVING for a service not known

    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        key = f"h2c://127.0.0.1:{port}"
        proxy = await start_proxy([{"name": "app", "versions": {"stable": {
            "upstreams": [f"127.0.0.1:{port}"], "protocol": "h2c",
            "health_check": {"grpc": {"service": "payments"}, "interval": 0.1,
                             "unhealthy_threshold": 1, "healthy_threshold": 1}}}}])
        state = proxy.health.state(key)
        await wait_for(lambda: not state.healthy)  # "payments" is not SERVING
        serving["payments"] = b"\x08\x01"
        await wait_for(lambda: state.healthy)
        assert state.checks["success"] >= 1 and state.checks["failure"] >= 1
    finally:
        await server.stop(None)


def test_grpc_health_checks_need_an_http2_version() -> None:
    from proxy.config.loader import parse_config
    from proxy.config.model import ConfigError

    with pytest.raises(ConfigError, match="needs upstreams that speak HTTP/2"):
        parse_config({"services": [{"name": "app", "health_check": {"grpc": {}},
                                    "versions": {"stable": {"upstreams": ["127.0.0.1:1"]}}}]})


async def test_a_drained_pool_says_goaway_lets_streams_finish_then_closes(
        h2_backend, start_proxy):
    backend = await h2_backend("stable")
    proxy = await start_proxy(h2_service(backend.address))
    pool = next(iter(proxy.pools.pools.values()))
    slow = asyncio.ensure_future(exchange(proxy.port, get("/slow?ms=400")))
    await wait_for(lambda: len(backend.requests) == 1)
    (conn,) = pool.connections
    pool.close_idle()  # what a drain does: GOAWAY, no new streams on it
    assert conn.closing and not conn.closed
    (answer,) = await slow
    assert answer.status == 200  # the stream in flight finished
    await wait_for(lambda: conn.closed)  # and then the connection closed
    (after,) = await exchange(proxy.port, get("/echo"))
    assert after.status == 200 and backend.connections == 2  # a new one for what follows
