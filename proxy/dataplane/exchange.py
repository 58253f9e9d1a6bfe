"""One request and its response, whatever protocol the client speaks.

``Exchange`` is the half of a request's life that any client protocol shares: find its route
and version, check its limits, pick and hold an upstream connection (opening one when no idle
one is pooled), stream the request body to it, retry or fail over when the upstream fails,
send copies to shadow versions, and count the request once when it ends. Its upstream is an
``UpstreamChannel``: an HTTP/1.1 connection, to which the request head goes as HTTP/1.1
whatever the client spoke (``build_head``), or a stream of an HTTP/2 connection
(``upstream_h2``, a version's ``protocol: h2c | h2``), to which it goes as HTTP/2 header
fields (``h2_request_headers``).

The other half, how the client's bytes become a request and how a response is framed back to
it, belongs to the client protocol: ``http1.Http1Exchange`` for HTTP/1.1. A subclass fills in
the request fields, calls ``dispatch``, and implements the methods below marked "the
protocol's": a subclass rather than a second object, so that compiled, each of those calls is
one native call through a vtable (see bench/RESULTS.md).

Where a response is, is one explicit state (``response``): AWAITING, HELD, SENDING, TUNNEL,
DONE, FINISHED, passed through in that order (HELD back to AWAITING when a retry drops a
response nothing of which reached the client). Whether the request has been read whole is the
other, independent side (``request_complete``): a response may be over before its request is
(an early 413), and a request may be over long before its response.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final

from .diff import Captured
from .http11 import (
    ALLOW_WITHOUT_TRACE,
    CRLF,
    HEAD_END_WITH_VIA,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    PLAIN_CONNECTION_VALUES,
    REQUEST_REWRITTEN,
    SAFE_METHODS,
    TRANSFER_CHUNKED,
    connection_tokens,
    without_headers,
)
from .mirror import MirrorCopy, MirrorPolicy
from .retry import RETRY_CONNECT_FAILURE, RETRY_RESET, RETRY_STATUS, RETRY_TIMEOUT
from .routing import Route, VersionTarget
from .upstream import ResponseSink

if TYPE_CHECKING:
    import asyncio

    from .context import DataPlaneContext, DataPlaneSettings, Peer
    from .upstream import Balancer, UpstreamChannel, UpstreamPool

log = logging.getLogger("weir.server")

# Where an exchange's response is (``Exchange.response``). Plain int constants rather than an
# Enum: compiled, comparing with one is a native integer comparison.
AWAITING: Final = 0  # routing, connecting, sending the request, or waiting for a response head
HELD: Final = 1      # the upstream's head is in, held until the end of the read: nothing of the
                     # response has reached the client, so a retry or a 502 may still replace it
SENDING: Final = 2   # the head has gone to the client; the body follows
TUNNEL: Final = 3    # switched protocols (101): bytes flow raw both ways until a side closes
DONE: Final = 4      # the response has gone out whole (an answer from Weir goes out at once)
FINISHED: Final = 5  # counted, and handed back to its connection: nothing more to do

# Tries for a request whose HTTP/2 upstream streams are refused unprocessed.
STREAM_REFUSALS: Final = 3

# Body bytes held per exchange while its upstream connection is being opened.
BUFFER_HIGH_WATER: Final = 256 * 1024

# On a circuit breaker's 503: requests in flight finish quickly, so a retry soon may work.
RETRY_AFTER: Final = b"retry-after: 1\r\n"

# A module constant rather than an imported name, which compiled code looks up in the module's
# dict at every call. The request's latency clock: uvloop's loop.time() is in milliseconds.
perf_counter: Final = time.perf_counter


class Exchange(ResponseSink):
    """One request and its response: the protocol-independent half (see the module's doc)."""

    __slots__ = (
        "body_buffer", "body_received", "buffered", "bytes_out", "chunked", "connect_deadline",
        "connecting", "content_length", "extra_headers", "forward", "has_body", "hmap",
        "method", "mirrors", "outbuf", "peer", "plane", "pool", "primary_digest", "reason",
        "request_complete", "response", "retried", "rewritten_headers", "route", "settings",
        "started", "status", "target", "trailers", "tried", "until_eof", "upgrade", "upstream",
        "upstream_address", "upstream_keep_alive", "url",
    )

    def __init__(self, plane: DataPlaneContext, settings: DataPlaneSettings,
                 peer: Peer) -> None:
        self.plane = plane
        self.settings = settings  # the connection's: a reload applies to new connections
        self.peer = peer
        # --- the request, as the protocol's half has read it
        self.method = b""
        self.url = b""
        # The request headers to pass on as they came, flat and ready to join:
        # [name, b": ", value, CRLF, ...]; the ones Weir rewrites are only in hmap.
        self.forward: list[bytes] = []
        # Every header by its lower-case name, repeated ones joined.
        self.hmap: dict[bytes, bytes] = {}
        # Whether any header is one Weir rewrites (REQUEST_REWRITTEN: hop-by-hop, Expect,
        # X-Forwarded-*): most requests have none, and need none of those looked up.
        self.rewritten_headers = False
        self.upgrade = False  # asks to switch protocols (WebSocket)
        self.head_request = False
        self.has_body = False
        self.chunked = False  # the body's length is not known ahead: forwarded chunked
        self.content_length = 0
        self.started = 0.0  # perf_counter() when its head was complete
        # --- the request body
        self.body_buffer: list[bytes] | None = None  # read before an upstream is attached
        self.buffered = 0
        self.body_received = 0
        self.request_complete = False
        # --- where it goes
        self.route: Route | None = None
        self.target: VersionTarget | None = None
        self.reason = ""
        self.extra_headers = b""
        self.pool: UpstreamPool | None = None
        self.upstream: UpstreamChannel | None = None
        self.upstream_address: str | None = None
        self.connecting: asyncio.Task[None] | None = None
        # Loop time by which every connect of this request must be done: set by the first
        # connect, so that failing over to other upstreams fits in one connect timeout.
        self.connect_deadline = 0.0
        self.retried = 0  # sent once more after a stale pooled connection (or refused stream)
        self.tried: list[UpstreamPool] | None = None  # upstreams already tried, once retrying
        # --- the response
        self.response = AWAITING
        self.status = 0
        self.upstream_keep_alive = False
        self.until_eof = False  # the upstream's body ends when it closes the connection
        # Response bytes held until the end of the upstream read, then written in one go.
        self.outbuf: list[bytes] = []
        self.bytes_out = 0
        # Trailer fields from an HTTP/2 upstream, held until the response ends.
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.grpc_status = -1
        self.mirrors: list[MirrorCopy] | None = None
        # The user's answer as comparisons need it (a diff.Captured) when a mirror compares.
        self.primary_digest: Any = None

    # --- the protocol's half ----------------------------------------------------------------
    # Besides these, ResponseSink's on_upstream_body, on_upstream_tunnel_data, flush and
    # pause_client_reading, which frame and write the response.

    def respond_local(self, status: int, message: str, close: bool = False,
                      headers: bytes = b"") -> None:
        """Answer from Weir itself (``headers``: extra header lines), and end the response
        (DONE, then maybe_finish). ``close``: the client must not send another request."""
        raise NotImplementedError

    def relay_head(self, status: int, lines: list[bytes], noted: list[bytes]) -> None:
        """Frame the upstream's response head (see ResponseSink.on_upstream_head) for the
        client and hold it in ``outbuf``: HELD, or TUNNEL for a 101."""
        raise NotImplementedError

    def end_response(self) -> None:
        """The upstream's response is complete: write what is held and what ends the body."""
        raise NotImplementedError

    def maybe_finish(self) -> None:
        """Once both the response and, as the protocol needs, the request are over: FINISHED,
        ``record``, and hand the connection on."""
        raise NotImplementedError

    def send_continue(self) -> None:
        """The request expects 100-continue and is about to be sent upstream."""
        raise NotImplementedError

    def pause_for_buffer(self, paused: bool) -> None:
        """Stop (or resume) reading the request body: BUFFER_HIGH_WATER is held unsent."""
        raise NotImplementedError

    def client_paused(self) -> bool:
        """Whether the client is not taking response bytes as fast as they come."""
        raise NotImplementedError

    def queued(self) -> bool:
        """Whether an answer now would go out ahead of an earlier request's (pipelining)."""
        raise NotImplementedError

    def reset_client(self) -> None:
        """The response broke after part of it reached the client: end it so that the client
        cannot take what it got as whole."""
        raise NotImplementedError

    def close_client(self) -> None:
        """Close after what has been sent (a tunnel's end, a drained version)."""
        raise NotImplementedError

    def break_response(self, status: int, reason: str) -> None:
        """The upstream failed after part of the response reached the client (``status``:
        what Weir would have answered before). By default reset_client; HTTP/2 ends a gRPC
        call with its status instead."""
        self.reset_client()

    def protocol(self) -> str:
        """What the client spoke, for the access log: "HTTP/1.1", "HTTP/2", ..."""
        raise NotImplementedError

    # --- request side -----------------------------------------------------------------------

    def dispatch(self, host: bytes) -> None:
        """The head is in and valid for its protocol: route it, check its limits, then get an
        upstream connection (or answer from Weir)."""
        route = self.plane.table.find_route(host, self.url)
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
        hmap = self.hmap
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
        limit = self.settings.max_body_bytes
        # body_received: a pipelined request that went over the limit while it was queued.
        if limit is not None and (self.content_length > limit or self.body_received > limit):
            self.plane.stats.limits.max_body_bytes += 1
            self.respond_local(413, f"request body is larger than {limit} bytes")
            return
        # Typed as the data plane's own Balancer: compiled, pick() is then a native call.
        balancer: Balancer = target.balancer  # type: ignore[assignment]
        pool = balancer.pick()
        if pool is None:
            self.no_upstream(route, target)
            return
        if self.has_body and hmap.get(b"expect", b"").lower() == b"100-continue":
            self.send_continue()
        self.pool = pool
        self.upstream_address = pool.address
        pool.active.add(self)
        # A request that cannot be retried is not sent on a connection the upstream has
        # already closed (the stale keep-alive race). The usual GET takes the most recently
        # used idle connection without a call (pool.take_idle's fast path, inlined).
        idle = pool.idle
        conn: UpstreamChannel | None
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
            self.connecting = self.plane.loop.create_task(self.connect(pool))

    def no_upstream(self, route: Route, target: VersionTarget) -> None:
        """Every upstream of the version is unhealthy, ejected or full: answer now rather than
        hang or try one known to be down."""
        balancer: Balancer = target.balancer  # type: ignore[assignment]
        message, full = self.plane.health.unavailable(route.name, target.name, balancer)
        self.respond_local(503, message, headers=RETRY_AFTER if full else b"")

    def start_mirrors(self, policies: tuple[MirrorPolicy, ...]) -> None:
        method = self.method
        for policy in policies:
            if policy.wants(method):
                refused = policy.refusal()
                if refused:
                    policy.drop(self, refused)
                    continue
                if self.mirrors is None:
                    self.mirrors = []
                self.mirrors.append(MirrorCopy(policy, self))
                if policy.compare and self.primary_digest is None:
                    self.primary_digest = Captured()

    async def connect(self, pool: UpstreamPool) -> None:
        route = self.route
        assert route is not None
        now = self.plane.loop.time()
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
        if self.response == FINISHED:
            conn.release()
            return
        self.attach(conn)

    def attach(self, conn: UpstreamChannel) -> None:
        if conn.http2:
            self.start_stream(conn)
            return
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
            self.pause_for_buffer(False)
        if self.request_complete and self.chunked:
            data += LAST_CHUNK
        route = self.route
        assert route is not None  # narrowed, so that compiled code reads it natively
        conn.send(self, data, route.read_timeout)
        if self.client_paused():
            conn.pause_reading()

    def start_stream(self, stream: UpstreamChannel) -> None:
        """The request goes out as HEADERS on a stream of an HTTP/2 upstream connection, its
        body (held so far, and what follows) as DATA."""
        route = self.route
        assert route is not None
        if self.upgrade:
            # Nothing carries an HTTP/1.1 Upgrade to an HTTP/2 upstream (RFC 9113 8.6).
            stream.release()
            self.release_pool_slot()
            self.respond_local(502, f"version {self.target.name if self.target else ''!r} "
                                    "speaks HTTP/2 to its upstreams: a protocol switch "
                                    "(WebSocket) cannot reach them", close=True)
            return
        self.upstream = stream
        body = self.body_buffer
        # A request without a body ends with its HEADERS, even before the protocol's half
        # has seen its end (HTTP/1.1 reads a GET's end after its head).
        ends = not body and (self.request_complete or not self.has_body)
        headers = self.h2_request_headers(REQUEST_REWRITTEN, None, stream.pool.tls is not None)
        stream.start(self, headers, ends, route.read_timeout)
        if body:
            self.body_buffer = None
            self.buffered = 0
            stream.write_body(b"".join(body), False)
            self.pause_for_buffer(False)
            if self.request_complete:
                stream.end_body(False)
        if self.client_paused():
            stream.pause_reading()

    def h2_request_headers(self, skip: frozenset[bytes], authority: bytes | None,
                           tls: bool) -> list[tuple[bytes, bytes]]:
        """The request head for an HTTP/2 upstream: what build_head forwards, as HTTP/2
        header fields (names lower-case, Host as :authority, ``te: trailers`` kept, which
        gRPC needs). ``authority``: instead of the request's own Host (a mirror's);
        ``tls``: the upstream connection's, for :scheme."""
        hmap = self.hmap
        peer = self.peer
        host = authority if authority is not None else hmap.get(b"host", b"")
        scheme = b"https" if tls else b"http"
        headers = [(b":method", self.method), (b":scheme", scheme), (b":authority", host),
                   (b":path", self.url)]
        named: set[bytes] | None = None
        te: bytes | None = None
        if self.rewritten_headers:
            connection = hmap.get(b"connection")
            if connection is not None and connection not in PLAIN_CONNECTION_VALUES:
                named = connection_tokens(connection)
            te = hmap.get(b"te")
        forward = self.forward
        for i in range(0, len(forward), 4):
            name = forward[i].lower()
            if name == b"host" or name in skip or (named is not None and name in named):
                continue
            headers.append((name, forward[i + 2]))
        if te is not None and b"trailers" in te.lower():
            headers.append((b"te", b"trailers"))  # the one TE HTTP/2 allows (RFC 9113 8.2.2)
        if peer.trusted:
            forwarded = hmap.get(b"x-forwarded-for")
            headers.append((b"x-forwarded-for", forwarded + b", " + peer.address_bytes
                            if forwarded else peer.address_bytes))
            headers.append((b"x-forwarded-proto",
                            hmap.get(b"x-forwarded-proto", self.plane.scheme)))
            headers.append((b"x-forwarded-host", hmap.get(b"x-forwarded-host") or host))
        else:
            headers.append((b"x-forwarded-for", peer.address_bytes))
            headers.append((b"x-forwarded-proto", self.plane.scheme))
            headers.append((b"x-forwarded-host", hmap.get(b"host", host)))
        headers.append((b"via", b"1.1 weir"))
        return headers

    def build_head(self, skip: frozenset[bytes], extra: bytes) -> bytes:
        """The request head as forwarded: hop-by-hop headers out, forwarding headers in.
        ``skip`` names more headers to leave out, ``extra`` adds header lines (mirrors use
        both to set their own Host and Content-Length)."""
        peer = self.peer
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
        if peer.trusted:
            forwarded = hmap.get(b"x-forwarded-for")
            xff = forwarded + b", " + peer.address_bytes if forwarded else peer.address_bytes
            proto = hmap.get(b"x-forwarded-proto", self.plane.scheme)
            fhost = hmap.get(b"x-forwarded-host") or host or b""
            parts.extend((b"x-forwarded-for: ", xff, b"\r\nx-forwarded-proto: ", proto,
                          b"\r\nx-forwarded-host: ", fhost, CRLF))
        else:
            parts.append(peer.forwarded_for)
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
        limit = self.settings.max_body_bytes
        if limit is not None and self.body_received > limit:
            # Acted on once, when the limit is crossed; the rest is read and dropped (never
            # forwarded) until the connection closes.
            if self.body_received - len(body) <= limit:
                self.body_over_limit(limit)
            return
        if self.response >= DONE:
            return  # the response went out early; the rest of the body is read and dropped
        conn = self.upstream
        if conn is not None:
            conn.write_body(body, self.chunked)
        else:
            if self.body_buffer is None:
                self.body_buffer = []
            self.body_buffer.append(body)
            self.buffered += len(body)
            if self.buffered > BUFFER_HIGH_WATER:
                self.pause_for_buffer(True)

    def body_over_limit(self, limit: int) -> None:
        if self.queued():
            # Behind a request still being answered (or already refused by its declared
            # length): a 413 now would go out ahead of that answer. dispatch sends it in turn.
            self.body_buffer = None
            self.buffered = 0
            return
        self.plane.stats.limits.max_body_bytes += 1
        if self.response != AWAITING:
            self.reset_client()
            return
        self.drop_upstream()
        self.respond_local(413, f"request body is larger than {limit} bytes", close=True)

    def on_request_complete(self) -> None:
        self.request_complete = True
        if self.mirrors is not None:
            for copy in self.mirrors:
                copy.send()
        response = self.response
        conn = self.upstream
        if conn is not None and response < DONE and (self.chunked or conn.http2):
            conn.end_body(self.chunked)
        if response == DONE:  # else the response's end finishes the exchange
            self.maybe_finish()

    # --- response side (called by UpstreamConnection) ---------------------------------------

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
        self.status = status
        self.upstream_keep_alive = keep_alive
        if self.primary_digest is not None:
            self.primary_digest.take_head(lines)
        self.relay_head(status, lines, noted)

    def on_upstream_complete(self) -> None:
        self.end_response()
        self.response = DONE
        conn, self.upstream = self.upstream, None
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.active.discard(self)
        if conn is not None:
            if self.upstream_keep_alive and self.request_complete and not self.until_eof:
                conn.release()
            else:
                conn.close()
        self.maybe_finish()

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Held for the protocol's end_response (an HTTP/2 client gets them as HEADERS, an
        HTTP/1.1 one in the last chunk)."""
        self.trailers = trailers

    def on_upstream_failed(self, status: int, reason: str, got_bytes: bool) -> None:
        self.upstream = None
        # 504 is the read timeout; the other failure, an unparseable response (502), is a
        # broken upstream rather than a passing one, and is not retried.
        if status == 504 and self.retry_request(RETRY_TIMEOUT):
            return
        self.upstream_failed(status, reason)

    def on_upstream_closed(self) -> None:
        conn, self.upstream = self.upstream, None
        response = self.response
        if response == FINISHED:
            return
        if response != AWAITING:
            if response == TUNNEL:
                self.release_pool_slot()
                self.close_client()
            elif self.until_eof:
                self.on_upstream_complete()
            else:
                self.release_pool_slot()
                # A truncated body: the client must not take it as whole.
                self.break_response(502, "upstream closed the connection mid-answer")
            return
        if (conn is not None and conn.reused and not conn.got_bytes
                and self.retried < (STREAM_REFUSALS if conn.http2 else 1)
                and not self.has_body and self.method in IDEMPOTENT_METHODS
                and self.pool is not None):
            # A pooled connection the upstream had already closed: try once on a fresh one.
            # An HTTP/2 stream the upstream refused unprocessed (a GOAWAY that did not name
            # it, REFUSED_STREAM) may be refused again on the next connection, which the
            # same GOAWAY policy ends: a few tries.
            self.retried += 1
            self.pool.retries += 1
            self.connecting = self.plane.loop.create_task(self.connect(self.pool))
            return
        if self.pool is not None:
            self.pool.record_failure()
        if self.retry_request(RETRY_RESET, conn is not None and not conn.got_bytes):
            return
        self.upstream_failed(502, "upstream closed the connection before answering")

    # --- retries ----------------------------------------------------------------------------

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
        if (route is None or self.response != AWAITING or self.upgrade
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
        stats = self.plane.stats
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
        if self.plane.loop.time() >= self.connect_deadline > 0.0:
            return False
        route = self.route
        target = self.target
        assert route is not None and target is not None and self.pool is not None
        tried = self.tried = [*(self.tried or ()), self.pool]
        balancer: Balancer = target.balancer  # type: ignore[assignment]
        pool = balancer.pick_untried(tried)
        if pool is None:
            return False  # every upstream of the version tried: the failure is the answer
        self.plane.stats.count_retry(route.name, target.name, reason)
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
        self.retried = 0  # the new attempt may meet a stale pooled connection too
        conn = pool.take_idle(self.has_body or self.method not in IDEMPOTENT_METHODS)
        if conn is not None:
            self.attach(conn)
        else:
            self.connecting = self.plane.loop.create_task(self.connect(pool))

    # --- endings ----------------------------------------------------------------------------

    def upstream_failed(self, status: int, reason: str) -> None:
        self.release_pool_slot()
        response = self.response
        if response == FINISHED:
            return
        log.warning("%s %s: %s", self.method.decode(), self.url[:200].decode("latin-1"), reason)
        if response == HELD:
            # The response broke in the read that brought its head, which is still held
            # here: nothing of it reached the client, so it gets the 502 instead.
            self.outbuf = []
            self.response = AWAITING
        if self.response != AWAITING:
            self.break_response(status, reason)
        else:
            self.respond_local(status, reason)

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
            self.plane.stats.count_unrouted(status)
        else:
            target.stats.observe(self.method, status, seconds)
            if self.grpc_status >= 0:
                target.stats.observe_grpc(self.grpc_status, status)
        access_log = self.plane.access_log
        if access_log is not None:
            access_log.exchange(self, status, seconds)

    def settle_mirrors(self, status: int) -> None:
        """Copies not yet sent (the request never completed) are dropped; copies that compare
        get the primary's status and body digest."""
        answer = self.primary_digest
        digest = answer.hexdigest() if answer is not None else ""
        for copy in self.mirrors or ():
            if copy.pool is None and not copy.done and not self.request_complete:
                copy.finish("dropped")
            elif copy.digest is not None:
                copy.primary_finished(status, digest, answer)
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
        self.close_client()  # a FIN after what was already sent, not a reset

    def abandon(self) -> None:
        """The client went away: stop everything this exchange holds."""
        self.end_early()
        self.drop_upstream()

    def end_early(self) -> None:
        response = self.response
        if response != FINISHED:
            self.response = FINISHED
            # 499 (nginx's "client closed request") when no response had started.
            self.record(self.status if response != AWAITING else 499)
