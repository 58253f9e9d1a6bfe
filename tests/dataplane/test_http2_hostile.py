"""HTTP/2 to clients (dataplane/http2.py) against hostile and edge-case clients, black-box: a
real Weir data plane on 127.0.0.1 in front of real backends, and two kinds of client over real
TCP connections:

- ``H2Client``, a well-behaved client built on the ``h2`` package (which also checks that
  what Weir sends is valid HTTP/2: a frame past the client's window, a forbidden header, is an
  error there);
- ``RawH2``, frames written by hand (hyperframe and hpack, h2's own framing layers) for what a
  well-behaved client will not send: bad prefaces, frames on the wrong streams, floods.

Each test says what RFC 9113 asks for, and then checks that Weir still serves a fresh, well
behaved client (HTTP/1.1 and HTTP/2) and logged no error or traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy.dataplane.http2 import CONTROL_BURST, DEFAULT_WINDOW, PREFACE, PREMATURE_MIN_STREAMS
from proxy.dataplane.proxyserver import ProxyServer

from ..conftest import Backend, one_service, wait_for

StartProxy = Callable[..., Awaitable[ProxyServer]]
StartBackend = Callable[..., Awaitable[Backend]]

AUTHORITY = b"app.test"
PATTERN = bytes(range(256)) * 256  # what the backend's /stream sends, repeated


def pattern(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def request_headers(path: str = "/", method: str = "GET",
                    extra: Iterable[tuple[bytes, bytes]] = (),
                    authority: bytes = AUTHORITY) -> list[tuple[bytes, bytes]]:
    return [(b":method", method.encode()), (b":scheme", b"http"),
            (b":authority", authority), (b":path", path.encode()), *extra]


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterable[None]:
    """Whatever a client sends, Weir logs no error and no traceback (an exception in a
    callback is logged by the event loop at ERROR). The backends' own complaints (aiohttp's,
    about a request body cut off) are not Weir's."""
    yield
    bad = [r for r in caplog.records if (r.levelno >= logging.ERROR or r.exc_info)
           and not r.name.startswith("aiohttp")]
    assert not bad, "\n".join(f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad)


# --- a well-behaved client (h2) -------------------------------------------------------------


@dataclass
class Stream:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None

    @property
    def over(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """h2 in client mode over an asyncio connection. Response DATA is acknowledged as it
    arrives, except on the streams in ``hold`` (a slow reader)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, Stream] = {}
        self.hold: set[int] = set()
        self.unacked: dict[int, int] = {}
        self.terminated: ConnectionTerminated | None = None
        self.ping_acks: list[bytes] = []
        self.eof = False

    @classmethod
    async def open(cls, port: int, window: int | None = None) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        if window is not None:
            client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        client.flush()
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def start(self, path: str = "/", method: str = "GET", body: bytes | None = None,
              extra: Iterable[tuple[bytes, bytes]] = (), end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = Stream()
        self.conn.send_headers(sid, request_headers(path, method, extra),
                               end_stream=body is None and end)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    async def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not until():
                assert not self.eof, "connection closed while waiting"
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    self.eof = True
                    continue
                for event in self.conn.receive_data(data):
                    self.handle(event)
                self.flush()

    def handle(self, event: Any) -> None:
        if isinstance(event, ResponseReceived):
            st = self.streams[event.stream_id]
            st.headers = list(event.headers)
            st.status = int(dict(st.headers)[b":status"])
        elif isinstance(event, DataReceived):
            st = self.streams[event.stream_id]
            st.body += event.data
            if event.stream_id in self.hold:
                self.unacked[event.stream_id] = (self.unacked.get(event.stream_id, 0)
                                                 + event.flow_controlled_length)
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, StreamEnded):
            self.streams[event.stream_id].ended = True
        elif isinstance(event, StreamReset):
            self.streams[event.stream_id].reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, PingAckReceived):
            self.ping_acks.append(event.ping_data)

    def release(self, sid: int, more: int) -> None:
        """A held stream's reader catches up: what it got is acknowledged, and its window
        opened by ``more``."""
        self.hold.discard(sid)
        unacked = self.unacked.pop(sid, 0)
        if unacked:
            self.conn.acknowledge_received_data(unacked, sid)
        self.conn.increment_flow_control_window(more, stream_id=sid)
        self.conn.increment_flow_control_window(more)
        self.flush()

    async def request(self, path: str = "/", method: str = "GET", body: bytes | None = None,
                      timeout: float = 5.0) -> Stream:
        sid = self.start(path, method, body)
        await self.pump(lambda: self.streams[sid].over, timeout)
        return self.streams[sid]

    async def send_body(self, sid: int, body: bytes, timeout: float = 5.0) -> None:
        """The body within the windows Weir gives, then END_STREAM."""
        conn = self.conn
        pos = 0
        while pos < len(body):
            size = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size,
                       len(body) - pos)
            if size <= 0:
                await self.pump(lambda: conn.local_flow_control_window(sid) > 0
                                or self.streams[sid].over, timeout)
                if self.streams[sid].over:
                    return
                continue
            conn.send_data(sid, body[pos:pos + size])
            pos += size
            self.flush()
        conn.end_stream(sid)
        self.flush()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# --- a client that sends what it likes (hyperframe, hpack) -----------------------------------


# The raw (hostile) client's source address: a client cut for abuse is refused HTTP/2 from
# its address for a while, which must not hit the well-behaved clients on 127.0.0.1.
HOSTILE_ADDRESS = "127.0.0.2"


class RawH2:
    """Frames as the test writes them; what Weir sends is parsed and kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ack_settings: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.ack_settings = ack_settings
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.buf = bytearray()
        self.block: list[bytes] = []  # a header block waiting for its END_HEADERS
        self.frames: list[Frame] = []
        self.server_settings: dict[int, int] = {}
        self.settings_acked = 0
        self.headers: dict[int, list[list[tuple[bytes, bytes]]]] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaways: list[GoAwayFrame] = []
        self.ping_acks: list[bytes] = []
        self.credit: dict[int, int] = {}  # WINDOW_UPDATE increments received, by stream
        self.eof = False
        self.sent = 0  # bytes written

    @classmethod
    async def open(cls, port: int, preface: bytes | None = PREFACE, settings: bool = True,
                   ack_settings: bool = True, source: str = HOSTILE_ADDRESS) -> RawH2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        raw = cls(reader, writer, ack_settings)
        if preface:
            raw.send_bytes(preface)
        if settings:
            raw.send(SettingsFrame(0))
        return raw

    # writing

    def send_bytes(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)
            self.sent += len(data)

    def send(self, *frames: Frame) -> None:
        self.send_bytes(b"".join(f.serialize() for f in frames))

    def block_for(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(headers)

    def headers_frame(self, sid: int, path: str = "/", method: str = "GET", end: bool = True,
                      extra: Iterable[tuple[bytes, bytes]] = (),
                      authority: bytes = AUTHORITY) -> HeadersFrame:
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        block = self.block_for(request_headers(path, method, extra, authority))
        return HeadersFrame(sid, block, flags=flags)

    async def drain(self) -> bool:
        """False once Weir has closed the connection."""
        try:
            await self.writer.drain()
        except ConnectionError:
            return False
        return not self.writer.is_closing()

    # reading

    async def pump(self, until: Callable[[], bool], timeout: float = 5.0,
                   what: str = "") -> None:
        async with asyncio.timeout(timeout):
            while not until():
                assert not self.eof, f"connection closed before {what}: {self.summary()}"
                await self.read_some()

    async def read_some(self) -> None:
        try:
            data = await self.reader.read(262144)
        except ConnectionError:
            data = b""
        if not data:
            self.eof = True
            return
        self.buf += data
        self.parse()

    def parse(self) -> None:
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]), strict=False)
            if len(self.buf) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(self.buf[9:9 + length])))
            del self.buf[:9 + length]
            self.frames.append(frame)
            self.handle(frame)

    async def until_closed(self, timeout: float = 5.0) -> None:
        await self.pump(lambda: self.eof, timeout)

    def handle(self, frame: Frame) -> None:
        sid = frame.stream_id
        if isinstance(frame, SettingsFrame):
            if "ACK" in frame.flags:
                self.settings_acked += 1
            else:
                self.server_settings.update(frame.settings)
                if self.ack_settings:
                    self.send(SettingsFrame(0, flags=["ACK"]))
        elif isinstance(frame, HeadersFrame | ContinuationFrame):
            self.block.append(frame.data)
            if "END_HEADERS" in frame.flags:
                block, self.block = b"".join(self.block), []
                self.headers.setdefault(sid, []).append(
                    [(bytes(n), bytes(v)) for n, v in self.decoder.decode(block, raw=True)])
        elif isinstance(frame, DataFrame):
            self.data.setdefault(sid, bytearray()).extend(frame.data)
        elif isinstance(frame, RstStreamFrame):
            self.resets[sid] = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append(frame)
        elif isinstance(frame, PingFrame):
            if "ACK" in frame.flags:
                self.ping_acks.append(frame.opaque_data)
        elif isinstance(frame, WindowUpdateFrame):
            self.credit[sid] = self.credit.get(sid, 0) + frame.window_increment
        if "END_STREAM" in frame.flags and isinstance(frame, HeadersFrame | DataFrame):
            self.ended.add(sid)

    def status(self, sid: int) -> int | None:
        for block in self.headers.get(sid, []):
            value = dict(block).get(b":status")
            if value is not None and not value.startswith(b"1"):
                return int(value)
        return None

    def goaway(self) -> GoAwayFrame | None:
        return self.goaways[-1] if self.goaways else None

    def summary(self) -> str:
        names = [type(f).__name__ for f in self.frames[-20:]]
        return (f"{len(self.frames)} frames (last: {names}), goaways="
                f"{[(g.error_code, g.last_stream_id) for g in self.goaways]}, "
                f"resets={dict(list(self.resets.items())[:10])}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def error_name(code: int | None) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


async def expect_connection_error(raw: RawH2, codes: set[ErrorCodes], what: str,
                                  timeout: float = 5.0) -> GoAwayFrame:
    """The connection ends with a GOAWAY carrying one of ``codes``, and is then closed."""
    await raw.pump(lambda: bool(raw.goaways) or raw.eof, timeout, what)
    goaway = raw.goaway()
    assert goaway is not None, f"{what}: closed without a GOAWAY: {raw.summary()}"
    assert goaway.error_code in codes, (
        f"{what}: GOAWAY {error_name(goaway.error_code)}, want one of "
        f"{sorted(c.name for c in codes)}")
    await raw.until_closed(timeout)
    return goaway


# --- Weir still serves --------------------------------------------------------------------


async def http11_get(port: int, path: str = "/") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
                     .encode())
        async with asyncio.timeout(5):
            data = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def assert_still_serving(proxy: ProxyServer) -> None:
    """A fresh HTTP/1.1 client and a fresh HTTP/2 client both get their answers."""
    status, _ = await http11_get(proxy.port)
    assert status == 200
    client = await H2Client.open(proxy.port)
    try:
        streams = [client.start("/fresh") for _ in range(3)]
        await client.pump(lambda: all(client.streams[s].over for s in streams))
        for sid in streams:
            st = client.streams[sid]
            assert (st.status, st.reset) == (200, None)
            assert b'"/fresh"' in st.body
    finally:
        await client.close()


