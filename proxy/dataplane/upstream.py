"""Upstream side of the data plane: keep-alive connection pools and least-in-flight balancing.

An ``UpstreamConnection`` parses one response at a time with httptools and hands what it reads
to the exchange that owns it (see ``exchange.Exchange``). Pools are keyed by address (and TLS
settings) and outlive config reloads, so a reload does not throw away warm connections.
"""

from __future__ import annotations

import asyncio
import logging
import select
import ssl
import sys
from collections.abc import Callable, Collection
from random import choices
from typing import Final, Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ..config.model import UpstreamSettings, UpstreamTLS, split_address
from .corking import CorkedTransport, Corker
from .http11 import (
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    LAST_CHUNK,
    RESPONSE_NOTED,
    RESPONSE_NOTED_LENGTH_BITS,
    RESPONSE_REWRITTEN,
    lowered,
)

log = logging.getLogger("weir.upstream")

# httptools' methods, taken off the class once and called with their parser: from compiled code
# a call by name looks the method up on the type every time (about 120 instructions more).
_feed_response: Final = HttpResponseParser.feed_data
_status_code: Final = HttpResponseParser.get_status_code
_response_keep_alive: Final = HttpResponseParser.should_keep_alive

# Like nginx's proxy_buffer_size, but roomier: a response head is held whole until it ends,
# so one over this is refused as nginx does ("upstream sent too big header": a 502).
MAX_RESPONSE_HEAD: Final = 32 * 1024

# A slow-starting upstream's share begins at this fraction of its full share (Envoy's
# min_weight_percent default), so that it warms up from its first moment back.
RAMP_FLOOR: Final = 0.1


class ResponseSink:
    """What an upstream connection reports to the exchange it is serving (``exchange.Exchange``,
    or a shadow's ``mirror.MirrorCopy``). A base class rather than a Protocol: compiled, the
    connection then calls these through a vtable, where a Protocol costs a method lookup by
    name and boxed arguments on each of the four or five calls every response makes."""

    __slots__ = ("grpc_status", "head_request")

    head_request: bool  # set by each subclass
    # A gRPC answer's grpc-status (-1: none yet), set by an HTTP/2 upstream stream when it
    # reads it in a head (trailers-only) or the trailers.
    grpc_status: int

    def on_upstream_head(self, status: int, lines: list[bytes],
                         noted: list[bytes], keep_alive: bool) -> None:
        """``lines``: lines[0] is left empty for the status line, then the headers to pass on
        ([name, b": ", value, CRLF, ...]); the sink may keep the list and add to it.
        ``noted``: the headers that frame the response or that Weir sets, flat: [name, value,
        ...], names lower-cased."""
        raise NotImplementedError

    def on_upstream_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response's trailer fields (from an HTTP/2 upstream), before its end."""
        raise NotImplementedError

    def on_upstream_complete(self) -> None:
        raise NotImplementedError

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_upstream_failed(self, status: int, reason: str, got_bytes: bool) -> None:
        raise NotImplementedError

    def on_upstream_closed(self) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def pause_client_reading(self, paused: bool) -> None:
        raise NotImplementedError


class Closable(Protocol):
    def close_for_drain(self) -> None: ...


