"""Microbenchmark of Weir's per-request Python work, without sockets or a load generator.

It drives the real Http1Connection and UpstreamConnection with in-memory transports: each
iteration feeds one request to the client side and one canned response to the upstream side,
so what is measured is exactly the proxy's own CPU cost per request (parsing callbacks,
routing, sticky hashing, head rewriting), free of kernel and scheduler noise.

With ``--http2`` it drives the real Http2Connection instead, with the bytes h2load sends
through bench/run.py --load h2load (recorded from h2load 1.52 -m10): the preface, its SETTINGS
and connection WINDOW_UPDATE, then HEADERS frames, ``--streams`` of them per read as h2load
keeps that many requests in flight, each answered by its own upstream connection in the same
loop iteration. ``--window-updates`` adds a connection WINDOW_UPDATE to each read, as a client
with a small window (curl, nghttp, grpc) sends; ``--body`` makes each request a POST whose
12-byte body (its length declared) follows in a DATA frame of its own, the shape of a gRPC
unary call, with the header block h2load sends for one (see H2_POST_BLOCK); ``--cut N``
delivers each read in pieces of N bytes, most ending inside a frame, as TCP hands over a large
write.

    python bench/hotpath.py                 # µs per request, best of 5
    python bench/hotpath.py --profile       # plus the top functions by own time
    python bench/hotpath.py --http2         # the same over HTTP/2 (h2c)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.config.loader import parse_config
from proxy.dataplane.proxyserver import ProxyServer
from proxy.dataplane.upstream import UpstreamConnection
from proxy.runtime.process import settle_garbage_collector

CONFIG = {
    "listen": "127.0.0.1:0",
    "services": [{
        "name": "bench",
        "versions": {"stable": {"upstreams": ["127.0.0.1:9"]},
                     "canary": {"upstreams": ["127.0.0.1:9"]}},
        "weights": {"stable": 90, "canary": 10},
        "sticky": {"header": "x-user-id"},
        "rules": [{"match": {"headers": {"x-beta": "yes"}}, "version": "canary"}],
    }],
}

# What wrk sends through bench/run.py, and what nginx answers there.
REQUESTS = [b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nx-user-id: user-%d\r\n\r\n" % i
            for i in range(1000)]
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 02:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 12\r\n"
            b"Connection: keep-alive\r\n\r\nhello world\n")


# h2load's bytes over h2c, as it sends them with -m10 and `-H 'x-user-id: user-1'` (see
# bench/README.md): its SETTINGS (no push, a 1 GiB stream window) and connection
# WINDOW_UPDATE, then the first request's HEADERS, which fill the HPACK table, and every later
# request's, six bytes of indexed fields.
H2_PREFACE = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
              + bytes.fromhex("00000c040000000000" "00020000000000043fffffff"
                              "000004080000000000" "3fff0000"))
H2_FIRST_BLOCK = bytes.fromhex("8486418b089d5c0b8170dc0bcfbeff827a8f9c541c722954d3a5358980ae"
                               "d897074087f2b5a82d8b1a4f85b505b160ff")
H2_BLOCK = bytes.fromhex("8486c082bfbe")
H2_SETTINGS_ACK = bytes.fromhex("000000040100000000")
H2_WINDOW_UPDATE = bytes.fromhex("000004080000000000") + (12 * 10).to_bytes(4)
# --body: bench/run.py --grpc's call as h2load sends it (captured from nghttp2 1.52): POST
# /bench.Echo/Call.grpc with content-type application/grpc and te trailers, which the first
# POST adds to the HPACK table, and in every request :path (Huffman-coded) and content-length
# as literals without indexing, which nghttp2 never indexes. (GET / has :path / in the static
# table: all indexed.)
GRPC_PATH_LITERAL = "0490" "6232d449d7c049cec5e1d142f359593f"
H2_FIRST_POST_BLOCK = bytes.fromhex(GRPC_PATH_LITERAL + "86c083bf" "5f8b1d75d0620d263d4c4d6564"
                                    "4002746586" "4d833505b11f" "c0" "0f0d023132")
H2_POST_BLOCK = bytes.fromhex(GRPC_PATH_LITERAL + "86c283c1bfbec0" "0f0d023132")
H2_BODY = b"hello world\n"


def h2_headers(stream_id: int, block: bytes = H2_BLOCK, end_stream: bool = True) -> bytes:
    """A HEADERS frame with END_HEADERS (and END_STREAM)."""
    flags = b"\x05" if end_stream else b"\x04"
    return len(block).to_bytes(3) + b"\x01" + flags + stream_id.to_bytes(4) + block


def h2_request(stream_id: int, body: bool) -> bytes:
    if not body:
        return h2_headers(stream_id)
    return (h2_headers(stream_id, H2_POST_BLOCK, False) + len(H2_BODY).to_bytes(3)
            + b"\x00\x01" + stream_id.to_bytes(4) + H2_BODY)


class MemoryTransport:
    """Just enough of asyncio.Transport for the data plane; counts what is written (and keeps
    it, when asked)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.written = 0
        self.protocol: Any = None
        self.kept: list[bytes] | None = None
        self.sock = sock  # for the poll of a pooled connection a POST is sent on

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.kept is not None:
            self.kept.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        return ("127.0.0.1", 40000) if name == "peername" else default