def pool_of(proxy: ProxyServer) -> Any:
    return next(iter(proxy.pools.pools.values()))


def active_exchanges(proxy: ProxyServer) -> int:
    return sum(len(pool.active) for pool in proxy.pools.pools.values())


async def no_leaks(proxy: ProxyServer, timeout: float = 5.0) -> None:
    """No client connection left open and no exchange holding an upstream slot."""
    pool = pool_of(proxy)
    await wait_for(lambda: not proxy.connections and not pool.active
                   and not active_exchanges(proxy), timeout)


@pytest.fixture
async def plain(start_backend: StartBackend,
               start_proxy: StartProxy) -> AsyncIterator[tuple[ProxyServer, Backend]]:
    backend = await start_backend("b")
    proxy = await start_proxy(one_service(backend.address), limits={"header_timeout": 2})
    yield proxy, backend


# --- 1: prefaces --------------------------------------------------------------------------


BAD_PREFACES = {
    # Not the preface from "SM" on: no HTTP/2 connection; HTTP/1.1 sees "PRI * HTTP/2.0".
    "garbage-after-partial-preface": PREFACE[:18] + b"XX\r\n\r\n" + b"\x00" * 64,
    # The preface, then a SETTINGS frame 3 bytes long (RFC 9113 6.5: FRAME_SIZE_ERROR).
    "preface-then-short-settings": PREFACE + b"\x00\x00\x03\x04\x00\x00\x00\x00\x00abc",
    # The preface, then SETTINGS on a stream (RFC 9113 6.5: PROTOCOL_ERROR).
    "preface-then-settings-on-a-stream": PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x01",
}


@pytest.mark.parametrize("data", BAD_PREFACES.values(), ids=BAD_PREFACES.keys())
async def test_bad_preface_closes_the_connection(plain: tuple[ProxyServer, Backend],
                                                 data: bytes) -> None:
    """RFC 9113 3.4: an invalid preface is a connection error of type PROTOCOL_ERROR (the
    GOAWAY may be omitted). Weir closes the connection; whatever it sends first is a GOAWAY
    (PROTOCOL_ERROR, or FRAME_SIZE_ERROR for a frame over SETTINGS_MAX_FRAME_SIZE, RFC 9113
    4.2) or, where the bytes were never HTTP/2, an HTTP/1.1 error answer."""
    proxy, backend = plain
    raw = await RawH2.open(proxy.port, preface=None, settings=False)
    raw.send_bytes(data)
    async with asyncio.timeout(5):
        received = await raw.reader.read(-1)
    if received.startswith(b"HTTP/1.1 "):
        assert int(received.split(b" ", 2)[1]) in (400, 505), received[:200]
    else:
        raw.buf += received
        raw.parse()
        goaway = raw.goaway()
        assert goaway is not None, received[:200]
        assert goaway.error_code in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.FRAME_SIZE_ERROR)
    assert backend.requests == []
    await no_leaks(proxy)
    await assert_still_serving(proxy)


