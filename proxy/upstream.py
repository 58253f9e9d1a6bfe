"""Upstream side of the data plane: keep-alive connection pools and least-in-flight balancing.

An ``UpstreamConnection`` parses one response at a time with httptools and hands what it reads
to the exchange that owns it (see ``server.Exchange``). Pools are keyed by address and outlive
config reloads, so a reload does not throw away warm connections.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .config import UpstreamSettings, split_address

log = logging.getLogger("weir.upstream")


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange it is serving."""

    head_request: bool

    def on_upstream_head(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_complete(self) -> None: ...
    def on_upstream_tunnel_data(self, data: bytes) -> None: ...
    def on_upstream_failed(self, status: int, reason: str, got_bytes: bool) -> None: ...
    def on_upstream_closed(self) -> None: ...
    def flush(self) -> None: ...
    def pause_client_reading(self, paused: bool) -> None: ...


class Closable(Protocol):
    def close_for_drain(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("_head_done", "_headers", "_informational", "_reset_parser",
                 "closed", "got_bytes", "idle_since", "last_activity", "loop", "parser",
                 "pool", "read_timeout", "reused", "sink", "timer", "transport", "tunnel")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.closed = False
        self.reused = False
        self.tunnel = False
        self.got_bytes = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.read_timeout = 60.0
        self.timer: asyncio.TimerHandle | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._head_done = False
        self._reset_parser = False

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # An idle pooled connection must stay silent; anything else means it is unusable.
            self.close()
            return
        if self.tunnel:
            sink.on_upstream_tunnel_data(data)
            return
        self.got_bytes = True
        self.last_activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.tunnel = True
            rest = data[exc.args[0]:]
            if rest and self.sink is not None:
                self.sink.on_upstream_tunnel_data(rest)
        except HttpParserError as exc:
            log.warning("invalid response from %s: %s", self.pool.address, exc)
            self.pool.record_failure()
            self._fail(502, "upstream sent an invalid response")
            return
        if sink is self.sink or self.sink is None:
            sink.flush()
        if self._reset_parser:
            # A response to HEAD ends with its head; httptools cannot be told so, so the
            # parser that is waiting for a body is replaced before the connection is reused.
            self._reset_parser = False
            self.parser = HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_upstream_closed()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_client_reading(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.pause_client_reading(False)

    # --- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self._headers = self._headers, []
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103) are not relayed: Weir answers
            # Expect: 100-continue itself, and the final response follows on this connection.
            self._informational = True
            return
        self._head_done = True
        if status >= 500:
            self.pool.record_failure()
        else:
            self.pool.failures = 0  # outlier detection counts failures in a row
        if status == 101:
            self.tunnel = True  # llhttp still reports a message end; it is not one
        sink = self.sink
        if sink is None:
            return
        # The reason phrase is not read (no on_status callback): like Envoy, Weir sends the
        # standard phrase for the code, which clients ignore anyway (RFC 9112 4).
        sink.on_upstream_head(status, b"", headers, self.parser.should_keep_alive())
        if sink.head_request and self.sink is sink:
            self._reset_parser = True
            self.finish_response(sink)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is None or self._reset_parser:
            # Body bytes after a HEAD response or for nobody: the connection is out of step.
            self.close()
            return
        sink.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.tunnel:
            return
        sink = self.sink
        if sink is not None and not self._reset_parser:
            self.finish_response(sink)

    # --- used by the exchange -------------------------------------------------------------

    def finish_response(self, sink: ResponseSink) -> None:
        self.sink = None  # the read timer stays armed; it finds no sink and lapses
        sink.on_upstream_complete()

    def send(self, sink: ResponseSink, data: bytes, read_timeout: float) -> None:
        """Start an exchange: attach the sink, write the request head, arm the read timer."""
        self.sink = sink
        self.got_bytes = False
        self.tunnel = False
        self._head_done = False
        self._informational = False
        self.last_activity = self.loop.time()
        self.read_timeout = read_timeout
        assert self.transport is not None
        self.transport.write(data)
        if self.timer is None:
            self.timer = self.loop.call_later(read_timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        """A lazily re-armed timer that outlives exchanges: on a busy connection it fires once
        per read_timeout instead of being set and cancelled for every request."""
        self.timer = None
        if self.sink is None or self.closed or self.tunnel:
            return  # idle in the pool, or a tunnel (closed by its peers, not by time)
        idle = self.loop.time() - self.last_activity
        if idle < self.read_timeout:
            self.timer = self.loop.call_later(self.read_timeout - idle, self._check_timeout)
            return
        self.pool.timeouts += 1
        self.pool.record_failure()
        self._fail(504, "upstream did not answer in time")

    def touch(self) -> None:
        """Request bytes going out count as activity: a slow upload is not a slow upstream."""
        self.last_activity = self.loop.time()

    def _fail(self, status: int, reason: str) -> None:
        sink, self.sink = self.sink, None
        got = self._head_done
        self.close()
        if sink is not None:
            sink.on_upstream_failed(status, reason, got)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def detach(self) -> None:
        """The exchange is gone (client left, or an error): this connection is not reusable."""
        self.sink = None
        self.close()

    def close(self) -> None:
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.sink = None
        self._cancel_timer()
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Keep-alive connections to one upstream address, most recently used first."""

    __slots__ = ("_drain_timer", "active", "address", "available", "connect_errors",
                 "connect_timeout", "drain_label", "draining", "eject_after", "failures", "host",
                 "idle", "idle_timeout", "loop", "max_idle", "max_requests", "on_outlier",
                 "port", "retries", "timeouts")

    def __init__(self, address: str, settings: UpstreamSettings,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        # Exchanges using this upstream (requests in flight, streams, tunnels): the balancer
        # counts them, and draining closes those still open when its time is up.
        self.active: set[Closable] = set()
        self.draining = False
        self.drain_label: tuple[str, str] = ("", "")
        self._drain_timer: asyncio.TimerHandle | None = None
        # Counters for /metrics: failed connects, timeouts (connect or read), retries.
        self.connect_errors = 0
        self.timeouts = 0
        self.retries = 0
        # Upstream health (see health.py), kept here because the request path reads it: the
        # balancer skips a pool that is not ``available`` (unhealthy or ejected) or that has
        # ``max_requests`` in flight, and ``failures`` counts failures in a row for outlier
        # detection, which ``on_outlier`` hears about once ``eject_after`` is reached.
        self.available = True
        self.max_requests = sys.maxsize
        self.failures = 0
        self.eject_after = 0  # 0: outlier detection is off
        self.on_outlier: Callable[[UpstreamPool], None] | None = None
        self.apply(settings)

    @property
    def inflight(self) -> int:
        return len(self.active)

    def apply(self, settings: UpstreamSettings) -> None:
        self.connect_timeout = settings.timeouts.connect
        self.idle_timeout = settings.idle_timeout
        self.max_idle = settings.max_idle_per_upstream

    def record_failure(self) -> None:
        """A 5xx, a failed connect, a read timeout: off the fast path, so a call is fine."""
        self.failures += 1
        if 0 < self.eject_after <= self.failures and self.on_outlier is not None:
            self.on_outlier(self)

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self, timeout: float | None = None) -> UpstreamConnection:
        """A fresh connection; raises TimeoutError or OSError."""
        async with asyncio.timeout(timeout if timeout is not None else self.connect_timeout):
            _, conn = await self.loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port)
        conn.reused = False
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed or self.draining or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than idle_timeout (oldest are at the front)."""
        deadline = now - self.idle_timeout
        while self.idle and self.idle[0].idle_since < deadline:
            self.idle.pop(0).close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()

    def start_draining(self, timeout: float, label: tuple[str, str]) -> None:
        """This upstream lost its traffic: idle connections close now, requests in flight
        finish, and whatever is still open after ``timeout`` (streams, WebSockets) is closed."""
        if self.draining:
            return
        self.draining = True
        self.drain_label = label
        self.close_idle()
        log.info("draining %s (%s/%s): %d open, %.0fs to finish", self.address, *label,
                 len(self.active), timeout)
        self._drain_timer = self.loop.call_later(timeout, self._drain_expired)

    def stop_draining(self) -> None:
        self.draining = False
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _drain_expired(self) -> None:
        self._drain_timer = None
        if self.active:
            log.info("drain of %s over: closing %d stream(s) still open", self.address,
                     len(self.active))
        for exchange in list(self.active):
            exchange.close_for_drain()


class Balancer:
    """The upstreams of one version; picks the one with the fewest requests in flight among
    those that are available (healthy, not ejected) and below their circuit-breaker limit."""

    __slots__ = ("_next", "pools")

    def __init__(self, pools: list[UpstreamPool]) -> None:
        self.pools = pools
        self._next = 0

    def pick(self) -> UpstreamPool | None:
        """None when no upstream can take a request now (``all_full`` tells the reasons
        apart)."""
        pools = self.pools
        count = len(pools)
        if count == 1:
            pool = pools[0]
            return pool if pool.available and len(pool.active) < pool.max_requests else None
        # Start from a rotating index so that ties are spread instead of piling on the first.
        start = self._next = (self._next + 1) % count
        best = None
        best_load = sys.maxsize
        for offset in range(count):
            pool = pools[(start + offset) % count]
            load = len(pool.active)
            if load < best_load and load < pool.max_requests and pool.available:
                best = pool
                best_load = load
        return best

    def all_full(self) -> bool:
        """After pick() found nothing: is it only because the available upstreams are at their
        circuit-breaker limit (so that trying again shortly can work)?"""
        return any(pool.available for pool in self.pools)


class PoolRegistry:
    """One pool per upstream address for the life of the process."""

    def __init__(self, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.pools: dict[str, UpstreamPool] = {}
        self._balancers: dict[tuple[str, ...], Balancer] = {}

    def balancer_for(self, addresses: tuple[str, ...]) -> Balancer:
        balancer = self._balancers.get(addresses)
        if balancer is None:
            pools = []
            for address in addresses:
                pool = self.pools.get(address)
                if pool is None:
                    pool = self.pools[address] = UpstreamPool(address, self.settings, self.loop)
                pools.append(pool)
            balancer = self._balancers[addresses] = Balancer(pools)
        return balancer

    def apply(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        for pool in self.pools.values():
            pool.apply(settings)

    def sweep(self) -> None:
        now = self.loop.time()
        for pool in self.pools.values():
            pool.sweep(now)

    def close_all(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()
