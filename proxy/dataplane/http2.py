"""HTTP/2 to clients (RFC 9113): an asyncio.Protocol per connection, an ``Http2Exchange`` per
stream, framing done by the ``h2`` package.

A connection arrives here two ways: TLS with ``h2`` chosen in ALPN, or cleartext whose first
bytes are the HTTP/2 connection preface ("prior knowledge", how gRPC runs inside a network),
which ``http1.Http1Connection`` hands over. Each stream is an ``Exchange`` of its own: routed
by its own headers (rules, sticky users, weights), so a weight change applies to the very
next stream on a long-lived connection. Its upstream may speak HTTP/1.1 or HTTP/2 (see
exchange.py); trailers from an HTTP/2 one go out as the stream's last HEADERS, and a gRPC call
Weir answers itself gets a trailers-only gRPC answer (``respond_grpc``).

Flow control follows what the other side consumes, both ways:
- request bodies: a stream's DATA is acknowledged (WINDOW_UPDATE) only as it is written to
  its upstream, and not while that upstream's write buffer is full or while the body is held
  waiting for an upstream connection; a client can have at most a window in flight;
- responses: DATA goes out only within the client's window; what does not fit is held, and
  over RESPONSE_HIGH_WATER the stream's upstream connection stops being read. A client that
  stops reading one stream stalls that stream alone.

Defences: concurrent streams (``limits.max_concurrent_streams``), header list size
(``limits.max_header_bytes``, refused by HPACK as it decodes) and body size as for HTTP/1.1;
h2 bounds CONTINUATION frames per header block; rapid reset (CVE-2023-44487) as Envoy does it,
by the share of streams the client resets before they have run a second; SETTINGS and PING
floods by a budget of control frames. Each ends the connection with GOAWAY. A read is handled
whole frames at a time, SLICE_FRAMES of them before the loop's next turn, and the streams it
opens start once it is handled (see data_received and start_streams): a flood holds up other
connections for one slice at most, and a stream reset in the read that opened it costs no
upstream work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from h2.config import H2Configuration
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2Connection,
    H2ConnectionStateMachine,
    _decode_headers,
)
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from h2.stream import (
    H2Stream,
    H2StreamStateMachine,
    StreamClosedBy,
    StreamInputs,
    StreamState,
)
from h2.windows import WindowManager
from hpack.hpack import encode_integer
from hpack.huffman_table import (
    HUFFMAN_COMPLETE,
    HUFFMAN_EMIT_SYMBOL,
    HUFFMAN_FAIL,
    HUFFMAN_TABLE,
)
from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable
from hyperframe.frame import GoAwayFrame

from .corking import CorkedTransport
from .exchange import DONE, FINISHED, HELD, SENDING, Exchange
from .http11 import CRLF, REQUEST_REWRITTEN, connection_tokens, local_body

if TYPE_CHECKING:
    from .context import DataPlaneContext, DataPlaneSettings, Peer

log = logging.getLogger("weir.http2")

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Response bytes held per stream beyond the client's window before its upstream connection
# stops being read.
RESPONSE_HIGH_WATER: Final = 256 * 1024

# A read is parsed SLICE_FRAMES frames at a time (see data_received).
SLICE_FRAMES: Final = 64

# Rapid reset (CVE-2023-44487), as Envoy counts it: a stream the client resets within
# PREMATURE_SECONDS of opening it is premature; once a connection has opened
# PREMATURE_MIN_STREAMS streams, more than half of them premature ends it.
PREMATURE_SECONDS: Final = 1.0
PREMATURE_MIN_STREAMS: Final = 100

# SETTINGS and PING frames (each one Weir must answer) a client may send: a burst, refilled
# at a rate per second. A flood past it ends the connection.
CONTROL_BURST: Final = 1000.0
CONTROL_PER_SECOND: Final = 100.0

# The window Weir opens to a client for each request body, and for the connection. Opened
# with WINDOW_UPDATE frames rather than SETTINGS_INITIAL_WINDOW_SIZE: a client that started
# a stream before it read the SETTINGS may miss the change (curl 7.88 stalls its upload).
BODY_WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 4 * 1024 * 1024
DEFAULT_WINDOW: Final = 65535

# Hop-by-hop response headers HTTP/2 forbids (RFC 9113 8.2.2) are already out of the lines an
# upstream connection passes on; these are the ones Weir sets itself.
VIA_PAIR: Final = (b"via", b"1.1 weir")

perf_counter: Final = time.perf_counter

GRPC_DEADLINE_EXCEEDED: Final = 4
GRPC_RESOURCE_EXHAUSTED: Final = 8
GRPC_UNIMPLEMENTED: Final = 12
GRPC_INTERNAL: Final = 13
GRPC_UNAVAILABLE: Final = 14
# Printable ASCII but "%", which gRPC sends as is in grpc-message.
GRPC_MESSAGE_SAFE: Final = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")

# --- response frames, framed by Weir -------------------------------------------------------
# A response's HEADERS and DATA frames are framed here rather than by h2, whose generic path
# (frame objects, header normalization, its HPACK encoder's table search) cost more than the
# rest of an exchange. h2 is told what went out: the stream's state machine takes the same
# inputs h2's own send_headers/send_data give it, and the same flow-control windows shrink.

FRAME_HEADER: Final = struct.Struct(">HBBBL")  # length (24 bits: 16 + 8), type, flags, stream
DATA_FRAME: Final = 0x0
HEADERS_FRAME: Final = 0x1
RST_STREAM_FRAME: Final = 0x3
WINDOW_UPDATE_FRAME: Final = 0x8
MAX_WINDOW: Final = 2**31 - 1
CONTINUATION_FRAME: Final = 0x9
END_STREAM_FLAG: Final = 0x1
END_HEADERS_FLAG: Final = 0x4
PRIORITY_FLAG: Final = 0x20

SEND_HEADERS: Final = StreamInputs.SEND_HEADERS
SEND_DATA: Final = StreamInputs.SEND_DATA
SEND_END_STREAM: Final = StreamInputs.SEND_END_STREAM

# A stream's state machine (h2.stream.H2StreamStateMachine) is moved by Weir itself on the
# usual path, as its transition table would move it (for h2's process_input, a Python call and
# the hash of an Enum per input, five inputs a request): a request's HEADERS in an IDLE stream;
# a response's HEADERS, DATA and END_STREAM in OPEN or HALF_CLOSED_REMOTE. Anything else goes
# through process_input.
OPEN: Final = StreamState.OPEN
HALF_CLOSED_REMOTE: Final = StreamState.HALF_CLOSED_REMOTE
HALF_CLOSED_LOCAL: Final = StreamState.HALF_CLOSED_LOCAL
CLOSED: Final = StreamState.CLOSED
CLOSED_BY_END: Final = StreamClosedBy.SEND_END_STREAM
CLOSED_BY_RESET: Final = StreamClosedBy.RECV_RST_STREAM
# The connection's (h2.connection.H2ConnectionStateMachine): a server's is IDLE until its first
# request, SERVER_OPEN from then on.
NO_STREAM_YET: Final = ConnectionState.IDLE
SERVER_OPEN: Final = ConnectionState.SERVER_OPEN
CONNECTION_CLOSED: Final = ConnectionState.CLOSED


def window_credit(window: Any, size: int) -> int:
    """``size`` more bytes consumed in an inbound window (an h2.windows.WindowManager): by
    how much to open it now (0: not yet), as its process_bytes decides, and the window's
    state moved as that does it."""
    processed = window._bytes_processed + size
    current = window.current_window_size
    largest = window.max_window_size
    if (current == 0 and processed > min(1024, largest // 4)) or processed >= largest // 2:
        increment = min(processed, largest - current)
        window._bytes_processed = 0
        window.current_window_size = current + increment
        return increment
    window._bytes_processed = processed
    return 0


def request_headers_in(machine: Any, ended: bool) -> None:
    """RECV_HEADERS (request_received), then RECV_END_STREAM when ``ended``, in an IDLE
    stream."""
    machine.client = False
    machine.headers_received = True
    machine.state = HALF_CLOSED_REMOTE if ended else OPEN


def response_headers_out(machine: Any, end_stream: bool) -> None:
    """SEND_HEADERS (response_sent), then SEND_END_STREAM when ``end_stream``; raises
    ProtocolError where h2 would (a stream the client has reset, say)."""
    state = machine.state
    if ((state is OPEN or state is HALF_CLOSED_REMOTE) and machine.client is False
            and not machine.headers_sent):
        machine.headers_sent = True
        if end_stream:
            end_stream_out(machine)
        return
    if ((state is OPEN or state is HALF_CLOSED_REMOTE) and machine.client is False
            and not machine.trailers_sent and end_stream):
        machine.trailers_sent = True  # trailers: response_sent's second time
        end_stream_out(machine)
        return
    machine.process_input(SEND_HEADERS)
    if end_stream:
        machine.process_input(SEND_END_STREAM)


def new_h2_stream(stream_id: int, config: Any, inbound_window: int, outbound_window: int,
                  max_frame: int) -> Any:
    """``H2Stream(stream_id, config, inbound_window, outbound_window)`` with its
    max_outbound_frame_size set, the same objects made without running the three __init__
    (the stream's, its state machine's and its window's) that h2, interpreted, runs for each:
    their attributes copied from ones made once. test_http2_framing checks them against h2's."""
    machine = MAKE_OBJECT(H2StreamStateMachine)
    fields = MACHINE_FIELDS.copy()
    fields["stream_id"] = stream_id
    machine.__dict__ = fields
    window = MAKE_OBJECT(WindowManager)
    window.__dict__ = {"max_window_size": inbound_window,
                       "current_window_size": inbound_window, "_bytes_processed": 0}
    stream = MAKE_OBJECT(H2Stream)
    fields = STREAM_FIELDS.copy()
    fields["state_machine"] = machine
    fields["stream_id"] = stream_id
    fields["max_outbound_frame_size"] = max_frame
    fields["outbound_flow_control_window"] = outbound_window
    fields["_inbound_window_manager"] = window
    fields["config"] = config
    stream.__dict__ = fields
    return stream


MAKE_OBJECT: Final = object.__new__
MACHINE_FIELDS: Final[dict[str, Any]] = dict(vars(H2StreamStateMachine(0)))
STREAM_FIELDS: Final[dict[str, Any]] = dict(vars(H2Stream(
    0, config=H2Configuration(), inbound_window_size=0, outbound_window_size=0)))


def closed_stream(h2: H2Connection, stream_id: int, closed_by: Any) -> None:
    """Remember how a stream closed, as h2 does when it drops it (h2's _closed_streams, a
    SizeLimitDict: its own __setitem__, interpreted, trims it each time; here it is trimmed
    once it is a tenth over its limit, to the limit)."""
    closed: Any = h2._closed_streams
    SET_ITEM(closed, stream_id, closed_by)
    if len(closed) > CLOSED_STREAMS_TRIM:
        while len(closed) > CLOSED_STREAMS_KEPT:
            closed.popitem(last=False)


SET_ITEM: Final = OrderedDict.__setitem__
CLOSED_STREAMS: Final[Any] = H2Connection()._closed_streams  # an empty one, for its limit
CLOSED_STREAMS_KEPT: Final[int] = CLOSED_STREAMS._size_limit
CLOSED_STREAMS_TRIM: Final = CLOSED_STREAMS_KEPT + CLOSED_STREAMS_KEPT // 10


def data_out(machine: Any) -> None:
    """SEND_DATA; raises ProtocolError where h2 would."""
    state = machine.state
    if state is not OPEN and state is not HALF_CLOSED_REMOTE:
        machine.process_input(SEND_DATA)


def end_stream_out(machine: Any) -> None:
    """SEND_END_STREAM; raises ProtocolError where h2 would."""
    state = machine.state
    if state is HALF_CLOSED_REMOTE:
        machine.stream_closed_by = CLOSED_BY_END  # send_end_stream
        machine.state = CLOSED
    elif state is OPEN:
        machine.state = HALF_CLOSED_LOCAL
    else:
        machine.process_input(SEND_END_STREAM)

# HPACK (RFC 7541) as Weir encodes response fields: each one a literal without indexing, its
# name indexed when the static table has it, its value as it is (no Huffman). The dynamic table
# is never used, so no field depends on what the client's decoder holds, and the encoding of a
# name is worked out once (as nginx, which does not index response fields either).


def hpack_name_code(name: bytes) -> bytes:
    """The start of a literal field without indexing (RFC 7541 6.2.2) for ``name``."""
    index = STATIC_NAMES.get(name, 0)
    if index:
        return bytes(encode_integer(index, 4))  # 0000 and the index
    return b"\x00" + bytes(encode_integer(len(name), 7)) + name


def static_names() -> dict[bytes, int]:
    names: dict[bytes, int] = {}
    for index, (name, _) in enumerate(HeaderTable.STATIC_TABLE, 1):
        names.setdefault(name, index)
    return names


def static_statuses() -> dict[int, bytes]:
    """:status fields the static table has whole, as indexed fields (RFC 7541 6.1)."""
    return {int(value): bytes((0x80 | index,))
            for index, (name, value) in enumerate(HeaderTable.STATIC_TABLE, 1)
            if name == b":status"}


STATIC_NAMES: Final = static_names()
NAME_CODES: Final[dict[bytes, bytes]] = {name: hpack_name_code(name) for name in STATIC_NAMES}
NAME_CODES_MAX: Final = 1024  # names learnt from upstreams beyond the static table's
LENGTH_CODES: Final = [bytes((n,)) for n in range(127)]  # a 7-bit prefix, under 127
STATUS_CODES: Final = static_statuses()


def hpack_status(status: int) -> bytes:
    code = STATUS_CODES.get(status)
    if code is None:
        code = NAME_CODES[b":status"] + b"\x03%d" % status
        STATUS_CODES[status] = code
    return code


def hpack_field(parts: list[bytes], name: bytes, value: bytes) -> None:
    """Add the encoding of one field (``name`` lower-case) to ``parts``."""
    code = NAME_CODES.get(name)
    if code is None:
        code = hpack_name_code(name)
        if len(NAME_CODES) < NAME_CODES_MAX:
            NAME_CODES[name] = code
    parts.append(code)
    size = len(value)
    parts.append(LENGTH_CODES[size] if size < 127 else bytes(encode_integer(size, 7)))
    parts.append(value)


VIA_FIELD: Final = NAME_CODES[b"via"] + LENGTH_CODES[len(VIA_PAIR[1])] + VIA_PAIR[1]

# --- requests' HEADERS, taken by Weir ------------------------------------------------------
# The HEADERS frame that opens a stream, in the usual shape (the whole block in it, no padding;
# priority data skipped), is taken by Http2Connection.take_frames rather than by h2's frame-by-frame
# path; everything else goes to h2 as it comes. What h2 would do is done: the block decoded as
# h2's HPACK decoder decodes it (decoded_fields; the decoder itself for any other shape, and its
# errors taken as h2 takes them), the header list checked as h2's
# validate_inbound_headers checks it (below; a malformed one is a connection error, as in h2),
# the stream made in h2 with the state machine inputs and content length h2 gives it.

PSEUDO_METHOD: Final = 1
PSEUDO_SCHEME: Final = 2
PSEUDO_AUTHORITY: Final = 4
PSEUDO_PATH: Final = 8
PSEUDO_PROTOCOL: Final = 16
REQUEST_PSEUDO: Final = {b":method": PSEUDO_METHOD, b":scheme": PSEUDO_SCHEME,
                         b":authority": PSEUDO_AUTHORITY, b":path": PSEUDO_PATH,
                         b":protocol": PSEUDO_PROTOCOL}
# A field name (RFC 9113 8.2.1): none of 0x00-0x20, 0x41-0x5a (upper case), 0x7f-0xff, nor a
# colon outside of a pseudo-header's first character.
FIELD_NAME: Final = re.compile(rb"[!-9;-@\[-~]+")
# Connection-specific fields (RFC 9113 8.2.2), as h2 lists them.
CONNECTION_SPECIFIC: Final = frozenset({b"connection", b"proxy-connection", b"keep-alive",
                                        b"transfer-encoding", b"upgrade"})
# Names whose values need a look of their own; every other name that passed is remembered.
LOOKED_AT: Final = frozenset({b"te", b"host", b"content-length"})
GOOD_NAMES: Final[set[bytes]] = set()
GOOD_NAMES_MAX: Final = 4096


STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = HeaderTable.STATIC_TABLE
STATIC_COUNT: Final = len(STATIC_TABLE)
STATIC_FIELDS: Final[tuple[Any, ...]] = STATIC_TABLE  # see decoded_fields


# hpack's Huffman decoder as three tables: for a state and the next four bits, the state
# after them, its flags and the byte it emits (see huffman_decoded).
HUFFMAN_NEXT: Final[tuple[int, ...]] = tuple(entry[0] for entry in HUFFMAN_TABLE)
HUFFMAN_FLAGS: Final[tuple[int, ...]] = tuple(entry[1] for entry in HUFFMAN_TABLE)
HUFFMAN_BYTE: Final[tuple[int, ...]] = tuple(entry[2] for entry in HUFFMAN_TABLE)


def huffman_decoded(data: bytes, start: int, end: int) -> bytes | None:
    """``data[start:end]`` Huffman-decoded (RFC 7541 5.2) as hpack's decode_huffman does it, a
    nibble at a time; None where it raises (an invalid or incomplete code)."""
    out = bytearray()
    state = 0
    flags = HUFFMAN_COMPLETE  # an empty string is complete
    for i in range(start, end):
        byte = data[i]
        index = state * 16 + (byte >> 4)
        flags = HUFFMAN_FLAGS[index]
        if flags & HUFFMAN_FAIL:
            return None
        if flags & HUFFMAN_EMIT_SYMBOL:
            out.append(HUFFMAN_BYTE[index])
        index = HUFFMAN_NEXT[index] * 16 + (byte & 0x0F)
        flags = HUFFMAN_FLAGS[index]
        if flags & HUFFMAN_FAIL:
            return None
        if flags & HUFFMAN_EMIT_SYMBOL:
            out.append(HUFFMAN_BYTE[index])
        state = HUFFMAN_NEXT[index]
    if not flags & HUFFMAN_COMPLETE:
        return None
    return bytes(out)


def hpack_integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
    """The integer (RFC 7541 5.1) whose prefix is the ``mask`` bits of ``block[pos]``, and the
    position after it; (-1, pos) when the block ends inside it or it is over 2^28 (hpack's
    limit is its length: it refuses one longer than 10 bytes)."""
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(block)
    while pos < end and shift <= 21:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def hpack_string(block: bytes, pos: int) -> tuple[bytes | None, int]:
    """The string literal (RFC 7541 5.2) at ``pos`` and the position after it; None when it
    is cut short or its Huffman code is invalid."""
    huffman = block[pos] & 0x80
    length, pos = hpack_integer(block, pos, 0x7F)
    end = pos + length
    if length < 0 or end > len(block):
        return None, pos
    if huffman:
        # The same strings come again and again (a gRPC method's :path, which nghttp2 never
        # indexes): each is decoded once. Only short ones are kept, and only so many.
        code = block[pos:end]
        text = HUFFMAN_DECODED.get(code)
        if text is None:
            text = huffman_decoded(block, pos, end)
            if text is not None and length <= HUFFMAN_KEPT_LENGTH and (
                    len(HUFFMAN_DECODED) < HUFFMAN_KEPT):
                HUFFMAN_DECODED[code] = text
        return text, end
    return block[pos:end], end


HUFFMAN_DECODED: Final[dict[bytes, bytes]] = {}
HUFFMAN_KEPT: Final = 4096
HUFFMAN_KEPT_LENGTH: Final = 128


def decoded_fields(decoder: Any, block: bytes) -> list[tuple[bytes, bytes]] | None:
    """The header list of a block, decoded as h2's HPACK decoder (hpack's) decodes it, and its
    dynamic table moved as hpack moves it: indexed fields, and literals with or without
    indexing (their names indexed or not, their strings Huffman-coded or not). Without a
    Python call per field and per string: clients send each request's new fields as literals,
    an attacker all of them. None for anything else (a table size update, an index or string
    out of the block or the table, a list over its size), the table as it was: the decoder
    then decodes or refuses the block itself."""
    table = decoder.header_table
    if table._maxsize > decoder.max_allowed_table_size:
        return None
    limit = decoder.max_header_list_size
    dynamic = table.dynamic_entries
    saved: Any = None  # the dynamic table before this block's first entry, to put back
    # Any: compiled, a field is then the table's own tuple, not unpacked and packed again
    fields: list[Any] = []
    field: Any
    size = 0
    pos = 0
    end = len(block)
    while pos < end:
        first = block[pos]
        if first & 0x80:  # indexed (6.1)
            if first != 0xFF:
                index = first - 0x81
                pos += 1
            else:
                index, pos = hpack_integer(block, pos, 0x7F)
                index -= 1
            if index < 0:
                break  # index 0, or cut short
            if index < STATIC_COUNT:
                field = STATIC_FIELDS[index]
            elif index - STATIC_COUNT < len(dynamic):
                field = dynamic[index - STATIC_COUNT]
            else:
                break
        else:
            if first & 0x40:  # with incremental indexing (6.2.1)
                name_index, pos = hpack_integer(block, pos, 0x3F)
            elif first & 0x20:
                break  # a dynamic table size update: hpack's
            else:  # without indexing, or never indexed (6.2.2, 6.2.3)
                name_index, pos = hpack_integer(block, pos, 0x0F)
            if name_index < 0 or pos >= end:
                break
            if name_index:
                name_index -= 1
                if name_index < STATIC_COUNT:
                    name = STATIC_TABLE[name_index][0]
                elif name_index - STATIC_COUNT < len(dynamic):
                    name = dynamic[name_index - STATIC_COUNT][0]
                else:
                    break
            else:
                literal, pos = hpack_string(block, pos)
                if literal is None or pos >= end:
                    break
                name = literal
            value, pos = hpack_string(block, pos)
            if value is None:
                break
            if first & 0x40:
                if saved is None:
                    saved = (deque(dynamic), table._current_size)
                table.add(name, value)
                field = (name, value)
            elif first & 0x10:
                field = NeverIndexedHeaderTuple(name, value)  # kept so when passed on
            else:
                field = (name, value)
        name, value = field
        size += 32 + len(name) + len(value)  # RFC 7541 4.1, as hpack counts the list
        if size > limit:
            break
        fields.append(field)
    else:
        return fields
    if saved is not None:
        table.dynamic_entries, table._current_size = saved
    return None


def malformed(headers: list[tuple[bytes, bytes]]) -> str:
    """Why a request's header list is malformed (RFC 9113 8.2, 8.3), as h2's inbound
    validation would refuse it; "" when it is not."""
    seen = 0
    regular = False
    method = b""
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        if value:
            # By their codes: bytes.__contains__ tries a bytes argument as an int first and
            # raises and clears a TypeError each time (2,000 instructions a look).
            if 13 in value or 10 in value or 0 in value:
                return f"illegal character in the value of {name!r}"
            first = value[0]
            last = value[-1]
            if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:
                return f"value of {name!r} surrounded by whitespace"
        if name[:1] == b":":
            bit = REQUEST_PSEUDO.get(name, 0)
            if not bit:
                return f"pseudo-header field {name!r} in a request"
            if seen & bit:
                return f"duplicate pseudo-header field {name!r}"
            if regular:
                return f"pseudo-header field {name!r} after a regular one"
            seen |= bit
            if bit == PSEUDO_METHOD:
                method = value
            elif bit == PSEUDO_AUTHORITY:
                authority = value
            elif bit == PSEUDO_PATH and not value:
                return "empty :path"
            continue
        regular = True
        if name in GOOD_NAMES:
            continue
        if FIELD_NAME.fullmatch(name) is None:
            return f"illegal header name {name!r}"
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific header field {name!r}"
        if name in LOOKED_AT:
            if name == b"te":
                if value.lower() != b"trailers":
                    return f"TE header {value!r}"
            elif name == b"host":
                if host is not None:
                    return "more than one Host header"
                host = value
            elif not value.isdigit():
                return f"content-length {value!r}"
        elif len(GOOD_NAMES) < GOOD_NAMES_MAX:
            GOOD_NAMES.add(name)
    if not seen & PSEUDO_METHOD:
        return "no :method"
    if method == b"CONNECT" and not seen & PSEUDO_PROTOCOL:
        if seen & (PSEUDO_SCHEME | PSEUDO_PATH):
            return "CONNECT with :scheme or :path"
    else:
        if seen & (PSEUDO_SCHEME | PSEUDO_PATH) != PSEUDO_SCHEME | PSEUDO_PATH:
            return "no :scheme or no :path"
        if seen & PSEUDO_PROTOCOL and method != b"CONNECT":
            return ":protocol without CONNECT"
    if authority is None and host is None:
        return "neither :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return ":authority and Host differ"
    return ""

PAUSE_UPSTREAM: Final = 1  # the upstream's write buffer is full
PAUSE_BUFFER: Final = 2    # body bytes are piling up while we connect

GOAWAY_KEEPS_OPEN: Final = {
    **H2ConnectionStateMachine._transitions,
    (ConnectionState.SERVER_OPEN, ConnectionInputs.RECV_GOAWAY):
        (None, ConnectionState.SERVER_OPEN),
}

H2_CONFIG: Final = H2Configuration(client_side=False, header_encoding=None,
                                   validate_inbound_headers=True,
                                   normalize_inbound_headers=True,
                                   validate_outbound_headers=False,
                                   normalize_outbound_headers=False)


def header_pairs(block: bytes) -> list[tuple[bytes, bytes]]:
    """b"name: value\\r\\n..." (the form Weir keeps its own headers in) as HTTP/2 pairs."""
    pairs: list[tuple[bytes, bytes]] = []
    for line in block.split(CRLF):
        if line:
            name, _, value = line.partition(b":")
            pairs.append((name.strip().lower(), value.strip()))
    return pairs


def write_frame(transport: CorkedTransport, h2: H2Connection, kind: int, flags: int,
                stream_id: int, payload: bytes) -> None:
    """A frame framed by Weir (either direction's connection), after what h2 holds."""
    if h2._data_to_send:
        transport.write(h2.data_to_send())
    size = len(payload)
    transport.write(FRAME_HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id))
    transport.write(payload)


