"""The data plane: an asyncio.Protocol per client connection, one Exchange per request.

A client connection parses requests with httptools. Each request becomes an ``Exchange``
that picks a version from the current route table, takes a pooled upstream connection (or
opens one), and streams bytes both ways with backpressure: when one side's transport stops
accepting writes, the other side stops reading. Requests pipelined behind the active one wait,
parsed and buffered, with the client's reading paused.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import resource
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from .corking import CorkedTransport
from .http11 import (
    ALLOW_WITHOUT_TRACE,
    CONNECTION_CLOSE,
    CONNECTION_KEEP_ALIVE,
    CONTINUE,
    CRLF,
    GET,
    HEAD_END_WITH_VIA,
    HOST,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    PLAIN_CONNECTION_VALUES,
    REQUEST_REWRITTEN,
    SAFE_METHODS,
    STATUS_LINES,
    TRANSFER_CHUNKED,
    VIA,
    connection_tokens,
    lowered,
    simple_response,
    split_absolute_form,
    status_line,
)
from .mirror import MirrorCopy, MirrorPolicy
from .retry import RETRY_CONNECT_FAILURE, RETRY_RESET, RETRY_STATUS, RETRY_TIMEOUT
from .routing import Route, RouteTable, VersionTarget
from .upstream import ResponseSink

if TYPE_CHECKING:
    from ..config.model import Config
    from .accesslog import AccessLog
    from .corking import Corker
    from .stats import StatsRegistry
    from .upstream import Balancer, UpstreamConnection, UpstreamPool

log = logging.getLogger("weir.server")

# Body bytes held per exchange while its upstream connection is being opened.
BUFFER_HIGH_WATER: Final = 256 * 1024

# httptools' methods, taken off the class once and called with their parser: from compiled code
# a call by name looks the method up on the type every time (about 120 instructions more).
_feed_request: Final = HttpRequestParser.feed_data
_request_method: Final = HttpRequestParser.get_method
_request_keep_alive: Final = HttpRequestParser.should_keep_alive
# A module constant rather than an imported name, which compiled code looks up in the module's
# dict at every call. The request's latency clock: uvloop's loop.time() is in milliseconds.
perf_counter: Final = time.perf_counter

PAUSE_QUEUE: Final = 1      # a pipelined request waits behind the active one
PAUSE_UPSTREAM: Final = 2   # the upstream's write buffer is full
PAUSE_BUFFER: Final = 4     # body bytes are piling up while we connect
PAUSE_CLOSING: Final = 8    # we will close after the active exchange: read no more requests

# On a circuit breaker's 503: requests in flight finish quickly, so a retry soon may work.
RETRY_AFTER: Final = b"retry-after: 1\r\n"


# How often, at most, "max_connections reached" is logged while connections are being refused.
LIMIT_WARNING_INTERVAL: Final = 10.0

# After an error answer to a client that may still be sending (see ClientConnection.linger):
# how long to read and discard what it sends before closing, like nginx's lingering_timeout.
LINGER_SECONDS: Final = 2.0

# File descriptors kept back from the default max_connections for listeners, the admin API,
# idle pooled upstream connections, health checks and log files.
RESERVED_FDS: Final = 100

OVER_CAPACITY: Final = simple_response(503, "too many connections; try again later", close=True)


def default_max_connections() -> int:
    """Half the process's open-file limit (less a reserve), as HAProxy derives its maxconn:
    each client connection may hold an upstream connection too, and a client refused with a
    503 is better off than one whose accept fails for want of a file descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1, (soft - RESERVED_FDS) // 2)


class HeadTooLarge(Exception):
    """Raised inside a parser callback; httptools reports it as the context of its error."""


class CodingNotImplemented(Exception):
    """A request Transfer-Encoding other than exactly ``chunked`` (raised like HeadTooLarge):
    Weir forwards a body as plain chunked, so any other coding would reach the app as bytes
    it cannot tell apart from the content. nginx answers it with 501 too."""


class DataPlaneSettings:
    """Per-config values the hot path reads, resolved once at load time."""

    __slots__ = ("header_timeout", "idle_timeout", "max_body_bytes", "max_connections",
                 "max_header_bytes", "trusted_networks")

    def __init__(self, config: Config) -> None:
        self.max_connections = config.limits.max_connections or default_max_connections()
        self.max_header_bytes = config.limits.max_header_bytes
        self.max_body_bytes = config.limits.max_body_bytes
        self.header_timeout = config.limits.header_timeout
        self.idle_timeout = config.limits.idle_timeout
        self.trusted_networks = tuple(ipaddress.ip_network(n, strict=False)
                                      for n in config.trusted_proxies)

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted_networks:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_networks)


class DataPlaneContext:
    """All a client connection and its exchanges need of the process, on an object of a
    compiled class (``ProxyServer``, interpreted, would cost a lookup by name for each read).
    ``ProxyServer`` builds it and is the only writer of what changes: ``table``,
    ``access_log``, ``settings`` (a reload) and ``draining`` (a shutdown); the rest is fixed
    for the life of the process."""

    __slots__ = ("access_log", "connections", "corker", "draining", "health", "listener_tls",
                 "loop", "scheme", "settings", "stats", "table")

    def __init__(self, table: RouteTable, access_log: AccessLog | None,
                 settings: DataPlaneSettings, stats: StatsRegistry, health: Any,
                 corker: Corker, loop: asyncio.AbstractEventLoop, scheme: bytes,
                 listener_tls: Any) -> None:
        self.table = table
        self.access_log = access_log
        self.draining = False  # shutting down: answers tell clients to reconnect elsewhere
        self.settings = settings  # read by each new connection
        self.stats = stats
        self.health = health  # health.HealthMonitor: marks upstreams failed or back
        self.corker = corker  # holds writes, tells the time (see corking.py)
        self.loop = loop
        self.scheme = scheme  # b"https" on a TLS listener, else b"http"
        self.listener_tls = listener_tls  # None for plain HTTP
        self.connections: set[ClientConnection] = set()


