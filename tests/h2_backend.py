"""A real HTTP/2 server for the tests (cleartext with prior knowledge, or TLS with ALPN h2),
on the ``h2`` package: an app for the tests of HTTP/2 to upstreams that aiohttp cannot be
(it serves HTTP/1.1 only). It answers each request on its own stream with what it saw, as
JSON, and does what a request's path asks:

- ``/echo`` (any other path too): 200, JSON of method, path, authority, headers, body size
  and sha256, content-length set;
- ``/stream?size=N``: N bytes of body without content-length (its end is END_STREAM);
- ``/trailers``: the JSON, then trailers ``x-trailer-one: 1`` and ``grpc-status: 0``;
- ``/slow?ms=N``: answers after N milliseconds;
- ``/status?code=N``: that status, with a short body.

It records the streams open at once (``max_open``) and the connections it accepted, and can
be told to send GOAWAY after ``goaway_after`` requests on a connection, or to advertise
``max_streams`` in SETTINGS_MAX_CONCURRENT_STREAMS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from h2.config import H2Configuration
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
)
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes


@dataclass
class H2Backend:
    name: str
    port: int = 0
    max_streams: int = 100
    goaway_after: int | None = None
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    open_streams: int = 0
    max_open: int = 0
    server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class _Request:
    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.body = bytearray()


class H2BackendProtocol(asyncio.Protocol):
    def __init__(self, backend: H2Backend) -> None:
        self.backend = backend
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, _Request] = {}
        self.pending: dict[int, bytearray] = {}  # response bytes waiting for a window
        self.ends: dict[int, list[tuple[bytes, bytes]] | None] = {}
        self.served = 0
        self.peer_gone = False  # the client sent GOAWAY
        self.started: set[int] = set()
        # After a GOAWAY either way the server still answers the streams in flight (RFC 9113
        # 6.8), which h2 would refuse.
        self.conn.state_machine._transitions = {
            **H2ConnectionStateMachine._transitions,
            (ConnectionState.SERVER_OPEN, ConnectionInputs.SEND_GOAWAY):
                (None, ConnectionState.SERVER_OPEN),
            (ConnectionState.SERVER_OPEN, ConnectionInputs.RECV_GOAWAY):
                (None, ConnectionState.SERVER_OPEN),
        }
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.backend.connections += 1
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS:
                                   self.backend.max_streams})
        self.conn.local_settings.acknowledge()  # in force from the first frame
        self.conn.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self.requests[event.stream_id] = _Request(event.headers)
                self.backend.open_streams += 1
                self.backend.max_open = max(self.backend.max_open, self.backend.open_streams)
                if event.stream_ended is not None:
                    self.start(event.stream_id)
            elif isinstance(event, DataReceived):
                request = self.requests.get(event.stream_id)
                if request is not None:
                    request.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
                if event.stream_ended is not None:
                    self.start(event.stream_id)
            elif isinstance(event, StreamEnded):
                self.start(event.stream_id)
            elif isinstance(event, StreamReset):
                if self.requests.pop(event.stream_id, None) is not None:
                    self.backend.open_streams -= 1
                self.pending.pop(event.stream_id, None)
            elif isinstance(event, WindowUpdated):
                for stream_id in list(self.pending):
                    self.send_pending(stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.peer_gone = True  # streams in flight are answered, then it closes
        if self.peer_gone and not self.requests and self.transport is not None:
            self.transport.close()
        self.flush()

    def start(self, stream_id: int) -> None:
        request = self.requests.get(stream_id)
        if request is None or stream_id in self.started:
            return  # h2 reports a request's end twice: with its last frame, and on its own
        self.started.add(stream_id)
        self.served += 1
        goaway_after = self.backend.goaway_after
        if goaway_after is not None and self.served == goaway_after:
            # The streams opened so far are answered; later ones are not processed.
            self.conn.close_connection(last_stream_id=stream_id)
        task = asyncio.get_running_loop().create_task(self.answer(stream_id, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, stream_id: int, request: _Request) -> None:
        pseudo = {name: value for name, value in request.headers if name.startswith(b":")}
        target = urlsplit(pseudo.get(b":path", b"/").decode())
        query = {key: values[0] for key, values in parse_qs(target.query).items()}
        record = {
            "backend": self.backend.name,
            "method": pseudo.get(b":method", b"").decode(),
            "path": pseudo.get(b":path", b"").decode(),
            "scheme": pseudo.get(b":scheme", b"").decode(),
            "authority": pseudo.get(b":authority", b"").decode(),
            "headers": {name.decode(): value.decode() for name, value in request.headers
                        if not name.startswith(b":")},
            "header_names": [name.decode() for name, _ in request.headers],
            "body_size": len(request.body),
            "body_sha256": hashlib.sha256(request.body).hexdigest(),
        }
        self.backend.requests.append(record)
        if target.path == "/slow":
            await asyncio.sleep(int(query.get("ms", "100")) / 1000)
        status = 200
        trailers = None
        headers = [(b"server", b"h2-backend")]
        if target.path == "/stream":
            body = b"x" * int(query.get("size", "1000"))
        elif target.path == "/status":
            status = int(query.get("code", "200"))
            body = b"status %d\n" % status
            headers.append((b"content-length", b"%d" % len(body)))
        else:
            body = json.dumps(record).encode()
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body))]
            if target.path == "/trailers":
                trailers = [(b"x-trailer-one", b"1"), (b"grpc-status", b"0")]
        try:
            self.conn.send_headers(stream_id, [(b":status", b"%d" % status), *headers])
        except ProtocolError:
            return  # reset meanwhile
        if record["method"] == "HEAD":
            body = b""  # the length it would have, and no body (RFC 9110 9.3.2)
        self.pending[stream_id] = bytearray(body)
        self.ends[stream_id] = trailers
        self.send_pending(stream_id)
        self.flush()

    def send_pending(self, stream_id: int) -> None:
        pending = self.pending.get(stream_id)
        if pending is None:
            return
        try:
            while pending:
                window = min(self.conn.local_flow_control_window(stream_id),
                             self.conn.max_outbound_frame_size)
                if window <= 0:
                    return
                chunk = bytes(pending[:window])
                del pending[:window]
                self.conn.send_data(stream_id, chunk)
            trailers = self.ends.pop(stream_id, None)
            if trailers:
                self.conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        except ProtocolError:
            pass
        del self.pending[stream_id]
        if self.requests.pop(stream_id, None) is not None:
            self.backend.open_streams -= 1
        if self.peer_gone and not self.requests and self.transport is not None:
            self.flush()
            self.transport.close()


async def start_h2_backend(name: str, tls: ssl.SSLContext | None = None,
                           **settings: Any) -> H2Backend:
    backend = H2Backend(name, **settings)
    loop = asyncio.get_running_loop()
    backend.server = await loop.create_server(lambda: H2BackendProtocol(backend), "127.0.0.1",
                                              0, ssl=tls)
    backend.port = backend.server.sockets[0].getsockname()[1]
    return backend

