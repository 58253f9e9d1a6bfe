"""HTTP/1.1 to clients: an asyncio.Protocol per connection, an ``Http1Exchange`` per request.

A connection parses requests with httptools. Each request becomes an ``Http1Exchange``: the
protocol-independent ``exchange.Exchange`` (route, upstream, retries, mirrors, counting) plus
what HTTP/1.1 adds, the checks of its head (Host, absolute form, CONNECT) and the framing of
the response for the client (chunked or not, keep-alive or close, 101 and the tunnel after
it). Bytes stream both ways with backpressure: when one side's transport stops accepting
writes, the other side stops reading. Requests pipelined behind the active one wait, parsed
and buffered, with the client's reading paused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from .context import Peer
from .corking import CorkedTransport
from .exchange import AWAITING, DONE, FINISHED, HELD, SENDING, TUNNEL, Exchange
from .http2 import PREFACE, Http2Connection
from .http11 import (
    CONNECTION_CLOSE,
    CONNECTION_KEEP_ALIVE,
    CONTINUE,
    CRLF,
    GET,
    HOST,
    LAST_CHUNK,
    PLAIN_CONNECTION_VALUES,
    REQUEST_REWRITTEN,
    STATUS_LINES,
    TRANSFER_CHUNKED,
    VIA,
    connection_tokens,
    lowered,
    simple_response,
    split_absolute_form,
    status_line,
    without_headers,
)

if TYPE_CHECKING:
    from .context import DataPlaneContext

log = logging.getLogger("weir.server")

# httptools' methods, taken off the class once and called with their parser: from compiled code
# a call by name looks the method up on the type every time (about 120 instructions more).
_feed_request: Final = HttpRequestParser.feed_data
_request_method: Final = HttpRequestParser.get_method
_request_keep_alive: Final = HttpRequestParser.should_keep_alive
# A module constant rather than an imported name (see exchange.perf_counter).
perf_counter: Final = time.perf_counter

PAUSE_QUEUE: Final = 1      # a pipelined request waits behind the active one
PAUSE_UPSTREAM: Final = 2   # the upstream's write buffer is full
PAUSE_BUFFER: Final = 4     # body bytes are piling up while we connect
PAUSE_CLOSING: Final = 8    # we will close after the active exchange: read no more requests

# How often, at most, "max_connections reached" is logged while connections are being refused.
LIMIT_WARNING_INTERVAL: Final = 10.0

# After an error answer to a client that may still be sending (see Http1Connection.linger):
# how long to read and discard what it sends before closing, like nginx's lingering_timeout.
LINGER_SECONDS: Final = 2.0

OVER_CAPACITY: Final = simple_response(503, "too many connections; try again later", close=True)


class HeadTooLarge(Exception):
    """Raised inside a parser callback; httptools reports it as the context of its error."""


class CodingNotImplemented(Exception):
    """A request Transfer-Encoding other than exactly ``chunked`` (raised like HeadTooLarge):
    Weir forwards a body as plain chunked, so any other coding would reach the app as bytes
    it cannot tell apart from the content. nginx answers it with 501 too."""


class Http1Exchange(Exchange):
    """An HTTP/1.1 request and its response: the checks of its head, and the framing of the
    response for the client. The rest is ``Exchange``'s."""

    __slots__ = ("client", "dup_host", "http10", "keep_alive", "keep_client", "out_chunked")

    def __init__(self, client: Http1Connection) -> None:
        super().__init__(client.plane, client.settings, client.peer)
        self.client = client
        self.dup_host = False
        self.http10 = False
        self.keep_alive = True  # as the client asked (Connection, and its HTTP version)
        self.keep_client = True  # the connection stays open for a next request after this one
        self.out_chunked = False  # the response goes to the client chunked

    def start(self) -> None:
        """Headers are in: check what HTTP/1.1 asks of them, then dispatch."""
        if self.url[:1] != b"/" and self.url.startswith((b"http://", b"https://")):
            self.use_absolute_form()
        host = self.hmap.get(b"host")
        if self.dup_host or (host is None and not self.http10):
            self.respond_local(400, "a request needs exactly one Host header", close=True)
            return
        if self.method == b"CONNECT":
            self.respond_local(405, "CONNECT is not supported by a reverse proxy", close=True)
            return
        self.dispatch(host or b"")

    def use_absolute_form(self) -> None:
        """RFC 9112 3.2.2: the authority of an absolute-form target replaces Host, and the
        upstream gets the origin form."""
        authority, self.url = split_absolute_form(self.url)
        self.hmap[b"host"] = authority
        self.forward = [b"Host", b": ", authority, CRLF, *without_headers(self.forward, {b"host"})]
        self.dup_host = False

    # --- Exchange: the protocol's half --------------------------------------------------------

    def relay_head(self, status: int, lines: list[bytes], noted: list[bytes]) -> None:
        client = self.client
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
        keep = self.keep_alive and not client.closing and not self.plane.draining
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
        self.response = HELD
        # Held, not yet joined, until the upstream read is fully parsed: the body read with it
        # joins the same list, and the client's transport joins the lot into one write.
        if self.outbuf:
            self.outbuf += parts
        else:
            self.outbuf = parts
        if status == 101:
            self.flush()
            self.response = TUNNEL
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
            self.response = SENDING
            self.client.transport.write_list(out)

    def end_response(self) -> None:
        out = self.outbuf
        if self.out_chunked:
            trailers = self.trailers
            if trailers:  # from an HTTP/2 upstream (gRPC's status among them)
                out.append(b"0\r\n")
                for name, value in trailers:
                    out += (name, b": ", value, CRLF)
                out.append(CRLF)
            else:
                out.append(LAST_CHUNK)
        if out:
            self.outbuf = []
            self.client.transport.write_list(out)

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        self.client.transport.write(data)

    def pause_client_reading(self, paused: bool) -> None:
        self.client.set_pause(PAUSE_UPSTREAM, paused)

    def respond_local(self, status: int, message: str, close: bool = False,
                      headers: bytes = b"") -> None:
        """Unread request body bytes mean the connection must close."""
        client = self.client
        keep = (self.keep_alive and not close and not client.closing
                and not self.plane.draining
                and (self.request_complete or not self.has_body) and not self.upgrade)
        self.keep_client = keep
        self.status = status
        target = self.target
        extra = target.response_header if target is not None else b""
        client.transport.write(simple_response(status, message, not keep, extra + headers,
                                               self.head_request))
        self.response = DONE
        self.maybe_finish()

    def maybe_finish(self) -> None:
        """A connection kept open must read the whole request before the next one."""
        if self.response == DONE and (self.request_complete or not self.keep_client):
            self.response = FINISHED
            self.record(self.status)
            self.client.exchange_finished(self)

    def send_continue(self) -> None:
        # Never to an HTTP/1.0 client, which cannot take a 1xx (RFC 9110 10.1.1): it sends
        # its body anyway, and the expectation is ignored.
        if not self.http10:
            self.client.transport.write(CONTINUE)

    def pause_for_buffer(self, paused: bool) -> None:
        self.client.set_pause(PAUSE_BUFFER, paused)

    def client_paused(self) -> bool:
        return self.client.write_paused

    def queued(self) -> bool:
        return self is not self.client.active

    def reset_client(self) -> None:
        self.client.abort()

    def close_client(self) -> None:
        self.client.close()

    def protocol(self) -> str:
        return "HTTP/1.0" if self.http10 else "HTTP/1.1"