def build(loop: asyncio.AbstractEventLoop) -> tuple[Any, UpstreamConnection, MemoryTransport]:
    proxy = ProxyServer(parse_config(CONFIG), loop)
    pool = next(iter(proxy.pools.pools.values()))
    upstream = UpstreamConnection(pool)
    upstream.connection_made(MemoryTransport())  # type: ignore[arg-type]
    pool.release(upstream)
    client = proxy.protocol()
    client_transport = MemoryTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    return client, upstream, client_transport


SOCKETS: list[socket.socket] = []


def build_h2(loop: asyncio.AbstractEventLoop, streams: int, body: bool
             ) -> tuple[Any, list[UpstreamConnection], MemoryTransport]:
    """An HTTP/2 client connection past its preface and first request, and one pooled
    upstream connection per stream in flight."""
    proxy = ProxyServer(parse_config(CONFIG), loop)
    pool = next(iter(proxy.pools.pools.values()))
    upstreams = []
    for _ in range(streams):
        upstream = UpstreamConnection(pool)
        ours, theirs = socket.socketpair()  # silent: the upstream has not closed it
        SOCKETS.append(theirs)
        upstream.connection_made(MemoryTransport(ours))  # type: ignore[arg-type]
        upstreams.append(upstream)
    for upstream in upstreams:
        pool.release(upstream)
    client = proxy.protocol()
    transport = MemoryTransport()
    transport.kept = []
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(H2_PREFACE)  # handed over to HTTP/2
    conn = transport.protocol
    assert conn is not None and type(conn).__name__ == "Http2Connection", conn
    corker = pool.corker
    conn.data_received(H2_SETTINGS_ACK + h2_headers(1, H2_FIRST_BLOCK))
    corker.flush()
    for upstream in upstreams:
        if upstream.sink is not None:
            upstream.data_received(RESPONSE)
    corker.flush()
    if body:
        conn.data_received(h2_headers(3, H2_FIRST_POST_BLOCK, False) + len(H2_BODY).to_bytes(3)
                           + b"\x00\x01" + (3).to_bytes(4) + H2_BODY)
        corker.flush()
        for upstream in upstreams:
            if upstream.sink is not None:
                upstream.data_received(RESPONSE)
        corker.flush()
    return conn, upstreams, transport


def run_h2(count: int, conn: Any, upstreams: list[UpstreamConnection], streams: int,
           window_updates: bool, body: bool, cut: int = 0) -> float:
    """``count`` requests (rounded up to whole reads of ``streams``), on stream ids that go
    on from where the last run left them."""
    first = conn.h2.highest_inbound_stream_id + 2
    last = first + 2 * count
    # The reads are framed before the clock starts (about 300 instructions a request, counted
    # by callgrind all the same).
    prefix = H2_WINDOW_UPDATE if window_updates else b""
    reads = [prefix + b"".join([h2_request(sid, body)
                                for sid in range(start, min(start + 2 * streams, last), 2)])
             for start in range(first, last, 2 * streams)]
    if cut:
        reads = [read[i:i + cut] for read in reads for i in range(0, len(read), cut)]
    corker = upstreams[0].pool.corker
    corker.scheduled = True
    send_held = corker.flush
    response = RESPONSE
    started = time.perf_counter()
    for data in reads:
        conn.data_received(data)
        send_held()
        corker.scheduled = True
        for upstream in upstreams:
            sink: Any = upstream.sink
            if sink is not None and sink.request_complete:  # answered once it is all there
                upstream.data_received(response)
        send_held()
        corker.scheduled = True
    return time.perf_counter() - started


