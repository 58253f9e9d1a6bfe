"""What Weir frames and parses itself on an HTTP/2 upstream connection, in place of h2
(upstream_h2.py: send_request, send_pending, end_body, take_frames): checked in memory
against h2 itself, on both ends of the wire. The request as an h2 server receives it (the
HPACK block decoded, CONTINUATION, body DATA and END_STREAM in place, windows), the stream's
state in Weir's h2 as h2's own send_headers/send_data would leave it, and the answers h2's
inbound validation refuses still refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from proxy.config.loader import parse_config
from proxy.dataplane.proxyserver import ProxyServer
from proxy.dataplane.upstream_h2 import (
    H2_CLIENT_CONFIG,
    STREAM_WINDOW,
    Http2Pool,
    Http2UpstreamConnection,
    ProbeSink,
)

CONFIG = {
    "listen": "127.0.0.1:0",
    "services": [{"name": "app", "versions": {
        "stable": {"upstreams": ["127.0.0.1:9"], "protocol": "h2c"}}}],
}


class Wire:
    """A transport that hands what Weir writes to an h2 server connection."""

    def __init__(self) -> None:
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        self.events: list[Any] = []
        self.kept: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.kept.append(bytes(data))
        try:
            self.events.extend(self.server.receive_data(bytes(data)))
        except ProtocolError:  # after a GOAWAY Weir sent, its RST_STREAMs
            assert self.server.state_machine.state == ConnectionState.CLOSED

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def answer(self, conn: Http2UpstreamConnection) -> None:
        """What the server has to say (SETTINGS, their ACKs, answers) goes to Weir."""
        data = self.server.data_to_send()
        if data:
            conn.data_received(data)


def connect(loop: asyncio.AbstractEventLoop) -> tuple[Http2UpstreamConnection, Wire]:
    proxy = ProxyServer(parse_config(CONFIG), loop)
    pool = next(iter(proxy.pools.pools.values()))
    assert isinstance(pool, Http2Pool)
    conn = Http2UpstreamConnection(pool)
    wire = Wire()
    conn.connection_made(wire)
    pool.corker.flush()
    wire.answer(conn)
    pool.corker.flush()
    wire.answer(conn)  # the SETTINGS ACK
    assert conn.ready.done()
    return conn, wire


def request(path: bytes, method: bytes = b"GET", *extra: tuple[bytes, bytes]
            ) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":authority", b"app.example"),
            (b":path", path), (b"user-agent", b"test"), *extra]


STREAM_FIELDS = ("request_method", "_authority", "max_outbound_frame_size",
                 "outbound_flow_control_window", "_expected_content_length")
MACHINE_FIELDS = ("state", "client", "headers_sent", "trailers_sent", "headers_received",
                  "stream_closed_by")


def h2_state(h2: H2Connection, stream_id: int) -> tuple[Any, ...]:
    stream = h2.streams[stream_id]
    machine = stream.state_machine
    return (tuple(getattr(stream, name) for name in STREAM_FIELDS),
            tuple(getattr(machine, name) for name in MACHINE_FIELDS),
            stream._inbound_window_manager.current_window_size,
            h2.highest_outbound_stream_id)


def reference(wire: Wire, headers: list[tuple[bytes, bytes]], end_stream: bool,
              stream_id: int, body: bytes = b"") -> H2Connection:
    """h2 itself sending the same request, from a client in the same state."""
    h2 = H2Connection(H2_CLIENT_CONFIG)
    h2.local_settings = Settings(client=True, initial_values={
        SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
    h2.initiate_connection()
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    h2.receive_data(server.data_to_send())
    server.receive_data(h2.data_to_send())
    h2.receive_data(server.data_to_send())
    h2.highest_outbound_stream_id = stream_id - 2 if stream_id > 1 else 0
    h2.send_headers(stream_id, headers, end_stream=end_stream)
    if body:
        h2.send_data(stream_id, body, end_stream=True)
    return h2


@pytest.mark.parametrize("method,end_stream", [(b"GET", True), (b"HEAD", True),
                                               (b"POST", False)])
async def test_a_request_leaves_h2_as_its_send_headers_does_and_reaches_the_server_whole(
        method: bytes, end_stream: bool) -> None:
    conn, wire = connect(asyncio.get_running_loop())
    for round_ in range(3):  # a new stream id each time, after the last one's
        headers = request(b"/x?n=%d" % round_, method, (b"x-long", b"v" * 200),
                          (b"te", b"trailers"))
        sink = ProbeSink(conn.loop)
        stream = conn.open_stream()
        stream.start(sink, headers, end_stream, 60.0)
        body = b"hello" * 3000 if not end_stream else b""
        if body:
            stream.write_body(body, False)
            stream.end_body(False)
        conn.pool.corker.flush()
        sid = stream.stream_id
        assert sid == 2 * round_ + 1
        mine = h2_state(conn.h2, sid)
        assert mine == h2_state(reference(wire, headers, end_stream, sid, body), sid)
        received = [e for e in wire.events if getattr(e, "stream_id", 0) == sid]
        assert isinstance(received[0], RequestReceived) and received[0].headers == headers
        assert b"".join(e.data for e in received if isinstance(e, DataReceived)) == body
        assert isinstance(received[-1], StreamEnded)
        assert (conn.h2.outbound_flow_control_window
                == wire.server._inbound_flow_control_window_manager.current_window_size
                == 65535 - len(body) * (round_ + 1))
        stream.close()
        assert sid not in conn.h2.streams  # forgotten once closed, as h2 would sweep it


async def test_a_request_head_over_the_frame_size_goes_in_continuation_frames() -> None:
    conn, wire = connect(asyncio.get_running_loop())
    headers = request(b"/big", b"GET", *((b"x-big-%d" % i, b"b" * 9000) for i in range(4)))
    wire.kept.clear()
    stream = conn.open_stream()
    stream.start(ProbeSink(conn.loop), headers, True, 60.0)
    conn.pool.corker.flush()
    received = [e for e in wire.events if isinstance(e, RequestReceived)]
    assert received[-1].headers == headers
    data = b"".join(wire.kept)
    kinds = []
    while data:
        size = int.from_bytes(data[:3])
        kinds.append((data[3], data[4]))
        data = data[9 + size:]
    assert kinds[0] == (1, 1) and (9, 4) in kinds  # HEADERS with END_STREAM, CONTINUATION


async def test_a_body_over_the_upstreams_windows_waits_for_its_window_updates() -> None:
    conn, wire = connect(asyncio.get_running_loop())
    body = bytes(range(256)) * 40_000  # 10 MB, the server's windows 65,535 bytes
    stream = conn.open_stream()
    sink = ProbeSink(conn.loop)
    stream.start(sink, request(b"/up", b"POST"), False, 60.0)
    for start in range(0, len(body), 256 * 1024):
        stream.write_body(body[start:start + 256 * 1024], False)
    stream.end_body(False)
    got = bytearray()
    for _ in range(10_000):
        conn.pool.corker.flush()
        for event in wire.events:
            if isinstance(event, DataReceived):
                got += event.data
                assert len(got) <= len(body)
                wire.server.acknowledge_received_data(event.flow_controlled_length,
                                                      event.stream_id)
        done = any(isinstance(e, StreamEnded) for e in wire.events)
        wire.events.clear()
        h2 = conn.h2
        assert h2.outbound_flow_control_window >= 0
        assert h2.streams[stream.stream_id].outbound_flow_control_window >= 0
        if done:
            break
        wire.answer(conn)
    assert bytes(got) == body
    wire.answer(conn)  # the last WINDOW_UPDATEs
    # Both ends agree on the windows.
    assert (conn.h2.outbound_flow_control_window
            == wire.server._inbound_flow_control_window_manager.current_window_size)


# --- answers, taken by Weir before h2 --------------------------------------------------------

def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3) + bytes((kind, flags)) + stream_id.to_bytes(4) + payload


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal without indexing, its name a literal too (names under 127 bytes)."""
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def Sink(loop: asyncio.AbstractEventLoop) -> ProbeSink:
    """A health check's sink (compiled classes take no interpreted subclass): the status,
    the start of the body, grpc-status, and done: True when whole, False when failed."""
    return ProbeSink(loop)