class Http1Connection(asyncio.Protocol):
    """One HTTP/1.1 client connection; runs its exchanges one at a time, in order."""

    __slots__ = (
        "active", "closing", "corker", "current", "deadline", "head_bytes",
        "idle", "in_head", "lingering",
        "loop", "parser", "pause_flags", "peer", "pending_error", "plane", "queue",
        "settings",
        "timer", "timer_at", "transport", "tunnel", "tunnel_pending", "unsniffed",
        "write_paused",
    )

    def __init__(self, plane: DataPlaneContext) -> None:
        self.plane = plane
        self.loop = plane.loop
        self.corker = plane.corker
        self.settings = plane.settings
        self.transport: CorkedTransport = None  # type: ignore[assignment]
        self.parser: HttpRequestParser = None  # type: ignore[assignment]  # connection_made
        self.current: Http1Exchange | None = None
        self.active: Http1Exchange | None = None
        # Pipelined requests waiting their turn; a deque only once one comes (most clients
        # never pipeline, and an idle keep-alive connection should cost little memory).
        self.queue: deque[Http1Exchange] | tuple[()] = ()
        self.in_head = False
        self.idle = False  # waiting, after a response, for the next request (idle_timeout)
        self.head_bytes = 0
        self.pause_flags = 0
        self.write_paused = False
        self.closing = False
        self.tunnel: Http1Exchange | None = None
        self.tunnel_pending: list[bytes] = []
        self.lingering = False
        # Bytes of the first read(s), until they show HTTP/2's preface or not (see sniff).
        self.unsniffed: bytes | None = b""
        # An error for a request pipelined behind the active one: (status, the answer), sent
        # once the active exchange ends (see protocol_error).
        self.pending_error: tuple[int, bytes] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline: float | None = None
        self.peer: Peer = None  # type: ignore[assignment]  # set when the connection is made

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else "unix"
        penalties = self.plane.penalties
        if penalties.until and penalties.refuses(address, self.loop.time()):
            # Cut for HTTP/2 abuse a moment ago, and back: closed before anything is read or
            # set up, the way HAProxy's "tcp-request connection reject" does, so a client
            # that reconnects as fast as it is cut costs little more than its accepts.
            self.plane.stats.limits.http2_abuse += 1
            self.closing = True
            transport.abort()  # type: ignore[attr-defined]  # a Transport, from the server
            return
        self.parser = HttpRequestParser(self)
        if len(self.plane.connections) >= self.settings.max_connections:
            self.refuse(transport)
            return
        self.transport = CorkedTransport(transport, self.corker)
        self.peer = Peer(address, self.settings, self.plane.scheme)
        if self.plane.listener_tls is not None:
            self.unsniffed = None  # TLS: ALPN says which protocol, before any byte
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self.hand_to_http2(b"")
                return
        self.plane.connections.add(self)
        self.set_deadline(self.settings.header_timeout)

    def sniff(self, data: bytes) -> bool:
        """Cleartext HTTP/2 with prior knowledge (h2c) starts with a preface no HTTP/1.1
        request can: the connection goes to HTTP/2 when it does. True: the data was taken
        (handed over, or held while too short to tell)."""
        held = self.unsniffed + data if self.unsniffed else data
        if PREFACE.startswith(held[:len(PREFACE)]):
            if len(held) < len(PREFACE):
                self.unsniffed = held
                return True
            self.plane.connections.discard(self)
            self.cancel_timer()
            self.hand_to_http2(held)
            return True
        self.unsniffed = None
        if held is not data:
            self.data_received(held)  # HTTP/1.1 after all, from its first byte
            return True
        return False

    def hand_to_http2(self, data: bytes) -> None:
        penalties = self.plane.penalties
        if penalties.until and penalties.refuses(self.peer.address, self.loop.time()):
            # Cut for abuse while this connection was being opened: no frame of it is parsed.
            self.plane.stats.limits.http2_abuse += 1
            self.transport.abort()
            return
        raw = self.transport.transport
        h2 = Http2Connection(self.plane, self.settings, self.peer)
        raw.set_protocol(h2)
        h2.connection_made(raw)
        if data:
            h2.data_received(data)

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
        if self.unsniffed is not None and self.sniff(data):
            return
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
                log.error("internal error handling a request from %s", self.peer.address,
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
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    # --- httptools callbacks --------------------------------------------------------------

    def parser_buffered_too_much(self, received: int) -> bool:
        """A head still incomplete: httptools holds the header being read, which the
        callbacks have not counted yet, so count raw bytes while a head is open."""
        self.head_bytes += received
        return self.head_bytes > 2 * self.settings.max_header_bytes

    def on_url(self, url: bytes) -> None:
        # The first callback of every request (on_message_begin would be one more call).
        if not self.in_head:
            self.current = ex = Http1Exchange(self)
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

    def exchange_finished(self, ex: Http1Exchange) -> None:
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

    def start_tunnel(self, ex: Http1Exchange) -> None:
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
            if active.response != AWAITING:
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