async def test_partial_preface_then_silence_is_closed_by_the_header_timeout(
        plain: tuple[ProxyServer, Backend]) -> None:
    """A client that sends half the preface and nothing more does not hold a connection
    forever: limits.header_timeout (2 s here) closes it."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port, preface=PREFACE[:10], settings=False)
    await raw.until_closed(timeout=6)
    await no_leaks(proxy)
    await assert_still_serving(proxy)


async def test_partial_preface_then_eof_is_closed(plain: tuple[ProxyServer, Backend]) -> None:
    """Half the preface and then the client's FIN: Weir closes its side too."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port, preface=PREFACE[:10], settings=False)
    raw.writer.write_eof()
    await raw.until_closed(timeout=6)
    await no_leaks(proxy)


async def test_preface_not_followed_by_settings_is_a_protocol_error(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 3.4: the client preface is the magic string followed by a SETTINGS frame;
    anything else is an invalid preface, a connection error of type PROTOCOL_ERROR."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port, settings=False)
    raw.send(PingFrame(0, opaque_data=b"12345678"))
    await raw.pump(lambda: bool(raw.goaways or raw.ping_acks) or raw.eof)
    assert not raw.ping_acks, "the PING in place of SETTINGS was answered"
    await expect_connection_error(raw, {ErrorCodes.PROTOCOL_ERROR}, "PING before SETTINGS")


async def test_oversized_frame_header_is_refused_at_once(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 4.2: a frame larger than SETTINGS_MAX_FRAME_SIZE (16 KiB here) is a
    FRAME_SIZE_ERROR, a connection error for a frame on stream 0 or one that could alter the
    connection's state. Its 9-byte header says how long it is: nothing requires waiting for
    (and buffering) the body. Here, the client speaks HTTP/1.1 after the preface: "GET" read
    as a frame length is 4.6 MB."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n" + b"x" * 65536)
    await expect_connection_error(raw, {ErrorCodes.FRAME_SIZE_ERROR,
                                        ErrorCodes.PROTOCOL_ERROR}, "oversized frame header",
                                  timeout=3)


# --- 2: flow control, the client's side ---------------------------------------------------


@contextlib.contextmanager
def unreachable_upstream() -> Iterable[str]:
    """An upstream whose connects never complete: a listening socket with a backlog of 0,
    whose accept queue one connection (never accepted) fills, so that the kernel drops the
    SYNs of the next. A request body waits in Weir for the connect, and past
    exchange.BUFFER_HIGH_WATER Weir stops acknowledging it (the module doc)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = socket.create_connection(address, timeout=5)
    try:
        yield f"127.0.0.1:{address[1]}"
    finally:
        filler.close()
        listener.close()


def stall_and_app(stalled: str, backend: Backend) -> list[dict[str, Any]]:
    """stall.test goes to the stalled upstream, anything else to the backend."""
    return [{"name": "stall", "match": {"hosts": ["stall.test"]},
             "timeouts": {"connect": 30},
             "versions": {"stable": {"upstreams": [stalled]}}},
            *one_service(backend.address)]


STALL = b"stall.test"


async def blast(raw: RawH2, streams: list[int], stop: Callable[[], bool],
                respect_stream_windows: bool, limit: int = 64 << 20) -> dict[int, int]:
    """DATA frames of 16 KiB round the ``streams`` until ``stop``: past every window, or
    (``respect_stream_windows``) within each stream's and past the connection's alone.
    Returns the bytes sent on each stream."""
    # What Weir means to give (see test_settings_advertise_the_configured_limits).
    initial = raw.server_settings[SettingCodes.INITIAL_WINDOW_SIZE]
    sent = dict.fromkeys(streams, 0)
    chunk = b"x" * 16384
    while not stop() and sum(sent.values()) < limit:
        progress = False
        for sid in streams:
            size = len(chunk)
            if respect_stream_windows:
                size = min(size, initial + raw.credit.get(sid, 0) - sent[sid])
                if size <= 0:
                    continue
            raw.send(DataFrame(sid, chunk[:size]))
            sent[sid] += size
            progress = True
        if not await raw.drain():
            break
        if not progress:  # every stream's window is used up: wait for credit, or the error
            before = dict(raw.credit)
            await wait_for(lambda b=before: stop() or raw.credit != b,  # type: ignore[misc]
                           timeout=10)
        else:
            await asyncio.sleep(0)  # let the reader see what Weir answers
    return sent


@pytest.mark.parametrize("window", ["stream", "connection"])
async def test_data_beyond_the_window_is_a_flow_control_error(
        start_backend: StartBackend, start_proxy: StartProxy, window: str) -> None:
    """RFC 9113 6.9.1: a sender MUST NOT send DATA beyond the window its peer gave it; a
    receiver MAY treat a stream window overrun as a stream or connection error, and MUST
    treat a connection window overrun as a connection error, of type FLOW_CONTROL_ERROR.

    Request bodies go to an upstream Weir cannot connect to, so Weir stops acknowledging them
    (the module doc: not while held waiting for an upstream connection). The client then sends
    past the
    stream window Weir gave it ("stream"), or within each of 80 streams' windows (80 x 64 KiB
    is more than the 4 MiB connection window) and past the connection's ("connection")."""
    backend = await start_backend("b")
    with unreachable_upstream() as stalled:
        proxy = await start_proxy(stall_and_app(stalled, backend))
        raw = await RawH2.open(proxy.port)
        await raw.pump(lambda: bool(raw.settings_acked and raw.server_settings))
        streams = [1] if window == "stream" else list(range(1, 161, 2))
        for sid in streams:
            raw.send(raw.headers_frame(sid, "/upload", "POST", end=False, authority=STALL))

        def stop() -> bool:
            return bool(raw.goaways or raw.resets or raw.eof)

        reader = asyncio.create_task(raw.pump(stop, timeout=30))
        sent = await blast(raw, streams, stop, respect_stream_windows=window == "connection")
        await reader
        await raw.pump(lambda: raw.eof or bool(raw.goaways), timeout=5)
        # What Weir means to give (see test_settings_advertise_the_configured_limits).
        initial = raw.server_settings[SettingCodes.INITIAL_WINDOW_SIZE]
        conn_granted = 65535 + raw.credit.get(0, 0)
        if window == "stream":
            goaway = raw.goaway()
            if goaway is not None:
                assert goaway.error_code == ErrorCodes.FLOW_CONTROL_ERROR, raw.summary()
            else:
                assert raw.resets == {1: ErrorCodes.FLOW_CONTROL_ERROR}, raw.summary()
            assert sent[1] > initial + raw.credit.get(1, 0), "refused within the window"
        else:
            await expect_connection_error(raw, {ErrorCodes.FLOW_CONTROL_ERROR}, "overrun")
            assert not raw.resets, raw.summary()
            assert sum(sent.values()) > conn_granted, "refused within the window"
        await raw.close()
        await no_leaks(proxy)
        await assert_still_serving(proxy)


