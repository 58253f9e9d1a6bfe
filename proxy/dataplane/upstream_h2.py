"""HTTP/2 to upstreams (a version's ``protocol: h2c`` or ``h2``): multiplexed, pooled
connections, framing done by the ``h2`` package.

An ``Http2Pool`` keeps the open connections to one upstream address. An exchange takes a
stream on a connection with room (the upstream's SETTINGS_MAX_CONCURRENT_STREAMS bounds
it), or waits for a new connection, which concurrent exchanges share: a burst of requests
opens one connection, not one each. The stream (``UpstreamStream``) is the exchange's
``UpstreamChannel``: its request goes out as HEADERS and DATA, and what the upstream answers
comes back through the same ``ResponseSink`` calls an HTTP/1.1 connection makes, the head
as HTTP/1.1-style lines (a response without content-length is noted as chunked: its end is
END_STREAM, which both client protocols can frame), trailers through
``on_upstream_trailers``.

Flow control, both ways tied to what the other side consumes:
- request bodies go out within the upstream's windows; what does not fit is held, and past
  REQUEST_HIGH_WATER the client stops being read (``pause_client_reading``);
- response DATA is acknowledged (WINDOW_UPDATE) as it is handed to the client, and not while
  the client is not taking it (``pause_reading``): a slow client stalls its own stream, up
  to STREAM_WINDOW, never the connection.

A GOAWAY from the upstream lets the streams it names finish; the later ones, which it never
processed, are reported closed before any byte (a GET is then sent again on a fresh
connection, as on a stale HTTP/1.1 keep-alive connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

from h2.config import H2Configuration
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
    _decode_headers,
)
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import StreamClosedBy

from .corking import CorkedTransport
from .http2 import (
    CLOSED,
    CONNECTION_SPECIFIC,
    CONTINUATION_FRAME,
    DATA_FRAME,
    END_HEADERS_FLAG,
    END_STREAM_FLAG,
    FIELD_NAME,
    HALF_CLOSED_LOCAL,
    HALF_CLOSED_REMOTE,
    HEADERS_FRAME,
    MAX_WINDOW,
    OPEN,
    WINDOW_UPDATE_FRAME,
    closed_stream,
    decoded_fields,
    end_stream_out,
    free_h2,
    hpack_field,
    new_h2_stream,
    send_within_windows,
    take_within_windows,
    window_credit,
    write_frame,
)
from .http11 import CRLF, HOP_BY_HOP
from .upstream import ResponseSink, UpstreamChannel, UpstreamPool

if TYPE_CHECKING:
    import ssl

    from ..config.model import UpstreamSettings, UpstreamTLS
    from .corking import Corker

log = logging.getLogger("weir.upstream")

# The window Weir opens to an upstream for each response, and for the whole connection: a
# client that stops reading holds at most STREAM_WINDOW of its stream's answer here.
STREAM_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
DEFAULT_WINDOW: Final = 65535

# Request body bytes held per stream beyond the upstream's window before the client stops
# being read.
REQUEST_HIGH_WATER: Final = 256 * 1024

# Streams per connection until the upstream's SETTINGS say otherwise (RFC 9113 6.5.2
# recommends servers allow at least 100).
DEFAULT_MAX_STREAMS: Final = 100

# A connection stops taking new streams before its stream ids run out (2^31 - 1).
LAST_STREAM_ID: Final = 2**31 - 1000

# A GOAWAY either way ends no stream in flight (RFC 9113 6.8): h2 would close the whole
# connection on one, and take the upstream's next frame for those streams for an error.
GOAWAY_KEEPS_OPEN: Final = {
    **H2ConnectionStateMachine._transitions,
    (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY):
        (None, ConnectionState.CLIENT_OPEN),
    (ConnectionState.CLIENT_OPEN, ConnectionInputs.SEND_GOAWAY):
        (None, ConnectionState.CLIENT_OPEN),
}

H2_CLIENT_CONFIG: Final = H2Configuration(client_side=True, header_encoding=None,
                                          validate_inbound_headers=True,
                                          normalize_inbound_headers=True,
                                          validate_outbound_headers=False,
                                          normalize_outbound_headers=False)

CLIENT_OPEN: Final = ConnectionState.CLIENT_OPEN
CONNECTION_CLOSED: Final = ConnectionState.CLOSED
CLOSED_BY_RECV_END: Final = StreamClosedBy.RECV_END_STREAM

# --- responses' frames, taken by Weir ---------------------------------------------------------
# The usual frames of answers (HEADERS with the whole block, DATA, WINDOW_UPDATE) are taken by
# Http2UpstreamConnection.take_frames before h2 sees the read, as h2 would take them: its HPACK
# decoder, its inbound validation (response_malformed), its state machine inputs, windows and
# content-length tracking. A response head is taken only when its block starts with an indexed
# final :status (a 1xx answer, which h2 handles apart, goes to h2 with the rest of the read).

# The first byte of a block that starts with :status 200, 204, 206, 304, 400, 404 or 500 from
# the static table (RFC 7541 appendix A, indexes 8-14).
FINAL_STATUS_FIRST: Final = frozenset(range(0x88, 0x8F))
PSEUDO_RESPONSE: Final = frozenset({b":status"})
PSEUDO_OTHERS: Final = frozenset({b":method", b":scheme", b":authority", b":path",
                                  b":protocol"})
GOOD_RESPONSE_NAMES: Final[set[bytes]] = set()
GOOD_RESPONSE_NAMES_MAX: Final = 4096


def response_malformed(headers: list[tuple[bytes, bytes]], trailers: bool) -> str:
    """Why a response's header list (or its trailers) is malformed, as h2's inbound validation
    (validate_headers with the flags of a response or trailers) would refuse it; "" when it
    is not. A value with CR, LF or NUL is refused here: passed on to an HTTP/1.1 client, it
    would split the response."""
    seen_status = False
    regular = False
    for name, value in headers:
        if value:
            # By their codes: bytes.__contains__ with an int is the cheap look (see http2.py).
            if 13 in value or 10 in value or 0 in value:
                return f"illegal character in the value of {name!r}"
            first = value[0]
            last = value[-1]
            if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:
                return f"value of {name!r} surrounded by whitespace"
        if name[:1] == b":":
            if len(name) > 1 and FIELD_NAME.fullmatch(name, 1) is None:
                return f"illegal header name {name!r}"
            if trailers:
                return f"pseudo-header field {name!r} in trailers"
            if regular:
                return f"pseudo-header field {name!r} after a regular one"
            if name in PSEUDO_RESPONSE:
                if seen_status:
                    return f"duplicate pseudo-header field {name!r}"
                seen_status = True
            elif name in PSEUDO_OTHERS:
                return f"request pseudo-header field {name!r} in a response"
            else:
                return f"pseudo-header field {name!r}"
            continue
        regular = True
        if name in GOOD_RESPONSE_NAMES:
            continue
        if FIELD_NAME.fullmatch(name) is None:
            return f"illegal header name {name!r}"
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific header field {name!r}"
        if name == b"te":
            if value.lower() != b"trailers":
                return f"TE header {value!r}"
        elif len(GOOD_RESPONSE_NAMES) < GOOD_RESPONSE_NAMES_MAX:
            GOOD_RESPONSE_NAMES.add(name)
    if not trailers and not seen_status:
        return "no :status"
    return ""


def content_length_of(headers: list[tuple[bytes, bytes]]) -> int | None:
    """h2's _initialize_content_length (the HEAD case apart): the declared length, or None;
    raises ProtocolError for a malformed or conflicting one."""
    length: int | None = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise ProtocolError(f"Invalid content-length header: {value!r}")
            parsed = int(value)
            if length is None:
                length = parsed
            elif parsed != length:
                raise ProtocolError(f"Conflicting content-length headers: {length} and "
                                    f"{parsed}")
    return length


def combine_cookies(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """h2's normalize_inbound_headers: cookie fields joined, last."""
    cookies = [value for name, value in headers if name == b"cookie"]
    if not cookies:
        return headers
    fields = [field for field in headers if field[0] != b"cookie"]
    fields.append((b"cookie", b"; ".join(cookies)))
    return fields

