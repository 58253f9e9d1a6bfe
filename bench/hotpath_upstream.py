"""Microbenchmark of Weir's per-request Python work towards an HTTP/2 (h2c) upstream, without
sockets or a load generator (as bench/hotpath.py, whose in-memory transports it uses).

Each iteration feeds requests to the client side and, for each, the upstream's canned answer
to the pooled Http2UpstreamConnection: HEADERS (``:status 200``, ``content-type:
application/grpc``), an 18-byte DATA frame and trailers (``grpc-status: 0``) ending the
stream, the shape of nghttpd's answer in bench/run.py --grpc. With ``--body`` each request is
a POST of a 12-byte body (a gRPC unary call's framed message) and each answer carries a
connection WINDOW_UPDATE for it, as the upstream returns the window. The answer's fields are
HPACK literals without indexing; with ``--indexed`` they are encoded as nghttpd encodes them
(hpack's Encoder: the first answer fills the dynamic table, every later one is indexed).

    python bench/hotpath_upstream.py                  # HTTP/1.1 client, µs per request
    python bench/hotpath_upstream.py --http2 --body   # HTTP/2 client, gRPC-shaped POSTs
    python bench/hotpath_upstream.py --profile        # plus the top functions by own time
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hotpath import (
    H2_BODY,
    H2_FIRST_BLOCK,
    H2_FIRST_POST_BLOCK,
    H2_PREFACE,
    H2_SETTINGS_ACK,
    MemoryTransport,
    h2_headers,
    h2_request,
)

from proxy.config.loader import parse_config
from proxy.dataplane.proxyserver import ProxyServer
from proxy.dataplane.upstream_h2 import Http2Pool, Http2UpstreamConnection
from proxy.runtime.process import settle_garbage_collector

CONFIG = {
    "listen": "127.0.0.1:0",
    "services": [{
        "name": "bench",
        "versions": {"stable": {"upstreams": ["127.0.0.1:9"], "protocol": "h2c"}},
    }],
}

GET = b"GET /svc/Method HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nx-user-id: user-1\r\n\r\n"
POST = (b"POST /svc/Method HTTP/1.1\r\nHost: 127.0.0.1:8080\r\ncontent-type: application/grpc"
        b"\r\nte: trailers\r\ncontent-length: 12\r\n\r\n" + H2_BODY)

# The upstream's answer, HPACK literals without indexing (as nghttpd's after its first).
HEAD_BLOCK = b"\x88" + b"\x0f\x10\x10application/grpc"
TRAILER_BLOCK = b"\x00\x0bgrpc-status\x010"
MESSAGE = b"\x00\x00\x00\x00\x0d" + b"hello world!\n"  # 18 bytes
SERVER_SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3) + bytes((kind, flags)) + stream_id.to_bytes(4) + payload


BLOCKS = {"head": HEAD_BLOCK, "trailers": TRAILER_BLOCK}


def index_blocks() -> tuple[bytes, bytes]:
    """The first answer's blocks as an indexing encoder sends them; the later answers' from
    then on (BLOCKS)."""
    from hpack import Encoder

    encoder = Encoder()
    head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    trailers = [(b"grpc-status", b"0")]
    first = (encoder.encode(head), encoder.encode(trailers))
    BLOCKS["head"] = encoder.encode(head)
    BLOCKS["trailers"] = encoder.encode(trailers)
    return first


def answer(stream_id: int, body: bool, blocks: tuple[bytes, bytes] | None = None) -> bytes:
    head, trailers = blocks or (BLOCKS["head"], BLOCKS["trailers"])
    out = (frame(1, 4, stream_id, head) + frame(0, 0, stream_id, MESSAGE)
           + frame(1, 5, stream_id, trailers))
    if body:
        out = frame(8, 0, 0, len(H2_BODY).to_bytes(4)) + out
    return out


def build(loop: asyncio.AbstractEventLoop, http2: bool, body: bool, indexed: bool = False
          ) -> tuple[Any, Http2UpstreamConnection, MemoryTransport, MemoryTransport]:
    proxy = ProxyServer(parse_config(CONFIG), loop)
    pool = next(iter(proxy.pools.pools.values()))
    assert isinstance(pool, Http2Pool), pool
    conn = Http2UpstreamConnection(pool)
    up_transport = MemoryTransport()
    up_transport.kept = []
    conn.connection_made(up_transport)  # type: ignore[arg-type]
    conn.data_received(SERVER_SETTINGS + SETTINGS_ACK)
    assert conn.ready.done()
    pool.connections.append(conn)
    client = proxy.protocol()
    transport = MemoryTransport()
    transport.kept = []
    client.connection_made(transport)  # type: ignore[arg-type]
    first = index_blocks() if indexed else None
    if http2:
        client.data_received(H2_PREFACE)
        client = transport.protocol
        client.data_received(H2_SETTINGS_ACK + h2_headers(1, H2_FIRST_BLOCK))
        pool.corker.flush()
        conn.data_received(answer(conn.h2.highest_outbound_stream_id, False, first))
        pool.corker.flush()
        if body:
            client.data_received(h2_headers(3, H2_FIRST_POST_BLOCK, False)
                                 + len(H2_BODY).to_bytes(3) + b"\x00\x01" + (3).to_bytes(4)
                                 + H2_BODY)
            pool.corker.flush()
            conn.data_received(answer(conn.h2.highest_outbound_stream_id, True))
            pool.corker.flush()
    elif first is not None:
        client.data_received(POST if body else GET)
        pool.corker.flush()
        conn.data_received(answer(conn.h2.highest_outbound_stream_id, body, first))
        pool.corker.flush()
    return client, conn, transport, up_transport


def run(count: int, client: Any, conn: Http2UpstreamConnection, http2: bool,
        body: bool) -> float:
    """``count`` requests, one at a time, each answered in the next read of the upstream."""
    first = client.h2.highest_inbound_stream_id + 2 if http2 else 0
    requests = ([h2_request(sid, body) for sid in range(first, first + 2 * count, 2)]
                if http2 else [POST if body else GET] * count)
    up_first = (conn.h2.highest_outbound_stream_id or -1) + 2
    answers = [answer(sid, body) for sid in range(up_first, up_first + 2 * count, 2)]
    corker = conn.pool.corker
    corker.scheduled = True
    send_held = corker.flush
    started = time.perf_counter()
    for i in range(count):
        client.data_received(requests[i])
        send_held()
        corker.scheduled = True
        conn.data_received(answers[i])
        send_held()
        corker.scheduled = True
    return time.perf_counter() - started


def check(kept: list[bytes], http2: bool) -> None:
    data = b"".join(kept)
    if http2:
        assert data.count(b"hello world!\n") >= 2, data[-300:]
        return
    assert data.count(b"HTTP/1.1 200") >= 2 and b"grpc-status: 0" in data, data[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--http2", action="store_true", help="an HTTP/2 client (h2c)")
    parser.add_argument("--body", action="store_true",
                        help="POSTs of a 12-byte body (gRPC unary calls)")
    parser.add_argument("--indexed", action="store_true",
                        help="the answers' fields indexed in HPACK's dynamic table (nghttpd)")
    args = parser.parse_args()

    import uvloop

    loop = uvloop.new_event_loop()
    client, conn, transport, up_transport = build(loop, args.http2, args.body, args.indexed)
    settle_garbage_collector()
    run(2000, client, conn, args.http2, args.body)  # warm caches
    assert transport.kept is not None and up_transport.kept is not None
    check(transport.kept, args.http2)
    assert conn.streams == {} and not conn.closed, conn.streams
    transport.kept = None
    up_transport.kept = None
    best = min(run(args.count, client, conn, args.http2, args.body)
               for _ in range(args.repeat))
    assert conn.streams == {} and not conn.closed
    print(f"{best / args.count * 1e6:.2f} µs of proxy CPU per request to an h2c upstream "
          f"(best of {args.repeat} x {args.count:,})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run, args.count, client, conn, args.http2, args.body)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