def answer_to(conn: Http2UpstreamConnection, method: bytes, data: bytes,
              body: bytes = b"") -> tuple[ProbeSink, Any]:
    sink = Sink(conn.loop)
    stream = conn.open_stream()
    stream.start(sink, request(b"/a", method), not body, 60.0)
    if body:
        stream.write_body(body, False)
        stream.end_body(False)
    conn.pool.corker.flush()
    conn.data_received(data.replace(b"SID!", stream.stream_id.to_bytes(4)))
    return sink, stream


def headers_frame(flags: int, block: bytes) -> bytes:
    return len(block).to_bytes(3) + b"\x01" + bytes((flags,)) + b"SID!" + block


def data_frame(flags: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3) + b"\x00" + bytes((flags,)) + b"SID!" + payload


async def test_an_answer_with_trailers_is_taken_whole_and_the_connection_serves_on() -> None:
    conn, _ = connect(asyncio.get_running_loop())
    for _ in range(3):
        sink, stream = answer_to(conn, b"POST", headers_frame(4, b"\x88" + literal(
            b"content-type", b"application/grpc")) + data_frame(0, b"\x00\x00\x00\x00\x01x")
            + headers_frame(5, literal(b"grpc-status", b"0")), b"hello")
        assert sink.done.result() is True and sink.status == 200 and sink.grpc_status == 0
        assert bytes(sink.body) == b"\x00\x00\x00\x00\x01x"
        assert stream.closed and not conn.streams and stream.stream_id not in conn.h2.streams
    assert not conn.closed