def send_within_windows(transport: CorkedTransport, h2: H2Connection, stream: Any,
                        pending: list[bytes], end: bool) -> int:
    """Frame from ``pending`` what the stream's and the connection's windows take, in frames
    the peer accepts, as h2's send_data would (either direction's connection): the stream's
    state machine moved by SEND_DATA, and SEND_END_STREAM with the last of it when ``end``;
    both windows shrunk. Returns the bytes sent; ``pending`` keeps the rest. Raises
    ProtocolError where h2 would (a stream closed meanwhile), before anything is sent."""
    window = min(stream.outbound_flow_control_window, h2.outbound_flow_control_window)
    if window <= 0:
        return 0
    machine = stream.state_machine
    data_out(machine)
    stream_id = stream.stream_id
    frame = h2.max_outbound_frame_size
    sent = 0
    while pending and window > 0:
        chunk = pending[0]
        size = min(window, frame, len(chunk))
        if size == len(chunk):
            pending.pop(0)
        else:
            pending[0] = chunk[size:]
            chunk = chunk[:size]
        window -= size
        sent += size
        if end and not pending:
            end_stream_out(machine)
            write_frame(transport, h2, DATA_FRAME, END_STREAM_FLAG, stream_id, chunk)
        else:
            write_frame(transport, h2, DATA_FRAME, 0, stream_id, chunk)
    stream.outbound_flow_control_window -= sent
    h2.outbound_flow_control_window -= sent
    return sent


