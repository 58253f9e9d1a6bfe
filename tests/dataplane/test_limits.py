"""Edge limits: max_connections, and every limit's status code and counter in
weir_limit_rejections_total; plus a slowloris crowd that must not starve normal clients.

The malformed-request cases themselves (400s, one 431, 413s, one 408) are in test_http.py;
here each limit is checked for the counter it moves, over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import resource
import shlex
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.control.metrics import Metrics
from proxy.dataplane.proxyserver import ProxyServer

from ..conftest import (
    StartWeirProcess,
    exchange,
    one_service,
    read_response,
    read_until_closed,
    sample,
    wait_for,
)

LIMITS = ("max_connections", "header_timeout", "idle_timeout", "max_header_bytes",
          "max_body_bytes")


def get(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode()


def limit_counts(proxy: ProxyServer) -> dict[str, float]:
    """weir_limit_rejections_total by limit, read from the Prometheus exposition."""
    metrics = Metrics()
    metrics.attach(proxy)
    text = metrics.exposition().decode()
    counts = {}
    for limit in LIMITS:
        value = sample(text, "weir_limit_rejections_total", limit=limit)
        assert value is not None, f"no sample for limit={limit}"
        counts[limit] = value
    return counts


async def test_max_connections_refuses_with_503_and_frees_slots(
        start_backend: Callable[..., Any], start_proxy: Callable[..., Any]) -> None:
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={"max_connections": 3})
    assert limit_counts(proxy) == dict.fromkeys(LIMITS, 0.0)
    held = []
    for _ in range(3):  # keep-alive clients that hold their slots
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(get())
        assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
        held.append((reader, writer))
    assert len(proxy.connections) == 3

    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(get())
        refused = await asyncio.wait_for(read_response(reader), 5)
        assert refused.status == 503
        assert refused.header("connection") == "close"
        assert b"too many connections" in refused.body
        assert await read_until_closed(reader) == b""  # closed at once, nothing else read
        writer.close()
    assert len(proxy.connections) == 3  # a refused connection never takes a slot
    assert backend.requests and len(backend.requests) == 3
    assert limit_counts(proxy)["max_connections"] == 2

    # Connections that finish free their slot.
    held[0][1].close()
    await wait_for(lambda: len(proxy.connections) == 2)
    [ok] = await exchange(proxy.port, get())
    assert ok.status == 200
    # The others still work on their kept-alive connections.
    reader, writer = held[1]
    writer.write(get("/again"))
    assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    for _, writer in held[1:]:
        writer.close()
    await wait_for(lambda: not proxy.connections)
    assert limit_counts(proxy)["max_connections"] == 2


async def test_max_connections_default_follows_the_open_file_limit(
        start_backend: Callable[..., Any], start_proxy: Callable[..., Any]) -> None:
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        assert proxy.settings.max_connections == (soft - 100) // 2


async def test_every_limit_answers_its_status_and_moves_its_counter(
        start_backend: Callable[..., Any], start_proxy: Callable[..., Any]) -> None:
    backend = await start_backend()
    proxy = await start_proxy(one_service(backend.address), limits={
        "max_connections": 50, "max_header_bytes": "1KiB", "max_body_bytes": "1KiB",
        "header_timeout": "300ms", "idle_timeout": "300ms"})
    expected = dict.fromkeys(LIMITS, 0.0)

    # 431: a head over max_header_bytes, complete or still arriving.
    [big] = await exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 2000
                           + b"\r\n\r\n")
    assert big.status == 431
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: " + b"e" * 4000)
    assert (await read_until_closed(reader)).startswith(b"HTTP/1.1 431 ")
    writer.close()
    expected["max_header_bytes"] = 2
    assert limit_counts(proxy) == expected

    # 413: by declared length, and a chunked body that grows past the limit.
    [sized] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000"
                             b"\r\n\r\n" + b"x" * 5000)
    assert sized.status == 413
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    [chunked] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: a\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 4 + b"0\r\n\r\n")
    assert chunked.status == 413
    expected["max_body_bytes"] = 2  # once per request, however many chunks follow
    assert limit_counts(proxy) == expected

    # 408: a head not finished within header_timeout; a connection that sends nothing is
    # closed at the same deadline, without a response.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert (await read_until_closed(reader, timeout=3)).startswith(b"HTTP/1.1 408 ")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await read_until_closed(reader, timeout=3) == b""
    writer.close()
    expected["header_timeout"] = 2
    assert limit_counts(proxy) == expected

    # idle_timeout: a kept-alive connection with no next request is closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(get())
    assert (await asyncio.wait_for(read_response(reader), 5)).status == 200
    assert await read_until_closed(reader, timeout=3) == b""
    writer.close()
    expected["idle_timeout"] = 1
    assert limit_counts(proxy) == expected

    # 503: over max_connections.
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(50)]
    await wait_for(lambda: len(proxy.connections) == 50)
    [refused] = await exchange(proxy.port, get())
    assert refused.status == 503
    for _, writer in held:
        writer.close()
    expected["max_connections"] = 1
    assert limit_counts(proxy) == expected

    # A normal request moves none of them.
    await wait_for(lambda: not proxy.connections)
    [ok] = await exchange(proxy.port, get())
    assert ok.status == 200
    assert limit_counts(proxy) == expected


# --- slowloris --------------------------------------------------------------------------------


SLOW_CONNECTIONS = 500
NORMAL_REQUESTS = 200
HEADER_TIMEOUT = 3.0


@contextmanager
def open_files_at_least(wanted: int) -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE for this process (client, proxy and backend share it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Slowloris(threading.Thread):
    """An attacker in its own thread and event loop: SLOW_CONNECTIONS connections, each
    sending a request head one byte at a time and never finishing it."""

    def __init__(self, port: int, interval: float, give_up_after: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.give_up_after = give_up_after
        self.connected = threading.Event()
        self.answers: list[bytes] = []  # what each connection got before it was closed

    def run(self) -> None:
        asyncio.run(self.attack())

    async def attack(self) -> None:
        head = b"GET /slowloris HTTP/1.1\r\nHost: app.test\r\nX-Padding: " + b"p" * 1000
        conns = [await asyncio.open_connection("127.0.0.1", self.port)
                 for _ in range(SLOW_CONNECTIONS)]
        self.connected.set()

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got = asyncio.ensure_future(reader.read())  # b"" or the answer, once closed
            try:
                for byte in head:
                    if got.done():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.sleep(self.interval)
                self.answers.append(await got)
            except OSError:
                self.answers.append(b"<reset>")
            finally:
                got.cancel()
                writer.close()

        async with asyncio.timeout(self.give_up_after):
            await asyncio.gather(*(trickle(r, w) for r, w in conns))


async def timed_request(port: int) -> tuple[int, float]:
    started = time.perf_counter()
    [response] = await exchange(port, get("/normal"), timeout=5)
    return response.status, time.perf_counter() - started


async def run_limited(calls: list[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


async def test_slowloris_does_not_starve_normal_clients(
        start_backend: Callable[..., Any], start_proxy: Callable[..., Any]) -> None:
    with open_files_at_least(4 * SLOW_CONNECTIONS + 1000):
        backend = await start_backend()
        proxy = await start_proxy(one_service(backend.address), limits={
            "header_timeout": f"{HEADER_TIMEOUT}s", "max_connections": 10_000})
        attacker = Slowloris(proxy.port, interval=0.2, give_up_after=HEADER_TIMEOUT + 8)
        started = time.monotonic()
        attacker.start()
        try:
            assert await asyncio.to_thread(attacker.connected.wait, 10)
            await wait_for(lambda: len(proxy.connections) >= SLOW_CONNECTIONS, timeout=5)

            # While all of them are open and trickling, normal clients are served quickly.
            results = await run_limited(
                [lambda: timed_request(proxy.port) for _ in range(NORMAL_REQUESTS)], 10)
            assert len(proxy.connections) >= SLOW_CONNECTIONS, "the crowd left too early"
            assert time.monotonic() - started < HEADER_TIMEOUT
            assert [status for status, _ in results] == [200] * NORMAL_REQUESTS
            latencies = sorted(seconds for _, seconds in results)
            p99 = latencies[int(0.99 * len(latencies)) - 1]
            assert p99 < 0.5, f"p99 {p99:.3f}s while under slowloris"

            # After header_timeout every slow connection is answered 408 and closed.
            await asyncio.to_thread(attacker.join, HEADER_TIMEOUT + 10)
            assert not attacker.is_alive()
        finally:
            attacker.join(HEADER_TIMEOUT + 10)
        # Every slow connection reads its 408, even one still sending its next byte when
        # Weir gives up on it: Weir ends its side and reads on (a lingering close) rather than
        # close with bytes unread, which would reset the connection and lose the 408.
        timed_out = [a for a in attacker.answers if a.startswith(b"HTTP/1.1 408 ")]
        assert len(attacker.answers) == SLOW_CONNECTIONS
        assert len(timed_out) == SLOW_CONNECTIONS, sorted({a[:40] for a in attacker.answers})
        assert limit_counts(proxy)["header_timeout"] == SLOW_CONNECTIONS
        assert not [r for r in backend.requests if r["path"] == "/slowloris"]
        await wait_for(lambda: not proxy.connections)
        assert time.monotonic() - started < 15



async def test_weir_raises_its_open_file_limit_to_the_hard_limit(
        weir_process: StartWeirProcess) -> None:
    """Started with the common soft limit of 1024 (here 256), Weir raises it to the hard limit
    at start: otherwise it would hold only a few hundred clients."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit is only {hard}")

    def low_soft_limit(argv: list[str]) -> list[str]:
        return ["sh", "-c", f"ulimit -Sn 256 && exec {shlex.join(argv)}"]

    weir = await weir_process(one_service("127.0.0.1:9"), wrap=low_soft_limit)
    limits = Path(f"/proc/{weir.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    weir_soft = line.split()[3]
    expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert weir_soft in (expected, str(1 << 20)), line