@pytest.mark.parametrize("value", [b"a\r\nx-injected: 1", b"a\nb", b"a\x00b", b" padded"])
async def test_an_answer_with_a_bad_character_in_a_value_is_refused(value: bytes) -> None:
    conn, _ = connect(asyncio.get_running_loop())
    sink, _ = answer_to(conn, b"GET", b"")
    sid = max(conn.streams)
    conn.data_received(frame(1, 5, sid, b"\x88" + literal(b"x-bad", value)))
    assert sink.done.result() is False  # failed: a 502 for an exchange
    assert conn.closed and sink.status == 0


@pytest.mark.parametrize("block,trailer", [
    (b"\x88" + literal(b"X-Upper", b"1"), b""),
    (b"\x88" + literal(b"connection", b"close"), b""),
    (b"\x88\x88", b""),
    (literal(b"x-a", b"1") + b"\x88", b""),
    (b"\x88" + b"\x82", b""),  # :method in a response
    (b"\x88" + literal(b"te", b"gzip"), b""),
    (b"\x88" + literal(b"content-length", b"x"), b""),
    (b"\x88", b"\x88"),  # a pseudo-header in trailers
])
async def test_answers_h2_refuses_are_refused(block: bytes, trailer: bytes) -> None:
    conn, _ = connect(asyncio.get_running_loop())
    sink, _ = answer_to(conn, b"GET", b"")
    sid = max(conn.streams)
    if trailer:
        conn.data_received(frame(1, 4, sid, block) + frame(1, 5, sid, trailer))
    else:
        conn.data_received(frame(1, 5, sid, block))
    assert conn.closed and sink.done.result() is False


async def test_a_head_answer_has_no_body_and_a_body_longer_than_declared_is_refused() -> None:
    conn, _ = connect(asyncio.get_running_loop())
    sink, _ = answer_to(conn, b"HEAD", headers_frame(5, b"\x88" + literal(
        b"content-length", b"5")))
    assert sink.done.result() is True and sink.status == 200 and not sink.body
    # A HEAD's answer with a body: h2 refuses it (its content length is 0).
    sink, _ = answer_to(conn, b"HEAD", headers_frame(4, b"\x88" + literal(
        b"content-length", b"5")) + data_frame(1, b"hello"))
    assert sink.done.result() is False and conn.closed
    conn, _ = connect(asyncio.get_running_loop())
    sink, _ = answer_to(conn, b"GET", headers_frame(4, b"\x88" + literal(
        b"content-length", b"3")) + data_frame(1, b"hello"))
    assert sink.done.result() is False and conn.closed


async def test_an_informational_answer_then_the_final_one_pass() -> None:
    conn, _ = connect(asyncio.get_running_loop())
    sink, _ = answer_to(conn, b"GET", headers_frame(4, literal(b":status", b"103"))
                        + headers_frame(4, b"\x88") + data_frame(1, b"ok"))
    assert sink.done.result() is True and sink.status == 200 and bytes(sink.body) == b"ok"


def test_response_malformed_refuses_what_h2_refuses() -> None:
    """Against h2's own inbound validation of responses and trailers, on random lists."""
    import random

    from h2.utilities import HeaderValidationFlags, validate_headers

    from proxy.dataplane.upstream_h2 import response_malformed
    names = [b":status", b":method", b":path", b":foo", b"x-a", b"X-Up", b"te", b"connection",
             b"content-type", b"bad name", b"a:b", b"", b"cookie", b"grpc-status", b":"]
    values = [b"200", b"trailers", b"gzip", b"", b"a b", b" a", b"a\t", b"a\r\nb", b"\x00",
              b"text/plain", b"1"]
    rng = random.Random(19)
    for _ in range(4000):
        headers = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5:
            headers.insert(0, (b":status", b"200"))
        for trailers in (False, True):
            flags = HeaderValidationFlags(is_client=True, is_trailer=trailers,
                                          is_response_header=not trailers,
                                          is_push_promise=False)
            try:
                list(validate_headers(headers, flags))
                refused = False
            except ProtocolError:
                refused = True
            assert bool(response_malformed(headers, trailers)) == refused, (headers, trailers)


