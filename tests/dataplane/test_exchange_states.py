"""The explicit states of an exchange (exchange.py), driven through the real Http1Connection
and UpstreamConnection over in-memory transports, as bench/hotpath.py drives them: each step
is one read on one side, and what the client received is checked along with the state."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config.loader import parse_config
from proxy.dataplane.exchange import AWAITING, DONE, FINISHED, SENDING, TUNNEL
from proxy.dataplane.proxyserver import ProxyServer
from proxy.dataplane.upstream import UpstreamConnection


class MemoryTransport:
    """Just enough of asyncio.Transport; keeps what is written."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.data = bytearray()
        self.closed = False
        self.sock = sock  # polled before a POST goes out on a pooled connection

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.data += part

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        return ("127.0.0.1", 40000) if name == "peername" else default

    def take(self) -> bytes:
        data, self.data = bytes(self.data), bytearray()
        return data


class Rig:
    """One client connection and one pooled upstream connection, both in memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        config = parse_config({
            "listen": "127.0.0.1:0",
            "limits": {"max_body_bytes": 1000},
            "services": [{"name": "app",
                          "versions": {"stable": {"upstreams": ["127.0.0.1:9"]}}}],
        })
        self.proxy = ProxyServer(config, loop)
        pool = next(iter(self.proxy.pools.pools.values()))
        self.corker = pool.corker
        self.upstream = UpstreamConnection(pool)
        # A connected pair with nothing to read: what a live pooled connection looks like.
        self.sockets = socket.socketpair()
        self.upstream_side = MemoryTransport(self.sockets[0])
        self.upstream.connection_made(self.upstream_side)  # type: ignore[arg-type]
        pool.release(self.upstream)
        self.client = self.proxy.protocol()
        self.client_side = MemoryTransport()
        self.client.connection_made(self.client_side)  # type: ignore[arg-type]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def from_client(self, data: bytes) -> None:
        self.client.data_received(data)
        self.corker.flush()  # what the loop does at the end of the iteration

    def from_upstream(self, data: bytes) -> None:
        self.upstream.data_received(data)
        self.corker.flush()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    made = Rig(asyncio.get_running_loop())
    yield made
    made.close()


async def test_a_response_goes_from_awaiting_through_sending_to_finished(rig: Rig) -> None:
    rig.from_client(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.client.active
    assert ex is not None and ex.response == AWAITING and ex.request_complete
    assert rig.upstream_side.take().startswith(b"GET /a HTTP/1.1\r\n")
    rig.from_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert ex.response == SENDING  # the head and the first bytes went out with the read
    assert rig.client_side.take().endswith(b"\r\n\r\nhello")
    rig.from_upstream(b"world")
    assert ex.response == FINISHED and rig.client.active is None
    assert rig.client_side.take() == b"world"
    assert not rig.client_side.closed  # kept alive for the next request


async def test_an_early_response_waits_for_the_rest_of_its_request(rig: Rig) -> None:
    """The upstream answers before the body is all in: the response is DONE, and the exchange
    finishes only once the request is complete, so the next request is read in turn."""
    rig.from_client(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
    ex = rig.client.active
    assert ex is not None and not ex.request_complete
    rig.from_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert ex.response == DONE and rig.client.active is ex
    assert rig.client_side.take().endswith(b"\r\n\r\nok")
    rig.from_client(b"def")
    assert ex.response == FINISHED and ex.request_complete and rig.client.active is None
    assert not rig.client_side.closed


async def test_a_head_broken_in_its_own_read_is_replaced_by_a_502(rig: Rig) -> None:
    """Held, not sent: a response whose head arrives with a broken body in the same read
    never reached the client, which gets Weir's 502 instead of half a response."""
    rig.from_client(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.client.active
    assert ex is not None
    rig.from_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert ex.response == FINISHED
    answer = rig.client_side.take()
    assert answer.startswith(b"HTTP/1.1 502 ") and b"200 OK" not in answer


async def test_a_switch_of_protocols_is_a_tunnel_until_a_side_closes(rig: Rig) -> None:
    rig.from_client(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n")
    ex = rig.client.active
    assert ex is not None
    rig.from_upstream(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n")
    assert ex.response == TUNNEL and rig.client.tunnel is ex
    assert rig.client_side.take().startswith(b"HTTP/1.1 101 ")
    rig.from_client(b"\x81\x02hi")
    assert rig.upstream_side.take().endswith(b"\x81\x02hi")  # raw, not parsed as HTTP
    rig.upstream.connection_lost(None)
    rig.corker.flush()
    assert rig.client_side.closed


async def test_a_client_that_leaves_before_any_answer_is_counted_as_499(rig: Rig) -> None:
    rig.from_client(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    ex = rig.client.active
    assert ex is not None and ex.response == AWAITING
    rig.client.connection_lost(None)
    assert ex.response == FINISHED and ex.upstream is None
    target = ex.target
    assert target is not None
    assert target.stats.requests == {(b"GET", 499): 1}