# --- 3: frames on streams in the wrong state ----------------------------------------------


async def finished_stream(raw: RawH2, sid: int) -> None:
    raw.send(raw.headers_frame(sid))
    await raw.pump(lambda: sid in raw.ended, what=f"stream {sid}'s response")
    assert raw.status(sid) == 200


async def data_on_idle_stream(raw: RawH2) -> int:
    raw.send(DataFrame(5, b"hello"))
    return 5


async def data_after_end_stream(raw: RawH2) -> int:
    await finished_stream(raw, 1)
    raw.send(DataFrame(1, b"hello"))
    return 1


async def headers_on_a_finished_stream(raw: RawH2) -> int:
    await finished_stream(raw, 1)
    await finished_stream(raw, 3)
    raw.send(raw.headers_frame(1, "/bad"))
    return 1


async def headers_below_the_highest_id(raw: RawH2) -> int:
    raw.send(raw.headers_frame(5, "/slow?delay=0.2"), raw.headers_frame(3, "/bad"))
    return 3


async def headers_on_an_even_stream(raw: RawH2) -> int:
    raw.send(raw.headers_frame(2, "/bad"))
    return 2


async def continuation_without_headers(raw: RawH2) -> int:
    block = raw.block_for(request_headers("/bad"))
    raw.send(ContinuationFrame(1, block, flags=["END_HEADERS"]))
    return 1


async def continuation_after_a_complete_block(raw: RawH2) -> int:
    raw.send(raw.headers_frame(1, "/upload", "POST", end=False))
    raw.send(ContinuationFrame(1, raw.block_for([(b"x-late", b"1")]), flags=["END_HEADERS"]))
    return 1


async def other_frame_inside_a_header_block(raw: RawH2) -> int:
    block = raw.block_for(request_headers("/bad"))
    raw.send(HeadersFrame(1, block[:5], flags=["END_STREAM"]),
             PingFrame(0, opaque_data=b"\0" * 8),
             ContinuationFrame(1, block[5:], flags=["END_HEADERS"]))
    return 1


# Each: what the client does, and the connection error RFC 9113 asks for.
CONNECTION_ERRORS: dict[str, tuple[Callable[[RawH2], Awaitable[int]], set[ErrorCodes]]] = {
    # 5.1 idle: any frame but HEADERS or PRIORITY is a connection error PROTOCOL_ERROR.
    "data-on-idle-stream": (data_on_idle_stream, {ErrorCodes.PROTOCOL_ERROR}),
    # 5.1 closed: frames after END_STREAM (received): connection error STREAM_CLOSED; 6.1
    # allows a stream error STREAM_CLOSED for DATA (see the stream-error test).
    "headers-on-a-finished-stream": (headers_on_a_finished_stream,
                                     {ErrorCodes.STREAM_CLOSED, ErrorCodes.PROTOCOL_ERROR}),
    # 5.1.1: a new stream's id must exceed every id the client used: PROTOCOL_ERROR.
    "headers-below-the-highest-id": (headers_below_the_highest_id,
                                     {ErrorCodes.PROTOCOL_ERROR}),
    # 5.1.1: client streams are odd: PROTOCOL_ERROR.
    "headers-on-an-even-stream": (headers_on_an_even_stream, {ErrorCodes.PROTOCOL_ERROR}),
    # 6.10: CONTINUATION must follow HEADERS/CONTINUATION without END_HEADERS: PROTOCOL_ERROR.
    "continuation-without-headers": (continuation_without_headers,
                                     {ErrorCodes.PROTOCOL_ERROR}),
    "continuation-after-a-complete-block": (continuation_after_a_complete_block,
                                            {ErrorCodes.PROTOCOL_ERROR}),
    # 4.3/6.10: a header block is contiguous; any other frame inside it: PROTOCOL_ERROR.
    "other-frame-inside-a-header-block": (other_frame_inside_a_header_block,
                                          {ErrorCodes.PROTOCOL_ERROR}),
}


@pytest.mark.parametrize("case", CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS.keys())
async def test_frame_on_a_stream_in_the_wrong_state_is_a_connection_error(
        plain: tuple[ProxyServer, Backend],
        case: tuple[Callable[[RawH2], Awaitable[int]], set[ErrorCodes]]) -> None:
    proxy, backend = plain
    act, codes = case
    raw = await RawH2.open(proxy.port)
    sid = await act(raw)
    goaway = await expect_connection_error(raw, codes, "the bad frame")
    if sid % 2 == 0 or act is data_on_idle_stream:
        assert goaway.last_stream_id < sid, "GOAWAY's last stream id takes in a bad stream"
    assert not [r for r in backend.requests if r["path"] == "/bad"], "it reached the backend"
    await no_leaks(proxy)
    await assert_still_serving(proxy)


