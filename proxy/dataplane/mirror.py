"""Shadow traffic: copies of live requests sent to a shadow version, answers thrown away.

A copy never touches the user's response: it is built from the request as it streams to the
primary, sent only once the request is complete, on the shadow version's own pooled
connections, and read to the end and discarded. What a copy may hold is bounded (body size,
copies in flight, bytes queued); when the shadow is slow or down, copies are dropped and
counted instead of piling up. The copies ride the same data-plane machinery as user requests
(UpstreamConnection) rather than an HTTP client library: a copy then costs about what a proxied
request costs, which is what keeps mirroring 100% of traffic affordable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from time import monotonic
from typing import TYPE_CHECKING

from ..config.model import Mirror
from .diff import Captured, Differ, DiffStats
from .http11 import REQUEST_REWRITTEN
from .stats import MirrorStats
from .upstream import ResponseSink

MIRROR_SKIP = REQUEST_REWRITTEN | {b"host", b"content-length"}

if TYPE_CHECKING:
    from .accesslog import AccessLog
    from .exchange import Exchange
    from .routing import VersionTarget
    from .upstream import UpstreamChannel, UpstreamPool

log = logging.getLogger("weir.mirror")

# After this many connect failures in a row, mirroring to that shadow pauses for a while:
# a shadow that refuses connections must not cost a failed connect per user request.
FAILURES_BEFORE_BACKOFF = 5
BACKOFF_SECONDS = 1.0
# Weight of the newest copy in the running average of how long a copy takes (see pacing).
DURATION_SMOOTHING = 0.1
# Copies that may start back to back, after a lull, before the pacing spaces them out.
PACING_BURST = 4


class MirrorPolicy:
    """One compiled ``mirror`` entry of a service, with its shared limits."""

    __slots__ = ("average_seconds", "backoff_until", "compare", "consecutive_failures",
                 "differ", "fraction", "host_suffix", "inflight", "max_body", "max_concurrent",
                 "max_queued", "methods", "next_start", "noise_of", "queued_bytes", "stats",
                 "target", "timeout", "waiting")

    def __init__(self, config: Mirror, target: VersionTarget, stats: MirrorStats) -> None:
        self.target = target
        self.stats = stats
        self.fraction = config.percent / 100.0
        self.methods = frozenset(m.encode() for m in config.methods)
        self.max_body = config.max_body_bytes
        self.max_concurrent = config.max_concurrent
        self.max_queued = config.max_queued_bytes
        self.timeout = config.timeout
        self.host_suffix = config.host_suffix
        self.compare = config.compares
        self.differ: Differ | None = (Differ(config.ignore.headers, config.ignore.json_paths)
                                      if self.compare else None)
        # A baseline policy (copies to the primary once more): its comparisons are the
        # noise of this shadow's field diffs, not a shadow's own (see diff.py).
        self.noise_of: DiffStats | None = None
        self.inflight = 0  # copies sent to the shadow and not answered yet
        self.waiting = 0   # copies held back by the pacing (at most max_concurrent)
        self.queued_bytes = 0
        self.consecutive_failures = 0
        self.backoff_until = 0.0
        # Pacing. A shadow slower than the traffic holds all max_concurrent slots; they free
        # up together and would be taken again together, so copies would go out and their
        # answers come back in bursts that delay the users' requests around them. Instead
        # copies start no closer together than average_seconds / max_concurrent: the rate
        # at which the shadow finishes them, spread evenly (PACING_BURST may go together).
        # A copy not due yet waits for its turn (up to max_concurrent of them wait): pacing
        # spreads copies out, it does not drop them (only the limits do). A shadow that keeps
        # up holds few slots and is not paced at all (see start_delay).
        self.average_seconds = 0.0  # of a copy, from sending to its end; 0 until one ends
        self.next_start = 0.0

    def wants(self, method: bytes) -> bool:
        return method in self.methods and (self.fraction >= 1.0
                                           or random.random() < self.fraction)

    def count(self, outcome: str) -> None:
        self.stats.outcomes[outcome] += 1

    def refusal(self, body_size: int = 0) -> str:
        """Why a copy of ``body_size`` bytes cannot be sent now (a DROP_REASONS entry), or ""
        when it can. Checked first before a copy is built (no body yet), so that while the
        shadow is full or down the copies it cannot take cost a counter, not an object per
        request; then again with its body, once the request is complete."""
        if self.inflight >= self.max_concurrent:
            return "max_concurrent"
        if self.queued_bytes + body_size > self.max_queued:
            return "max_queued_bytes"
        if self.backoff_until and monotonic() < self.backoff_until:
            return "shadow_unreachable"
        return ""

    def start_delay(self, now: float) -> float:
        """A copy is about to go: how long it waits for its turn (0: now). Paced only once the
        shadow holds half its slots: below that it keeps up, and copies go out as requests
        come. The next copy is due one spacing later (a token bucket of PACING_BURST)."""
        if not self.average_seconds or self.inflight * 2 < self.max_concurrent:
            return 0.0
        spacing = self.average_seconds / self.max_concurrent
        due = max(self.next_start, now - PACING_BURST * spacing)
        self.next_start = due + spacing
        return due - now

    def ended(self, seconds: float) -> None:
        """A sent copy was answered or timed out after ``seconds``."""
        if self.average_seconds:
            self.average_seconds += DURATION_SMOOTHING * (seconds - self.average_seconds)
        else:
            self.average_seconds = seconds

    def drop(self, exchange: Exchange, reason: str) -> None:
        """Count a copy dropped before it was built (see refusal)."""
        self.stats.outcomes["dropped"] += 1
        self.stats.dropped[reason] += 1
        access_log = exchange.plane.access_log
        if access_log is not None:
            access_log.mirror(self.target, 0, "dropped", exchange.url, exchange.method)


class MirrorCopy(ResponseSink):
    """The copy of one request; it implements what UpstreamConnection reports to."""

    __slots__ = ("access_log", "body", "body_size", "conn", "digest", "done", "exchange",
                 "h2_head", "keep_alive", "method", "on_wire", "path", "payload", "policy",
                 "pool", "primary", "primary_answer", "sent_at", "shadow_status",
                 "too_large", "waiting")

    def __init__(self, policy: MirrorPolicy, exchange: Exchange) -> None:
        self.policy = policy
        self.exchange: Exchange | None = exchange
        self.head_request = exchange.head_request
        self.grpc_status = -1
        self.method = exchange.method
        self.path = exchange.url
        self.access_log: AccessLog | None = exchange.plane.access_log
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.conn: UpstreamChannel | None = None
        # What goes out: for an HTTP/1.1 shadow the head and body as bytes, for an HTTP/2
        # one the body alone and h2_head.
        self.payload = b""
        self.h2_head: list[tuple[bytes, bytes]] | None = None
        self.pool: UpstreamPool | None = None
        self.digest: Captured | None = Captured() if policy.compare else None
        self.primary_answer: Captured | None = None
        self.shadow_status = 0
        self.keep_alive = False
        self.primary: tuple[int, str] | None = None  # (status, body digest) once known
        self.done = False
        self.waiting = False  # held back by the pacing (counted in policy.waiting)
        self.on_wire = False  # sent (counted in policy.inflight)
        self.sent_at = 0.0

    # --- fed by the primary exchange ------------------------------------------------------

    def add_body(self, data: bytes) -> None:
        if self.too_large:
            return
        self.body_size += len(data)
        if self.body_size > self.policy.max_body:
            self.too_large = True
            self.body = []
        else:
            self.body.append(data)

    def send(self) -> None:
        """The user's request is complete: send the copy, or drop it if over a limit."""
        policy = self.policy
        exchange = self.exchange
        if exchange is None:
            return
        reason = "max_body_bytes" if self.too_large else policy.refusal(self.body_size)
        if reason:
            self.drop_as(reason)
            return
        balancer = policy.target.balancer
        user_pool = exchange.pool
        if policy.noise_of is not None and user_pool is not None:
            # A baseline copy: to another upstream of the primary than the user's answer came
            # from, where it has several, so that their differences are learnt as noise too.
            pool: UpstreamPool | None = balancer.pick_excluding(  # type: ignore[attr-defined,assignment]
                (user_pool,))
        else:
            pool = balancer.pick()  # type: ignore[assignment]
        if pool is None:  # the shadow's upstreams are down, ejected or full
            self.drop_as("shadow_unreachable")
            return
        if pool.protocol == "http1":
            self.payload = self.build_head(exchange) + b"".join(self.body)
        else:
            self.h2_head = exchange.h2_request_headers(
                MIRROR_SKIP, self.shadow_host(exchange), pool.tls is not None)
            self.h2_head.append((b"content-length", b"%d" % self.body_size))
            self.payload = b"".join(self.body)
        self.exchange = None  # no reference cycle with the exchange: refcounting frees both
        self.body = []
        delay = policy.start_delay(monotonic())
        if delay > 0 and policy.waiting >= policy.max_concurrent:
            self.drop_as("max_concurrent")  # as many wait as the shadow has slots
            return
        policy.queued_bytes += self.body_size
        self.pool = pool
        pool.active.add(self)  # type: ignore[arg-type]
        if delay > 0:
            self.waiting = True
            policy.waiting += 1
            asyncio.get_running_loop().call_later(delay, self.go)
        else:
            self.go()

    def drop_as(self, reason: str) -> None:
        self.policy.stats.dropped[reason] += 1
        self.finish("dropped")

    def go(self) -> None:
        """On the wire: over an idle connection of the shadow's pool, or a new one."""
        pool = self.pool
        if self.done or pool is None:
            return  # ended while it waited its turn (a drain closed its pool)
        policy = self.policy
        if self.waiting:
            self.waiting = False
            policy.waiting -= 1
            if policy.inflight >= policy.max_concurrent:
                self.drop_as("max_concurrent")
                return
        policy.inflight += 1
        self.on_wire = True
        self.sent_at = monotonic()
        conn = pool.take_idle()
        if conn is not None:
            self.attach(conn)
        else:
            asyncio.get_running_loop().create_task(self.connect(pool))

    def shadow_host(self, exchange: Exchange) -> bytes:
        host = exchange.hmap.get(b"host", b"")
        if self.policy.host_suffix:
            name, colon, port = host.rpartition(b":") if b"]" not in host[-1:] else (host, b"",
                                                                                    b"")
            if not colon or not port.isdigit():
                name, colon, port = host, b"", b""
            host = name + b"-shadow" + colon + port
        return host

    def build_head(self, exchange: Exchange) -> bytes:
        extra = b"host: %b\r\ncontent-length: %d\r\n" % (self.shadow_host(exchange),
                                                            self.body_size)
        return exchange.build_head(MIRROR_SKIP, extra)

    async def connect(self, pool: UpstreamPool) -> None:
        policy = self.policy
        try:
            conn = await pool.connect(min(policy.timeout, 5.0))
        except TimeoutError:
            pool.timeouts += 1
            pool.record_failure(unreachable=True)
            self.connect_failed("timeout")
            return
        except OSError:
            pool.connect_errors += 1
            pool.record_failure(unreachable=True)
            self.connect_failed("error")
            return
        if self.done:
            conn.release()
            return
        self.attach(conn)

    def connect_failed(self, outcome: str) -> None:
        policy = self.policy
        policy.consecutive_failures += 1
        if policy.consecutive_failures >= FAILURES_BEFORE_BACKOFF:
            policy.backoff_until = monotonic() + BACKOFF_SECONDS
        self.finish(outcome)

    def attach(self, conn: UpstreamChannel) -> None:
        self.conn = conn
        self.policy.consecutive_failures = 0
        payload, self.payload = self.payload, b""
        head = self.h2_head
        if head is None:
            conn.send(self, payload, self.policy.timeout)
            return
        self.h2_head = None
        conn.start(self, head, not payload, self.policy.timeout)
        if payload:
            conn.write_body(payload, False)
            conn.end_body(False)

    # --- what the shadow's connection reports ---------------------------------------------

    def on_upstream_head(self, status: int, lines: list[bytes],
                         noted: list[bytes], keep_alive: bool) -> None:
        self.shadow_status = status
        self.keep_alive = keep_alive
        if self.digest is not None:
            self.digest.take_head(lines)

    def on_upstream_body(self, data: bytes) -> None:
        if self.digest is not None:
            self.digest.update(data)

    def on_upstream_complete(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.keep_alive:
                conn.release()
            else:
                conn.close()
        self.finish("success")

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        pass  # a shadow's answer is thrown away

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        pass  # a shadow has no business upgrading; the copy ends when it closes

    def on_upstream_failed(self, status: int, reason: str, got_bytes: bool) -> None:
        self.conn = None
        self.finish("timeout" if status == 504 else "error")

    def on_upstream_closed(self) -> None:
        self.conn = None
        self.finish("error")

    def pause_client_reading(self, paused: bool) -> None:
        pass  # nothing to pause: the copy's body is already in memory

    def flush(self) -> None:
        pass

    def close_for_drain(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
        self.finish("error")

    # --- the end --------------------------------------------------------------------------

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self.exchange = None
        policy = self.policy
        policy.count(outcome)
        seconds = monotonic() - self.sent_at
        if self.on_wire:
            # The shadow's answer as a request of its version: its status, or 502 and 504
            # for a copy it refused or did not answer in time (see MirrorStats.answers).
            status = (self.shadow_status if outcome == "success"
                      else 504 if outcome == "timeout" else 502)
            policy.stats.answers.observe(self.method, status, seconds)
        if self.pool is not None:
            if outcome in ("success", "timeout"):
                policy.ended(seconds)
            self.pool.active.discard(self)  # type: ignore[arg-type]
            if self.on_wire:
                policy.inflight -= 1
            if self.waiting:
                policy.waiting -= 1
            policy.queued_bytes -= self.body_size
            self.pool = None
        if outcome == "success" and self.digest is not None:
            self.compare_when_ready()
        if self.access_log is not None:
            self.access_log.mirror(policy.target, self.shadow_status, outcome, self.path,
                                   self.method)

    def primary_finished(self, status: int, digest: str, answer: Captured | None) -> None:
        self.primary = (status, digest)
        self.primary_answer = answer
        if self.done and self.shadow_status:
            self.compare_when_ready()

    def compare_when_ready(self) -> None:
        if self.primary is None or self.digest is None:
            return
        status, digest = self.primary
        shadow = self.digest
        shadow_digest = shadow.hexdigest()
        self.digest = None
        policy = self.policy
        differ, primary = policy.differ, self.primary_answer
        self.primary_answer = None
        if differ is not None and primary is not None:
            fields, mine, theirs = differ.differences(status, primary, self.shadow_status,
                                                      shadow)
            request = f"{self.method.decode()} {self.path[:200].decode('latin-1')}"
            noise = policy.noise_of
            if noise is not None:
                noise.record(fields, True, request, mine, theirs)
                return  # a baseline copy: the primary against itself
            policy.stats.diff.record(fields, False, request, mine, theirs)
        stats = policy.stats
        if status == self.shadow_status and digest == shadow_digest:
            stats.comparisons["match"] += 1
            return
        stats.comparisons["mismatch"] += 1
        stats.mismatches.append({
            "method": self.method.decode(),
            "path": self.path[:200].decode("latin-1"),
            "primary_status": status,
            "shadow_status": self.shadow_status,
            "same_body": digest == shadow_digest,
        })
