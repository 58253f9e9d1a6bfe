"""Writes held to the end of the loop iteration (proxy/dataplane/corking.py): on real
loopback sockets, what is held reaches the peer whole and in order, before whatever ends the
stream; and through the proxy, an answer finished in the same iteration as a FIN is not
lost."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.dataplane.corking import JOIN_BYTES, NOTHING_HELD, CorkedTransport, Corker, coalesced

from ..conftest import one_service, read_response, read_until_closed

pytestmark = pytest.mark.timeout(30)

Pair = tuple[CorkedTransport, asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def corked_pair() -> AsyncIterator[Callable[[Corker], Awaitable[Pair]]]:
    """A corked client transport connected to a plain asyncio server on 127.0.0.1."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports: list[CorkedTransport] = []
    writers: list[asyncio.StreamWriter] = []

    async def connect(corker: Corker) -> Pair:
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        corked = CorkedTransport(transport, corker)
        transports.append(corked)
        async with asyncio.timeout(5):
            reader, writer = await accepted.get()
        writers.append(writer)
        return corked, reader, writer

    yield connect
    for corked in transports:
        corked.transport.close()
    for writer in writers:
        writer.close()
    server.close()


async def test_held_writes_reach_the_peer_in_order_before_the_close(corked_pair):
    corker = Corker(asyncio.get_running_loop())
    corked, reader, _ = await corked_pair(corker)
    corked.write(b"one ")
    corked.writelines([b"two ", b"", b"three "])
    corked.write(b"four")
    assert b"".join(corked.pending) == b"one two three four"  # all held, nothing sent yet
    assert corker.held == [corked]
    corked.close()  # sends what is held first
    assert await read_until_closed(reader) == b"one two three four"


async def test_held_writes_leave_at_the_end_of_the_iteration_without_a_close(corked_pair):
    corker = Corker(asyncio.get_running_loop())
    first, first_reader, _ = await corked_pair(corker)
    second, second_reader, _ = await corked_pair(corker)
    first.write(b"a")
    second.write(b"b")
    first.write(b"c")
    assert corker.held == [first, second]  # one entry per transport, one flush scheduled
    async with asyncio.timeout(5):
        assert await first_reader.readexactly(2) == b"ac"
        assert await second_reader.readexactly(1) == b"b"
    assert corker.held == [] and not corker.scheduled


async def test_a_list_given_up_is_held_as_it_is_or_added_to_what_is_held(corked_pair):
    corker = Corker(asyncio.get_running_loop())
    corked, reader, _ = await corked_pair(corker)
    corked.write_list([])
    assert not corker.held  # nothing to send: nothing held, no flush
    head_and_body = [b"HTTP/1.1 200 OK\r\n", b"\r\n", b"body"]
    corked.write_list(head_and_body)
    assert corked.pending is head_and_body  # not copied
    corked.write_list([b" and", b" more"])
    assert corker.held == [corked]
    async with asyncio.timeout(5):
        assert await reader.readexactly(32) == b"HTTP/1.1 200 OK\r\n\r\nbody and more"
    assert corked.pending is NOTHING_HELD and not NOTHING_HELD  # shared, and never added to


async def test_write_eof_sends_held_writes_first(corked_pair):
    corker = Corker(asyncio.get_running_loop())
    corked, reader, _ = await corked_pair(corker)
    corked.write(b"before the end")
    corked.write_eof()
    assert await read_until_closed(reader) == b"before the end"


async def test_held_writes_larger_than_a_join_arrive_whole(corked_pair):
    corker = Corker(asyncio.get_running_loop())
    corked, reader, _ = await corked_pair(corker)
    pieces = [bytes([65 + i]) * (JOIN_BYTES // 3) for i in range(5)]  # written as a writev
    corked.writelines(pieces)
    corked.close()
    assert await read_until_closed(reader) == b"".join(pieces)


async def test_the_time_is_read_once_per_loop_iteration_and_again_in_the_next():
    loop = asyncio.get_running_loop()
    corker = Corker(loop)
    first = corker.now()
    deadline = time.monotonic() + 2
    while loop.time() <= first and time.monotonic() < deadline:
        pass  # busy: the loop's clock moves on within this iteration
    assert loop.time() > first
    assert corker.now() == first  # the same iteration: the time as it was first read
    assert not corker.held  # telling the time holds no write, but schedules the flush
    await asyncio.sleep(0)
    assert corker.now() > first  # read again in the next iteration


def test_over_a_join_large_pieces_go_as_they_are_and_the_small_ones_between_are_joined():
    big, other = b"b" * JOIN_BYTES, b"o" * (JOIN_BYTES + 1)
    pieces = [b"HTTP/1.1 200 OK\r\n", b"a: 1\r\n", b"\r\n", big, b"\r\n", b"4000\r\n", other]
    out = coalesced(pieces)
    assert out == [b"HTTP/1.1 200 OK\r\na: 1\r\n\r\n", big, b"\r\n4000\r\n", other]
    assert out[1] is big and out[3] is other  # not copied
    assert coalesced([b"x", b"y"]) == [b"xy"]


async def test_large_body_after_many_small_pieces_arrives_whole(corked_pair):
    corker = Corker(asyncio.get_running_loop())
    corked, reader, _ = await corked_pair(corker)
    pieces = [b"h%d: v\r\n" % i for i in range(30)] + [b"z" * (2 * JOIN_BYTES), b"tail"]
    corked.writelines(pieces)
    corked.close()
    assert await read_until_closed(reader) == b"".join(pieces)


async def test_writes_held_for_a_closed_transport_are_dropped_without_harming_others(
        corked_pair):
    corker = Corker(asyncio.get_running_loop())
    gone, _, _ = await corked_pair(corker)
    kept, kept_reader, _ = await corked_pair(corker)
    gone.write(b"nobody reads this")
    gone.transport.close()  # closed under the hold, as uvloop does on a fatal error
    kept.write(b"still sent")
    async with asyncio.timeout(5):
        assert await kept_reader.readexactly(10) == b"still sent"
    assert gone.pending == []


# --- through the proxy ----------------------------------------------------------------------


async def test_answer_reaches_a_client_that_half_closed_after_its_request(start_backend,
                                                                          start_proxy):
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        reader, writer = await asyncio.open_connection(sock=sock.dup())
        response = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
    assert response.status == 200
    assert response.json()["path"] == "/half"


async def test_answer_finished_in_the_iteration_the_client_fin_arrives_reaches_it(
        raw_backend, start_proxy):
    """The upstream's answer and the client's FIN become readable together. Weir finishes the
    response (its write held), then reads the FIN with no request active, so eof_received
    returns None and the transport closes itself: what was held must go out first."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")  # sent at once
        client.shutdown(socket.SHUT_WR)  # in the same step: Weir sees both in one poll
        await reader.read()

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    with client:
        await loop.sock_connect(client, ("127.0.0.1", proxy.port))
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = bytearray()
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(client, 65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\nhello")


async def test_answer_and_upstream_fin_in_one_segment_reach_the_client(raw_backend,
                                                                       start_proxy):
    """The upstream's whole answer and its FIN arrive together: the response finishes and
    the upstream transport closes itself in the same loop iteration."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        writer.close()  # the FIN follows the bytes at once

    port = await raw_backend(handler)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        writer.close()
        assert (response.status, response.body) == (200, b"hello")