async def test_data_on_a_half_closed_stream_resets_it_and_frees_its_upstream(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 5.1 half-closed (remote): DATA after the client's END_STREAM is a stream error
    STREAM_CLOSED (a connection error is allowed too, 5.4.1). h2 resets the stream itself;
    Weir must hear of it and let go of the stream's upstream request rather than wait for its
    answer, and the connection carries on."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    raw.send(raw.headers_frame(1, "/slow?delay=3"))
    await wait_for(lambda: active_exchanges(proxy) == 1)
    raw.send(DataFrame(1, b"late"))
    await raw.pump(lambda: 1 in raw.resets or bool(raw.goaways), what="the reset")
    assert raw.resets == {1: ErrorCodes.STREAM_CLOSED}, raw.summary()
    await wait_for(lambda: active_exchanges(proxy) == 0)
    await finished_stream(raw, 3)
    await raw.close()
    await no_leaks(proxy)


async def test_upload_within_the_advertised_windows_completes(
        plain: tuple[ProxyServer, Backend]) -> None:
    """A client that keeps to the windows Weir advertises (RFC 9113 6.9) can send a body of
    any size: Weir opens the windows as it forwards the body."""
    proxy, backend = plain
    client = await H2Client.open(proxy.port)
    body = pattern(300_000)
    sid = client.start("/upload", "POST", end=False)
    await client.send_body(sid, body, timeout=3)
    await client.pump(lambda: client.streams[sid].over, timeout=3)
    assert client.streams[sid].status == 200
    assert backend.requests[-1]["body_size"] == len(body)
    await client.close()


# --- 4: rapid reset -----------------------------------------------------------------------


async def flood(raw: RawH2, frames: Callable[[int], list[Frame]], count: int,
                batch: int = 50) -> int:
    """``count`` rounds of ``frames(i)``, written ``batch`` rounds at a time until Weir
    answers with a GOAWAY or closes; returns the rounds written."""
    done = 0
    reader = asyncio.create_task(raw.pump(lambda: bool(raw.goaways) or raw.eof, timeout=10))
    try:
        while done < count and not raw.goaways and not raw.eof:
            n = min(batch, count - done)
            raw.send(*[f for i in range(done, done + n) for f in frames(i)])
            done += n
            if not await raw.drain():
                break
            await asyncio.sleep(0)  # let the reader take what Weir answers
        await reader
    finally:
        reader.cancel()
    return done


RESETS = {
    # The client opens a stream and resets it at once (CVE-2023-44487).
    "client-resets": lambda raw, sid: [raw.headers_frame(sid, "/slow?delay=3"),
                                       RstStreamFrame(sid, error_code=ErrorCodes.CANCEL)],
    # The client makes Weir reset it: DATA after END_STREAM ("MadeYouReset", CVE-2025-8671).
    "server-resets": lambda raw, sid: [raw.headers_frame(sid, "/slow?delay=3"),
                                       DataFrame(sid, b"x")],
}


@pytest.mark.parametrize("make", RESETS.values(), ids=RESETS.keys())
async def test_rapid_reset_ends_the_connection_and_spares_others(
        plain: tuple[ProxyServer, Backend], make: Callable[[RawH2, int], list[Frame]]) -> None:
    """1,000 streams opened and reset at once: past PREMATURE_MIN_STREAMS, more than half of
    them reset within a second ends the connection with GOAWAY ENHANCE_YOUR_CALM (the module
    doc; RFC 9113 10.5). A well-behaved client on another connection meanwhile gets its
    answers, and nothing of the reset streams is left holding an upstream."""
    proxy, _ = plain
    good = await H2Client.open(proxy.port)
    raw = await RawH2.open(proxy.port)
    rounds = await flood(raw, lambda i: make(raw, 2 * i + 1), 1000)
    goaway = await expect_connection_error(raw, {ErrorCodes.ENHANCE_YOUR_CALM}, "rapid reset")
    assert goaway.last_stream_id <= 2 * rounds - 1
    assert rounds >= PREMATURE_MIN_STREAMS
    streams = [good.start(f"/good/{i}") for i in range(10)]
    await good.pump(lambda: all(good.streams[s].over for s in streams))
    assert [good.streams[s].status for s in streams] == [200] * 10
    await good.close()
    await no_leaks(proxy)
    await assert_still_serving(proxy)


async def test_a_few_resets_are_fine(plain: tuple[ProxyServer, Backend]) -> None:
    """Cancelling now and then (a browser leaving a page) is not an attack: 50 streams opened
    and reset, then a request on the same connection is answered."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    for sid in range(1, 101, 2):
        raw.send(raw.headers_frame(sid, "/slow?delay=3"),
                 RstStreamFrame(sid, error_code=ErrorCodes.CANCEL))
    await finished_stream(raw, 101)
    assert not raw.goaways
    await raw.close()
    await no_leaks(proxy)


# --- 5: CONTINUATION flood ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16384], ids=["empty", "16KiB"])
async def test_continuation_flood_is_a_connection_error(
        plain: tuple[ProxyServer, Backend], size: int) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION after CONTINUATION (CVE-2024-27316):
    the header block is cut off early with a connection error (h2 allows 64 CONTINUATION
    frames per block), long before the 10,000 frames (160 MiB) the client has ready; empty
    frames, which add nothing to the block's size, are bounded too."""
    proxy, backend = plain
    raw = await RawH2.open(proxy.port)
    block = raw.block_for(request_headers("/bad"))
    raw.send(HeadersFrame(1, block, flags=["END_STREAM"]))
    payload = b"\x00" * size
    rounds = await flood(raw, lambda i: [ContinuationFrame(1, payload)], 10_000, batch=16)
    await expect_connection_error(raw, {ErrorCodes.PROTOCOL_ERROR,
                                        ErrorCodes.ENHANCE_YOUR_CALM}, "CONTINUATION flood")
    assert rounds < 10_000
    assert not [r for r in backend.requests if r["path"] == "/bad"]
    await no_leaks(proxy)
    await assert_still_serving(proxy)


# --- 6: SETTINGS and PING floods ----------------------------------------------------------


CONTROL_FLOODS = {
    "ping": lambda i: [PingFrame(0, opaque_data=i.to_bytes(8, "big"))],
    "settings": lambda i: [SettingsFrame(0, settings={SettingCodes.HEADER_TABLE_SIZE: 4096})],
}


@pytest.mark.parametrize("make", CONTROL_FLOODS.values(), ids=CONTROL_FLOODS.keys())
async def test_control_frame_flood_ends_the_connection(
        plain: tuple[ProxyServer, Backend], make: Callable[[int], list[Frame]]) -> None:
    """5,000 PINGs or SETTINGS, each of which Weir must answer (RFC 9113 6.5.3, 6.7): past
    CONTROL_BURST, GOAWAY ENHANCE_YOUR_CALM, and not one answer per frame."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port, ack_settings=False)
    rounds = await flood(raw, make, 5000, batch=250)
    await expect_connection_error(raw, {ErrorCodes.ENHANCE_YOUR_CALM}, "control flood")
    assert rounds >= CONTROL_BURST
    answers = len(raw.ping_acks) + raw.settings_acked
    assert answers <= CONTROL_BURST + 300, answers
    await no_leaks(proxy)
    await assert_still_serving(proxy)


async def test_a_few_pings_are_answered(plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 6.7: each PING gets a PING ACK with the same opaque data; the connection
    carries on."""
    proxy, _ = plain
    client = await H2Client.open(proxy.port)
    payloads = [b"ping-%03d" % i for i in range(5)]
    for payload in payloads:
        client.conn.ping(payload)
    client.flush()
    await client.pump(lambda: len(client.ping_acks) == len(payloads))
    assert client.ping_acks == payloads
    st = await client.request("/after-pings")
    assert st.status == 200
    assert client.terminated is None
    await client.close()
    await no_leaks(proxy)


# --- 7: limits ----------------------------------------------------------------------------


LIMITS = {"max_concurrent_streams": 3, "max_header_bytes": 4096, "max_body_bytes": 1024,
          "header_timeout": 2}


@pytest.fixture
async def limited(start_backend: StartBackend,
                  start_proxy: StartProxy) -> AsyncIterator[tuple[ProxyServer, Backend]]:
    backend = await start_backend("b")
    proxy = await start_proxy(one_service(backend.address), limits=LIMITS)
    yield proxy, backend


async def settled(raw: RawH2) -> None:
    """Both SETTINGS exchanged: Weir's (once this client's ACK reaches it) are in force."""
    await raw.pump(lambda: bool(raw.server_settings) and raw.settings_acked > 0)


async def test_settings_advertise_the_configured_limits(
        limited: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 6.5.2: what Weir enforces must be what it advertises: its limits and its
    stream window, and no server push."""
    proxy, _ = limited
    raw = await RawH2.open(proxy.port)
    await settled(raw)
    got = raw.server_settings
    assert got.get(SettingCodes.ENABLE_PUSH, 0) == 0
    assert {k: got.get(k) for k in (SettingCodes.MAX_CONCURRENT_STREAMS,
                                    SettingCodes.MAX_HEADER_LIST_SIZE,
                                    SettingCodes.INITIAL_WINDOW_SIZE)} == {
        SettingCodes.MAX_CONCURRENT_STREAMS: LIMITS["max_concurrent_streams"],
        SettingCodes.MAX_HEADER_LIST_SIZE: LIMITS["max_header_bytes"],
        SettingCodes.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW}
    await raw.close()


async def test_stream_over_max_concurrent_streams_is_refused(
        limited: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 5.1.2: a HEADERS frame past the concurrent-stream limit is a stream error
    PROTOCOL_ERROR or REFUSED_STREAM; an endpoint may end the connection instead (5.4.1).
    What happens (h2's TooManyStreamsError, raised before the block is decoded, so the
    connection's HPACK state is lost): GOAWAY PROTOCOL_ERROR whose last stream id shows the
    extra stream unprocessed, and the streams in flight are dropped with the connection.
    The extra request never reaches the backend."""
    proxy, backend = limited
    raw = await RawH2.open(proxy.port)
    await settled(raw)
    for sid in (1, 3, 5):
        raw.send(raw.headers_frame(sid, "/slow?delay=3"))
    await wait_for(lambda: active_exchanges(proxy) == 3)
    raw.send(raw.headers_frame(7, "/bad"))
    await raw.pump(lambda: bool(raw.goaways) or 7 in raw.resets, what="the refusal")
    if 7 in raw.resets:
        assert raw.resets[7] in (ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR)
    else:
        goaway = await expect_connection_error(raw, {ErrorCodes.PROTOCOL_ERROR,
                                                     ErrorCodes.REFUSED_STREAM}, "stream 7")
        assert goaway.last_stream_id == 5
    assert not [r for r in backend.requests if r["path"] == "/bad"]
    await raw.close()
    await no_leaks(proxy)
    await assert_still_serving(proxy)


async def test_client_that_never_acks_settings_is_still_limited(
        limited: tuple[ProxyServer, Backend]) -> None:
    """limits.max_concurrent_streams is a defence (the module doc): a client cannot escape it
    by never acknowledging the SETTINGS that carry it (RFC 9113 6.5.3 lets Weir end such a
    connection with SETTINGS_TIMEOUT; REFUSED_STREAM is always allowed, 8.7)."""
    proxy, _ = limited
    raw = await RawH2.open(proxy.port, ack_settings=False)
    for sid in range(1, 11, 2):
        raw.send(raw.headers_frame(sid, "/slow?delay=3"))
    await raw.pump(lambda: bool(raw.goaways or raw.resets) or active_exchanges(proxy) == 5,
                   what="five streams")
    assert active_exchanges(proxy) <= LIMITS["max_concurrent_streams"]
    await raw.close()


async def oversized_in_one_frame(raw: RawH2) -> list[Frame]:
    return [raw.headers_frame(1, "/bad", extra=[(b"x-big", b"a" * 6000)])]


async def oversized_in_continuations(raw: RawH2) -> list[Frame]:
    block = raw.block_for(request_headers("/bad", extra=[(b"x-big", b"a" * 6000)]))
    pieces = [block[i:i + 1000] for i in range(0, len(block), 1000)]
    frames: list[Frame] = [HeadersFrame(1, pieces[0], flags=["END_STREAM"])]
    frames += [ContinuationFrame(1, p) for p in pieces[1:-1]]
    frames.append(ContinuationFrame(1, pieces[-1], flags=["END_HEADERS"]))
    return frames


async def hpack_bomb(raw: RawH2) -> list[Frame]:
    """3,000 bytes into the HPACK dynamic table with an accepted request, then a request of a
    few bytes that names it five times: 15 KB decoded."""
    big = (b"x-big", b"a" * 3000)
    raw.send(raw.headers_frame(1, "/ok", extra=[big]))
    await raw.pump(lambda: 1 in raw.ended, what="the first request's answer")
    assert raw.status(1) == 200
    second = raw.headers_frame(3, "/bad", extra=[big] * 5)
    assert len(second.data) < 100
    return [second]


HEADER_FLOODS = {"one-frame": oversized_in_one_frame,
                 "continuations": oversized_in_continuations, "hpack-bomb": hpack_bomb}


@pytest.mark.parametrize("make", HEADER_FLOODS.values(), ids=HEADER_FLOODS.keys())
async def test_header_list_over_max_header_bytes_is_refused(
        limited: tuple[ProxyServer, Backend],
        make: Callable[[RawH2], Awaitable[list[Frame]]]) -> None:
    """A header list over limits.max_header_bytes (4,096 here) as HPACK decodes it, however it
    is framed or compressed, never reaches the backend: a 431, a stream reset, or a
    connection error (h2: GOAWAY ENHANCE_YOUR_CALM) are all RFC 9113 answers (10.5.1)."""
    proxy, backend = limited
    raw = await RawH2.open(proxy.port)
    await settled(raw)
    frames = await make(raw)
    sid = frames[-1].stream_id
    raw.send(*frames)
    await raw.pump(lambda: bool(raw.goaways) or sid in raw.resets or raw.status(sid) is not None,
                   what="the refusal")
    if raw.goaways:
        await expect_connection_error(raw, {ErrorCodes.ENHANCE_YOUR_CALM,
                                            ErrorCodes.PROTOCOL_ERROR,
                                            ErrorCodes.COMPRESSION_ERROR}, "big headers")
    elif raw.status(sid) is not None:
        assert raw.status(sid) == 431
    assert not [r for r in backend.requests if r["path"] == "/bad"]
    await raw.close()
    await no_leaks(proxy)
    await assert_still_serving(proxy)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
async def test_body_over_max_body_bytes_is_413(limited: tuple[ProxyServer, Backend],
                                               declared: bool) -> None:
    """A body over limits.max_body_bytes (1,024 here), declared by content-length or found
    as it streams: 413, and the connection carries on. The request's HEADERS and DATA leave
    in one write, as any client sends a small POST."""
    proxy, backend = limited
    client = await H2Client.open(proxy.port)
    body = b"b" * 4096
    extra = [(b"content-length", b"4096")] if declared else []
    sid = client.conn.get_next_available_stream_id()
    client.streams[sid] = Stream()
    client.conn.send_headers(sid, request_headers("/upload", "POST", extra))
    client.conn.send_data(sid, body, end_stream=True)
    client.flush()
    await client.pump(lambda: client.streams[sid].over)
    st = client.streams[sid]
    assert st.status == 413, (st.status, st.reset)
    assert b"413" in st.body
    assert not [r for r in backend.requests if r["path"] == "/upload"]
    after = await client.request("/after")
    assert after.status == 200
    await client.close()
    await no_leaks(proxy)


# --- 8: a slow reader stalls only its own stream ------------------------------------------


async def test_slow_reader_stalls_only_its_own_stream(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 5.2: a client's window bounds what Weir sends on a stream. With a window of
    1 KiB and no WINDOW_UPDATE on a 2 MB download, another stream on the same connection
    still gets its whole answer; once the reader catches up, the download arrives intact."""
    proxy, _ = plain
    client = await H2Client.open(proxy.port, window=1024)
    size = 2_000_000
    big = client.start(f"/stream?size={size}")
    client.hold.add(big)
    await client.pump(lambda: len(client.streams[big].body) > 0)
    small = await client.request("/small")
    assert small.status == 200 and b'"/small"' in small.body
    assert len(client.streams[big].body) <= 1024
    assert not client.streams[big].over
    client.release(big, size)
    await client.pump(lambda: client.streams[big].over, timeout=10)
    st = client.streams[big]
    assert (st.status, st.ended, st.reset) == (200, True, None)
    assert st.body == pattern(size)
    await client.close()
    await no_leaks(proxy)


# --- 9: a client leaving mid-response leaks nothing ---------------------------------------


async def stalled_download(raw: RawH2) -> None:
    """Stream 1: a 2 MB download the client's 1 KiB window holds up."""
    raw.send(SettingsFrame(0, settings={SettingCodes.INITIAL_WINDOW_SIZE: 1024}))
    raw.send(raw.headers_frame(1, "/stream?size=2000000"))
    await raw.pump(lambda: len(raw.data.get(1, b"")) > 0, what="the download's start")


async def leave_by_rst_mid_response(raw: RawH2, proxy: ProxyServer) -> None:
    await stalled_download(raw)
    raw.send(RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
    await wait_for(lambda: active_exchanges(proxy) == 0)
    await next_stream_works(raw, 3)


async def leave_by_rst_mid_request(raw: RawH2, proxy: ProxyServer) -> None:
    raw.send(raw.headers_frame(1, "/upload", "POST", end=False), DataFrame(1, b"x" * 1000))
    await wait_for(lambda: active_exchanges(proxy) == 1)
    raw.send(RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
    await wait_for(lambda: active_exchanges(proxy) == 0)
    await next_stream_works(raw, 3)


async def leave_by_rst_while_waiting(raw: RawH2, proxy: ProxyServer) -> None:
    raw.send(raw.headers_frame(1, "/slow?delay=3"))
    await wait_for(lambda: active_exchanges(proxy) == 1)
    raw.send(RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
    await wait_for(lambda: active_exchanges(proxy) == 0)
    await next_stream_works(raw, 3)


async def next_stream_works(raw: RawH2, sid: int) -> None:
    raw.send(raw.headers_frame(sid), WindowUpdateFrame(sid, window_increment=1 << 20))
    await raw.pump(lambda: sid in raw.ended, what=f"stream {sid}")
    assert raw.status(sid) == 200


async def leave_by_goaway_then_close(raw: RawH2, proxy: ProxyServer) -> None:
    await stalled_download(raw)
    raw.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR))
    await raw.drain()


async def leave_by_goaway_error(raw: RawH2, proxy: ProxyServer) -> None:
    await stalled_download(raw)
    raw.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.INTERNAL_ERROR))
    await raw.until_closed()


async def leave_by_closing_the_socket(raw: RawH2, proxy: ProxyServer) -> None:
    await stalled_download(raw)


LEAVINGS = {
    "rst-mid-response": leave_by_rst_mid_response,
    "rst-mid-request-body": leave_by_rst_mid_request,
    "rst-while-waiting": leave_by_rst_while_waiting,
    "goaway-then-close": leave_by_goaway_then_close,
    "goaway-with-error": leave_by_goaway_error,
    "socket-closed": leave_by_closing_the_socket,
}


@pytest.mark.parametrize("leave", LEAVINGS.values(), ids=LEAVINGS.keys())
async def test_client_leaving_mid_exchange_leaks_nothing(
        plain: tuple[ProxyServer, Backend],
        leave: Callable[[RawH2, ProxyServer], Awaitable[None]]) -> None:
    """After a client's RST_STREAM, GOAWAY or close mid-exchange: no exchange holds an
    upstream, and once the client's connection is gone, none is left in proxy.connections."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    await leave(raw, proxy)
    await raw.close()
    await no_leaks(proxy)
    await assert_still_serving(proxy)


# --- 10: graceful shutdown ----------------------------------------------------------------


GOAWAY_CLOSES = ("h2 moves the connection to CLOSED once a GOAWAY is sent or received: "
                 "Weir's send_headers/send_data for streams in flight then raise ProtocolError, "
                 "which Weir swallows, so those responses are silently dropped")


async def test_shutdown_sends_goaway_and_finishes_the_stream_in_flight(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 6.8: GOAWAY NO_ERROR whose last stream id covers the stream in flight; that
    stream's response still arrives whole (the module doc: "streams in flight finish"); then
    Weir closes."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    await finished_stream(raw, 1)
    raw.send(raw.headers_frame(3, "/slow?delay=0.5"))
    await wait_for(lambda: active_exchanges(proxy) == 1)
    shutdown = asyncio.create_task(proxy.shutdown(timeout=5))
    try:
        await raw.pump(lambda: bool(raw.goaways), what="the GOAWAY")
        goaway = raw.goaway()
        assert goaway is not None
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.last_stream_id >= 3
        await raw.pump(lambda: 3 in raw.ended or raw.eof, what="stream 3's answer")
        assert raw.status(3) == 200, raw.summary()
        assert bytes(raw.data[3]) == b"slow done"
        await raw.until_closed()
    finally:
        async with asyncio.timeout(6):
            await shutdown
    assert not proxy.connections


async def test_stream_opened_after_the_shutdown_goaway_is_not_a_connection_error(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 6.8: after sending GOAWAY, the sender ignores frames on streams the peer
    opens past the last stream id (a client cannot help opening one while the GOAWAY is on
    its way); refusing it (REFUSED_STREAM) is fine, a connection error is not."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    raw.send(raw.headers_frame(1, "/slow?delay=0.5"))
    await wait_for(lambda: active_exchanges(proxy) == 1)
    shutdown = asyncio.create_task(proxy.shutdown(timeout=5))
    try:
        await raw.pump(lambda: bool(raw.goaways), what="the GOAWAY")
        raw.send(raw.headers_frame(3, "/too-late"))
        await raw.until_closed(timeout=5)
        assert [g.error_code for g in raw.goaways] == [ErrorCodes.NO_ERROR], raw.summary()
        assert raw.resets.get(3, ErrorCodes.REFUSED_STREAM) == ErrorCodes.REFUSED_STREAM
    finally:
        async with asyncio.timeout(6):
            await shutdown


async def test_client_goaway_lets_the_streams_in_flight_finish(
        plain: tuple[ProxyServer, Backend]) -> None:
    """RFC 9113 6.8: a client's GOAWAY NO_ERROR means it opens no more streams; the streams
    it has still complete (the module doc: "streams it opened run to their end"), and
    flow control goes on for them."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    await stalled_download(raw)
    raw.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR))
    raw.send(WindowUpdateFrame(1, window_increment=2_000_000),
             WindowUpdateFrame(0, window_increment=2_000_000))
    await raw.pump(lambda: 1 in raw.ended or raw.eof, what="the download's end")
    assert not raw.goaways, raw.summary()
    assert bytes(raw.data[1]) == pattern(2_000_000)
    await raw.until_closed()
    await no_leaks(proxy)