def check_h2(kept: list[bytes], expected: int) -> None:
    """Every request answered whole: a 200 with the upstream's body, the stream ended."""
    from hpack import Decoder
    from hyperframe.frame import DataFrame, Frame, HeadersFrame

    data = b"".join(kept)
    decoder = Decoder()
    statuses: dict[int, bytes] = {}
    bodies: dict[int, bytes] = {}
    ended = set()
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        data = data[9 + length:]
        if isinstance(frame, HeadersFrame):
            statuses[frame.stream_id] = dict(decoder.decode(frame.data, raw=True))[b":status"]
        elif isinstance(frame, DataFrame):
            bodies[frame.stream_id] = bodies.get(frame.stream_id, b"") + frame.data
        if "END_STREAM" in frame.flags:
            ended.add(frame.stream_id)
    assert len(statuses) == expected, (len(statuses), expected)
    assert set(statuses.values()) == {b"200"}, set(statuses.values())
    assert set(bodies.values()) == {b"hello world\n"}, set(bodies.values())
    assert ended == set(statuses), "a stream not ended"


def run(count: int, client: Any, upstream: UpstreamConnection) -> float:
    requests = REQUESTS
    # What the event loop does at the end of each iteration: send the writes held in it.
    # Holding a write also schedules that flush with call_soon, once per loop iteration, and
    # under load an iteration serves many requests; the loop does not run here, so the flush
    # is called directly and counted as scheduled (call_soon and running its handle cost
    # about 0.3 µs more per iteration).
    corker = upstream.pool.corker
    corker.scheduled = True
    send_held = corker.flush
    started = time.perf_counter()
    for i in range(count):
        client.data_received(requests[i % 1000])
        send_held()
        corker.scheduled = True
        upstream.data_received(RESPONSE)
        send_held()
        corker.scheduled = True
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--http2", action="store_true",
                        help="an HTTP/2 client connection (h2c, h2load's frames)")
    parser.add_argument("--streams", type=int, default=10,
                        help="--http2: requests per read, each on its own stream (h2load -m)")
    parser.add_argument("--window-updates", action="store_true",
                        help="--http2: a connection WINDOW_UPDATE in every read")
    parser.add_argument("--body", action="store_true",
                        help="--http2: POSTs with a 12-byte body in a DATA frame of its own")
    parser.add_argument("--cut", type=int, default=0,
                        help="--http2: each read delivered in pieces of this many bytes")
    args = parser.parse_args()

    import uvloop

    loop = uvloop.new_event_loop()
    if args.http2:
        return main_h2(args, loop)
    client, upstream, transport = build(loop)
    # As `weir run` does once it listens: without it, every full collection walks all that
    # start-up imported, and the count would grow with each module imported (h2's, say)
    # rather than with the work per request.
    settle_garbage_collector()
    run(2000, client, upstream)  # warm caches (routes, sticky users)
    assert transport.written > 0, "no response reached the client"
    best = min(run(args.count, client, upstream) for _ in range(args.repeat))
    print(f"{best / args.count * 1e6:.2f} µs of proxy CPU per request "
          f"(best of {args.repeat} x {args.count:,})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, args.count, client, upstream)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    loop.close()
    return 0


def main_h2(args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> int:
    conn, upstreams, transport = build_h2(loop, args.streams, args.body)
    settle_garbage_collector()
    run_h2(2000, conn, upstreams, args.streams, args.window_updates, args.body,
           args.cut)  # warm caches
    kept = transport.kept
    assert kept is not None
    transport.kept = None
    check_h2(kept, conn.h2.highest_inbound_stream_id // 2 + 1)
    best = min(run_h2(args.count, conn, upstreams, args.streams, args.window_updates, args.body,
                      args.cut)
               for _ in range(args.repeat))
    print(f"{best / args.count * 1e6:.2f} µs of proxy CPU per HTTP/2 request "
          f"(best of {args.repeat} x {args.count:,}, {args.streams} streams a read)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run_h2, args.count, conn, upstreams, args.streams,
                         args.window_updates, args.body, args.cut)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
