"""Microbenchmark of Weir's per-request Python work, without sockets or a load generator.

It drives the real Http1Connection and UpstreamConnection with in-memory transports: each
iteration feeds one request to the client side and one canned response to the upstream side,
so what is measured is exactly the proxy's own CPU cost per request (parsing callbacks,
routing, sticky hashing, head rewriting), free of kernel and scheduler noise.

    python bench/hotpath.py                 # µs per request, best of 5
    python bench/hotpath.py --profile       # plus the top functions by own time
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


class MemoryTransport:
    """Just enough of asyncio.Transport for the data plane; counts what is written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.written += len(part)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
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
    args = parser.parse_args()

    import uvloop

    loop = uvloop.new_event_loop()
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


if __name__ == "__main__":
    sys.exit(main())