def take_within_windows(h2: H2Connection, stream: Any, size: int, ended: bool) -> bool:
    """A DATA frame of ``size`` bytes received on ``stream``, as h2 takes it when it is
    valid (either direction's connection): within both inbound windows and the declared
    content-length, which it then shrinks and counts. False, with nothing changed: h2's
    FlowControlError or InvalidBodyLengthError, left to h2 to raise."""
    window: Any = h2._inbound_flow_control_window_manager
    stream_window = stream._inbound_window_manager
    if size > window.current_window_size or size > stream_window.current_window_size:
        return False
    received = stream._actual_content_length + size
    expected = stream._expected_content_length
    if expected is not None and (received > expected or (ended and received != expected)):
        return False
    window.current_window_size -= size
    stream_window.current_window_size -= size
    stream._actual_content_length = received
    return True


def free_h2(h2: H2Connection) -> None:
    """A closed connection's H2Connection: its table of bound methods (a reference cycle)
    dropped, so that it is freed at once rather than at the next full collection, which
    runs rarely (runtime/process.py freezes the start-up objects and raises the young
    generation's threshold): 14-18 KiB per closed connection piled up until then. Nothing
    parses a frame on it any more."""
    h2.__dict__.pop("_frame_dispatch_table", None)


def grpc_code_for(status: int) -> int:
    """The gRPC status of a call Weir answers itself with what would be this HTTP status:
    DEADLINE_EXCEEDED for a timeout, RESOURCE_EXHAUSTED over a size limit, UNIMPLEMENTED when
    no service matches (as Envoy's route-not-found), INTERNAL for a malformed request, and
    UNAVAILABLE for the rest (no upstream, refused, reset), which clients may retry."""
    if status == 504:
        return GRPC_DEADLINE_EXCEEDED
    if status in (413, 431, 429):
        return GRPC_RESOURCE_EXHAUSTED
    if status in (404, 405):
        return GRPC_UNIMPLEMENTED
    if status == 400:
        return GRPC_INTERNAL
    return GRPC_UNAVAILABLE