# How the head of a response without content-length is noted: its end is END_STREAM, which
# an HTTP/1.1 client gets as chunked framing and an HTTP/2 client as END_STREAM.
CHUNKED_NOTED: Final = (b"transfer-encoding", b"chunked")


class Http2Pool(UpstreamPool):
    """HTTP/2 connections to one upstream address, each carrying many streams."""

    __slots__ = ("connections", "opening", "opening_task")

    def __init__(self, address: str, settings: UpstreamSettings,
                 loop: asyncio.AbstractEventLoop, corker: Corker,
                 tls: UpstreamTLS | None = None, context: ssl.SSLContext | None = None,
                 protocol: str = "h2c") -> None:
        super().__init__(address, settings, loop, corker, tls, context, protocol)
        self.connections: list[Http2UpstreamConnection] = []
        # The connection being opened, which every exchange that finds no room waits for.
        self.opening: asyncio.Future[Http2UpstreamConnection] | None = None
        self.opening_task: asyncio.Task[None] | None = None  # held: the loop keeps weak refs

    def take_idle(self, must_be_open: bool = False) -> UpstreamChannel | None:
        """A stream on the first connection with room (fewer connections, fuller)."""
        for conn in self.connections:
            if conn.has_room():
                return conn.open_stream()
        return None

    async def connect(self, timeout: float | None = None) -> UpstreamChannel:
        """A stream on a connection with room, opening one if none has (shared by every
        exchange waiting meanwhile); raises TimeoutError or OSError."""
        async with asyncio.timeout(timeout if timeout is not None else self.connect_timeout):
            while True:
                stream = self.take_idle()
                if stream is not None:
                    return stream
                opening = self.opening
                if opening is None:
                    opening = self.opening = self.loop.create_future()
                    self.opening_task = self.loop.create_task(self.open(opening))
                # Shielded: one waiter giving up (its client left) must not cancel the
                # connection the others wait for.
                conn = await asyncio.shield(opening)
                if conn.has_room():
                    return conn.open_stream()

    async def open(self, opening: asyncio.Future[Http2UpstreamConnection]) -> None:
        """Open a connection and wait for the upstream's SETTINGS (its limits, and the proof
        that it speaks HTTP/2), within the connect timeout."""
        conn: Http2UpstreamConnection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                made = await self.open_connection(lambda: Http2UpstreamConnection(self))
                assert isinstance(made, Http2UpstreamConnection)
                conn = made
                await conn.ready
        except BaseException as exc:
            if conn is not None:
                conn.abort()
            if not opening.done():
                opening.set_exception(exc if isinstance(exc, Exception) else
                                      ConnectionError("connect cancelled"))
                opening.exception()  # retrieved: nobody may be waiting any more
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            if self.opening is opening:
                self.opening = None
                self.opening_task = None
        self.penalty = 0
        conn.idle_since = self.corker.now()  # swept only after idle_timeout with no stream
        if conn.closed:
            opening.set_exception(ConnectionError("upstream closed the HTTP/2 connection"))
            opening.exception()
            return
        self.connections.append(conn)
        opening.set_result(conn)

    def forget_connection(self, conn: Http2UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections that have carried no stream for longer than idle_timeout."""
        deadline = now - self.idle_timeout
        for conn in list(self.connections):
            if not conn.streams and conn.reserved == 0 and conn.idle_since < deadline:
                conn.shutdown()

    def close_idle(self) -> None:
        """No new streams anywhere; connections close once their streams end."""
        for conn in list(self.connections):
            conn.shutdown()

    def release_connection(self, conn: Http2UpstreamConnection) -> None:
        """A connection's last stream ended: keep it for the next, or close it if the pool
        is out of rotation (drained, ejected, failing checks)."""
        if self.draining or not self.available:
            conn.shutdown()
        else:
            conn.idle_since = self.corker.now()


class Http2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an upstream, as a client."""

    def __init__(self, pool: Http2Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: CorkedTransport = None  # type: ignore[assignment]
        self.h2 = H2Connection(H2_CLIENT_CONFIG)
        # A GOAWAY from the upstream lets the streams it names finish, and so does Weir's
        # own (a drain, an idle pool); after either, Weir opens no new stream itself.
        self.h2.state_machine._transitions = GOAWAY_KEEPS_OPEN
        self.streams: dict[int, UpstreamStream] = {}
        self.touched: list[UpstreamStream] = []  # streams to flush at the end of a read
        self.reserved = 0  # streams handed out and not yet ended, opened or about to be
        self.max_streams = DEFAULT_MAX_STREAMS
        # The upstream's SETTINGS_MAX_CONCURRENT_STREAMS as h2 holds it (2^31: none).
        self.stream_limit = 2**31
        # A new stream's inbound and outbound windows as h2's SETTINGS give them (read from
        # them again once either side's SETTINGS change; None: to be read).
        self.initial_windows: tuple[int, int] | None = None
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.closing = False  # GOAWAY received or sent: no new streams
        self.closed = False
        self.write_paused = False
        self.opened = 0
        self.idle_since = 0.0
        # One timer for the read timeouts of all the connection's streams, not one a stream
        # (a call_later and a cancel per request): see check_timeouts.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # when it is due (the loop's time)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = CorkedTransport(transport, self.pool.corker)
        if self.pool.protocol == "h2":
            tls = transport.get_extra_info("ssl_object")
            chosen = tls.selected_alpn_protocol() if tls is not None else None
            if chosen != "h2":
                self.ready.set_exception(ConnectionError(
                    f"upstream did not agree to HTTP/2 in TLS ALPN (chose {chosen!r})"))
                self.abort()
                return
        h2 = self.h2
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.write_out()

    def data_received(self, data: bytes) -> None:
        if not self.ready.done() and data[3:4] != b"\x04":
            # A server's preface is a SETTINGS frame (RFC 9113 3.4): this is something else,
            # most often an HTTP/1.1 server's 400 to the client preface.
            self.ready.set_exception(ConnectionError(
                f"upstream does not speak HTTP/2 (it answered {data[:40]!r}); is its "
                "version's protocol right?"))
            self.ready.exception()
            self.abort()
            return
        touched = self.touched
        try:
            taken = self.take_frames(data) if self.ready.done() else 0
            events: list[Any] = self.h2.receive_data(data[taken:]) if taken < len(data) else []
        except ProtocolError as exc:
            for held in touched:
                held.touched = False
            touched.clear()
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(f"upstream broke HTTP/2: {exc}"))
                self.ready.exception()
                self.abort()
                return
            log.warning("HTTP/2 protocol error from upstream %s: %s", self.pool.address, exc)
            self.pool.record_failure()
            self.write_out()
            self.fail_streams(502, "upstream broke the HTTP/2 protocol")
            self.abort()
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.received(event.data, event.flow_controlled_length)
                    if not stream.touched:
                        stream.touched = True
                        touched.append(stream)
                    if event.stream_ended is not None:
                        stream.ended()
                else:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif kind is ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.head(event.headers)
                    if not stream.touched:
                        stream.touched = True
                        touched.append(stream)
                    if event.stream_ended is not None:
                        stream.ended()
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended()
            elif kind is TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers(event.headers)
                    if event.stream_ended is not None:
                        stream.ended()
            elif kind is WindowUpdated:
                self.window_updated(event.stream_id)
            elif kind is StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_by_upstream(event.error_code)
            elif kind is RemoteSettingsChanged:
                self.settings_changed()
            elif kind is SettingsAcknowledged:
                self.initial_windows = None  # Weir's own SETTINGS now apply
            elif kind is ConnectionTerminated:
                self.go_away_received(event.error_code, event.last_stream_id)
        self.write_out()
        if touched:
            for held in touched:
                held.touched = False
                sink = held.sink
                if sink is not None:
                    sink.flush()
            touched.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget_connection(self)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(
                "upstream closed the connection before its HTTP/2 SETTINGS"))
            self.ready.exception()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.connection_closed()
        free_h2(self.h2)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            stream.pause_client(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.pending_bytes <= REQUEST_HIGH_WATER:
                stream.pause_client(False)

    def eof_received(self) -> bool | None:
        self.transport.uncork()
        return None

    # --- frames taken by Weir -----------------------------------------------------------------

    def take_frames(self, data: bytes) -> int:
        """Take the frames at the start of ``data`` that are the usual ones of answers in their
        usual shape (HEADERS with the whole block, unpadded DATA, WINDOW_UPDATE) for streams
        Weir holds; how many bytes they are. What follows them is h2's, and all of it is when
        h2 holds part of a frame or of a header block. Raises ProtocolError where h2 would,
        with h2's GOAWAY sent."""
        h2 = self.h2
        buffer = h2.incoming_buffer
        if (buffer._data or buffer._headers_buffer
                or h2.state_machine.state is not CLIENT_OPEN):
            return 0
        end = len(data)
        pos = 0
        while end - pos >= 9:
            size = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            start = pos + 9
            flags = data[pos + 4]
            kind = data[pos + 3]
            if start + size > end or size > h2.max_inbound_frame_size:
                break
            stream_id = ((data[pos + 5] & 0x7F) << 24 | data[pos + 6] << 16
                         | data[pos + 7] << 8 | data[pos + 8])
            if kind == DATA_FRAME:
                if (flags & ~END_STREAM_FLAG
                        or not self.response_data(stream_id, data[start:start + size],
                                                  flags & END_STREAM_FLAG != 0)):
                    break
            elif kind == HEADERS_FRAME:
                if (flags & ~END_STREAM_FLAG != END_HEADERS_FLAG or size == 0
                        or not self.response_headers(stream_id, data[start:start + size],
                                                     flags & END_STREAM_FLAG != 0)):
                    break
            elif kind == WINDOW_UPDATE_FRAME:
                if size != 4 or not self.window_update(
                        stream_id, int.from_bytes(data[start:start + 4])):
                    break
            else:
                break
            pos = start + size
        return pos

    def response_data(self, stream_id: int, data: bytes, ended: bool) -> bool:
        """A DATA frame of an answer, as h2 takes it when valid (after the head, within both
        windows and the declared content-length). False: left to h2."""
        ours = self.streams.get(stream_id)
        if ours is None:
            return False
        h2 = self.h2
        stream = h2.streams.get(stream_id)
        if stream is None:
            return False
        machine = stream.state_machine
        state = machine.state
        if ((state is not OPEN and state is not HALF_CLOSED_LOCAL)
                or not machine.headers_received):
            return False
        size = len(data)
        if not take_within_windows(h2, stream, size, ended):
            return False
        if ended:
            self.end_received(machine)
        ours.received(data, size)
        if not ours.touched:
            ours.touched = True
            self.touched.append(ours)
        if ended:
            ours.ended()
        return True

    def end_received(self, machine: Any) -> None:
        """RECV_END_STREAM in OPEN or HALF_CLOSED_LOCAL."""
        if machine.state is OPEN:
            machine.state = HALF_CLOSED_REMOTE  # stream_half_closed
        else:
            machine.stream_closed_by = CLOSED_BY_RECV_END  # stream_ended
            machine.state = CLOSED

    def response_headers(self, stream_id: int, block: bytes, ended: bool) -> bool:
        """A response head (a final status) or trailers, as h2 takes them: decoded by its
        HPACK decoder, checked as its inbound validation checks them (response_malformed),
        the stream's state and content length moved as its receive_headers moves them. False:
        left to h2 (an informational answer, a stream Weir does not hold)."""
        ours = self.streams.get(stream_id)
        if ours is None:
            return False
        h2 = self.h2
        stream = h2.streams.get(stream_id)
        if stream is None:
            return False
        machine = stream.state_machine
        state = machine.state
        if state is not OPEN and state is not HALF_CLOSED_LOCAL:
            return False
        trailers = bool(machine.headers_received)
        if trailers:
            if machine.trailers_received:
                return False
        elif block[0] not in FINAL_STATUS_FIRST:
            return False
        try:
            fields = decoded_fields(h2.decoder, block)
            headers = combine_cookies(fields if fields is not None
                                      else list(_decode_headers(h2.decoder, block)))
            if trailers and not ended:
                raise ProtocolError("Trailers must have END_STREAM set")
            problem = response_malformed(headers, trailers)
            if problem:
                raise ProtocolError(f"malformed response: {problem}")
            length = 0 if stream.request_method == b"HEAD" else content_length_of(headers)
        except ProtocolError as exc:
            h2._terminate_connection(exc.error_code)  # GOAWAY, as h2's receive_data does
            raise
        if trailers:
            machine.trailers_received = True
        else:
            machine.headers_received = True
        if ended:
            self.end_received(machine)
        stream._expected_content_length = length
        if trailers:
            ours.trailers(headers)
        else:
            ours.head(headers)
            if not ours.touched:
                ours.touched = True
                self.touched.append(ours)
        if ended:
            ours.ended()
        return True

    def window_update(self, stream_id: int, increment: int) -> bool:
        """A WINDOW_UPDATE, as h2 takes it when valid, for the connection or a stream that can
        still send, or for a stream gone (ignored, as h2 ignores it). False: left to h2."""
        if not 0 < increment <= MAX_WINDOW:
            return False
        h2 = self.h2
        if not stream_id:
            window = h2.outbound_flow_control_window + increment
            if window > MAX_WINDOW:
                return False
            h2.outbound_flow_control_window = window
        else:
            stream = h2.streams.get(stream_id)
            if stream is None:
                return (bool(stream_id & 1)
                        and stream_id <= (h2.highest_outbound_stream_id or 0)
                        and stream_id in h2._closed_streams)
            state = stream.state_machine.state
            window = stream.outbound_flow_control_window + increment
            if ((state is not OPEN and state is not HALF_CLOSED_LOCAL
                 and state is not HALF_CLOSED_REMOTE) or window > MAX_WINDOW):
                return False
            stream.outbound_flow_control_window = window
        self.window_updated(stream_id)
        return True

    # --- events -----------------------------------------------------------------------------

    def settings_changed(self) -> None:
        self.initial_windows = None
        limit = self.h2.remote_settings.max_concurrent_streams
        self.max_streams = max(1, min(limit, 2**31)) if limit is not None else 2**31
        self.stream_limit = limit if limit is not None else 2**31
        if not self.ready.done():
            self.ready.set_result(None)
        self.window_updated(0)  # an INITIAL_WINDOW_SIZE change moves the streams' windows

    def window_updated(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.pending:
                stream.send_pending()
            return
        for stream in list(self.streams.values()):
            if stream.pending:
                stream.send_pending()

    def go_away_received(self, error_code: int, last_stream_id: int) -> None:
        """The upstream takes no new streams. Those it never processed (above
        ``last_stream_id``) are reported closed before any byte; with an error, the rest
        fail too and the connection ends."""
        self.closing = True
        self.pool.forget_connection(self)
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                stream.refused()
        if error_code:
            log.warning("upstream %s ended its HTTP/2 connection: %s", self.pool.address,
                        _error_name(error_code))
            self.fail_streams(502, "upstream ended the HTTP/2 connection "
                                   f"({_error_name(error_code)})")
            self.abort()
        elif not self.streams:
            self.close()

    def arm_timer(self, delay: float) -> None:
        """The read-timeout timer due in ``delay`` seconds at the latest."""
        due = self.loop.time() + delay
        timer = self.timer
        if timer is not None:
            if self.timer_at <= due:
                return
            timer.cancel()
        self.timer_at = due
        self.timer = self.loop.call_at(due, self.check_timeouts)

    def check_timeouts(self) -> None:
        """Streams idle past their read timeout fail (504); the timer is armed again for the
        first of the others to come due, and not at all when no stream is left (the next
        stream arms it)."""
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        due = -1.0
        for stream in list(self.streams.values()):
            if stream.sink is None or stream.closed:
                continue
            left = stream.read_timeout - (now - stream.last_activity)
            if left <= 0:
                stream.timed_out()
            elif due < 0 or left < due:
                due = left
        if due >= 0 and not self.closed:
            self.arm_timer(due)

    # --- used by the pool and the streams ---------------------------------------------------

    def has_room(self) -> bool:
        return (not self.closing and not self.closed and self.reserved < self.max_streams)

    def open_stream(self) -> UpstreamStream:
        self.reserved += 1
        stream = UpstreamStream(self)
        stream.reused = self.opened > 0
        self.opened += 1
        return stream

    def write_out(self) -> None:
        if self.h2._data_to_send:
            self.transport.write(self.h2.data_to_send())

    def write_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        """A frame framed by Weir, after what h2 holds."""
        write_frame(self.transport, self.h2, kind, flags, stream_id, payload)

    def send_request(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool) -> None:
        """A request's HEADERS (and CONTINUATION) on a new stream, encoded and framed by Weir
        as http2.py does responses (HPACK literals without indexing, names from the static
        table), with h2 told what went out as its send_headers tells it: the stream made and
        counted as h2's _begin_new_stream makes it (its windows from both sides' SETTINGS,
        the highest outbound stream id), its state machine moved by SEND_HEADERS (and
        SEND_END_STREAM), its request method noted (a HEAD's answer has no body). Anything
        unusual (a connection not open, the upstream's stream limit reached) goes through h2,
        which raises ProtocolError where it would refuse."""
        h2 = self.h2
        if (h2.state_machine.state is not CLIENT_OPEN or len(self.streams) > self.stream_limit
                or stream_id <= (h2.highest_outbound_stream_id or 0)):
            h2.send_headers(stream_id, headers, end_stream=end_stream)
            self.write_out()
            return
        windows = self.initial_windows
        if windows is None:
            windows = self.initial_windows = (h2.local_settings.initial_window_size,
                                              h2.remote_settings.initial_window_size)
        stream = new_h2_stream(stream_id, h2.config, windows[0], windows[1],
                               h2.max_outbound_frame_size)
        h2.streams[stream_id] = stream
        h2.highest_outbound_stream_id = stream_id
        machine = stream.state_machine
        machine.client = True  # request_sent
        machine.headers_sent = True
        machine.state = HALF_CLOSED_LOCAL if end_stream else OPEN
        parts: list[bytes] = []
        table = h2.encoder.header_table
        if table.resized:  # the upstream's SETTINGS changed the table's size: said first
            parts.append(h2.encoder._encode_table_size_change())
            table.resized = False
        for name, value in headers:
            if name == b":method":
                stream.request_method = value
            elif name == b":authority":
                stream._authority = value
            hpack_field(parts, name, value)
        block = b"".join(parts)
        flags = END_STREAM_FLAG if end_stream else 0
        frame = h2.max_outbound_frame_size
        if len(block) <= frame:
            self.write_frame(HEADERS_FRAME, flags | END_HEADERS_FLAG, stream_id, block)
            return
        self.write_frame(HEADERS_FRAME, flags, stream_id, block[:frame])
        for start in range(frame, len(block), frame):
            last = start + frame >= len(block)
            self.write_frame(CONTINUATION_FRAME, END_HEADERS_FLAG if last else 0, stream_id,
                             block[start:start + frame])

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Credit ``size`` bytes back to the upstream's windows: h2's
        acknowledge_received_data, done as h2 does it, with its window algorithm
        (window_credit) and the WINDOW_UPDATE frames framed by Weir (as http2.py does for
        clients)."""
        if size:
            h2 = self.h2
            increment = window_credit(h2._inbound_flow_control_window_manager, size)
            if increment:
                self.write_frame(WINDOW_UPDATE_FRAME, 0, 0, increment.to_bytes(4))
            stream = h2.streams.get(stream_id)
            if stream is None:
                return
            state = stream.state_machine.state
            if (state is OPEN or state is HALF_CLOSED_LOCAL
                    or state is HALF_CLOSED_REMOTE):
                increment = window_credit(stream._inbound_window_manager, size)
                if increment:
                    self.write_frame(WINDOW_UPDATE_FRAME, 0, stream_id, increment.to_bytes(4))

    def stream_done(self, stream: UpstreamStream) -> None:
        """A stream handed out is over (ended, reset, or never started)."""
        self.reserved -= 1
        stream_id = stream.stream_id
        if stream_id and self.streams.get(stream_id) is stream:
            del self.streams[stream_id]
            h2_streams = self.h2.streams
            h2_stream = h2_streams.get(stream_id)
            if h2_stream is not None and h2_stream.state_machine.state is CLOSED:
                # h2 would drop it when it next counts its open streams, which it does only
                # for the HEADERS it sends itself (see send_request).
                del h2_streams[stream_id]
                closed_stream(self.h2, stream_id, h2_stream.state_machine.stream_closed_by)
        if not self.streams and self.reserved == 0:
            if self.closing:
                self.close()
            else:
                self.pool.release_connection(self)
        if (self.h2.highest_outbound_stream_id or 0) > LAST_STREAM_ID:
            self.closing = True

    def fail_streams(self, status: int, reason: str) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(status, reason)

    def shutdown(self) -> None:
        """GOAWAY(NO_ERROR): no new streams; close once the last one ends."""
        if self.closed:
            return
        if not self.closing:
            self.closing = True
            self.pool.forget_connection(self)
            with contextlib.suppress(ProtocolError):
                self.h2.close_connection()
            self.write_out()
        if not self.streams and self.reserved == 0:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget_connection(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.pool.forget_connection(self)
        if self.transport is not None:
            self.transport.abort()


class UpstreamStream(UpstreamChannel):
    """One request and its response on an HTTP/2 upstream connection: the exchange's
    ``UpstreamChannel`` while it is in flight."""

    __slots__ = ("client_paused", "conn", "end_pending", "last_activity", "local_ended",
                 "pending", "pending_bytes", "read_timeout", "responded", "sink", "stream_id",
                 "touched", "unacked")

    def __init__(self, conn: Http2UpstreamConnection) -> None:
        super().__init__(conn.pool)
        self.http2 = True
        self.conn = conn
        self.stream_id = 0  # given when its HEADERS go out
        self.sink: ResponseSink | None = None
        self.pending: list[bytes] = []  # request body waiting for the upstream's window
        self.pending_bytes = 0
        self.end_pending = False  # END_STREAM waits behind pending
        # END_STREAM has gone out: h2 would take another for an error and close the stream.
        self.local_ended = False
        self.client_paused = False
        self.unacked = 0  # response bytes received and not yet acknowledged (paused)
        self.responded = False  # the final response head is in
        self.touched = False  # in this read's list of streams to flush
        self.last_activity = 0.0
        self.read_timeout = 60.0

    # --- UpstreamChannel: used by the exchange ----------------------------------------------

    def start(self, sink: ResponseSink, headers: list[tuple[bytes, bytes]], end_stream: bool,
              read_timeout: float) -> None:
        """Send the request's HEADERS (and END_STREAM with them when it has no body)."""
        conn = self.conn
        h2 = conn.h2
        self.sink = sink
        self.read_timeout = read_timeout
        self.last_activity = self.pool.corker.now()
        if conn.closed or conn.closing:
            # Closed between being handed out and used (a connect's await): as a stale
            # keep-alive connection would be.
            self.loop_call(self.refused)
            return
        stream_id = (h2.highest_outbound_stream_id or -1) + 2  # get_next_available_stream_id
        self.stream_id = stream_id
        conn.streams[stream_id] = self
        self.local_ended = end_stream
        try:
            conn.send_request(stream_id, headers, end_stream)
        except ProtocolError as exc:  # over a limit the upstream has just lowered
            log.info("upstream %s: stream not opened: %s", self.pool.address, exc)
            self.loop_call(self.refused)
            return
        conn.arm_timer(read_timeout)

    def loop_call(self, callback: Any) -> None:
        self.conn.loop.call_soon(callback)

    def send(self, sink: ResponseSink, data: bytes, read_timeout: float) -> None:
        raise AssertionError("an HTTP/2 stream is started with headers, not HTTP/1.1 bytes")

    def write_body(self, data: bytes, chunked: bool) -> None:
        if not self.stream_id or self.closed or self.local_ended:
            return
        self.last_activity = self.pool.corker.now()
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.send_pending()
        if self.pending_bytes > REQUEST_HIGH_WATER:
            self.pause_client(True)

    def end_body(self, chunked: bool) -> None:
        if not self.stream_id or self.closed or self.local_ended:
            return
        if self.pending:
            self.end_pending = True
            return
        self.local_ended = True
        conn = self.conn
        stream = conn.h2.streams.get(self.stream_id)
        if stream is None or conn.h2.state_machine.state is CONNECTION_CLOSED:
            return  # the upstream reset the stream, or ended it: its answer is its own
        try:
            end_stream_out(stream.state_machine)  # h2's end_stream, framed by Weir
        except ProtocolError:
            return
        conn.write_frame(DATA_FRAME, END_STREAM_FLAG, self.stream_id, b"")

    def send_pending(self) -> None:
        """Send what the upstream's windows take; hold the rest. Framed by Weir, as h2's
        send_data would frame it: the stream's state machine moved by SEND_DATA (and
        SEND_END_STREAM with the last of it), both windows shrunk."""
        conn = self.conn
        h2 = conn.h2
        stream_id = self.stream_id
        pending = self.pending
        stream = h2.streams.get(stream_id)
        if h2.state_machine.state is CONNECTION_CLOSED:
            stream = None
        try:
            if stream is None:
                raise ProtocolError("stream closed")
            had_pending = bool(pending)
            self.pending_bytes -= send_within_windows(conn.transport, h2, stream, pending,
                                                      self.end_pending)
            if self.end_pending and had_pending and not pending:
                self.local_ended = True  # END_STREAM went with the last of it
        except ProtocolError:  # the stream is closed: the upstream is done with the body
            pending.clear()
            self.pending_bytes = 0
            self.end_pending = False
        if self.pending_bytes <= REQUEST_HIGH_WATER and not conn.write_paused:
            self.pause_client(False)

    def pause_client(self, paused: bool) -> None:
        if paused != self.client_paused and self.sink is not None:
            self.client_paused = paused
            self.sink.pause_client_reading(paused)

    def pause_reading(self) -> None:
        """The client is not taking the answer: stop acknowledging it (the upstream can send
        at most the stream's window more)."""
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.unacked and self.stream_id:
                unacked, self.unacked = self.unacked, 0
                self.conn.acknowledge(self.stream_id, unacked)
                self.conn.write_out()

    def touch(self) -> None:
        self.last_activity = self.pool.corker.now()

    def reject(self, reason: str) -> None:
        log.warning("invalid response from %s: %s", self.pool.address, reason)
        self.pool.record_failure()
        self.fail(502, "upstream sent an invalid response")

    def release(self) -> None:
        """The exchange is over with the response whole: the stream ends without a reset,
        unless some of the request body is still held (its answer came first)."""
        self.sink = None
        if self.pending or self.end_pending:
            self.close()
        else:
            self.finish()

    def detach(self) -> None:
        self.sink = None
        self.close()

    def close(self) -> None:
        """Stop the stream (CANCEL) if it is still open, and free its slot."""
        if self.closed:
            return
        if self.stream_id:
            conn = self.conn
            stream = conn.h2.streams.get(self.stream_id)
            if stream is not None and stream.state_machine.state is not CLOSED:
                # (h2 raises StreamClosedError for one over on the wire: nothing to stop)
                with contextlib.suppress(ProtocolError):
                    conn.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                conn.write_out()
        self.finish()

    # --- what the connection reports --------------------------------------------------------

    def head(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The response's HEADERS: handed on as an HTTP/1.1 head would be."""
        self.got_bytes = True
        self.last_activity = self.pool.corker.now()
        status = 0
        lines: list[bytes] = [b""]
        noted: list[bytes] = []
        has_length = False
        for name, value in headers:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value) if value.isdigit() else 0
                continue
            if name == b"content-length":
                has_length = True
                noted.append(name)
                noted.append(value)
            elif name == b"grpc-status":  # a trailers-only answer: noted, and passed on
                if self.sink is not None and value.isdigit():
                    self.sink.grpc_status = int(value)
            elif name in HOP_BY_HOP or name == b"x-weir-version":
                continue  # h2 has refused connection-specific ones; te is not a response's
            lines.append(name)
            lines.append(b": ")
            lines.append(value)
            lines.append(CRLF)
        if not 200 <= status <= 599:
            self.reject(f"status code {status}")
            return
        self.responded = True
        if not has_length:
            noted.append(CHUNKED_NOTED[0])
            noted.append(CHUNKED_NOTED[1])
        if status >= 500:
            self.pool.record_failure()
        else:
            self.pool.failures = 0
        sink = self.sink
        if sink is not None:
            sink.on_upstream_head(status, lines, noted, True)

    def received(self, data: bytes, flow_controlled: int) -> None:
        self.last_activity = self.pool.corker.now()
        sink = self.sink
        if sink is not None and data:
            sink.on_upstream_body(data)
        if self.paused:
            self.unacked += flow_controlled
        else:
            self.conn.acknowledge(self.stream_id, flow_controlled)

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        sink = self.sink
        if sink is None:
            return
        for name, value in headers:
            if name == b"grpc-status" and value.isdigit():
                sink.grpc_status = int(value)
        sink.on_upstream_trailers(headers)

    def ended(self) -> None:
        """END_STREAM from the upstream: the exchange releases the stream (or closes it,
        with a reset, when its request is still being sent)."""
        sink = self.sink
        if not self.responded:
            self.fail(502, "upstream ended the stream without a response")
            return
        if sink is not None:
            self.sink = None
            sink.on_upstream_complete()
        if not self.closed:
            self.close()

    def reset_by_upstream(self, error_code: int) -> None:
        if error_code == ErrorCodes.REFUSED_STREAM and not self.responded:
            self.refused()
            return
        self.closed_by_peer()
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if error_code == ErrorCodes.NO_ERROR and self.responded:
            # RFC 9113 8.1: the upstream has answered whole and needs no more of the body.
            return
        log.info("upstream %s reset stream %d: %s", self.pool.address, self.stream_id,
                 _error_name(error_code))
        sink.on_upstream_closed()

    def refused(self) -> None:
        """Never processed by the upstream (REFUSED_STREAM, or past a GOAWAY's last stream):
        reported as a stale connection is, so that a request safe to repeat is."""
        self.reused = True
        self.got_bytes = False
        self.closed_by_peer()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_upstream_closed()

    def connection_closed(self) -> None:
        self.closed_by_peer()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_upstream_closed()

    def fail(self, status: int, reason: str) -> None:
        sink, self.sink = self.sink, None
        got = self.responded
        self.close()
        if sink is not None:
            sink.on_upstream_failed(status, reason, got)

    def timed_out(self) -> None:
        """Idle past its read timeout (see Http2UpstreamConnection.check_timeouts)."""
        self.pool.timeouts += 1
        self.pool.record_failure()
        self.fail(504, "upstream did not answer in time")

    # --- the end ----------------------------------------------------------------------------

    def closed_by_peer(self) -> None:
        """The stream is over on the wire: free its slot without a reset."""
        if not self.closed:
            self.finish()

    def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending:
            self.pending = []
        self.pending_bytes = 0
        self.conn.stream_done(self)


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"


# --- health checks --------------------------------------------------------------------------

# A probe reads this much of an answer's body at most.
PROBE_BODY_LIMIT: Final = 4096
GRPC_HEALTH_PATH: Final = b"/grpc.health.v1.Health/Check"
GRPC_SERVING: Final = b"\x08\x01"  # HealthCheckResponse{status: SERVING}, as protobuf


class ProbeSink(ResponseSink):
    """What a health check's stream reports to: the status, the start of the body, the
    grpc-status, and a future that is done when the answer is whole (or failed)."""

    __slots__ = ("body", "done", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head_request = False
        self.grpc_status = -1
        self.status = 0
        self.body = bytearray()
        self.done: asyncio.Future[bool] = loop.create_future()

    def on_upstream_head(self, status: int, lines: list[bytes],
                         noted: list[bytes], keep_alive: bool) -> None:
        self.status = status

    def on_upstream_body(self, data: bytes) -> None:
        if len(self.body) < PROBE_BODY_LIMIT:
            self.body += data[:PROBE_BODY_LIMIT]

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        pass  # grpc-status is already read into grpc_status

    def on_upstream_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(True)

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        pass

    def on_upstream_failed(self, status: int, reason: str, got_bytes: bool) -> None:
        if not self.done.done():
            self.done.set_result(False)

    def on_upstream_closed(self) -> None:
        if not self.done.done():
            self.done.set_result(False)

    def flush(self) -> None:
        pass

    def pause_client_reading(self, paused: bool) -> None:
        pass


def grpc_health_request(service: str) -> bytes:
    """A framed grpc.health.v1.HealthCheckRequest{service}: protobuf field 1, a string."""
    name = service.encode()
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def probe(pool: Http2Pool, path: str, grpc_service: str | None) -> bool:
    """One health check over a fresh HTTP/2 connection (as a Kubernetes probe proves that new
    connections are accepted): a GET of ``path`` that passes with a 2xx or 3xx, or with
    ``grpc_service`` set, grpc.health.v1.Health/Check that passes when the service answers
    SERVING. Raises OSError when the upstream cannot be reached; the caller bounds the
    time."""
    made = await pool.open_connection(lambda: Http2UpstreamConnection(pool))
    assert isinstance(made, Http2UpstreamConnection)
    conn = made
    try:
        await conn.ready
        sink = ProbeSink(pool.loop)
        stream = conn.open_stream()
        scheme = b"https" if pool.tls is not None else b"http"
        authority = (pool.server_hostname or pool.address).encode()
        if grpc_service is None:
            stream.start(sink, [(b":method", b"GET"), (b":scheme", scheme),
                                (b":authority", authority), (b":path", path.encode()),
                                (b"user-agent", b"weir-health-check")], True, 3600.0)
        else:
            stream.start(sink, [(b":method", b"POST"), (b":scheme", scheme),
                                (b":authority", authority), (b":path", GRPC_HEALTH_PATH),
                                (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                                (b"user-agent", b"weir-health-check")], False, 3600.0)
            stream.write_body(grpc_health_request(grpc_service), False)
            stream.end_body(False)
        whole = await sink.done
    finally:
        conn.shutdown()
        conn.close()
    if not whole:
        return False
    if grpc_service is None:
        return 200 <= sink.status < 400
    return sink.grpc_status == 0 and bytes(sink.body[5:]) == GRPC_SERVING
