"""Fuzzing the data plane's client side with hypothesis.

Raw HTTP/1.1 request bytes, structured and then mutated (odd methods and versions, conflicting
framing headers, bad chunk sizes, obs-fold, NULs, bare LF, huge lengths, upgrades, pipelining,
truncation) or arbitrary, go to a real Weir in front of real backends over a raw socket, split
into random pieces, then half-closed. For every input:

- the proxy answers or closes within DEADLINE seconds (no hang);
- whatever it sends is a sequence of well-formed responses, starting ``HTTP/1.1 NNN`` with
  100 <= NNN <= 599;
- nothing of ours raised: no "500 internal proxy error" (what a raising parser callback
  becomes) and no error logged by Weir or by the event loop;
- a normal request on a new connection is still served.

Weir and the backends run on the test's event loop; hypothesis runs its examples in a worker
thread with blocking sockets, so that each example is sent and read while the proxy serves it.
Runs are derandomized and keep no example database, so CI sees the same inputs every time.
For a deeper run by hand, ``WEIR_FUZZ_SCALE=N`` draws N times the examples, at random, so each
run tries new inputs (one such run found a connection held open for good; see test_http.py's
broken-body tests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dataplane.proxyserver import ProxyServer

DEADLINE = 5.0  # seconds for the proxy to answer or close one input
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] ")
NORMAL = b"GET /fuzz-check HTTP/1.1\r\nHost: app.test\r\n\r\n"

FUZZ_SCALE = int(os.environ.get("WEIR_FUZZ_SCALE", "1"))
FUZZ_SETTINGS = settings(
    deadline=None, derandomize=FUZZ_SCALE == 1, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- request strategies ---------------------------------------------------------------------
#
# A request starts valid (so that it gets past the parser into routing, limits, bodies,
# pipelining and upgrades) and then takes up to three anomalies, each a known way for a request
# to be odd or hostile. Shrinking drops anomalies first, so a failure names the ones that
# matter.


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[bytes]
    body: bytes
    eol: bytes = b"\r\n"
    cut: int | None = None  # truncate the serialized request here

    def serialize(self) -> bytes:
        line = self.method + b" " + self.target + (b" " + self.version if self.version else b"")
        eol = self.eol
        data = eol.join([line, *self.headers]) + eol + eol + self.body
        return data if self.cut is None else data[:self.cut]


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


VALID_TARGETS = [b"/", b"/a/b?c=d", b"/?preview=t1&x=%zz", b"/api/v2/items", b"/other/x",
                 b"http://app.test/abs?q=1", b"/ws", b"/stream?size=200000",
                 b"/stream?size=5000&length=1", b"/hop"]
VALID_HOSTS = [b"app.test", b"other.test", b"x.wild.test", b"app.test:8080", b"APP.TEST",
               b"[::1]:80"]
VALID_EXTRAS = [b"Cookie: uid=abc", b"Cookie: beta=yes", b"X-User-Id: u1", b"X-Beta: 1",
                b"Connection: keep-alive", b"Connection: close", b"Expect: 100-continue",
                b"Accept: */*", b"X-Forwarded-For: 1.2.3.4", b"TE: trailers",
                b"Connection: x-drop\r\nX-Drop: secret", b"Keep-Alive: timeout=5",
                b"Proxy-Connection: keep-alive",
                b"Connection: upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"]

BAD_METHODS = [b"get", b"G ET", b"", b"PRI", b"CONNECT", b"TRACE", b"X" * 300, b"M-SEARCH",
               b"\x00GET", b"GET\t", b"SOURCE", b"ACL"]
BAD_TARGETS = [b"*", b"", b"//double//slash", b"/a b", b"/\x7f\x80\xff", b"http://",
               b"http://[::1", b"app.test:443", b"/" + b"a" * 5000, b"/%00%ff", b"/#frag",
               b"https://u:p@other.test:8080/other"]
BAD_VERSIONS = [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.10", b"HTTP/11",
                b"", b"HTTP/9.9", b"HTTP/1.1\x00", b"HTTP/1", b"HTTP/1.1 x"]
BAD_LENGTHS = [b"-1", b"+5", b" 5", b"5 ", b"0x10", b"1e3", b"", b"5, 5", b"5,6", b"\x005",
               b"99999999999999999999", b"18446744073709551615", b"18446744073709551616",
               b"100000"]
BAD_TE = [b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked, chunked", b" chunked",
          b"chunked\x00", b"x-custom", b"chunked;q=1", b"", b"Chunked"]
BAD_CHUNKED = [b"zz\r\nhello\r\n0\r\n\r\n", b"-1\r\nx\r\n0\r\n\r\n",
               b"ffffffffffffffffff\r\nx\r\n", b"5;ext=1\r\nhello\r\n0\r\n\r\n",
               b"0x5\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
               b"5\nhello\n0\n\n", b"0\r\n", b"5\r\nhel", b"5 \r\nhello\r\n0\r\n\r\n",
               b"\r\n0\r\n\r\n", b"5\r\nhello0\r\n\r\n", b"1" * 30 + b"\r\n"]
BAD_LINES = [b" folded continuation", b"\tfolded", b"NoColon", b"Space : before",
             b": empty-name", b"X-Nul: a\x00b", b"X-Ctl: \x01\x7f", b"\x00: x", b"X-A:no-space",
             b"X-Big: " + b"b" * 5000, b"Host: second.test", b"Content-Length: 3",
             b"Transfer-Encoding: chunked", b"Upgrade: h2c", b"Connection: upgrade"]

ANOMALIES = ["method", "target", "version", "no_host", "dup_length", "length_and_chunked",
             "bad_length", "bad_te", "bad_chunks", "bad_line", "obs_fold", "huge_body",
             "truncate", "bare_lf", "bare_cr", "extra_body", "random_header", "trailer",
             "no_length"]


@st.composite
def structured_request(draw: st.DrawFn) -> bytes:
    req = Request(
        method=draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS",
                                     b"PATCH"])),
        target=draw(st.sampled_from(VALID_TARGETS)),
        version=draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"])),
        headers=[b"Host: " + draw(st.sampled_from(VALID_HOSTS))],
        body=b"")
    req.headers += draw(st.lists(st.sampled_from(VALID_EXTRAS), max_size=3))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    anomalies = draw(st.lists(st.sampled_from(ANOMALIES), max_size=3, unique=True))
    if "huge_body" in anomalies:
        body = b"x" * draw(st.integers(17_000, 40_000))  # over max_body_bytes
    if framing == "length":
        req.headers.append(b"Content-Length: %d" % len(body))
        req.body = body
    elif framing == "chunked":
        req.headers.append(b"Transfer-Encoding: chunked")
        trailer = b"X-Trailer: t\r\n" if "trailer" in anomalies else b""
        req.body = chunked(split(body, draw(st.lists(st.integers(0, len(body)), max_size=4))),
                           trailer)
    for anomaly in anomalies:
        if anomaly == "method":
            req.method = draw(st.one_of(st.sampled_from(BAD_METHODS),
                                        st.binary(min_size=1, max_size=8)))
        elif anomaly == "target":
            req.target = draw(st.one_of(st.sampled_from(BAD_TARGETS),
                                        st.binary(max_size=30).map(lambda b: b"/" + b)))
        elif anomaly == "version":
            req.version = draw(st.sampled_from(BAD_VERSIONS))
        elif anomaly == "no_host":
            req.headers = req.headers[1:]
        elif anomaly == "dup_length":
            req.headers.append(b"Content-Length: %d" % draw(st.sampled_from(
                [len(req.body), len(req.body) + 1, 0])))
        elif anomaly == "length_and_chunked":
            req.headers.append(draw(st.sampled_from(
                [b"Content-Length: %d" % len(req.body), b"Transfer-Encoding: chunked"])))
        elif anomaly == "bad_length":
            req.headers.append(b"Content-Length: " + draw(st.sampled_from(BAD_LENGTHS)))
        elif anomaly == "bad_te":
            req.headers.append(b"Transfer-Encoding: " + draw(st.sampled_from(BAD_TE)))
        elif anomaly == "bad_chunks" and framing == "chunked":
            req.body = draw(st.sampled_from(BAD_CHUNKED))
        elif anomaly == "bad_line":
            req.headers.insert(draw(st.integers(0, len(req.headers))),
                               draw(st.sampled_from(BAD_LINES)))
        elif anomaly == "obs_fold":
            # After a header line where there is one (a fold first in the head is bad too).
            n = len(req.headers)
            req.headers.insert(draw(st.integers(min(1, n), n)), b" folded")
        elif anomaly == "bare_lf":
            req.eol = b"\n"
        elif anomaly == "bare_cr":
            req.eol = b"\r"
        elif anomaly == "extra_body":
            req.body += draw(st.binary(min_size=1, max_size=50))
        elif anomaly == "no_length" and framing == "length":
            req.headers = [h for h in req.headers if not h.startswith(b"Content-Length")]
        elif anomaly == "random_header":
            req.headers.append(draw(st.binary(min_size=1, max_size=12)) + b": "
                               + draw(st.binary(max_size=40)))
    if "truncate" in anomalies:
        req.cut = draw(st.integers(0, max(0, len(req.serialize()) - 1)))
    return req.serialize()


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """A few byte-level edits: flips, inserts, deletions, duplications, truncation."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([b"\x00", b"\r", b"\n", b" ", b"\r\n", b":",
                                                b"\xff", b"0"]))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 40))]
        else:
            del data[at:]
    return bytes(data)