def grpc_message(message: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC's PROTOCOL-HTTP2)."""
    return quote(message, safe=GRPC_MESSAGE_SAFE).encode()


class Http2Exchange(Exchange):
    """One stream: its request as an HTTP/2 client sent it, its response framed back."""

    __slots__ = ("conn", "ended", "head", "out_done", "pause_flags", "pending",
                 "pending_bytes", "stream_id", "unacked")

    def __init__(self, conn: Http2Connection, stream_id: int) -> None:
        super().__init__(conn.plane, conn.settings, conn.peer)
        self.conn = conn
        self.stream_id = stream_id
        self.head: bytes | None = None  # its HPACK block, held until the read ends
        self.pending: list[bytes] = []  # response bytes waiting for the client's window
        self.pending_bytes = 0
        self.ended = False  # the response's end is waiting behind pending
        self.out_done = False  # the response has gone out whole, END_STREAM with it
        self.pause_flags = 0
        self.unacked = 0  # request body bytes received and not yet acknowledged

    def take_request(self, headers: list[tuple[bytes, bytes]], stream_ended: bool) -> bool:
        """Fill the request fields from the stream's header list (h2 has validated it: the
        pseudo-headers are there, once, first). False: the request cannot be forwarded."""
        forward = self.forward
        hmap = self.hmap
        authority = b""
        cookies: list[bytes] = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    self.method = value
                elif name == b":path":
                    self.url = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"cookie":
                cookies.append(value)  # one header for HTTP/1.1 (RFC 9113 8.2.3)
                continue
            if name in REQUEST_REWRITTEN:
                self.rewritten_headers = True
            else:
                forward += (name, b": ", value, CRLF)
            if name in hmap:
                hmap[name] += b", " + value
            else:
                hmap[name] = value
        if cookies:
            joined = b"; ".join(cookies)
            hmap[b"cookie"] = joined
            forward += (b"cookie", b": ", joined, CRLF)
        if authority:
            host = hmap.get(b"host")
            if host is None:
                forward += (b"host", b": ", authority, CRLF)
                hmap[b"host"] = authority
            elif host != authority:
                return False  # two names for one target: malformed (RFC 9113 8.3.1)
        self.head_request = self.method == b"HEAD"
        self.has_body = not stream_ended
        length = hmap.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return False
            self.content_length = int(length)
            if stream_ended and self.content_length:
                return False
        elif self.has_body:
            self.chunked = True  # an HTTP/1.1 upstream needs a framing: chunked it is
        self.request_complete = stream_ended
        self.started = perf_counter()
        return bool(self.method) and (bool(self.url) or self.method == b"CONNECT")

    def start(self) -> None:
        host = self.hmap.get(b"host")
        if host is None:
            self.respond_local(400, "a request needs :authority or Host")
            return
        if self.method == b"CONNECT":
            self.respond_local(405, "CONNECT is not supported by a reverse proxy")
            return
        self.dispatch(host)

    # --- request body and its flow control --------------------------------------------------

    def received(self, data: bytes, flow_controlled: int) -> None:
        if data:  # an empty DATA frame (often the one with END_STREAM) is no chunk
            self.on_request_body(data)
        if self.pause_flags and self.response != FINISHED:
            self.unacked += flow_controlled  # acknowledged once the pause is over
        else:
            self.conn.acknowledge(self.stream_id, flow_controlled)

    def set_pause(self, flag: int, paused: bool) -> None:
        self.pause_flags = self.pause_flags | flag if paused else self.pause_flags & ~flag
        if not self.pause_flags and self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(self.stream_id, unacked)

    def pause_for_buffer(self, paused: bool) -> None:
        self.set_pause(PAUSE_BUFFER, paused)

    def pause_client_reading(self, paused: bool) -> None:
        self.set_pause(PAUSE_UPSTREAM, paused)

    # --- Exchange: the protocol's half ------------------------------------------------------

    def relay_head(self, status: int, lines: list[bytes], noted: list[bytes]) -> None:
        drop: set[bytes] | None = None
        chunked_in = has_length = False
        for i in range(0, len(noted), 2):
            lname = noted[i]
            if lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding":
                chunked_in = True
            elif lname == b"connection":
                drop = connection_tokens(noted[i + 1]) or None
        if chunked_in and has_length:
            drop = (drop or set()) | {b"content-length"}  # chunked wins (RFC 9112 6.3)
        self.until_eof = not (chunked_in or has_length or self.head_request
                              or status in (204, 304))
        parts = [hpack_status(status)]
        for i in range(1, len(lines), 4):
            name = lines[i].lower()
            if drop is None or name not in drop:
                hpack_field(parts, name, lines[i + 2])
        target = self.target
        assert target is not None
        for name, value in target.response_pairs:
            hpack_field(parts, name, value)
        if self.extra_headers:
            for name, value in header_pairs(self.extra_headers):
                hpack_field(parts, name, value)
        parts.append(VIA_FIELD)
        self.head = b"".join(parts)
        self.response = HELD

    def on_upstream_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.primary_digest is not None:
            self.primary_digest.update(data)
        self.pending.append(data)
        self.pending_bytes += len(data)

    def flush(self) -> None:
        head = self.head
        if head is not None:
            self.head = None
            self.response = SENDING
            self.conn.send_block(self.stream_id, head, False)
        if self.pending:
            self.send_pending()

    def send_pending(self) -> None:
        """Send what the client's window takes; hold the rest (see the module's doc)."""
        conn = self.conn
        trailers = self.trailers
        sent = conn.send_data(self.stream_id, self.pending, self.ended and trailers is None)
        self.pending_bytes -= sent
        upstream = self.upstream
        if self.pending:
            if self.pending_bytes > RESPONSE_HIGH_WATER and upstream is not None:
                upstream.pause_reading()
            return
        if self.ended:
            if trailers is not None:
                conn.send_trailers(self.stream_id, trailers)
            self.out_done = True  # END_STREAM went with the last of the data, or trailers
            conn.settle(self)
        elif upstream is not None and not conn.write_paused:
            upstream.resume_reading()

    def end_response(self) -> None:
        """Settled in maybe_finish, which follows at once. END_STREAM goes on the last frame
        of the response: its HEADERS when it has no body and no trailers (a gRPC client takes
        a HEADERS frame that does not end the stream for the call's start, and a trailers-only
        answer's grpc-status in it as nothing), the last DATA, or the trailers."""
        self.ended = True
        head = self.head
        trailers = self.trailers
        if head is not None:
            self.head = None
            self.response = SENDING
            if not self.pending and trailers is None:
                self.conn.send_block(self.stream_id, head, True)
                self.out_done = True
                return
            self.conn.send_block(self.stream_id, head, False)
        if self.pending:
            self.send_pending()  # ends with the last of its data, now or once it fits
            return
        if not self.out_done:
            if trailers is not None:
                self.conn.send_trailers(self.stream_id, trailers)
            else:
                self.conn.end_stream(self.stream_id)
            self.out_done = True

    def on_upstream_tunnel_data(self, data: bytes) -> None:
        raise AssertionError("no Upgrade over HTTP/2")

    def respond_local(self, status: int, message: str, close: bool = False,
                      headers: bytes = b"") -> None:
        self.status = status
        if self.hmap.get(b"content-type", b"").startswith(b"application/grpc"):
            self.respond_grpc(status, message)
            return
        body = local_body(status, message)
        head = [(b":status", b"%d" % status),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body))]
        target = self.target
        if target is not None:
            head += target.response_pairs
        if headers:
            head += header_pairs(headers)
        self.head = None
        self.pending = []
        self.pending_bytes = 0
        conn = self.conn
        if self.head_request:
            conn.send_headers(self.stream_id, head, True)
        else:
            conn.send_headers(self.stream_id, head, False)
            conn.send_data(self.stream_id, [body], True)
        self.out_done = True
        self.response = DONE
        self.maybe_finish()

    def respond_grpc(self, status: int, message: str) -> None:
        """Weir's own answer to a gRPC call: trailers-only (gRPC's PROTOCOL-HTTP2), HTTP 200
        and the status in the one HEADERS frame that ends the stream, so that the client's
        library reports the gRPC status rather than a broken call. Counted as what went out:
        HTTP 200 in http_requests_total, the code in weir_grpc_responses_total (an error when
        in the service's ``grpc.error_codes``)."""
        code = grpc_code_for(status)
        self.grpc_status = code
        self.status = 200  # what the client got; the failure counts through grpc_status
        head = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % code), (b"grpc-message", grpc_message(message))]
        target = self.target
        if target is not None:
            head += target.response_pairs
        self.head = None
        self.pending = []
        self.pending_bytes = 0
        self.conn.send_headers(self.stream_id, head, True)
        self.out_done = True
        self.response = DONE
        self.maybe_finish()

    def maybe_finish(self) -> None:
        """Unlike HTTP/1.1, a stream need not wait for the rest of its request: nothing
        queues behind it."""
        if self.response == DONE:
            self.response = FINISHED
            self.record(self.status)
            self.conn.settle(self)

    def send_continue(self) -> None:
        self.conn.send_headers(self.stream_id, [(b":status", b"100")], False)

    def client_paused(self) -> bool:
        return self.conn.write_paused

    def queued(self) -> bool:
        return False

    def reset_client(self) -> None:
        self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.abandon()  # no connection_lost will come for a stream

    def close_client(self) -> None:
        self.conn.reset(self, ErrorCodes.CANCEL)

    def break_response(self, status: int, reason: str) -> None:
        """A gRPC call whose answer has begun ends with trailers carrying the status (a read
        timeout is DEADLINE_EXCEEDED), which the client's library reports as such, rather
        than a reset it can only call INTERNAL."""
        if (self.trailers is not None or self.ended or not self.hmap.get(
                b"content-type", b"").startswith(b"application/grpc")):
            self.reset_client()
            return
        code = grpc_code_for(status)
        self.grpc_status = code
        self.trailers = [(b"grpc-status", b"%d" % code), (b"grpc-message", grpc_message(reason))]
        self.drop_upstream()
        self.end_response()
        self.response = DONE
        self.maybe_finish()

    def protocol(self) -> str:
        return "HTTP/2"