class Exchange(ResponseSink):
    """One request and its response."""

    __slots__ = (
        "body_buffer", "body_received", "buffered", "bytes_out", "chunked", "client",
        "connect_deadline", "connecting",
        "content_length", "dup_host", "extra_headers", "finished", "forward", "has_body",
        "head_sent", "hmap", "http10", "keep_alive", "keep_client", "method", "mirrors",
        "out_chunked", "outbuf", "pool", "primary_digest", "reason", "request_complete",
        "response_done", "response_started", "retried", "rewritten_headers",
        "route", "started", "status", "target", "tried", "until_eof", "upgrade", "upstream",
        "upstream_address", "upstream_keep_alive", "url",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.url = b""
        # The request headers to pass on as they came, flat and ready to join:
        # [name, b": ", value, CRLF, ...]; the ones Weir rewrites are only in hmap.
        self.forward: list[bytes] = []
        self.hmap: dict[bytes, bytes] = {}
        # Whether any header is one Weir rewrites (REQUEST_REWRITTEN: hop-by-hop, Expect,
        # X-Forwarded-*): most requests have none, and need none of those looked up.
        self.rewritten_headers = False
        self.dup_host = False
        self.method = b""
        self.http10 = False
        self.keep_alive = True
        self.keep_client = True
        self.upgrade = False
        self.head_request = False
        self.chunked = False
        self.has_body = False
        self.content_length = 0
        self.body_buffer: list[bytes] | None = None  # body read before an upstream is attached
        self.buffered = 0
        self.body_received = 0
        self.request_complete = False
        self.route: Route | None = None
        self.target: VersionTarget | None = None
        self.reason = ""
        self.extra_headers = b""
        self.pool: UpstreamPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        # Loop time by which every connect of this request must be done: set by the first
        # connect, so that failing over to other upstreams fits in one connect timeout.
        self.connect_deadline = 0.0
        self.retried = False
        self.tried: list[UpstreamPool] | None = None  # upstreams already tried, once retrying
        self.status = 0
        self.upstream_keep_alive = False
        self.response_started = False
        self.head_sent = False  # the response's head has been written to the client
        self.response_done = False
        self.out_chunked = False
        self.outbuf: list[bytes] = []
        self.until_eof = False
        self.finished = False
        self.started = 0.0
        self.bytes_out = 0
        self.upstream_address: str | None = None
        self.mirrors: list[MirrorCopy] | None = None
        self.primary_digest: Any = None  # a hashlib object when a mirror compares bodies

    # --- request side ---------------------------------------------------------------------

    def start(self) -> None:
        """Headers are in: route, check limits, then get an upstream connection."""
        client = self.client
        settings = client.settings
        hmap = self.hmap
        if self.url[:1] != b"/" and self.url.startswith((b"http://", b"https://")):
            self.use_absolute_form()
        host = hmap.get(b"host")
        if self.dup_host or (host is None and not self.http10):
            self.respond_local(400, "a request needs exactly one Host header", close=True)
            return
        if self.method == b"CONNECT":
            self.respond_local(405, "CONNECT is not supported by a reverse proxy", close=True)
            return
        route = client.plane.table.find_route(host or b"", self.url)
        if route is None:
            self.respond_local(404, "no service matches this host and path")
            return
        if self.method == b"TRACE" and not route.allow_trace:
            # Like nginx: an app that echoes TRACE would echo what the proxy added too
            # (X-Forwarded-*) and any credentials, to a page's script (cross-site tracing).
            # Answered before a version is chosen: no version sees it.
            self.respond_local(405, f"TRACE is not allowed for service {route.name!r}",
                               headers=ALLOW_WITHOUT_TRACE)
            return
        target, self.reason, self.extra_headers = route.pick_version(hmap, self.url)
        if target is None:
            self.respond_local(503, f"service {route.name!r} has no version with traffic")
            return
        self.route = route
        self.target = target
        retry = route.retry
        if retry is not None:
            retry.budget.deposit(self.started)
        if route.mirrors and not self.upgrade:
            # Not an Upgrade: a copy cannot carry the tunnel, and a shadow that switched
            # protocols would hold its connection and a max_concurrent slot until it closed.
            self.start_mirrors(route.mirrors)
        limit = settings.max_body_bytes
        # body_received: a pipelined request that went over the limit while it was queued.
        if limit is not None and (self.content_length > limit or self.body_received > limit):
            client.plane.stats.limits.max_body_bytes += 1
            self.respond_local(413, f"request body is larger than {limit} bytes")
            return
        # Typed as the data plane's own Balancer: compiled, pick() is then a native call.
        balancer: Balancer = target.balancer  # type: ignore[assignment]
        pool = balancer.pick()
        if pool is None:
            self.no_upstream(route, target)
            return
        # Never to an HTTP/1.0 client, which cannot take a 1xx (RFC 9110 10.1.1): it sends
        # its body anyway, and the expectation is ignored.
        if (self.has_body and not self.http10
                and hmap.get(b"expect", b"").lower() == b"100-continue"):
            client.transport.write(CONTINUE)
        self.pool = pool
        self.upstream_address = pool.address
        pool.active.add(self)
        # A request that cannot be retried is not sent on a connection the upstream has
        # already closed (the stale keep-alive race). The usual GET takes the most recently
        # used idle connection without a call (pool.take_idle's fast path, inlined).
        idle = pool.idle
        conn: UpstreamConnection | None
        if idle and not self.has_body and self.method in IDEMPOTENT_METHODS:
            conn = idle.pop()
            if conn.closed:
                conn = pool.take_idle()
            else:
                conn.reused = True
        else:
            conn = pool.take_idle(self.has_body or self.method not in IDEMPOTENT_METHODS)
        if conn is not None:
            self.attach(conn)
        else:
            self.connecting = client.loop.create_task(self.connect(pool))

    def no_upstream(self, route: Route, target: VersionTarget) -> None:
        """Every upstream of the version is unhealthy, ejected or full: answer now rather than
        hang or try one known to be down."""
        health = self.client.plane.health
        balancer: Balancer = target.balancer  # type: ignore[assignment]
        message, full = health.unavailable(route.name, target.name, balancer)
        self.respond_local(503, message, headers=RETRY_AFTER if full else b"")

    def start_mirrors(self, policies: tuple[MirrorPolicy, ...]) -> None:
        method = self.method
        for policy in policies:
            if policy.wants(method):
                if not policy.has_room():
                    policy.drop(self)
                    continue
                if self.mirrors is None:
                    self.mirrors = []
                self.mirrors.append(MirrorCopy(policy, self))
                if policy.compare and self.primary_digest is None:
                    self.primary_digest = hashlib.sha256()

    def use_absolute_form(self) -> None:
        """RFC 9112 3.2.2: the authority of an absolute-form target replaces Host, and the
        upstream gets the origin form."""
        authority, self.url = split_absolute_form(self.url)
        self.hmap[b"host"] = authority
        self.forward = [b"Host", b": ", authority, CRLF, *without_headers(self.forward, {b"host"})]
        self.dup_host = False

    async def connect(self, pool: UpstreamPool) -> None:
        route = self.route
        assert route is not None
        now = self.client.loop.time()
        if self.connect_deadline == 0.0:
            self.connect_deadline = now + route.connect_timeout
        if now >= self.connect_deadline:  # failing over took the whole connect timeout
            self.connecting = None
            self.upstream_failed(504, f"connecting to upstream {pool.address} timed out")
            return
        try:
            conn = await pool.connect(self.connect_deadline - now)
        except TimeoutError:
            self.connecting = None
            pool.timeouts += 1
            pool.record_failure(unreachable=True)
            if self.retry_request(RETRY_CONNECT_FAILURE):
                return
            self.upstream_failed(504, f"connecting to upstream {pool.address} timed out")
            return
        except OSError as exc:
            self.connecting = None
            pool.connect_errors += 1
            pool.record_failure(unreachable=True)
            if self.retry_request(RETRY_CONNECT_FAILURE):
                return
            self.upstream_failed(502, f"cannot connect to upstream {pool.address}: "
                                      f"{exc.strerror or exc}")
            return
        self.connecting = None
        if self.finished:
            pool.release(conn)
            return
        self.attach(conn)

    def attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        data = self.build_head(REQUEST_REWRITTEN, TRANSFER_CHUNKED if self.chunked else b"")
        if self.body_buffer:
            body = self.body_buffer
            self.body_buffer = None
            self.buffered = 0
            if self.chunked:
                data += b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in body)
            else:
                data += b"".join(body)
            self.client.set_pause(PAUSE_BUFFER, False)
        if self.request_complete and self.chunked:
            data += LAST_CHUNK
        route = self.route
        assert route is not None  # narrowed, so that compiled code reads it natively
        conn.send(self, data, route.read_timeout)
        if self.client.write_paused and conn.transport is not None:
            conn.transport.pause_reading()

    def build_head(self, skip: frozenset[bytes], extra: bytes) -> bytes:
        """The request head as forwarded: hop-by-hop headers out, forwarding headers in.
        ``skip`` names more headers to leave out, ``extra`` adds header lines (mirrors use
        both to set their own Host and Content-Length)."""
        client = self.client
        hmap = self.hmap
        parts = [self.method, b" ", self.url, b" HTTP/1.1\r\n"]
        connection = hmap.get(b"connection") if self.rewritten_headers else None
        named = (connection_tokens(connection)
                 if connection is not None and connection not in PLAIN_CONNECTION_VALUES
                 else None)
        # extend and append rather than += with a new tuple: native calls when compiled.
        if named or skip is not REQUEST_REWRITTEN:
            parts.extend(without_headers(self.forward, skip | named if named else skip))
        else:
            parts.extend(self.forward)  # the usual case: nothing more to leave out
        host = hmap.get(b"host")
        if client.trusted:
            forwarded = hmap.get(b"x-forwarded-for")
            xff = forwarded + b", " + client.peer_bytes if forwarded else client.peer_bytes
            proto = hmap.get(b"x-forwarded-proto", client.plane.scheme)
            fhost = hmap.get(b"x-forwarded-host") or host or b""
            parts.extend((b"x-forwarded-for: ", xff, b"\r\nx-forwarded-proto: ", proto,
                          b"\r\nx-forwarded-host: ", fhost, CRLF))
        else:
            parts.append(client.forwarded_for)
            parts.append(host if host is not None else b"")
            parts.append(CRLF)
        if host is None and b"host" not in skip and self.pool is not None:
            # HTTP/1.0 clients; a mirror copy (host in skip) brings its own Host.
            parts.extend((b"host: ", self.pool.address.encode(), CRLF))
        if self.upgrade:
            parts.extend((b"connection: upgrade\r\nupgrade: ", hmap.get(b"upgrade", b""), CRLF))
        if extra:
            parts.append(extra)
        parts.append(HEAD_END_WITH_VIA)
        return b"".join(parts)

    def on_request_body(self, body: bytes) -> None:
        self.body_received += len(body)
        if self.mirrors is not None:
            for copy in self.mirrors:
                copy.add_body(body)
        limit = self.client.settings.max_body_bytes
        if limit is not None and self.body_received > limit:
            # Acted on once, when the limit is crossed; the rest is read and dropped (never
            # forwarded) until the connection closes.
            if self.body_received - len(body) <= limit:
                self.body_over_limit(limit)
            return
        if self.response_done or self.finished:
            return  # the response went out early; the rest of the body is read and dropped
        conn = self.upstream
        if conn is not None:
            transport = conn.transport
            assert transport is not None
            if self.chunked:
                transport.writelines((b"%x\r\n" % len(body), body, CRLF))
            else:
                transport.write(body)
            conn.touch()
        else:
            if self.body_buffer is None:
                self.body_buffer = []
            self.body_buffer.append(body)
            self.buffered += len(body)
            if self.buffered > BUFFER_HIGH_WATER:
                self.client.set_pause(PAUSE_BUFFER, True)

    def body_over_limit(self, limit: int) -> None:
        client = self.client
        if self is not client.active:
            # Pipelined behind a request still being answered (or already refused by its
            # declared length): a 413 now would go out ahead of that answer. start() sends
            # it in turn.
            self.body_buffer = None
            self.buffered = 0
            return
        client.plane.stats.limits.max_body_bytes += 1
        message = f"request body is larger than {limit} bytes"
        if self.response_started:
            self.client.abort()
            return
        self.drop_upstream()
        self.respond_local(413, message, close=True)

    def on_request_complete(self) -> None:
        self.request_complete = True
        if self.mirrors is not None:
            for copy in self.mirrors:
                copy.send()
        conn = self.upstream
        if conn is not None and self.chunked and not self.response_done:
            assert conn.transport is not None
            conn.transport.write(LAST_CHUNK)
        if self.response_done:  # else the response's end finishes the exchange
            self.maybe_finish()

    # --- response side (called by UpstreamConnection) -------------------------------------

    def on_upstream_head(self, status: int, lines: list[bytes],
                         noted: list[bytes], keep_alive: bool) -> None:
        """See ResponseSink. The head is joined in ``lines`` itself, status line first."""
        if status == 101 and not self.upgrade:
            # A switch nobody asked for (RFC 9110 7.8, 15.2.2): an invalid response, not a
            # tunnel that would hand the client connection to the upstream raw.
            conn = self.upstream
            if conn is not None:
                conn.reject("upstream switched protocols for a request without Upgrade")
            return
        route = self.route
        assert route is not None
        policy = route.retry
        if (policy is not None and status in policy.statuses
                and self.retry_request(RETRY_STATUS)):
            return  # this response is dropped unseen; another attempt is under way
        client = self.client
        self.status = status
        self.upstream_keep_alive = keep_alive
        chunked_in = has_length = False
        drop: set[bytes] | None = None
        upgrade_to = b""
        for i in range(0, len(noted), 2):
            lname = noted[i]
            value = noted[i + 1]
            if lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding":
                chunked_in = True
            elif lname == b"connection":
                # The usual keep-alive, compared before a set lookup that would hash it.
                if value != b"keep-alive" and value not in PLAIN_CONNECTION_VALUES:
                    drop = connection_tokens(value) or None
            elif lname == b"upgrade":
                upgrade_to = value
        # While draining for shutdown, clients are told to reconnect (to another instance)
        # rather than reuse a connection that is about to be closed under them.
        keep = self.keep_alive and not client.closing and not client.plane.draining
        framing = b""
        if status == 101:
            framing = b"connection: upgrade\r\nupgrade: " + upgrade_to + CRLF
        elif self.upgrade:
            keep = False  # the upstream refused the upgrade; the client may already be sending
            # Nor is the upstream connection pooled: a server may take what follows an
            # Upgrade request as the new protocol whatever it answered (aiohttp reads it as
            # the request's body until EOF), and would swallow the next pooled request.
            self.upstream_keep_alive = False
        if status == 101 or self.head_request or status in (204, 304):
            pass
        elif chunked_in or not has_length:
            if has_length:
                drop = (drop or set()) | {b"content-length"}  # chunked wins (RFC 9112 6.3)
            self.until_eof = not chunked_in
            if self.http10:
                keep = False  # HTTP/1.0 has no chunked encoding: closing ends the body
            else:
                self.out_chunked = True
                framing = TRANSFER_CHUNKED
        parts = [b"", *without_headers(lines[1:], drop)] if drop else lines
        parts[0] = STATUS_LINES.get(status) or status_line(status)
        self.keep_client = keep or status == 101
        if status != 101:
            if not keep:
                parts.append(CONNECTION_CLOSE)
            elif self.http10:
                parts.append(CONNECTION_KEEP_ALIVE)
        target = self.target
        assert target is not None
        if framing or self.extra_headers:
            parts += (framing, target.response_header, self.extra_headers, VIA, CRLF)
        else:
            parts.append(target.response_end)
        self.response_started = True
        # Held, not yet joined, until the upstream read is fully parsed: the body read with it
        # joins the same list, and the client's transport joins the lot into one write.
        if self.outbuf:
            self.outbuf += parts
        else:
            self.outbuf = parts
        if status == 101:
            self.flush()
            client.start_tunnel(self)

    def on_upstream_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.primary_digest is not None:
            self.primary_digest.update(data)
        if self.out_chunked:
            self.outbuf += (b"%x\r\n" % len(data), data, CRLF)
        else:
            self.outbuf.append(data)

    def flush(self) -> None:
        out = self.outbuf
        if out:
            self.outbuf = []
            self.head_sent = True
            self.client.transport.write_list(out)

    def on_upstream_complete(self) -> None:
        out = self.outbuf
        if self.out_chunked:
            out.append(LAST_CHUNK)
        if out:
            self.outbuf = []
            self.head_sent = True
            self.client.transport.write_list(out)
        self.response_done = True
        conn, self.upstream = self.upstream, None
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.active.discard(self)
        if conn is not None:
            if self.upstream_keep_alive and self.request_complete and not self.until_eof:
                conn.pool.release(conn)
            else:
                conn.close()
        self.maybe_finish()

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        self.client.transport.write(data)

    def on_upstream_failed(self, status: int, reason: str, got_bytes: bool) -> None:
        self.upstream = None
        # 504 is the read timeout; the other failure, an unparseable response (502), is a
        # broken upstream rather than a passing one, and is not retried.
        if status == 504 and self.retry_request(RETRY_TIMEOUT):
            return
        self.upstream_failed(status, reason)

    def on_upstream_closed(self) -> None:
        conn, self.upstream = self.upstream, None
        if self.finished:
            return
        if self.response_started:
            if self.client.tunnel is self:
                self.release_pool_slot()
                self.client.close()
            elif self.until_eof:
                self.on_upstream_complete()
            else:
                self.release_pool_slot()
                self.client.abort()  # truncated body: the client must not take it as whole
            return
        if (conn is not None and conn.reused and not conn.got_bytes and not self.retried
                and not self.has_body and self.method in IDEMPOTENT_METHODS
                and self.pool is not None):
            # A pooled connection the upstream had already closed: try once on a fresh one.
            self.retried = True
            self.pool.retries += 1
            self.connecting = self.client.loop.create_task(self.connect(self.pool))
            return
        if self.pool is not None:
            self.pool.record_failure()
        if self.retry_request(RETRY_RESET, conn is not None and not conn.got_bytes):
            return
        self.upstream_failed(502, "upstream closed the connection before answering")

    def retry_request(self, reason: str, nothing_read: bool = False) -> bool:
        """Send the request again if the service's retry policy and budget allow it, to an
        upstream of the version not yet tried when there is one. False, with nothing done,
        when the failure must be relayed instead. With no retry policy, ``fail_over`` decides.

        A failed connect is retried for any request: nothing of it has left Weir, and its
        body so far is still held (as nginx passes a POST on to the next server when the
        connection could not be made). Any other failure is retried only for idempotent
        requests without a body (a body has already streamed to the upstream and is not
        kept). Never once anything of a response has reached the client.
        http_requests_total still counts the client's request once, with the status of its
        last attempt (see ``record``); retries show in weir_retries_total."""
        route = self.route
        if (route is None or self.finished or self.response_started or self.upgrade
                or self.pool is None):
            return False
        policy = route.retry
        if policy is None:
            return self.fail_over(reason, nothing_read)
        if reason not in policy.reasons:
            return False
        unsent = reason == RETRY_CONNECT_FAILURE and self.buffered == self.body_received
        if not unsent and (self.has_body or self.method not in IDEMPOTENT_METHODS):
            return False
        tried = self.tried
        if (1 if tried is None else len(tried) + 1) >= policy.attempts:
            return False
        target = self.target
        assert route is not None and target is not None
        tried = self.tried = [*(tried or ()), self.pool]
        pool: UpstreamPool | None = target.balancer.pick_excluding(tried)  # type: ignore
        if pool is None:
            return False  # nothing healthy left to try: the failure is the answer
        stats = self.client.plane.stats
        if not policy.budget.try_withdraw(perf_counter()):
            stats.count_retry_budget_exhausted(route.name, target.name)
            return False
        stats.count_retry(route.name, target.name, reason)
        self.connect_deadline = 0.0  # each of a policy's attempts gets a whole connect timeout
        self.send_again(pool, reason)
        return True

    def fail_over(self, reason: str, nothing_read: bool) -> bool:
        """The default with no ``retries`` block: a request whose connect failed goes to
        another upstream of its version, whatever its method (none of it has left Weir); a
        safe request (GET, HEAD, ...) whose fresh connection broke before any byte of an
        answer does too. Each upstream of the version is tried at most once, all within one
        connect timeout, and no budget applies: a failed connect cost the app nothing."""
        if reason == RETRY_CONNECT_FAILURE:
            if self.buffered != self.body_received:
                return False  # some of the body went out on an earlier connection
        elif not (reason == RETRY_RESET and nothing_read and not self.has_body
                  and self.method in SAFE_METHODS):
            return False
        if self.client.loop.time() >= self.connect_deadline > 0.0:
            return False
        route = self.route
        target = self.target
        assert route is not None and target is not None and self.pool is not None
        tried = self.tried = [*(self.tried or ()), self.pool]
        balancer: Balancer = target.balancer  # type: ignore[assignment]
        pool = balancer.pick_untried(tried)
        if pool is None:
            return False  # every upstream of the version tried: the failure is the answer
        self.client.plane.stats.count_retry(route.name, target.name, reason)
        self.send_again(pool, reason)
        return True

    def send_again(self, pool: UpstreamPool, reason: str) -> None:
        """Move the request to ``pool`` and send it there (a retry or a fail-over)."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.detach()  # a dropped response: closing beats reading a body of unknown size
        self.release_pool_slot()
        self.pool = pool
        log.debug("%s %s: retrying on %s (%s)", self.method.decode(),
                  self.url[:200].decode("latin-1"), pool.address, reason)
        self.upstream_address = pool.address
        pool.active.add(self)
        self.retried = False  # the new attempt may meet a stale pooled connection too
        conn = pool.take_idle(self.has_body or self.method not in IDEMPOTENT_METHODS)
        if conn is not None:
            self.attach(conn)
        else:
            self.connecting = self.client.loop.create_task(self.connect(pool))

    def pause_client_reading(self, paused: bool) -> None:
        self.client.set_pause(PAUSE_UPSTREAM, paused)

    # --- endings --------------------------------------------------------------------------

    def upstream_failed(self, status: int, reason: str) -> None:
        self.release_pool_slot()
        if self.finished:
            return
        log.warning("%s %s: %s", self.method.decode(), self.url[:200].decode("latin-1"), reason)
        if self.response_started and not self.head_sent and not self.response_done:
            # The response broke in the read that brought its head, which is still held
            # here: nothing of it reached the client, so it gets the 502 instead.
            self.outbuf = []
            self.response_started = False
        if self.response_started:
            self.client.abort()
        else:
            self.respond_local(status, reason)

    def respond_local(self, status: int, message: str, close: bool = False,
                      headers: bytes = b"") -> None:
        """Answer from Weir itself. Unread request body bytes mean the connection must close.
        ``headers`` are extra header lines."""
        client = self.client
        keep = (self.keep_alive and not close and not client.closing
                and not client.plane.draining
                and (self.request_complete or not self.has_body) and not self.upgrade)
        self.keep_client = keep
        self.status = status
        target = self.target
        extra = target.response_header if target is not None else b""
        client.transport.write(simple_response(status, message, not keep, extra + headers,
                                               self.head_request))
        self.response_started = True
        self.response_done = True
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.response_done and not self.finished and (
                self.request_complete or not self.keep_client):
            self.finished = True
            self.record(self.status)
            self.client.exchange_finished(self)

    def record(self, status: int) -> None:
        """Count the exchange once, when it ends, against the version that served it.

        Once per client request, whatever the attempts behind it: attempts that were retried
        are counted only in weir_retries_total (and the upstream's own counters), so per
        version http_requests_total is what clients saw, with the last attempt's status."""
        if self.mirrors is not None:
            self.settle_mirrors(status)
        target = self.target
        seconds = perf_counter() - self.started
        if target is None:
            self.client.plane.stats.count_unrouted(status)
        else:
            target.stats.observe(self.method, status, seconds)
        access_log = self.client.plane.access_log
        if access_log is not None:
            access_log.exchange(self, status, seconds)

    def settle_mirrors(self, status: int) -> None:
        """Copies not yet sent (the request never completed) are dropped; copies that compare
        get the primary's status and body digest."""
        digest = self.primary_digest.hexdigest() if self.primary_digest is not None else ""
        for copy in self.mirrors or ():
            if copy.pool is None and not copy.done and not self.request_complete:
                copy.finish("dropped")
            elif copy.digest is not None:
                copy.primary_finished(status, digest)
        self.mirrors = None  # the copies no longer need the exchange, nor it them

    def release_pool_slot(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.active.discard(self)

    def drop_upstream(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn is not None:
            conn.detach()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        self.release_pool_slot()

    def close_for_drain(self) -> None:
        """Its version lost its traffic and the drain timeout has passed."""
        self.end_early()
        self.drop_upstream()
        self.client.close()  # a FIN after what was already sent, not a reset

    def abandon(self) -> None:
        """The client went away: stop everything this exchange holds."""
        self.end_early()
        self.drop_upstream()

    def end_early(self) -> None:
        if not self.finished:
            self.finished = True
            # 499 (nginx's "client closed request") when no response had started.
            self.record(self.status if self.response_started else 499)


def without_headers(forward: list[bytes], names: frozenset[bytes] | set[bytes]) -> list[bytes]:
    """A flat [name, b": ", value, CRLF, ...] list less the headers named (lower-case)."""
    kept: list[bytes] = []
    for i in range(0, len(forward), 4):
        if forward[i].lower() not in names:
            kept += forward[i:i + 4]
    return kept


class ClientConnection(asyncio.Protocol):
    """One downstream connection; runs its exchanges one at a time, in order."""

    __slots__ = (
        "active", "closing", "corker", "current", "deadline", "forwarded_for", "head_bytes",
        "idle", "in_head", "lingering",
        "loop", "parser", "pause_flags", "peer", "peer_bytes", "pending_error", "plane", "queue",
        "settings",
        "timer", "timer_at", "transport", "trusted", "tunnel", "tunnel_pending", "write_paused",
    )

    def __init__(self, plane: DataPlaneContext) -> None:
        self.plane = plane
        self.loop = plane.loop
        self.corker = plane.corker
        self.settings = plane.settings
        self.transport: CorkedTransport = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.current: Exchange | None = None
        self.active: Exchange | None = None
        # Pipelined requests waiting their turn; a deque only once one comes (most clients
        # never pipeline, and an idle keep-alive connection should cost little memory).
        self.queue: deque[Exchange] | tuple[()] = ()
        self.in_head = False
        self.idle = False  # waiting, after a response, for the next request (idle_timeout)
        self.head_bytes = 0
        self.pause_flags = 0
        self.write_paused = False
        self.closing = False
        self.tunnel: Exchange | None = None
        self.tunnel_pending: list[bytes] = []
        self.lingering = False
        # An error for a request pipelined behind the active one: (status, the answer), sent
        # once the active exchange ends (see protocol_error).
        self.pending_error: tuple[int, bytes] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline: float | None = None
        self.peer = ""
        self.peer_bytes = b""
        self.trusted = False
        self.forwarded_for = b""

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.plane.connections) >= self.settings.max_connections:
            self.refuse(transport)
            return
        self.transport = CorkedTransport(transport, self.corker)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self.peer_bytes = self.peer.encode()
        self.trusted = self.settings.is_trusted(self.peer)
        # The forwarding headers of every request on this connection, up to the host's value.
        self.forwarded_for = (b"x-forwarded-for: " + self.peer_bytes
                              + b"\r\nx-forwarded-proto: " + self.plane.scheme
                              + b"\r\nx-forwarded-host: ")
        self.plane.connections.add(self)
        self.set_deadline(self.settings.header_timeout)

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        """Over max_connections. A 503 tells an HTTP client (or a load balancer in front) to
        retry elsewhere, where a bare close or reset looks like a crash; nothing is read, so a
        refused connection costs only its accept, and it never enters ``plane.connections``,
        so it takes no slot. (Were its request already here unread, the close is a reset, but
        Linux still delivers the 503 sent before it.)"""
        self.transport = CorkedTransport(transport, self.corker)
        limits = self.plane.stats.limits
        limits.max_connections += 1
        now = self.loop.time()
        if now - limits.last_warning >= LIMIT_WARNING_INTERVAL:
            limits.last_warning = now
            log.warning("limits.max_connections (%d) reached: refusing new connections with "
                        "503", self.settings.max_connections)
        self.transport.write(OVER_CAPACITY)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            upstream = self.tunnel.upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(data)
            return
        if self.lingering:
            return  # the answer (an error) is sent: what the client still sends is dropped
        if self.active is not None and self.active.upgrade:
            # Bytes after an upgrade request, before the upstream's 101: hold them.
            self.tunnel_pending.append(data)
            self.transport.pause_reading()
            return
        try:
            _feed_request(self.parser, data)
        except HttpParserUpgrade as exc:
            rest = data[exc.args[0]:]
            if rest:
                self.tunnel_pending.append(rest)
            self.transport.pause_reading()
        except HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadTooLarge):
                self.protocol_error(431, "request line and headers are too large")
            elif isinstance(cause, CodingNotImplemented):
                self.protocol_error(501, "a Transfer-Encoding other than chunked alone is "
                                         "not supported")
            elif cause is not None:
                # One of our callbacks raised: a bug of ours, not a bad request.
                log.error("internal error handling a request from %s", self.peer,
                          exc_info=cause)
                self.protocol_error(500, "internal proxy error")
            else:
                self.protocol_error(400, f"malformed request: {exc or type(exc).__name__}")
            return
        if self.in_head and self.parser_buffered_too_much(len(data)):
            self.protocol_error(431, "request line and headers are too large")

    def eof_received(self) -> bool | None:
        # Returning None lets the transport close itself, past the hold: send what it holds
        # now (an answer finished in this loop iteration).
        self.transport.uncork()
        # A client that half-closes after a complete request still gets its response; one
        # that stops in the middle of its request has given up on it.
        active = self.active
        if active is not None and self.tunnel is None and active.request_complete:
            self.closing = True
            # TLS has no half-close: after a close_notify uvloop shuts the connection down
            # whatever we answer, and logs a warning if we ask to keep it open.
            return True if self.plane.listener_tls is None else None
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.plane.connections.discard(self)
        self.cancel_timer()
        for ex in (self.active, *self.queue):
            if ex is not None:
                ex.abandon()
        self.active = None
        self.queue = ()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.resume_reading()

    # --- httptools callbacks --------------------------------------------------------------

    def parser_buffered_too_much(self, received: int) -> bool:
        """A head still incomplete: httptools holds the header being read, which the
        callbacks have not counted yet, so count raw bytes while a head is open."""
        self.head_bytes += received
        return self.head_bytes > 2 * self.settings.max_header_bytes

    def on_url(self, url: bytes) -> None:
        # The first callback of every request (on_message_begin would be one more call).
        if not self.in_head:
            self.current = ex = Exchange(self)
            ex.url = url
            self.head_bytes = len(url)
            self.in_head = True
            if self.active is None:
                self.idle = False
                # set_deadline, inlined: the lazily armed timer rarely needs touching.
                self.deadline = deadline = self.corker.now() + self.settings.header_timeout
                if self.timer is None or deadline < self.timer_at:
                    self.set_deadline(self.settings.header_timeout)
            return
        current = self.current  # the rest of a URL split across reads
        assert current is not None
        current.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.current
        assert ex is not None
        # Nearly every request's Host, in the spelling clients send: no lowering (see HOST).
        lname = HOST if name == b"Host" else lowered(name)
        if lname not in REQUEST_REWRITTEN:
            forward = ex.forward  # four appends: cheaper than += with a new tuple
            forward.append(name)
            forward.append(b": ")
            forward.append(value)
            forward.append(CRLF)
        else:
            ex.rewritten_headers = True
        self.head_bytes += len(name) + len(value) + 4
        hmap = ex.hmap
        if lname in hmap:
            if lname == b"host":
                ex.dup_host = True
            hmap[lname] += (b"; " if lname == b"cookie" else b", ") + value
        else:
            hmap[lname] = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.lingering:
            return  # a request pipelined behind an error answer: dropped with the rest
        ex = self.current
        assert ex is not None
        if self.head_bytes > self.settings.max_header_bytes:
            raise HeadTooLarge
        self.head_bytes = 0
        parser = self.parser
        ex.started = perf_counter()
        method = _request_method(parser)
        if method == GET:
            method = GET
        ex.method = method
        ex.head_request = method == b"HEAD"
        ex.keep_alive = keep_alive = _request_keep_alive(parser)
        # HTTP/1.0 keeps a connection only when asked in a Connection header, so the common
        # case needs no call to get_http_version (which formats a string).
        hmap = ex.hmap
        rewritten = ex.rewritten_headers  # Connection, Upgrade, Transfer-Encoding among them
        ex.http10 = ((not keep_alive or (rewritten and b"connection" in hmap))
                     and parser.get_http_version() == "1.0")
        # llhttp upgrades only a request with an Upgrade header (CONNECT aside, which Weir
        # refuses), so most requests need no call to ask.
        ex.upgrade = (rewritten and b"upgrade" in hmap and parser.should_upgrade()
                      and method != b"CONNECT")
        if rewritten and b"transfer-encoding" in hmap:
            # llhttp has refused a coding list that does not end in chunked (400); of the
            # rest, Weir relays only chunked alone (in any case, with trailing blanks, as
            # llhttp leaves it): codings before it would reach the app undone.
            coding = hmap[b"transfer-encoding"]
            if coding != b"chunked" and coding.rstrip(b" \t").lower() != b"chunked":
                raise CodingNotImplemented
            ex.chunked = ex.has_body = True
        else:
            length = hmap.get(b"content-length")
            if length:
                ex.content_length = int(length)  # llhttp has checked it is a number
                ex.has_body = ex.content_length > 0
        if self.active is None:
            self.active = ex
            self.deadline = None
            ex.start()
        else:
            if not self.queue:
                self.queue = deque()
            self.queue.append(ex)  # type: ignore[union-attr]
            self.set_pause(PAUSE_QUEUE, True)

    def on_body(self, body: bytes) -> None:
        if self.lingering:
            return
        ex = self.current
        assert ex is not None
        ex.on_request_body(body)

    def on_message_complete(self) -> None:
        ex, self.current = self.current, None
        if ex is not None and not self.lingering:
            ex.on_request_complete()

    # --- exchange lifecycle ---------------------------------------------------------------

    def exchange_finished(self, ex: Exchange) -> None:
        if ex is not self.active:
            return
        self.active = None
        if self.pause_flags:
            self.set_pause(PAUSE_UPSTREAM | PAUSE_BUFFER, False)
        pending = self.pending_error
        if pending is not None:
            self.pending_error = None
            if ex.keep_client and not self.transport.is_closing():
                self.plane.stats.count_unrouted(pending[0])
                self.transport.write(pending[1])
            self.linger()  # the broken request's bytes may still be coming
            return
        if not ex.keep_client:
            if ex.request_complete or ex.upgrade:
                self.close()
            else:
                self.linger()  # answered (413, say) before the client finished sending
            return
        if self.queue:
            # A transport that closed under us (the client reset, or sent a FIN that ended
            # it) is asked about only before a queued request would start: an idle
            # connection's connection_lost follows and cancels what is set below, and the call
            # costs more than the rest of this method.
            if self.transport.is_closing():
                self.close()
                return
            nxt = self.queue.popleft()  # type: ignore[union-attr]
            if not self.queue:
                self.set_pause(PAUSE_QUEUE, False)
            self.active = nxt
            nxt.start()
            return
        if self.closing:
            self.close()
            return
        self.idle = True
        # set_deadline, inlined: the lazily armed timer rarely needs touching.
        self.deadline = deadline = self.corker.now() + self.settings.idle_timeout
        if self.timer is None or deadline < self.timer_at:
            self.set_deadline(self.settings.idle_timeout)

    def start_tunnel(self, ex: Exchange) -> None:
        """After a 101: bytes flow raw both ways until either side closes."""
        self.tunnel = ex
        self.cancel_timer()
        pending, self.tunnel_pending = self.tunnel_pending, []
        upstream = ex.upstream
        if upstream is not None and upstream.transport is not None:
            for chunk in pending:
                upstream.transport.write(chunk)
        self.transport.resume_reading()

    def protocol_error(self, status: int, message: str) -> None:
        """The client broke HTTP: answer once and close, after any response in progress."""
        if self.lingering or self.pending_error is not None:
            return  # already answered, or the answer is set: this is the rest of the read
        self.in_head = False
        active = self.active
        if active is not None and not active.request_complete:
            if active.response_started:
                # The active request's own body broke after its upstream began to answer
                # (it answers before reading the body). That response is finished, then the
                # connection closes: no error answer can follow it (the client would take it
                # for this request's), and this request can never complete, so waiting for
                # it would hold the connection for good. The upstream connection, sent a
                # broken body, is closed when the response ends (on_upstream_complete).
                active.keep_client = False
                self.set_pause(PAUSE_CLOSING, True)
                active.maybe_finish()  # at once, when the response has already ended
                return
            # The error is in the active request itself (its body, say): it cannot be
            # answered by its upstream, which got a broken request.
            active.abandon()
            self.active = active = None
        if status == 431:
            self.plane.stats.limits.max_header_bytes += 1
        if active is None:
            self.plane.stats.count_unrouted(status)
            self.transport.write(simple_response(status, message, close=True))
            self.linger()
            return
        # A later request is broken: the active one is answered first, then the error, in
        # turn, then the connection closes (the active answer keeps the connection open for
        # it). With requests queued between the two, there is no error answer, so that none
        # is taken for another request's: the active answer says close, and the client
        # retries the queued ones on a new connection (RFC 9112 9.3.2).
        if self.queue:
            self.closing = True
            self.queue = ()
            active.keep_client = False
        else:
            self.pending_error = (status, simple_response(status, message, close=True))
        self.set_pause(PAUSE_CLOSING, True)

    def set_pause(self, flag: int, paused: bool) -> None:
        before = self.pause_flags
        after = before | flag if paused else before & ~flag
        if (before == 0) == (after == 0):
            self.pause_flags = after
            return
        self.pause_flags = after
        if self.transport.is_closing():
            return
        if after:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # --- timers ---------------------------------------------------------------------------

    def set_deadline(self, seconds: float) -> None:
        """One lazily re-armed timer per connection for the idle and header timeouts."""
        now = self.corker.now()
        self.deadline = deadline = now + seconds
        if self.timer is None or deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.active is not None or self.tunnel is not None:
            return
        now = self.loop.time()
        if deadline > now:
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self.on_timer)
            return
        limits = self.plane.stats.limits
        if self.in_head:
            self.transport.write(simple_response(408, "request headers took too long", True))
            limits.header_timeout += 1
            self.linger()
            return
        elif self.idle:
            limits.idle_timeout += 1
        else:
            limits.header_timeout += 1  # connected, and sent no request line in time
        self.close()

    def cancel_timer(self) -> None:
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- closing --------------------------------------------------------------------------

    def close(self) -> None:
        self.cancel_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.cancel_timer()
        self.transport.abort()

    def linger(self) -> None:
        """Close after an error answer while the client may still be sending. Closing a
        socket with unread bytes makes the kernel send a reset, which can destroy the answer
        before the client has read it (RFC 9112 9.6). So: end our side after the answer
        (FIN), read and drop what the client still sends, and close when it closes or after
        LINGER_SECONDS."""
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            self.close()  # TLS has no half-close
            return
        self.lingering = True
        self.in_head = False
        self.queue = ()
        self.cancel_timer()
        transport.write_eof()
        self.pause_flags = 0
        transport.resume_reading()
        self.timer = self.loop.call_later(LINGER_SECONDS, self.close)

    def shutdown(self) -> None:
        """Finish the request in progress, if any, then close. A connection that is idle, or
        still sending a request head, is closed now: nothing of it has reached an upstream."""
        self.closing = True
        if self.active is None and self.tunnel is None:
            self.close()