PIPELINES = st.lists(structured_request(), min_size=1, max_size=3).map(b"".join)
STRUCTURED = st.one_of(PIPELINES, PIPELINES, PIPELINES, PIPELINES.flatmap(mutated))
ARBITRARY = st.one_of(
    st.binary(max_size=2000),
    st.tuples(st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nHost: a\r\n",
                               NORMAL, b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                               b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                               b"\r\n"]),
              st.binary(max_size=500)).map(b"".join),
)


def with_splits(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, list[int]]]:
    """The payload and where to cut it into separately sent pieces."""
    return payloads.flatmap(lambda p: st.tuples(
        st.just(p), st.lists(st.integers(0, len(p)), max_size=4).map(sorted)))


# --- the target -------------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects the ERROR records that mean a bug of ours: Weir's own, asyncio's (a callback
    that raised), and a backend's rejection of a request head Weir forwarded as malformed
    (smuggling-shaped input must be refused by Weir, not passed on). A backend losing a
    connection that Weir dropped because the client broke HTTP mid-body is not one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        exc = record.exc_info[1] if record.exc_info else None
        if (name == "weir" or name.startswith("weir.") or name == "asyncio"
                or isinstance(exc, BadHttpMessage)):
            self.records.append(record)


@dataclass
class Target:
    proxy: ProxyServer
    errors: ErrorLog


