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
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded
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
        self.events.extend(self.server.receive_data(bytes(data)))

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