class Http2Connection(asyncio.Protocol):
    """One HTTP/2 client connection: its streams run side by side."""

    def __init__(self, plane: DataPlaneContext, settings: DataPlaneSettings,
                 peer: Peer) -> None:
        self.plane = plane
        self.settings = settings
        self.peer = peer
        self.loop = plane.loop
        self.transport: CorkedTransport = None  # type: ignore[assignment]
        self.h2 = H2Connection(H2_CONFIG)
        # h2 takes a GOAWAY it receives for the end of the connection: it would refuse to send
        # the answers still owed, and take the client's next frame (a WINDOW_UPDATE for one of
        # them) for an error, where RFC 9113 6.8 has the streams in flight finish. A client's
        # GOAWAY leaves this connection's state machine open; Weir refuses new streams itself.
        self.h2.state_machine._transitions = GOAWAY_KEEPS_OPEN
        # What of h2's Weir reads for every frame it takes itself (take_frames), held here:
        # h2 makes each once, and a lookup by name on its connection costs more than the rest
        # of some of those calls. New streams' windows, as h2's settings have them.
        self.h2_streams: dict[int, Any] = self.h2.streams
        self.h2_machine: Any = self.h2.state_machine
        self.local_window = DEFAULT_WINDOW
        self.remote_window = DEFAULT_WINDOW
        self.streams: dict[int, Http2Exchange] = {}
        self.write_paused = False
        self.settings_seen = False  # the client's preface ends with SETTINGS
        self.closing = False  # GOAWAY sent: no new streams; close when the last one ends
        self.opened = 0
        self.premature = 0
        self.control_budget = CONTROL_BURST
        self.control_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # loop time the last stream ended (see arm_idle_timer)
        self.unread = b""  # the start of a frame a read ended in (see data_received)
        self.held_read = b""  # the rest of a read sliced by data_received, for the next turn
        # Streams opened by the frames being handled, started once those are (start_streams)
        self.starting: list[Http2Exchange] = []

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = CorkedTransport(transport, self.plane.corker)
        self.plane.connections.add(self)
        h2 = self.h2
        # As initial values, not changes: h2 sends a change only with the next SETTINGS and
        # applies it when the client acknowledges it, so the first SETTINGS would carry h2's
        # defaults and a client that never acknowledged would be held to them.
        max_header_list = self.settings.max_header_bytes
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: self.settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
            SettingCodes.ENABLE_PUSH: 0,
        })
        h2.decoder.max_header_list_size = max_header_list
        self.local_window = h2.local_settings.initial_window_size
        self.remote_window = h2.remote_settings.initial_window_size
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.control_at = self.loop.time()
        self.write_out()
        self.arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        if self.unread:  # the start of a frame the last read ended inside
            data = self.unread + data
            self.unread = b""
        preface = self.h2.incoming_buffer._preamble_len
        if preface:  # the client's preface (or what of it is still to come): h2 checks it
            if not self.receive(data[:preface]) or len(data) <= preface:
                return
            data = data[preface:]
        if not self.settings_seen and len(data) >= 9:
            # The SETTINGS that end the preface, alone: what follows is then Weir's to take
            # (take_frames) rather than all h2's.
            first = 9 + (data[0] << 16 | data[1] << 8 | data[2])
            if first < len(data) and first - 9 <= self.h2.max_inbound_frame_size:
                if not self.receive(data[:first]):
                    return
                data = data[first:]
        # Whole frames only, SLICE_FRAMES at a time: the frame a read ends inside waits for
        # the next read (h2, given part of one, would hold it and take the next read whole,
        # and the next, as long as reads end inside frames), and after SLICE_FRAMES frames
        # the rest of the read waits for the loop's next turn, reading paused. A 100 KB read
        # of HEADERS and RST_STREAM pairs is 2,000 streams: parsed at once it would hold up
        # every other connection's answers, and be parsed even after its connection was cut
        # for abuse. Counted in frames, not bytes: a body's big DATA frames stay whole.
        size = len(data)
        limit = self.h2.max_inbound_frame_size
        pos = frames = 0
        while pos + 9 <= size:
            length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            if length > limit:
                pos = size  # h2 refuses it (FRAME_SIZE_ERROR) from its header
                break
            if pos + 9 + length > size:
                break
            pos += 9 + length
            frames += 1
            if frames == SLICE_FRAMES and pos < size:
                self.held_read = data[pos:]  # (and the streams opened wait for the rest)
                if self.receive(data[:pos]):
                    self.transport.pause_reading()
                    self.loop.call_soon(self.read_held)
                return
        if pos == size:
            self.receive(data)
        elif not pos:
            self.unread = data
        elif self.receive(data[:pos]):
            self.unread = data[pos:]

    def read_held(self) -> None:
        """The rest of a read data_received sliced, after the loop's turn."""
        data = self.held_read
        self.held_read = b""
        if data and not self.transport.is_closing():
            self.transport.resume_reading()  # what comes next is read after this
            self.data_received(data)

    def receive(self, data: bytes) -> bool:
        """Handle one slice of a read. False: the connection has ended (the rest unread)."""
        try:
            if self.settings_seen and not self.closing:
                taken = self.take_frames(data)
                if taken == len(data) or self.transport.is_closing():
                    if self.starting and not self.held_read:
                        self.start_streams()
                    self.write_out()
                    return not self.transport.is_closing()
                if taken:
                    data = data[taken:]
            # Any: compiled, the events' fields are then read without a check of their type
            # for each, which their classes (h2's, interpreted) would not make faster.
            events: list[Any] = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.info("HTTP/2 protocol error from %s: %s", self.peer.address, exc)
            self.write_out()  # the GOAWAY h2 has queued
            self.close()
            return False
        if not self.settings_seen and events:
            if type(events[0]) is not RemoteSettingsChanged:
                # RFC 9113 3.4: the preface ends with SETTINGS; anything else is no preface.
                log.info("HTTP/2 client %s sent no SETTINGS first", self.peer.address)
                self.h2.data_to_send()  # nothing h2 answered on its own goes out
                self.go_away(ErrorCodes.PROTOCOL_ERROR)
                self.close()
                return False
            self.settings_seen = True
        buffered = self.h2.incoming_buffer._data
        if len(buffered) >= 9 and int.from_bytes(buffered[:3]) > self.h2.max_inbound_frame_size:
            # h2 checks a frame's length once the whole frame is in; its 9-byte header is
            # enough to refuse it (HTTP/1.1 after the preface reads as a 4 MB frame).
            log.info("HTTP/2 frame over the frame size from %s", self.peer.address)
            self.go_away(ErrorCodes.FRAME_SIZE_ERROR)
            self.close()
            return False
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                self.request_received(event.stream_id, event.headers,
                                      event.stream_ended is not None)
                continue
            if kind is StreamReset:
                self.stream_reset(event.stream_id)
                if self.transport.is_closing():
                    return False  # cut for rapid reset: nothing more of this read is handled
                continue
            if kind is DataReceived:
                if self.starting:
                    self.start_streams()  # a stream's start comes before its body
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ex.received(event.data, event.flow_controlled_length)
                else:  # a stream already answered and forgotten: the connection's share
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                if event.stream_ended is not None:
                    self.stream_ended(event.stream_id)
            elif kind is StreamEnded:
                self.stream_ended(event.stream_id)
            elif kind is WindowUpdated:
                self.window_updated(event.stream_id)
            elif kind is TrailersReceived:
                if event.stream_ended is not None:
                    self.stream_ended(event.stream_id)
            elif kind is PingReceived or kind is RemoteSettingsChanged:
                if not self.spend_control():
                    return False
                if kind is RemoteSettingsChanged:
                    self.remote_window = self.h2.remote_settings.initial_window_size
                    self.window_updated(0)  # an INITIAL_WINDOW_SIZE change moves windows
            elif kind is ConnectionTerminated:
                if event.error_code:
                    self.abort()
                    return False
                self.closing = True  # streams in flight run to their end; no new ones
        if self.starting and not self.held_read:
            self.start_streams()
        self.write_out()
        if self.closing and not self.streams:
            self.close()
        return not self.transport.is_closing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.plane.connections.discard(self)
        self.cancel_timer()
        streams, self.streams = self.streams, {}
        self.starting = []
        self.held_read = b""
        for ex in streams.values():
            ex.abandon()
        free_h2(self.h2)

    def pause_writing(self) -> None:
        self.write_paused = True
        for ex in self.streams.values():
            if ex.upstream is not None:
                ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for ex in self.streams.values():
            if ex.upstream is not None and ex.pending_bytes <= RESPONSE_HIGH_WATER:
                ex.upstream.resume_reading()

    def eof_received(self) -> bool | None:
        self.transport.uncork()
        return None

    # --- events -----------------------------------------------------------------------------

    def take_frames(self, data: bytes) -> int:
        """Take the frames at the start of ``data`` (whole frames, see data_received) that
        are the usual ones in their usual shape: HEADERS that open new streams (see
        malformed; with or without priority), DATA of a request body, WINDOW_UPDATE and
        RST_STREAM; how many bytes they are. What follows them is h2's, and all of it is
        while h2 holds part of a header block (CONTINUATION to come)."""
        h2 = self.h2
        state = self.h2_machine.state
        if state is not SERVER_OPEN and state is not NO_STREAM_YET:
            return 0
        if h2.incoming_buffer._headers_buffer:
            return 0
        end = len(data)
        pos = 0
        while pos + 9 <= end:
            size = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            start = pos + 9
            flags = data[pos + 4]
            kind = data[pos + 3]
            if size > h2.max_inbound_frame_size or start + size > end:
                break  # h2's FRAME_SIZE_ERROR
            stream_id = ((data[pos + 5] & 0x7F) << 24 | data[pos + 6] << 16
                         | data[pos + 7] << 8 | data[pos + 8])
            if kind == HEADERS_FRAME:
                if flags & ~(END_STREAM_FLAG | PRIORITY_FLAG) != END_HEADERS_FLAG:
                    break
                block = start
                if flags & PRIORITY_FLAG:  # as browsers send them: skipped, as h2 does
                    block += 5
                    if block > start + size or stream_id == (
                            (data[start] & 0x7F) << 24 | data[start + 1] << 16
                            | data[start + 2] << 8 | data[start + 3]):
                        break  # h2's error: too short, or a stream depending on itself
                if not self.open_stream(stream_id, data[block:start + size],
                                        flags & END_STREAM_FLAG != 0):
                    break
            elif kind == DATA_FRAME:
                if (flags & ~END_STREAM_FLAG
                        or not self.request_data(stream_id, data[start:start + size],
                                                 flags & END_STREAM_FLAG != 0)):
                    break
            elif kind == WINDOW_UPDATE_FRAME:
                if size != 4 or not self.window_update(
                        stream_id, int.from_bytes(data[start:start + 4])):
                    break
            elif kind == RST_STREAM_FRAME:
                if size != 4 or not self.reset_received(stream_id):
                    break
                if self.transport.is_closing():
                    return start + size  # cut for rapid reset: the rest is not handled
            else:
                break
            pos = start + size
        return pos

    def reset_received(self, stream_id: int) -> bool:
        """A RST_STREAM for a stream not yet closed, as h2 takes it (whatever its error
        code). False: left to h2 (a stream closed, idle or 0)."""
        stream = self.h2_streams.get(stream_id)
        if stream is None:
            return False
        machine = stream.state_machine
        state = machine.state
        if state is not OPEN and state is not HALF_CLOSED_REMOTE and state is not HALF_CLOSED_LOCAL:
            return False
        machine.stream_closed_by = CLOSED_BY_RESET
        machine.state = CLOSED
        self.stream_reset(stream_id)
        return True

    def request_data(self, stream_id: int, data: bytes, ended: bool) -> bool:
        """A DATA frame (unpadded) of a request body still coming, as h2 takes it when it
        is valid: within both windows and the declared content-length. False: left to h2
        (all else, errors among them)."""
        if self.starting:
            self.start_streams()  # a stream's start comes before its body
        ex = self.streams.get(stream_id)
        if ex is None:
            return False
        h2 = self.h2
        stream = self.h2_streams.get(stream_id)
        if stream is None or stream.state_machine.state is not OPEN:
            return False
        size = len(data)
        if not take_within_windows(h2, stream, size, ended):
            return False
        if ended:
            stream.state_machine.state = HALF_CLOSED_REMOTE  # RECV_END_STREAM
        ex.received(data, size)
        if ended:
            self.stream_ended(stream_id)
        return True

    def window_update(self, stream_id: int, increment: int) -> bool:
        """A WINDOW_UPDATE, as h2 takes it when it is valid (a window it leaves within
        2^31-1), for the connection or a stream that can still send (the held data it makes
        room for goes out), or for a stream gone. False: left to h2 (all else, errors among
        them)."""
        if not 0 < increment <= MAX_WINDOW:  # the reserved bit set, say: h2's error
            return False
        h2 = self.h2
        if not stream_id:
            window = h2.outbound_flow_control_window + increment
            if window > MAX_WINDOW:
                return False
            h2.outbound_flow_control_window = window
        else:
            stream = self.h2_streams.get(stream_id)
            if stream is None:
                # A stream already closed and forgotten (an update sent before the client read
                # the end of its answer): h2 ignores it, as RFC 9113 6.9 allows.
                return bool(stream_id & 1) and stream_id <= h2.highest_inbound_stream_id
            state = stream.state_machine.state
            window = stream.outbound_flow_control_window + increment
            if (state is not OPEN and state is not HALF_CLOSED_REMOTE) or window > MAX_WINDOW:
                return False
            stream.outbound_flow_control_window = window  # RECV_WINDOW_UPDATE: no change
        self.window_updated(stream_id)
        return True

    def open_stream(self, stream_id: int, block: bytes, ended: bool) -> bool:
        """A new stream's request, as h2 would take it (see malformed). False: left to h2
        (not a new stream, or one over the limit, which h2 refuses)."""
        h2 = self.h2
        streams = self.h2_streams
        if (not stream_id & 1 or stream_id <= h2.highest_inbound_stream_id
                or len(streams) >= self.settings.max_concurrent_streams):
            return False
        try:
            fields = decoded_fields(h2.decoder, block)
            headers = fields if fields is not None else list(_decode_headers(h2.decoder, block))
            problem = malformed(headers)
            if problem:
                raise ProtocolError(f"malformed request: {problem}")
        except ProtocolError as exc:
            h2._terminate_connection(exc.error_code)  # GOAWAY, as h2's receive_data does
            raise
        machine = self.h2_machine
        if machine.state is NO_STREAM_YET:
            machine.state = SERVER_OPEN  # RECV_HEADERS, the connection's first
        stream = new_h2_stream(stream_id, h2.config, self.local_window, self.remote_window,
                               h2.max_outbound_frame_size)
        streams[stream_id] = stream
        h2.highest_inbound_stream_id = stream_id
        request_headers_in(stream.state_machine, ended)
        self.request_received(stream_id, headers, ended)
        if not ended:
            ex = self.streams.get(stream_id)
            if ex is not None and not ex.chunked:
                # h2 refuses a body longer or shorter than its content-length.
                stream._expected_content_length = ex.content_length
        return True

    def request_received(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                         stream_ended: bool) -> None:
        if self.closing:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.opened += 1
        ex = Http2Exchange(self, stream_id)
        self.streams[stream_id] = ex
        if not ex.take_request(headers, stream_ended):
            self.streams.pop(stream_id, None)
            self.h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if ex.has_body:
            self.open_window(stream_id, BODY_WINDOW - DEFAULT_WINDOW)
        self.starting.append(ex)

    def start_streams(self) -> None:
        """Start the streams the frames handled so far opened: routed, and an upstream
        connection asked for. Not as each opens, but at the end of the read that opened them
        (before, when a frame of their body or their end comes): a stream reset in the same
        read (rapid reset's every one) then costs no upstream work, nor a connection opened
        and closed."""
        starting = self.starting
        self.starting = []
        if self.transport.is_closing():
            return  # cut: connection_lost abandons them
        streams = self.streams
        for ex in starting:
            if streams.get(ex.stream_id) is ex:
                ex.start()

    def stream_ended(self, stream_id: int) -> None:
        ex = self.streams.get(stream_id)
        if ex is not None and not ex.request_complete:
            if self.starting:
                self.start_streams()  # a stream's start comes before its end
            ex.on_request_complete()
            self.settle(ex)

    def window_updated(self, stream_id: int) -> None:
        if stream_id:
            ex = self.streams.get(stream_id)
            if ex is not None and ex.pending:
                ex.send_pending()
            return
        for ex in list(self.streams.values()):
            if ex.pending:
                ex.send_pending()

    def stream_reset(self, stream_id: int) -> None:
        ex = self.streams.get(stream_id)
        if ex is None:
            return
        ex.abandon()
        if perf_counter() - ex.started < PREMATURE_SECONDS:  # started: when it opened
            self.premature += 1
            if (self.opened >= PREMATURE_MIN_STREAMS and self.premature * 2 > self.opened):
                log.warning("HTTP/2 client %s reset %d of %d streams right after opening "
                            "them (rapid reset): connection closed, and the address refused "
                            "HTTP/2 for %.0fs", self.peer.address, self.premature, self.opened,
                            self.penalize())
                self.go_away(ErrorCodes.ENHANCE_YOUR_CALM)
                self.abort()
                return
        self.forget(ex)  # and close, if it was the last stream of a closing connection

    def spend_control(self) -> bool:
        now = self.loop.time()
        budget = min(CONTROL_BURST, self.control_budget
                     + (now - self.control_at) * CONTROL_PER_SECOND)
        self.control_at = now
        self.control_budget = budget - 1
        if budget >= 1:
            return True
        log.warning("HTTP/2 client %s sent SETTINGS or PING frames faster than %d a second: "
                    "connection closed, and the address refused HTTP/2 for %.0fs",
                    self.peer.address, int(CONTROL_PER_SECOND), self.penalize())
        self.go_away(ErrorCodes.ENHANCE_YOUR_CALM)
        self.abort()
        return False

    def penalize(self) -> float:
        """Cut for abuse: the address gets no connection for a while (see
        context.Penalties); returns how long. Not a trusted proxy's (``trusted_proxies``), nor
        a Unix socket's: every client behind it would pay for one."""
        self.plane.stats.limits.http2_abuse += 1
        if self.peer.trusted or self.peer.address == "unix":
            return 0.0
        return self.plane.penalties.penalize(self.peer.address, self.loop.time())

    # --- used by the streams ----------------------------------------------------------------

    def write_out(self) -> None:
        if self.h2._data_to_send:  # (data_to_send's call is the cost when it holds nothing)
            self.transport.write(self.h2.data_to_send())

    def write_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        """A frame framed by Weir, after what h2 holds."""
        write_frame(self.transport, self.h2, kind, flags, stream_id, payload)

    def open_window(self, stream_id: int, increment: int) -> None:
        """h2's increment_flow_control_window for a stream, done as h2 does it for one still
        receiving (OPEN) on an open connection: its window grows and a WINDOW_UPDATE goes out.
        Anything else, by h2."""
        h2 = self.h2
        stream = self.h2_streams.get(stream_id)
        if (stream is not None and stream.state_machine.state is OPEN
                and self.h2_machine.state is SERVER_OPEN):
            window = stream._inbound_window_manager
            size = window.current_window_size + increment
            if increment > 0 and size <= MAX_WINDOW:  # else h2's error
                window.current_window_size = size  # window_opened
                window.max_window_size = max(size, window.max_window_size)
                self.write_frame(WINDOW_UPDATE_FRAME, 0, stream_id, increment.to_bytes(4))
                return
        h2.increment_flow_control_window(increment, stream_id)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Credit ``size`` bytes back to the client's windows (a WINDOW_UPDATE once enough
        has been consumed; a closed stream's share goes to the connection alone): h2's
        acknowledge_received_data, done as h2 does it, with its window algorithm
        (window_credit) and the frames framed by Weir."""
        if size:
            h2 = self.h2
            increment = window_credit(h2._inbound_flow_control_window_manager, size)
            if increment:
                self.write_frame(WINDOW_UPDATE_FRAME, 0, 0, increment.to_bytes(4))
            stream = self.h2_streams.get(stream_id)
            if stream is None:
                return
            state = stream.state_machine.state
            if state is OPEN or state is HALF_CLOSED_REMOTE or state is HALF_CLOSED_LOCAL:
                increment = window_credit(stream._inbound_window_manager, size)
                if increment:
                    self.write_frame(WINDOW_UPDATE_FRAME, 0, stream_id, increment.to_bytes(4))

    def send_headers(self, stream_id: int, head: list[tuple[bytes, bytes]],
                     end_stream: bool) -> None:
        try:
            self.h2.send_headers(stream_id, head, end_stream=end_stream)
        except ProtocolError:  # a stream the client has reset meanwhile
            return
        self.write_out()

    def send_trailers(self, stream_id: int, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response's trailers (a gRPC call's status), ending the stream: encoded by Weir
        (see hpack_field) when h2 would send them as they are, else by h2, which normalizes
        them (lower-cases names, strips values) or refuses them as it does."""
        parts: list[bytes] = []
        for name, value in trailers:
            if (name[:1] == b":" or name in CONNECTION_SPECIFIC or name == b"te"
                    or name != name.lower() or (value and (
                        value[0] == 0x20 or value[0] == 0x09
                        or value[-1] == 0x20 or value[-1] == 0x09))):
                self.send_headers(stream_id, trailers, True)
                return
            hpack_field(parts, name, value)
        self.send_block(stream_id, b"".join(parts), True)

    def send_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """A response head Weir has encoded (see hpack_field): its HEADERS frame, and
        CONTINUATION frames for what does not fit in one."""
        h2 = self.h2
        stream = self.h2_streams.get(stream_id)
        if stream is None or self.h2_machine.state is CONNECTION_CLOSED:
            return  # a stream the client has reset meanwhile, or a connection ending
        try:
            response_headers_out(stream.state_machine, end_stream)
        except ProtocolError:  # a stream the client has reset meanwhile
            return
        table = h2.encoder.header_table
        if table.resized:  # the client's SETTINGS changed the table's size: said first
            block = h2.encoder._encode_table_size_change() + block
            table.resized = False
        flags = END_STREAM_FLAG if end_stream else 0
        frame = h2.max_outbound_frame_size
        if len(block) <= frame:
            self.write_frame(HEADERS_FRAME, flags | END_HEADERS_FLAG, stream_id, block)
            return
        self.write_frame(HEADERS_FRAME, flags, stream_id, block[:frame])
        for start in range(frame, len(block), frame):
            last = start + frame >= len(block)
            self.write_frame(CONTINUATION_FRAME, END_HEADERS_FLAG if last else 0, stream_id,
                             block[start:start + frame])

    def send_data(self, stream_id: int, pending: list[bytes], end: bool) -> int:
        """Send from ``pending`` what the stream's and the connection's windows take, in
        frames the client accepts; end the stream with the last of it when ``end``. Returns
        the bytes sent; ``pending`` keeps the rest."""
        h2 = self.h2
        stream = self.h2_streams.get(stream_id)
        if stream is None or self.h2_machine.state is CONNECTION_CLOSED:
            pending.clear()
            return 0
        try:
            return send_within_windows(self.transport, h2, stream, pending, end)
        except ProtocolError:  # the stream is closed (reset by the client, say)
            pending.clear()
            return 0

    def end_stream(self, stream_id: int) -> None:
        try:
            self.h2.end_stream(stream_id)
        except ProtocolError:  # a stream the client has reset meanwhile
            return
        self.write_out()

    def settle(self, ex: Http2Exchange) -> None:
        """Forget a stream once nothing more passes on it: its response has gone out whole
        and has been counted. A request still sending is told to stop with NO_ERROR (RFC 9113
        8.1: a complete response may come before the request is)."""
        if not ex.out_done or ex.response != FINISHED:
            return
        if not ex.request_complete:
            self.reset(ex, ErrorCodes.NO_ERROR)
        else:
            self.forget(ex)

    def reset(self, ex: Http2Exchange, code: int) -> None:
        """RST_STREAM, and the stream is forgotten; the caller settles the exchange."""
        with contextlib.suppress(ProtocolError):  # closed already
            self.h2.reset_stream(ex.stream_id, code)
        self.write_out()
        self.forget(ex)

    def forget(self, ex: Http2Exchange) -> None:
        stream_id = ex.stream_id
        if self.streams.get(stream_id) is ex:
            del self.streams[stream_id]
        h2_streams = self.h2_streams
        stream = h2_streams.get(stream_id)
        if stream is not None and stream.state_machine.state is CLOSED:
            # h2 would drop it when it next counts its open streams, which it does only for
            # the HEADERS it takes itself (see take_frames).
            del h2_streams[stream_id]
            closed_stream(self.h2, stream_id, stream.state_machine.stream_closed_by)
        if not self.streams:
            if self.closing:
                self.close()
            else:
                self.arm_idle_timer()

    # --- closing ----------------------------------------------------------------------------

    def go_away(self, code: int) -> None:
        """GOAWAY for an error: the connection closes next."""
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        self.write_out()

    def shutdown(self) -> None:
        """GOAWAY(NO_ERROR) with the last stream id: streams in flight finish, no new ones
        start. Framed here rather than by h2, which would then refuse to send their answers
        and take the client's next frame for an error."""
        if not self.closing:
            self.closing = True
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = self.h2.highest_inbound_stream_id
            goaway.error_code = ErrorCodes.NO_ERROR
            self.write_out()  # what h2 holds goes first
            self.transport.write(goaway.serialize())
        if not self.streams:
            self.close()

    def arm_idle_timer(self) -> None:
        """No stream is open: the connection is closed after idle_timeout without one. One
        timer is kept while streams come and go, and looks when it fires at how long the
        connection has been idle: a timer made and cancelled for each idle spell would cost
        every stream one."""
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.timer is None:
                self.timer = self.loop.call_later(self.settings.idle_timeout,
                                                  self.idle_timeout)

    def idle_timeout(self) -> None:
        self.timer = None
        if self.streams:
            return  # armed again when the last of them ends
        left = self.idle_since + self.settings.idle_timeout - self.loop.time()
        if left > 0:
            self.timer = self.loop.call_later(left, self.idle_timeout)
            return
        self.plane.stats.limits.idle_timeout += 1
        self.shutdown()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.cancel_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.cancel_timer()
        self.transport.abort()