@pytest.fixture
async def target(start_backend: Callable[..., Any],
                 start_proxy: Callable[..., Any]) -> AsyncIterator[Target]:
    primary = await start_backend("primary")
    shadow = await start_backend("shadow")
    proxy = await start_proxy([
        {"name": "app",
         "versions": {"stable": {"upstreams": [primary.address]},
                      "canary": {"upstreams": [primary.address]},
                      "shadow": {"upstreams": [shadow.address]}},
         "weights": {"stable": 50, "canary": 50},
         "sticky": {"header": "x-user-id", "cookie": "uid", "mint_cookie": True},
         "rules": [{"match": {"headers": {"x-beta": "1"}}, "version": "canary"},
                   {"match": {"cookies": {"beta": "yes"}, "query": {"preview": {"prefix": "t"}}},
                    "version": "canary"},
                   {"match": {"path": {"regex": "^/api/v[0-9]+/"}}, "version": "canary"}],
         "mirror": [{"version": "shadow", "percent": 100, "compare": True,
                     "methods": ["GET", "HEAD", "POST", "PUT"], "max_body_bytes": "2KiB"}]},
        {"name": "other", "match": {"hosts": ["other.test", "*.wild.test"],
                                    "path_prefix": "/other"},
         "versions": {"v1": {"upstreams": [primary.address]}}},
    ], limits={"max_header_bytes": "4KiB", "max_body_bytes": "16KiB", "header_timeout": "3s",
               "idle_timeout": "3s"},
        # The backend may wait for good on what some inputs send it (aiohttp reads the body
        # of an Upgrade request until EOF): Weir's read timeout answers those with a 504, and
        # is short so that they cost little. A hang beyond it is Weir's.
        upstream={"timeouts": {"connect": "1s", "read": "500ms"}})
    errors = ErrorLog()
    root = logging.getLogger()  # records reach it from every logger that propagates
    root.addHandler(errors)
    try:
        yield Target(proxy, errors)
    finally:
        root.removeHandler(errors)