async def test_one_timer_serves_the_read_timeouts_of_all_a_connections_streams() -> None:
    """A stream with a shorter read timeout than the one the timer was armed for still
    times out on time; one kept busy does not; the timer stops when no stream is left."""
    conn, _ = connect(asyncio.get_running_loop())
    slow = Sink(conn.loop)
    conn.open_stream().start(slow, request(b"/slow"), True, 30.0)
    quick = Sink(conn.loop)
    conn.open_stream().start(quick, request(b"/quick"), True, 0.1)
    busy = Sink(conn.loop)
    busy_stream = conn.open_stream()
    busy_stream.start(busy, request(b"/busy"), True, 0.15)
    for _ in range(6):
        await asyncio.sleep(0.05)
        busy_stream.touch()
    assert quick.done.done() and quick.done.result() is False  # failed: a 504
    assert not slow.done.done() and not busy.done.done()
    timeouts = conn.pool.timeouts
    await asyncio.sleep(0.3)
    assert busy.done.done() and busy.done.result() is False and not slow.done.done()
    assert conn.pool.timeouts == timeouts + 1
    assert conn.timer is not None and conn.timer_at - conn.loop.time() > 25
    next(iter(conn.streams.values())).close()
    assert not conn.streams


async def test_answers_from_an_indexing_encoder_pass_from_the_first_to_the_last() -> None:
    """h2's server encodes with HPACK's dynamic table: the first answer fills it, the later
    ones are indexed fields (all decoded without hpack's decoder, see decoded_fields)."""
    conn, wire = connect(asyncio.get_running_loop())
    server = wire.server
    for n in range(4):
        sink = Sink(conn.loop)
        stream = conn.open_stream()
        stream.start(sink, request(b"/i"), True, 60.0)
        conn.pool.corker.flush()
        sid = stream.stream_id
        server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                  (b"x-n", b"same")])
        server.send_data(sid, b"answer %d" % n)
        server.send_headers(sid, [(b"grpc-status", b"0"), (b"x-t", b"1")], end_stream=True)
        wire.answer(conn)
        assert sink.done.result() is True and sink.status == 200
        assert bytes(sink.body) == b"answer %d" % n
        assert sink.grpc_status == 0 and not conn.streams and sid not in conn.h2.streams


async def test_a_big_answer_flows_through_the_windows_weir_credits_back() -> None:
    """5 MB answered within Weir's windows (STREAM_WINDOW a stream): each byte handed on
    is credited back with WINDOW_UPDATEs framed by Weir as h2 would frame them, and both ends
    agree on every window."""
    conn, wire = connect(asyncio.get_running_loop())
    server = wire.server
    sink = Sink(conn.loop)
    stream = conn.open_stream()
    stream.start(sink, request(b"/big"), True, 60.0)
    conn.pool.corker.flush()
    sid = stream.stream_id
    answer = bytes(range(256)) * 20_000
    server.send_headers(sid, [(b":status", b"200")])
    sent = 0
    for _ in range(10_000):
        window = server.local_flow_control_window(sid)
        size = min(window, server.max_outbound_frame_size, len(answer) - sent)
        if size > 0:
            server.send_data(sid, answer[sent:sent + size], end_stream=sent + size == len(answer))
            sent += size
        wire.answer(conn)
        conn.pool.corker.flush()
        if sent == len(answer):
            break
        assert size > 0 or server.local_flow_control_window(sid) > 0, "stalled"
    assert sink.done.result() is True and bytes(sink.body) == answer[:4096]
    assert (conn.h2._inbound_flow_control_window_manager.current_window_size
            == server.outbound_flow_control_window)


async def test_new_streams_take_the_windows_of_the_latest_settings() -> None:
    conn, wire = connect(asyncio.get_running_loop())
    windows = []
    for size in (1000, 70_000):
        wire.server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: size})
        wire.answer(conn)
        conn.pool.corker.flush()
        wire.answer(conn)
        stream = conn.open_stream()
        stream.start(Sink(conn.loop), request(b"/w"), True, 60.0)
        h2_stream = conn.h2.streams[stream.stream_id]
        windows.append((h2_stream.outbound_flow_control_window,
                        h2_stream._inbound_window_manager.current_window_size))
    assert windows == [(1000, STREAM_WINDOW), (70_000, STREAM_WINDOW)]
