"""The gRPC tests' harness: grpcio servers and clients over raw bytes (generic handlers, no code
generation), a raw HTTP/2 gRPC client (the `h2` package) that sees the frames themselves, and a
raw HTTP/2 gRPC upstream that records the request headers it is sent.

Everything runs in the test's event loop (uvloop): ``grpc.aio`` servers on 127.0.0.1 at ports
the kernel picks, ``grpc.aio`` channels to a Weir port. Each server has a name, and puts it in
every answer (the response bytes, the ``x-server`` initial and trailing metadata), so a client
can count which version served each call.

The service ``weir.test.Echo`` has four methods:

- ``Unary``: answers ``b"<name>:" + request``. Per call, through request metadata:
  ``x-trailer-*`` keys are echoed back as trailing metadata, ``x-initial-*`` as initial
  metadata, ``x-want-status`` (a number) and ``x-want-message`` (or ``x-want-message-bin``,
  UTF-8, for what ASCII metadata cannot carry) end the call with that status,
  ``x-delay`` (seconds) answers late. Per server, through its attributes: ``fail_rate`` of the
  calls (an exact share, spread evenly: call n fails when floor(n * rate) moves) end with
  ``fail_code`` and ``fail_message``; ``delay`` seconds before every answer.
- ``ServerStream``: the request is ``b"<count> <size>"``; answers ``count`` messages of
  ``size`` bytes (at least 6), each ``b"%06d" % index`` padded with ``b"."``. ``sent[call]``
  counts the messages each call has handed to grpcio (writes block under flow control).
- ``ClientStream``: answers ``b"<name>:<messages>:<sha256 of their concatenation>"``.
- ``Bidi``: answers each message at once with ``b"<name>:" + message``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)

SERVICE = "weir.test.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"

# The channel options every test client uses: no retries by grpcio itself (each call is one
# request, so counts are exact), no limit on what it receives.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)

Metadata = Sequence[tuple[str, str | bytes]]


def stream_message(index: int, size: int) -> bytes:
    """Message ``index`` of a ServerStream answer: its number, then padding to ``size``."""
    head = b"%06d" % index
    return head + b"." * max(0, size - len(head))


# --- servers --------------------------------------------------------------------------------


@dataclass
class GrpcServer:
    """One grpcio server (a version of the service); its attributes change its behaviour at
    once, and its counters say what it answered."""

    name: str
    fail_rate: float = 0.0
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    fail_message: str = "injected failure"
    delay: float = 0.0
    port: int = 0
    server: aio.Server | None = None
    calls: Counter[str] = field(default_factory=Counter)        # by method
    answered: Counter[int] = field(default_factory=Counter)     # unary calls by status code
    metadata: list[dict[str, str | bytes]] = field(default_factory=list)  # each unary call's
    requests: list[bytes] = field(default_factory=list)        # each unary call's message
    sent: dict[int, int] = field(default_factory=dict)          # ServerStream call -> messages
    stream_calls: int = 0
    unary_calls: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def answered_by_status(self) -> dict[str, int]:
        """Unary answers as {"<grpc status number>": count}, /metrics' label values."""
        return {str(code): count for code, count in self.answered.items()}

    def _scheduled_failure(self) -> bool:
        number = self.unary_calls
        rate = self.fail_rate
        return rate > 0 and math.floor(number * rate) > math.floor((number - 1) * rate)

    # -- the methods --

    async def unary(self, request: bytes, context: aio.ServicerContext) -> bytes:
        self.calls["Unary"] += 1
        self.unary_calls += 1
        received = {key: value for key, value in context.invocation_metadata() or ()}
        self.metadata.append(received)
        self.requests.append(request)
        trailing: list[tuple[str, str | bytes]] = [("x-server", self.name)]
        initial: list[tuple[str, str | bytes]] = [("x-server", self.name)]
        for key, value in received.items():
            if key.startswith("x-trailer-"):
                trailing.append((key, value))
            elif key.startswith("x-initial-"):
                initial.append((key, value))
        delay = float(str(received.get("x-delay", self.delay)))
        if delay:  # before any byte of the answer: the headers too are late
            await asyncio.sleep(delay)
        await context.send_initial_metadata(initial)
        context.set_trailing_metadata(trailing)
        code, message = grpc.StatusCode.OK, ""
        if "x-want-status" in received:
            wanted = int(str(received["x-want-status"]))
            code = next(c for c in grpc.StatusCode if c.value[0] == wanted)
            wanted_message = received.get("x-want-message-bin", received.get("x-want-message"))
            if isinstance(wanted_message, bytes):
                wanted_message = wanted_message.decode("utf-8")
            message = wanted_message or ""
        elif self._scheduled_failure():
            code, message = self.fail_code, self.fail_message
        self.answered[code.value[0]] += 1
        if code is not grpc.StatusCode.OK:
            context.set_code(code)
            context.set_details(message)
            return b""
        return self.name.encode() + b":" + request

    async def server_stream(self, request: bytes,
                            context: aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls["ServerStream"] += 1
        self.stream_calls += 1
        call = self.stream_calls
        count, size = (int(x) for x in request.split())
        self.sent[call] = 0
        await context.send_initial_metadata([("x-server", self.name),
                                             ("x-stream-call", str(call))])
        for index in range(count):
            yield stream_message(index, size)
            self.sent[call] = index + 1

    async def client_stream(self, requests: AsyncIterator[bytes],
                            context: aio.ServicerContext) -> bytes:
        self.calls["ClientStream"] += 1
        digest = hashlib.sha256()
        count = 0
        async for message in requests:
            digest.update(message)
            count += 1
        return b"%s:%d:%s" % (self.name.encode(), count, digest.hexdigest().encode())

    async def bidi(self, requests: AsyncIterator[bytes],
                   context: aio.ServicerContext) -> AsyncIterator[bytes]:
        self.calls["Bidi"] += 1
        await context.send_initial_metadata([("x-server", self.name)])
        async for message in requests:
            yield self.name.encode() + b":" + message

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        })

    async def start(self) -> GrpcServer:
        self.server = aio.server(options=(("grpc.so_reuseport", 0),))
        self.server.add_generic_rpc_handlers((self.handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        assert self.port, f"grpc server {self.name} could not bind"
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None


class GrpcFleet:
    """The servers of one test: ``await fleet.start("stable", fail_rate=0.2)``; all stopped
    on exit (``async with GrpcFleet() as fleet``)."""

    def __init__(self) -> None:
        self.servers: list[GrpcServer] = []
        self.clients: list[GrpcClient] = []

    async def start(self, name: str, **behaviour: Any) -> GrpcServer:
        server = await GrpcServer(name, **behaviour).start()
        self.servers.append(server)
        return server

    def client(self, port: int, authority: str = "grpc.test") -> GrpcClient:
        client = GrpcClient(port, authority)
        self.clients.append(client)
        return client

    async def __aenter__(self) -> GrpcFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.close()
        for server in self.servers:
            await server.stop()


# --- a grpcio client ------------------------------------------------------------------------


@dataclass
class Answer:
    """A finished unary call as the client saw it."""

    code: grpc.StatusCode
    details: str | None
    body: bytes | None
    initial: dict[str, str | bytes]
    trailing: dict[str, str | bytes]

    @property
    def server(self) -> str:
        """Which server answered: its ``x-server`` trailer (Weir's own answers have none)."""
        return str(self.trailing.get("x-server", self.initial.get("x-server", "")))

    @property
    def version(self) -> str:
        """The version Weir routed the call to, from its ``x-weir-version`` header (in the
        trailing metadata when Weir answered itself: a trailers-only response has no other)."""
        return str(self.initial.get("x-weir-version", self.trailing.get("x-weir-version", "")))


def as_dict(metadata: Any) -> dict[str, str | bytes]:
    return {key: value for key, value in metadata or ()}


class GrpcClient:
    """One grpcio.aio channel to a Weir port (``authority`` is what Weir routes by), with
    counts of which server answered each unary call."""

    def __init__(self, port: int, authority: str = "grpc.test") -> None:
        self.channel = aio.insecure_channel(
            f"127.0.0.1:{port}",
            options=[*CHANNEL_OPTIONS, ("grpc.default_authority", authority)])
        self.served: Counter[str] = Counter()
        self.codes: Counter[grpc.StatusCode] = Counter()
        self._unary = self.channel.unary_unary(UNARY)
        self._server_stream = self.channel.unary_stream(SERVER_STREAM)
        self._client_stream = self.channel.stream_unary(CLIENT_STREAM)
        self._bidi = self.channel.stream_stream(BIDI)

    async def unary(self, request: bytes = b"ping", metadata: Metadata = (),
                    timeout: float = 10.0) -> Answer:
        call = self._unary(request, metadata=tuple(metadata), timeout=timeout)
        try:
            body = await call
        except aio.AioRpcError as error:
            answer = Answer(error.code(), error.details(), None,
                            as_dict(error.initial_metadata()),
                            as_dict(error.trailing_metadata()))
        else:
            answer = Answer(await call.code(), await call.details(), body,
                            as_dict(await call.initial_metadata()),
                            as_dict(await call.trailing_metadata()))
        self.served[answer.server] += 1
        self.codes[answer.code] += 1
        return answer

    async def unary_many(self, count: int, concurrency: int = 20,
                         request: bytes = b"ping") -> list[Answer]:
        """``count`` unary calls on this channel, ``concurrency`` in flight at a time."""
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> Answer:
            async with semaphore:
                return await self.unary(request)

        return list(await asyncio.gather(*(one() for _ in range(count))))

    def server_stream(self, count: int, size: int = 16, timeout: float = 20.0,
                      ) -> aio.UnaryStreamCall:
        return self._server_stream(b"%d %d" % (count, size), timeout=timeout)

    async def client_stream(self, messages: Iterable[bytes], timeout: float = 10.0) -> bytes:
        async def source() -> AsyncIterator[bytes]:
            for message in messages:
                yield message

        return bytes(await self._client_stream(source(), timeout=timeout))

    def bidi(self, timeout: float = 10.0) -> aio.StreamStreamCall:
        return self._bidi(timeout=timeout)

    async def close(self) -> None:
        await self.channel.close(grace=None)


@dataclass
class GrpcHit:
    started: float  # time.time() when the call was made
    server: str     # the server that answered ("weir" when Weir answered itself)
    code: int       # the gRPC status number
    version: str    # the version Weir says it routed to (x-weir-version), "" if none
    details: str    # the status message


class GrpcLoad:
    """A few workers making unary calls back to back on ONE grpcio channel until stopped
    (``async with GrpcLoad(port) as load``), recording who answered each and how."""

    def __init__(self, port: int, workers: int = 4, authority: str = "grpc.test") -> None:
        self.client = GrpcClient(port, authority)
        self.workers = workers
        self.hits: list[GrpcHit] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> GrpcLoad:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            tasks, self._tasks = self._tasks, []
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
        await self.client.close()

    async def _worker(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            answer = await self.client.unary(b"load", timeout=5)
            self.hits.append(GrpcHit(started, answer.server or "weir", answer.code.value[0],
                                     answer.version, answer.details or ""))

    def count(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(h.server for h in self.hits if since <= h.started <= until)

    def codes(self, server: str | None = None) -> Counter[int]:
        return Counter(h.code for h in self.hits if server is None or h.server == server)

    def first(self, server: str) -> float:
        return min(h.started for h in self.hits if h.server == server)

    async def wait_hits(self, count: int, server: str | None = None, since: float = 0.0,
                        timeout: float = 5.0) -> None:
        def enough() -> bool:
            return sum(1 for h in self.hits if h.started >= since
                       and (server is None or h.server == server)) >= count

        async with asyncio.timeout(timeout):
            while not enough():
                await asyncio.sleep(0.01)


async def settles(read: Callable[[], int], quiet: float = 0.3, timeout: float = 10.0) -> int:
    """Wait until ``read()`` has kept the same value for ``quiet`` seconds, with a deadline of
    ``timeout``; returns that value (how far a blocked writer got)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        value, since = read(), loop.time()
        while loop.time() - since < quiet:
            await asyncio.sleep(0.02)
            if read() != value:
                value, since = read(), loop.time()
    return value


# --- raw HTTP/2: the frames themselves ------------------------------------------------------


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_messages(data: bytes) -> list[bytes]:
    messages = []
    while data:
        _, size = struct.unpack(">BI", data[:5])
        messages.append(data[5:5 + size])
        data = data[5 + size:]
    return messages


@dataclass
class RawAnswer:
    """One gRPC call's response as frames: the first HEADERS block, whether that block ended
    the stream (a trailers-only response), the DATA, and the trailers (if a second block)."""

    headers: dict[str, str]
    ended_by_headers: bool
    data: bytes
    trailers: dict[str, str] | None
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(self.headers.get(":status", "0"))


async def raw_grpc_call(port: int, message: bytes, authority: str = "grpc.test",
                        path: str = UNARY, timeout: float = 10.0,
                        extra_headers: Sequence[tuple[str, str]] = ()) -> RawAnswer:
    """One unary gRPC call over a fresh h2c connection with prior knowledge, read frame by
    frame with the `h2` package."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, [
        (":method", "POST"), (":scheme", "http"), (":authority", authority), (":path", path),
        ("content-type", "application/grpc"), ("te", "trailers"), *extra_headers])
    body = grpc_frame(message)
    sent = 0
    headers: dict[str, str] | None = None
    ended_by_headers = False
    trailers: dict[str, str] | None = None
    data = bytearray()
    reset: int | None = None
    done = False
    try:
        async with asyncio.timeout(timeout):
            while not done:
                # Send what the windows allow of the body, then read.
                while sent < len(body):
                    room = min(conn.local_flow_control_window(stream_id),
                               conn.max_outbound_frame_size, len(body) - sent)
                    if room <= 0:
                        break
                    conn.send_data(stream_id, body[sent:sent + room],
                                   end_stream=sent + room == len(body))
                    sent += room
                writer.write(conn.data_to_send())
                await writer.drain()
                chunk = await reader.read(65536)
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if getattr(event, "stream_id", stream_id) != stream_id:
                        continue
                    if isinstance(event, ResponseReceived):
                        headers = {k: v for k, v in event.headers}  # type: ignore[misc]
                        ended_by_headers = event.stream_ended is not None
                    elif isinstance(event, DataReceived):
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       stream_id)
                    elif isinstance(event, TrailersReceived):
                        trailers = {k: v for k, v in event.headers}  # type: ignore[misc]
                    elif isinstance(event, StreamEnded):
                        done = True
                    elif isinstance(event, StreamReset):
                        reset = event.error_code
                        done = True
                    elif isinstance(event, ConnectionTerminated):
                        done = True
    finally:
        writer.close()
    assert headers is not None, f"no response headers (reset: {reset})"
    return RawAnswer(headers, ended_by_headers, bytes(data), trailers, reset)


@dataclass
class RawGrpcUpstream:
    """An h2c upstream written with the `h2` package: records each request's headers (every
    field, in order, as sent) and answers each call OK with ``b"raw:" + message``."""

    port: int = 0
    requests: list[list[tuple[str, str]]] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> RawGrpcUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytearray] = {}
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                for event in conn.receive_data(chunk):
                    if isinstance(event, RequestReceived):
                        self.requests.append(list(event.headers))  # type: ignore[arg-type]
                        bodies[event.stream_id] = bytearray()
                    elif isinstance(event, DataReceived):
                        bodies[event.stream_id] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                    elif isinstance(event, StreamEnded):
                        messages = grpc_messages(bytes(bodies.pop(event.stream_id)))
                        answer = b"raw:" + (messages[0] if messages else b"")
                        conn.send_headers(event.stream_id, [
                            (":status", "200"), ("content-type", "application/grpc")])
                        conn.send_data(event.stream_id, grpc_frame(answer))
                        conn.send_headers(event.stream_id, [("grpc-status", "0")],
                                          end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


# --- Weir configs ---------------------------------------------------------------------------


def grpc_service(versions: dict[str, str], weights: dict[str, int] | None = None,
                 name: str = "svc", hosts: Sequence[str] = ("grpc.test",),
                 **extra: Any) -> dict[str, Any]:
    """A service whose versions speak h2c to their upstreams: {version: "host:port"}."""
    service: dict[str, Any] = {
        "name": name,
        "match": {"hosts": list(hosts)},
        "versions": {version: {"upstreams": [address], "protocol": "h2c"}
                     for version, address in versions.items()},
        **extra,
    }
    if weights is not None:
        service["weights"] = weights
    return service