class UpstreamChannel:
    """What an exchange holds of its upstream while its request is in flight: a whole
    HTTP/1.1 connection (``UpstreamConnection``), or one stream of a multiplexed HTTP/2
    connection (``upstream_h2.UpstreamStream``, where ``http2`` is set: the exchange then
    sends its head as HTTP/2 headers). A base class, so that compiled, the exchange's calls
    are native either way."""

    __slots__ = ("closed", "got_bytes", "http2", "paused", "pool", "reused", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.http2 = False
        # The connection's own transport; None for an HTTP/2 stream, which writes through
        # its connection (nor can it carry a tunnel: no Upgrade goes to an HTTP/2 upstream).
        self.transport: CorkedTransport | None = None
        self.closed = False
        self.reused = False  # taken from the pool rather than freshly connected
        self.got_bytes = False  # something of the response has been read
        self.paused = False  # not read while its client cannot take more (see pause_reading)

    def send(self, sink: ResponseSink, data: bytes, read_timeout: float) -> None:
        """HTTP/1.1: attach the sink, write the request head (and any body), arm the read
        timer."""
        raise NotImplementedError

    def start(self, sink: ResponseSink, headers: list[tuple[bytes, bytes]], end_stream: bool,
              read_timeout: float) -> None:
        """HTTP/2: attach the sink, send the request's HEADERS, arm the read timer."""
        raise NotImplementedError

    def write_body(self, data: bytes, chunked: bool) -> None:
        """A piece of the request body (``chunked``: framed as a chunk, for HTTP/1.1)."""
        raise NotImplementedError

    def end_body(self, chunked: bool) -> None:
        """The request body is complete."""
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def touch(self) -> None:
        raise NotImplementedError

    def reject(self, reason: str) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """The exchange is over and the channel may serve another (pooled, or for an HTTP/2
        stream, its slot freed on its connection)."""
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class UpstreamConnection(UpstreamChannel, asyncio.Protocol):
    __slots__ = ("_head_bytes", "_head_done", "_informational", "_lines", "_noted",
                 "_reading", "_reset_parser",
                 "idle_since", "last_activity", "loop", "parser",
                 "read_timeout", "sink", "timer", "tunnel")

    def __init__(self, pool: UpstreamPool) -> None:
        super().__init__(pool)
        self.loop = pool.loop
        self.parser = HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.tunnel = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.read_timeout = 60.0
        self.timer: asyncio.TimerHandle | None = None
        # The response head as it is read: the headers to pass on, ready to join, after a
        # place left for the status line (the sink's to fill; it keeps the list), and the
        # ones that frame the body or that Weir sets itself (a list that is reused).
        self._lines: list[bytes] = [b""]
        self._noted: list[bytes] = []
        self._head_bytes = 0
        self._informational = False
        self._head_done = False
        self._reset_parser = False
        self._reading: ResponseSink | None = None  # the sink when the current read began

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = CorkedTransport(transport, self.pool.corker)

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
        self._reading = sink
        self.last_activity = self.pool.corker.now()
        if not self._head_done:
            # llhttp sets no limit on a response head, Weir holds the head whole until it
            # ends, and httptools holds a header whole until it ends (one huge header, sent a
            # little at a time, reaches on_header only at its end). So the bytes read while a
            # head is open are counted as they arrive: all of them are the head's (interim
            # 1xx heads included) while it stays open after the read (checked below); a read
            # that ends it is checked in on_headers_complete.
            self._head_bytes += len(data)
        try:
            _feed_response(self.parser, data)
        except HttpParserUpgrade as exc:
            self.tunnel = True
            rest = data[exc.args[0]:]
            if rest and self.sink is not None:
                self.sink.on_upstream_tunnel_data(rest)
        except HttpParserError as exc:
            self.reject(str(exc))
            return
        if not self._head_done and self._head_bytes > MAX_RESPONSE_HEAD and sink is self.sink:
            self._head_too_large()  # every byte read for this response is still its head
            return
        if sink is self.sink:
            sink.flush()  # a completed response has flushed itself
        # Not kept past the read: a pooled connection would hold its last exchange, and with
        # it the client's connection (and an HTTP/2 client's whole h2 state), alive.
        self._reading = None
        if self._reset_parser:
            # A response to HEAD ends with its head; httptools cannot be told so, so the
            # parser that is waiting for a body is replaced before the connection is reused.
            self._reset_parser = False
            self.parser = HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        if self.transport is not None:
            self.transport.uncork()  # the transport closes itself next, past the hold
        return None  # close our side too

    def still_open(self) -> bool:
        """An idle connection has nothing to read: anything readable (a FIN, a reset, stray
        bytes) means the upstream is done with it. One poll(2), no waiting."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        poller = select.poll()
        poller.register(transport.get_extra_info("socket").fileno(),
                        select.POLLIN | select.POLLRDHUP)
        return not poller.poll(0)

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

    def on_message_begin(self) -> None:
        sink = self.sink
        if sink is not self._reading:
            # A response that begins in a read after the end of the response this read was
            # for: nobody asked for it (one in a later read closes the idle connection in
            # data_received). Pooled, or already taken again by a pipelined request sent
            # during this read, the connection would have this head take the place of the
            # next response's. It is closed, and a request sent on it meanwhile learns that
            # its connection closed before answering (a GET is retried on a fresh one).
            log.warning("response from %s that no request was waiting for: connection "
                        "closed", self.pool.address)
            self.abort()  # no sink from here on: the rest of this read is parsed for nobody
            if sink is not None:
                sink.on_upstream_closed()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field of a chunked body: dropped (RFC 9110 6.5.1)
        if RESPONSE_NOTED_LENGTH_BITS >> len(name) & 1:
            noted = self._noted  # flat, name then value: no tuple to make and free
            # The two noted names of nearly every response, as servers spell them: what
            # lowered() and the set lookups would say is known (test_http checks it).
            if name == b"Content-Length":
                noted.append(CONTENT_LENGTH)
                noted.append(value)  # and passed on
            elif name == b"Connection":
                noted.append(CONNECTION)
                noted.append(value)
                return  # rewritten
            else:
                lname = lowered(name)
                if lname in RESPONSE_NOTED:
                    noted.append(lname)
                    noted.append(value)
                    if lname in RESPONSE_REWRITTEN:
                        return
        lines = self._lines  # four appends: cheaper than += with a new tuple
        lines.append(name)
        lines.append(b": ")
        lines.append(value)
        lines.append(CRLF)

    def _head_too_large(self) -> None:
        """A response head over MAX_RESPONSE_HEAD: nginx's "upstream sent too big header".
        A 502 (the head is held until it ends, so nothing of it has reached the client), and
        the connection is closed: the rest of the response can no longer be framed."""
        log.warning("upstream sent too big header: a response head from %s over %d KiB; "
                    "connection closed", self.pool.address, MAX_RESPONSE_HEAD // 1024)
        self.pool.record_failure()
        self._fail(502, "upstream sent too big header (a response head over "
                        f"{MAX_RESPONSE_HEAD // 1024} KiB)")

    def on_headers_complete(self) -> None:
        status = _status_code(self.parser)
        lines, noted = self._lines, self._noted
        self._lines = [b""]  # the next head's, whatever becomes of this one: the sink may keep it
        if not 100 <= status <= 599:
            # llhttp takes any three digits; RFC 9110 15 calls the rest invalid (a client is
            # to take them as a 5xx), and a code under 100 is not even three digits out.
            noted.clear()
            self.reject(f"status code {status}")
            return
        if 100 <= status < 200 and status != 101:
            # Interim responses (100 Continue, 103) are not relayed: Weir answers
            # Expect: 100-continue itself, and the final response follows on this connection.
            self._informational = True
            noted.clear()
            return
        # The head ended in this read: its bytes are at most those counted (the read may
        # also have brought the start of the body); only when those are over the limit are
        # the headers held measured.
        if self._head_bytes > MAX_RESPONSE_HEAD and (
                sum(len(part) for part in lines) + sum(len(part) for part in noted)
                > MAX_RESPONSE_HEAD):
            noted.clear()
            self._head_too_large()
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
            noted.clear()
            return
        # The reason phrase is not read (no on_status callback): like Envoy, Weir sends the
        # standard phrase for the code, which clients ignore anyway (RFC 9112 4).
        sink.on_upstream_head(status, lines, noted, _response_keep_alive(self.parser))
        noted.clear()
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
            self.sink = None  # finish_response, inlined: the usual end of every exchange
            sink.on_upstream_complete()

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
        self._head_bytes = 0
        self._informational = False
        self.last_activity = self.pool.corker.now()
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

    def pause_reading(self) -> None:
        """The client it answers cannot take more for now. Paused and resumed only through
        these two, so that the pool can tell a paused connection (release resumes it: the
        answer may have ended in the very read that paused it)."""
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def touch(self) -> None:
        """Request bytes going out count as activity: a slow upload is not a slow upstream."""
        self.last_activity = self.pool.corker.now()

    def write_body(self, data: bytes, chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        if chunked:
            transport.writelines((b"%x\r\n" % len(data), data, CRLF))
        else:
            transport.write(data)
        self.last_activity = self.pool.corker.now()

    def end_body(self, chunked: bool) -> None:
        if chunked and self.transport is not None:
            self.transport.write(LAST_CHUNK)

    def reject(self, reason: str) -> None:
        """An invalid response: one llhttp cannot parse, or one it took that Weir (or the
        exchange) finds invalid. A 502, and the connection is closed."""
        log.warning("invalid response from %s: %s", self.pool.address, reason)
        self.pool.record_failure()
        self._fail(502, "upstream sent an invalid response")

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

    def release(self) -> None:
        self.pool.release(self)

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
                 "connect_timeout", "corker", "drain_label", "draining", "eject_after",
                 "failures", "host", "idle", "idle_timeout", "key", "loop", "max_idle",
                 "max_requests", "on_outlier", "on_unreachable", "penalty", "port", "protocol",
                 "ramp_start", "ramp_window", "reported", "retries", "server_hostname", "ssl",
                 "timeouts", "tls", "unreachable")

    def __init__(self, address: str, settings: UpstreamSettings,
                 loop: asyncio.AbstractEventLoop, corker: Corker,
                 tls: UpstreamTLS | None = None, context: ssl.SSLContext | None = None,
                 protocol: str = "http1") -> None:
        """``corker`` is the registry's, shared by the whole data plane."""
        self.address = address
        self.protocol = protocol  # http1, or h2c/h2 for upstream_h2.Http2Pool
        # Holds its connections' writes to the end of the loop iteration, and tells the time
        # (see corking.py).
        self.corker = corker
        self.host, self.port = split_address(address)
        self.loop = loop
        # HTTPS: the context (replaced on reload, for new connections) and the name to check.
        self.tls = tls
        self.key = pool_key(address, tls, protocol)  # its name in PoolRegistry, health, metrics
        self.ssl = context
        self.server_hostname = (tls.server_name or self.host) if tls is not None else None
        self.idle: list[UpstreamConnection] = []
        # Exchanges using this upstream (requests in flight, streams, tunnels): the balancer
        # counts them, and draining closes those still open when its time is up.
        self.active: set[Closable] = set()
        # Under `weir run --workers N` the supervisor's pools carry no traffic: each worker
        # reports its own (in flight, idle) here, by worker id, for the metrics and status.
        self.reported: dict[int, tuple[int, int]] = {}
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
        self.unreachable = False  # whether the latest failure was a failed connect
        self.eject_after = 0  # 0: outlier detection is off
        self.on_outlier: Callable[[UpstreamPool], None] | None = None
        # Told of every failed connect (health.py takes the upstream out of rotation).
        self.on_unreachable: Callable[[UpstreamPool], None] | None = None
        # Added to the requests in flight when the balancer compares loads: set while the
        # latest connect failed and the upstream stayed in rotation (the last of its version),
        # so that an upstream that fails fast, and so has nothing in flight, is not preferred.
        self.penalty = 0
        # Slow start (health.py starts it): over ramp_window seconds from ramp_start, the
        # balancer gives this upstream a growing part of its share; 0 when not ramping.
        self.ramp_start = 0.0
        self.ramp_window = 0.0
        self.apply(settings)

    @property
    def inflight(self) -> int:
        """Requests in flight: this process's, or under --workers the workers' last reports."""
        if self.reported:
            return len(self.active) + sum(active for active, _ in self.reported.values())
        return len(self.active)

    @property
    def idle_count(self) -> int:
        if self.reported:
            return len(self.idle) + sum(idle for _, idle in self.reported.values())
        return len(self.idle)

    def apply(self, settings: UpstreamSettings) -> None:
        self.connect_timeout = settings.timeouts.connect
        self.idle_timeout = settings.idle_timeout
        self.max_idle = settings.max_idle_per_upstream

    def record_failure(self, unreachable: bool = False) -> None:
        """A 5xx, a failed connect, a read timeout: off the fast path, so a call is fine.
        ``unreachable``: a connect that failed, which a passing health check disproves."""
        self.failures += 1
        self.unreachable = unreachable
        if unreachable and self.on_unreachable is not None:
            self.on_unreachable(self)
        if 0 < self.eject_after <= self.failures and self.on_outlier is not None:
            self.on_outlier(self)

    def ramp_factor(self, now: float) -> float:
        """The part of its full share this upstream gets now: 1.0 unless slow-starting."""
        if self.ramp_window <= 0.0:
            return 1.0
        elapsed = now - self.ramp_start
        if elapsed >= self.ramp_window:
            self.ramp_window = 0.0
            return 1.0
        return max(RAMP_FLOOR, elapsed / self.ramp_window)

    def take_idle(self, must_be_open: bool = False) -> UpstreamChannel | None:
        """The most recently used idle connection. ``must_be_open`` (for a request that
        cannot be retried) first asks the kernel whether the upstream has closed it since:
        the loop may not have read that close yet, and a request sent on it would be lost."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                if must_be_open and not conn.still_open():
                    conn.close()
                    continue
                conn.reused = True
                return conn
        return None

    async def connect(self, timeout: float | None = None) -> UpstreamChannel:
        """A fresh connection; raises TimeoutError or OSError. Over TLS the timeout covers
        the handshake too."""
        async with asyncio.timeout(timeout if timeout is not None else self.connect_timeout):
            conn = await self.open_connection(lambda: UpstreamConnection(self))
        assert isinstance(conn, UpstreamConnection)
        conn.reused = False
        self.penalty = 0
        return conn

    async def open_connection(self, factory: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """A connection to this upstream (TLS too, as configured), its protocol made by
        ``factory``; raises OSError. The caller bounds the time."""
        try:
            _, conn = await self.loop.create_connection(
                factory, self.host, self.port, ssl=self.ssl,
                server_hostname=self.server_hostname)
        except ssl.SSLCertVerificationError as exc:
            raise ConnectionError(f"TLS certificate verification failed for "
                                  f"{self.server_hostname}: {exc.verify_message}") from exc
        except ssl.SSLError as exc:
            raise ConnectionError(f"TLS handshake failed: {exc.reason or exc}") from exc
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        # Not pooled for a pool out of rotation (drained, ejected, failing checks): nobody
        # would take it, and a drained instance should see its connections close.
        if conn.closed or self.draining or not self.available or len(self.idle) >= self.max_idle:
            conn.close()
            return
        if conn.paused:
            conn.resume_reading()  # an idle connection must read: a close, stray bytes
        conn.idle_since = self.corker.now()
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

    __slots__ = ("_next", "pools", "ramping")

    def __init__(self, pools: list[UpstreamPool]) -> None:
        self.pools = pools
        self._next = 0
        self.ramping = False  # some upstream is slow-starting (health.py sets it)

    def pick(self) -> UpstreamPool | None:
        """None when no upstream can take a request now (``all_full`` tells the reasons
        apart)."""
        if self.ramping:
            return self.pick_ramping()
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
            active = len(pool.active)
            load = active + pool.penalty
            if load < best_load and active < pool.max_requests and pool.available:
                best = pool
                best_load = load
        return best

    def pick_ramping(self) -> UpstreamPool | None:
        """While an upstream slow-starts: a weighted draw, each available upstream weighing
        its ramp factor over its requests in flight plus one, so that at any load the
        ramping one gets about its factor's part of a full share. Least-in-flight resumes
        when every ramp has ended."""
        now = self.pools[0].corker.now()
        ramping = False
        candidates: list[UpstreamPool] = []
        weights: list[float] = []
        for pool in self.pools:
            factor = pool.ramp_factor(now)
            if factor < 1.0:
                ramping = True
            active = len(pool.active)
            if pool.available and active < pool.max_requests:
                candidates.append(pool)
                weights.append(factor / (active + 1 + pool.penalty))
        self.ramping = ramping
        return choices(candidates, weights)[0] if candidates else None

    def shares(self) -> dict[str, float]:
        """Each available upstream's expected part of this version's requests at equal
        load, for /api/status: equal parts, less what slow starts hold back."""
        now = self.pools[0].corker.now()
        factors = {p.key: p.ramp_factor(now) for p in self.pools if p.available}
        total = sum(factors.values())
        return {p.key: factors.get(p.key, 0.0) / total if total else 0.0 for p in self.pools}

    def pick_excluding(self, tried: Collection[UpstreamPool]) -> UpstreamPool | None:
        """For a retry: the least loaded available upstream not yet tried for this request;
        once every one has been tried, the usual pick (so a version with one upstream retries
        on it). None when no upstream can take it."""
        best = self.pick_untried(tried)
        return best if best is not None else self.pick()

    def pick_untried(self, tried: Collection[UpstreamPool]) -> UpstreamPool | None:
        """The least loaded available upstream not yet tried for this request; None once
        every one has been (a failed connect tries each upstream of its version once)."""
        best: UpstreamPool | None = None
        best_load = sys.maxsize
        for pool in self.pools:
            active = len(pool.active)
            load = active + pool.penalty
            if (pool not in tried and pool.available and active < pool.max_requests
                    and load < best_load):
                best = pool
                best_load = load
        return best

    def all_full(self) -> bool:
        """After pick() found nothing: is it only because the available upstreams are at their
        circuit-breaker limit (so that trying again shortly can work)?"""
        return any(pool.available for pool in self.pools)


def pool_key(address: str, tls: UpstreamTLS | None, protocol: str = "http1") -> str:
    """The pool's name in PoolRegistry.pools and in the metrics' ``upstream`` label. The same
    address over plain HTTP, over TLS, with other TLS settings, or over HTTP/2 gets separate
    pools: their connections are not interchangeable."""
    if tls is None:
        return f"h2c://{address}" if protocol == "h2c" else address
    options = [f"{key}={value}" for key, value in (
        ("verify", "false" if not tls.verify else None), ("ca_file", tls.ca_file),
        ("server_name", tls.server_name)) if value is not None]
    scheme = "h2" if protocol == "h2" else "https"
    return f"{scheme}://{address}" + (f" ({', '.join(options)})" if options else "")