async def test_the_last_stream_reset_after_a_client_goaway_closes_the_connection(
        plain: tuple[ProxyServer, Backend]) -> None:
    """After its GOAWAY NO_ERROR the client resets the one stream it had: nothing is left
    to finish, so Weir closes the connection then, not at the idle timeout."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    await stalled_download(raw)
    raw.send(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR))
    # The reset comes in a read of its own, once the GOAWAY has been taken in.
    await wait_for(lambda: all(getattr(c, "closing", False) for c in proxy.connections))
    raw.send(RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
    await raw.until_closed(timeout=3)
    await no_leaks(proxy)


# --- early answers and DATA in the same read --------------------------------------------


async def test_early_answer_with_its_body_in_the_same_read_spares_the_connection(
        limited: tuple[ProxyServer, Backend]) -> None:
    """A POST whose content-length is over limits.max_body_bytes: 413 from Weir at once. Its
    body came in the same packet; it is dropped (its flow control credited to the
    connection), and another stream in flight on the same connection is not harmed."""
    proxy, _ = limited
    client = await H2Client.open(proxy.port)
    slow = client.start("/slow?delay=0.3")
    await wait_for(lambda: active_exchanges(proxy) == 1)
    sid = client.conn.get_next_available_stream_id()
    client.streams[sid] = Stream()
    client.conn.send_headers(sid, request_headers("/upload", "POST",
                                                  [(b"content-length", b"2000")]))
    client.conn.send_data(sid, b"x" * 2000, end_stream=True)
    client.flush()
    await client.pump(lambda: client.streams[sid].over and client.streams[slow].over)
    assert client.streams[sid].status == 413
    assert client.streams[slow].status == 200
    await client.close()
    await no_leaks(proxy)


async def rapid_reset_cut(port: int) -> None:
    raw = await RawH2.open(port)
    await flood(raw, lambda i: [raw.headers_frame(2 * i + 1, "/slow?delay=3"),
                                RstStreamFrame(2 * i + 1, error_code=ErrorCodes.CANCEL)], 300)
    await expect_connection_error(raw, {ErrorCodes.ENHANCE_YOUR_CALM}, "rapid reset")


async def test_an_address_cut_for_rapid_reset_gets_no_connection_for_a_while(
        plain: tuple[ProxyServer, Backend]) -> None:
    """A client that reconnects as fast as it is cut would cost a core (bench/rapid_reset.py):
    its address is refused at once for a second, doubling while it keeps coming back. Other
    addresses are served meanwhile."""
    proxy, _ = plain
    await rapid_reset_cut(proxy.port)
    again = await RawH2.open(proxy.port)
    await again.until_closed(5)
    assert not again.frames, f"closed before any frame of its was read: {again.summary()}"
    assert proxy.stats.limits.http2_abuse == 2  # the cut, then the refusal
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port,
                                                   local_addr=(HOSTILE_ADDRESS, 0))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b"", "HTTP/1.1 refused too"
    writer.close()
    assert proxy.stats.limits.http2_abuse == 3
    status, _ = await http11_get(proxy.port)  # from 127.0.0.1: the penalty is per address
    assert status == 200
    await assert_still_serving(proxy)
    penalties = proxy.plane.penalties
    assert penalties.refuses(HOSTILE_ADDRESS, proxy.loop.time())
    first = penalties.until[HOSTILE_ADDRESS]
    await wait_for(lambda: not penalties.refuses(HOSTILE_ADDRESS, proxy.loop.time()), 3)
    await rapid_reset_cut(proxy.port)  # back, and cut again: twice as long
    assert penalties.until[HOSTILE_ADDRESS] - first >= 2.0 - 0.1


async def test_a_trusted_proxy_is_not_refused_after_a_cut(
        start_backend: StartBackend, start_proxy: StartProxy) -> None:
    """Every client behind a trusted proxy would pay for one abuser."""
    backend = await start_backend("b")
    proxy = await start_proxy(one_service(backend.address),
                              trusted_proxies=[f"{HOSTILE_ADDRESS}/32"])
    await rapid_reset_cut(proxy.port)
    assert not proxy.plane.penalties.until
    client = await RawH2.open(proxy.port)
    await finished_stream(client, 1)
    await client.close()


async def test_a_stream_reset_in_the_read_that_opened_it_never_reaches_the_upstream(
        plain: tuple[ProxyServer, Backend]) -> None:
    """Weir starts the streams a read opens once the read is handled: one whose RST_STREAM
    came with its HEADERS (a cancelled call, or rapid reset's every stream) is counted (499)
    and costs no upstream connection. Its neighbours in the same read are answered, in the
    order they came, a body sent with its HEADERS included."""
    proxy, backend = plain
    raw = await RawH2.open(proxy.port)
    await raw.pump(lambda: bool(raw.frames), what="the server's SETTINGS")
    raw.send(raw.headers_frame(1, "/kept-1"),  # (made in order: their HPACK blocks index)
             raw.headers_frame(3, "/cancelled"), RstStreamFrame(3, error_code=ErrorCodes.CANCEL),
             raw.headers_frame(5, "/echo-body", method="POST", end=False),
             DataFrame(5, b"sent with its head", flags=["END_STREAM"]))
    await raw.pump(lambda: {1, 5} <= raw.ended, what="the two kept streams' answers")
    assert raw.status(1) == 200 and raw.status(5) == 200
    paths = [r["path"] for r in backend.requests]
    assert "/cancelled" not in paths and "/kept-1" in paths, paths
    assert backend.requests[-1]["body_size"] == len(b"sent with its head")
    await wait_for(lambda: proxy.plane.stats.unrouted.get(499) == 1, 3)
    await raw.close()


async def test_a_rapid_reset_read_is_not_parsed_past_the_cut(
        plain: tuple[ProxyServer, Backend]) -> None:
    """1,000 HEADERS and RST_STREAM pairs in one write: Weir parses a big read a slice of
    frames at a time and stops at the cut, so the GOAWAY names a stream not far past the
    100th, and no more streams than that became requests (h2 alone would have parsed all
    2,000 frames first)."""
    proxy, _ = plain
    raw = await RawH2.open(proxy.port)
    await raw.pump(lambda: bool(raw.frames), what="the server's SETTINGS")
    raw.send(*[f for i in range(1000) for f in (
        raw.headers_frame(2 * i + 1, "/slow?delay=3"),
        RstStreamFrame(2 * i + 1, error_code=ErrorCodes.CANCEL))])
    goaway = await expect_connection_error(raw, {ErrorCodes.ENHANCE_YOUR_CALM}, "rapid reset")
    assert 2 * PREMATURE_MIN_STREAMS - 1 <= goaway.last_stream_id < 2 * 200, goaway
    # Each counted once: against the version, or unrouted when reset before its read ended
    # (Weir starts a read's streams once its frames are handled: those never were).
    stats = proxy.table.routes[0].versions["stable"].stats
    assert PREMATURE_MIN_STREAMS <= stats.total + proxy.plane.stats.unrouted.get(499, 0) < 200