def send(port: int, payload: bytes, cuts: list[int]) -> tuple[bytes, str]:
    """Send the payload in pieces, half-close, read until the proxy closes or DEADLINE.
    Returns what was read and how it ended: closed, reset or hang."""
    deadline = time.monotonic() + DEADLINE
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = bytearray()
    try:
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        try:
            for piece in pieces:
                if piece:
                    sock.sendall(piece)
                    time.sleep(0.0005)  # let the proxy read each piece on its own
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy answered and closed before taking it all: read what it sent
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(received), "hang"
            except ConnectionResetError:
                return bytes(received), "reset"
            if not chunk:
                return bytes(received), "closed"
            received += chunk
    finally:
        sock.close()


class Responses:
    """httptools callbacks that collect each response's status."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.parser = HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())


def check_responses(payload: bytes, received: bytes) -> list[int]:
    """Every response is well formed; returns their statuses."""
    if not received:
        return []
    if payload.startswith(HTTP2_PREFACE):
        # HTTP/2 with prior knowledge (Hypothesis finds the preface among Weir's constants):
        # the answer is HTTP/2's, opening with the server's SETTINGS frame.
        assert received[3:4] == b"\x04", f"not a SETTINGS frame: {received[:80]!r}"
        return []
    assert STATUS_LINE.match(received), f"not a status line: {received[:80]!r}"
    if b"HEAD" in payload:
        return []  # a response to HEAD has a length but no body: not framed on its own
    responses = Responses()
    try:
        responses.parser.feed_data(received)
    except HttpParserUpgrade:
        pass  # a 101: what follows is the tunnel's
    except HttpParserError as exc:
        raise AssertionError(f"malformed response stream ({exc}): {received[:300]!r}") from None
    for status in responses.statuses:
        assert 100 <= status <= 599, status
    return responses.statuses


def still_serves(port: int) -> None:
    received, how = send(port, NORMAL, [])
    assert received.startswith(b"HTTP/1.1 200 "), (how, received[:200])


def make_check(target: Target) -> Callable[[tuple[bytes, list[int]]], None]:
    port = target.proxy.port

    def check(case: tuple[bytes, list[int]]) -> None:
        payload, cuts = case
        target.errors.records.clear()
        received, how = send(port, payload, cuts)
        assert how != "hang", (f"no answer and no close within {DEADLINE}s; got "
                               f"{received[:200]!r}")
        check_responses(payload, received)
        assert b"internal proxy error" not in received, received[:300]
        assert not target.errors.records, [r.getMessage() for r in target.errors.records]
        assert target.proxy.stats.unrouted.get(500, 0) == 0
        still_serves(port)

    return check


async def run_fuzz(target: Target, strategy: st.SearchStrategy[tuple[bytes, list[int]]],
                   examples: int) -> None:
    check = make_check(target)
    test = settings(FUZZ_SETTINGS, max_examples=examples * FUZZ_SCALE)(given(strategy)(check))
    started = time.monotonic()
    await asyncio.to_thread(test)
    assert time.monotonic() - started < 60 * FUZZ_SCALE
    assert not target.errors.records


# A passing run takes seconds; a failing one may take minutes to shrink (each hanging example
# costs DEADLINE), and is worth waiting for rather than cutting off without its example.
@pytest.mark.timeout(600)
async def test_fuzz_structured_and_mutated_requests(target: Target) -> None:
    await run_fuzz(target, with_splits(STRUCTURED), examples=400)


@pytest.mark.timeout(600)
async def test_fuzz_arbitrary_bytes(target: Target) -> None:
    await run_fuzz(target, with_splits(ARBITRARY), examples=150)
