"""HTTP/1.1 constants, pre-encoded once so the hot path only joins bytes."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

# RFC 9110 7.6.1 plus the legacy names that proxies still have to strip.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})

# Request headers Weir rewrites itself rather than passing on as sent.
REQUEST_REWRITTEN: Final = HOP_BY_HOP | {
    b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
}

# Response headers Weir frames or sets itself.
RESPONSE_REWRITTEN: Final = HOP_BY_HOP | {b"x-weir-version"}
# Response headers the data plane must look at: the rewritten ones and the body's length.
RESPONSE_NOTED: Final = RESPONSE_REWRITTEN | {b"content-length"}
# Their lengths, as bits of one small int: most response headers (Date, Server,
# Content-Type, ...) are ruled out by the length of their name alone, with a shift (native
# when compiled), without lowering or hashing the name.
RESPONSE_NOTED_LENGTH_BITS: Final = sum(1 << n for n in {len(name) for name in RESPONSE_NOTED})

# Headers whose listing in Connection must not make us drop them.
CONNECTION_OPTIONS_IGNORED: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

# The usual method, as one object: the parser makes a new one for every request, and swapped
# for this one it needs no hashing in the set and dict lookups that follow.
GET: Final = b"GET"
IDEMPOTENT_METHODS: Final = frozenset({GET, b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# Safe methods (RFC 9110 9.2.1): sent again to another upstream by default when a connection
# broke before any byte of an answer, as nginx's default proxy_next_upstream does.
SAFE_METHODS: Final = frozenset({GET, b"HEAD", b"OPTIONS", b"TRACE"})

STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# On the 405 to a TRACE (RFC 9110 15.5.6 asks a 405 for an Allow): the usual methods, all
# of which Weir passes on (the app behind may take fewer).
ALLOW_WITHOUT_TRACE: Final = b"allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
VIA: Final = b"via: 1.1 weir\r\n"
CRLF: Final = b"\r\n"
HEAD_END_WITH_VIA: Final = VIA + CRLF  # one item to join instead of two
LAST_CHUNK: Final = b"0\r\n\r\n"
CONNECTION_CLOSE: Final = b"connection: close\r\n"
CONNECTION_KEEP_ALIVE: Final = b"connection: keep-alive\r\n"
TRANSFER_CHUNKED: Final = b"transfer-encoding: chunked\r\n"


# Header names as they arrive, lower-cased. A few spellings make up nearly all traffic, so a
# dict lookup replaces a lower() call and a new bytes object per header; names that are long,
# or that arrive once the table is full, are lowered each time instead of held.
_LOWERED: Final[dict[bytes, bytes]] = {}
_LOWERED_MAX_ENTRIES: Final = 1024
_LOWERED_MAX_NAME: Final = 64


# The names the data plane looks up itself, each as one object: a lowered name that is one
# of them is this object, which a set or dict lookup then matches by identity, without
# comparing bytes.
_CANONICAL: Final[dict[bytes, bytes]] = {
    name: name for name in RESPONSE_NOTED | REQUEST_REWRITTEN
    | {b"host", b"content-length", b"cookie"}
}


# Canonical objects of names that nearly every request or response carries, in one spelling
# (Host; Content-Length and Connection): the data plane compares a name with that spelling
# before it calls ``lowered``, whose dict lookup must hash the name.
HOST: Final = _CANONICAL[b"host"]
CONTENT_LENGTH: Final = _CANONICAL[b"content-length"]
CONNECTION: Final = _CANONICAL[b"connection"]


def lowered(name: bytes) -> bytes:
    lname = _LOWERED.get(name)
    if lname is None:
        lname = name.lower()
        lname = _CANONICAL.get(lname, lname)
        if len(name) <= _LOWERED_MAX_NAME and len(_LOWERED) < _LOWERED_MAX_ENTRIES:
            _LOWERED[name] = lname
    return lname


def status_line(status: int, reason: bytes = b"") -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Unknown")
    return line


PLAIN_CONNECTION_VALUES: Final = frozenset({b"keep-alive", b"close", b"upgrade", b"Keep-Alive",
                                            b"Close"})


def connection_tokens(value: bytes) -> set[bytes]:
    """Header names listed in a Connection header, lower-cased, without close/keep-alive."""
    if value in PLAIN_CONNECTION_VALUES:
        return set()  # the usual case, answered without splitting
    tokens = {t.strip().lower() for t in value.split(b",")}
    return tokens - CONNECTION_OPTIONS_IGNORED - {b""}


def split_absolute_form(url: bytes) -> tuple[bytes, bytes]:
    """``http://user@host:port/path?q`` → (``host:port``, ``/path?q``), for absolute-form
    request targets (RFC 9112 3.2.2)."""
    rest = url.split(b"//", 1)[1] if b"//" in url else url
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, target = rest[:end].rpartition(b"@")[2], rest[end:]
    return authority, target if target.startswith(b"/") else b"/" + target


def local_body(status: int, message: str) -> bytes:
    """The text of an answer from Weir itself, the same whatever protocol carries it."""
    return f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()


def simple_response(status: int, message: str, close: bool, extra: bytes = b"",
                    head_only: bool = False) -> bytes:
    """A complete small text response generated by Weir itself (errors, 404s). ``head_only``
    for an answer to HEAD: the same head, without the content (RFC 9110 9.3.2)."""
    body = local_body(status, message)
    head = [
        status_line(status),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        extra,
        CONNECTION_CLOSE if close else b"",
        CRLF,
    ]
    return b"".join(head) if head_only else b"".join(head) + body


def without_headers(forward: list[bytes], names: frozenset[bytes] | set[bytes]) -> list[bytes]:
    """A flat [name, b": ", value, CRLF, ...] list less the headers named (lower-case)."""
    kept: list[bytes] = []
    for i in range(0, len(forward), 4):
        if forward[i].lower() not in names:
            kept += forward[i:i + 4]
    return kept
