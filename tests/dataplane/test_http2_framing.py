"""HTTP/2 framing that Weir does itself rather than h2 (dataplane/http2.py):

- responses: Weir frames a response's HEADERS, CONTINUATION and DATA frames and encodes its
  fields with HPACK. What clients decode is what the upstream sent, whatever the head's size,
  its status, its names, and whatever the client's HPACK table size; answers framed by h2
  (Weir's own) on the same connection decode too.
- requests: Weir takes the HEADERS frames that open streams. A header list it takes is one h2
  takes, and one it refuses is one h2 refuses (``malformed`` against h2's validation, on
  thousands of lists); a body is held to its content-length as h2 holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import random
import re
import shutil
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from h2.stream import H2Stream, H2StreamStateMachine, StreamInputs
from h2.windows import WindowManager
from hpack import Decoder, Encoder
from hpack.exceptions import OversizedHeaderListError
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy.dataplane.http2 import (
    BODY_WINDOW,
    DEFAULT_WINDOW,
    H2_CONFIG,
    PREFACE,
    data_out,
    decoded_fields,
    end_stream_out,
    malformed,
    new_h2_stream,
    request_headers_in,
    response_headers_out,
    window_credit,
)

from ..conftest import one_service, wait_for

BIG = "v" * 10_000  # two of these make a head over the 16 KiB frame size


async def odd_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive HTTP/1.1: /big answers a head of 20 KB and more, /odd a status and names
    no static table has, anything else a plain 200."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        path = head.split(b" ", 2)[1]
        if path == b"/big":
            lines = f"HTTP/1.1 200 OK\r\nX-Big-One: {BIG}\r\nX-Big-Two: {BIG}\r\n"
        elif path == b"/odd":
            lines = ("HTTP/1.1 418 I'm a teapot\r\nX-Odd-Name: odd value\r\nServer: raw\r\n"
                     f"X-Long-Value: {'w' * 300}\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n")
        else:
            lines = "HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Type: text/plain\r\n"
        body = b"body of " + path
        writer.write(lines.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
    writer.close()


class Client:
    """h2 as a client, keeping every frame it was sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 table_size: int | None) -> None:
        self.reader, self.writer = reader, writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if table_size is not None:
            self.conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: table_size})
        self.frames: list[Frame] = []
        self.buffer = b""

    async def get(self, path: str, method: str = "GET") -> tuple[list[tuple[bytes, bytes]],
                                                                  bytes]:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", method), (":scheme", "http"),
                                           (":authority", "app"), (":path", path)],
                               end_stream=True)
        self.writer.write(self.conn.data_to_send())
        headers: list[tuple[bytes, bytes]] = []
        body = b""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "connection closed"
            self.keep_frames(data)
            ended = False
            for event in self.conn.receive_data(data):
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, ResponseReceived):
                    headers = list(event.headers)
                elif isinstance(event, DataReceived):
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        stream_id)
                elif isinstance(event, StreamEnded):
                    ended = True
            self.writer.write(self.conn.data_to_send())
            if ended:
                return headers, body

    def keep_frames(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
            if len(self.buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self.buffer[9:9 + length]))
            self.frames.append(frame)
            self.buffer = self.buffer[9 + length:]


async def connect(port: int, table_size: int | None = None) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Client(reader, writer, table_size)


async def test_a_head_over_the_frame_size_goes_out_in_continuation_frames(raw_backend,
                                                                         start_proxy):
    port = await raw_backend(odd_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    client = await connect(proxy.port)
    headers, body = await client.get("/big")
    assert dict(headers)[b"x-big-one"] == BIG.encode()
    assert dict(headers)[b"x-big-two"] == BIG.encode()
    assert dict(headers)[b":status"] == b"200" and body == b"body of /big"
    kinds = [type(f) for f in client.frames if f.stream_id == 1]
    assert kinds[:2] == [HeadersFrame, ContinuationFrame]
    assert all(f.body_len <= 16384 for f in client.frames)
    # And the connection goes on.
    headers, body = await client.get("/after")
    assert dict(headers)[b":status"] == b"200" and body == b"body of /after"


async def test_statuses_and_names_beyond_the_static_table_decode_as_sent(raw_backend,
                                                                         start_proxy):
    port = await raw_backend(odd_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    client = await connect(proxy.port)
    for _ in range(2):  # the second time, from the names Weir has learnt
        headers, body = await client.get("/odd")
        assert headers[0] == (b":status", b"418")
        assert (b"x-odd-name", b"odd value") in headers and (b"server", b"raw") in headers
        assert (b"x-long-value", b"w" * 300) in headers
        assert [v for n, v in headers if n == b"set-cookie"] == [b"a=1", b"b=2"]
        assert (b"via", b"1.1 weir") in headers and body == b"body of /odd"


@pytest.mark.parametrize("table_size", [0, 256, None])
async def test_answers_framed_by_weir_and_by_h2_share_a_connection(raw_backend, start_proxy,
                                                                  table_size: int | None):
    """Weir's own answers (a 405 to TRACE here) go through h2's encoder, which indexes
    fields; the upstream's do not. Whatever the client's table size, both decode, and a
    smaller table is announced at the start of the next header block (RFC 7541 4.2)."""
    port = await raw_backend(odd_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    client = await connect(proxy.port, table_size)
    for i in range(3):
        headers, body = await client.get(f"/p{i}")
        assert dict(headers)[b":status"] == b"200" and body == f"body of /p{i}".encode()
        assert dict(headers)[b"content-type"] == b"text/plain"
        headers, _ = await client.get("/t", method="TRACE")
        assert dict(headers)[b":status"] == b"405"
        assert dict(headers)[b"content-type"] == b"text/plain; charset=utf-8"


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="needs nghttp (nghttp2-client)")
@pytest.mark.parametrize("table_size", ["0", "100"])
async def test_nghttp_with_a_small_table_decodes_every_answer(raw_backend, start_proxy,
                                                              table_size: str):
    """nghttp2's decoder insists on the table size update after it makes its table smaller."""
    port = await raw_backend(odd_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    url = f"http://127.0.0.1:{proxy.port}"
    process = await asyncio.create_subprocess_exec(
        "nghttp", "-n", "-s", "-c", table_size, f"{url}/a", f"{url}/big", f"{url}/odd",
        f"{url}/b", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 20)
    text = out.decode() + err.decode()
    assert process.returncode == 0, text
    assert "error" not in text.lower(), text  # COMPRESSION_ERROR, say
    # -s: a line per stream, "id responseEnd requestStart process code size path"
    codes = {line.split()[-1]: line.split()[-3] for line in text.splitlines()
             if re.match(r"\s*\d+\s+\+", line)}
    assert codes == {"/a": "200", "/big": "200", "/odd": "418", "/b": "200"}, text


# --- requests: malformed, against h2 ---------------------------------------------------------

Fields = list[tuple[bytes, bytes]]
BASE: Fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"),
                (b":path", b"/")]
ODD_FIELDS: Fields = [
    (b":method", b"POST"), (b":method", b"CONNECT"), (b":scheme", b"https"),
    (b":authority", b"other"), (b":path", b""), (b":path", b"/x"), (b":protocol", b"websocket"),
    (b":status", b"200"), (b":custom", b"x"), (b":", b"x"), (b"", b"x"),
    (b"host", b"app"), (b"host", b"other"), (b"te", b"trailers"), (b"te", b"TRAILERS"),
    (b"te", b"gzip"), (b"connection", b"close"), (b"keep-alive", b"1"), (b"upgrade", b"h2c"),
    (b"transfer-encoding", b"chunked"), (b"proxy-connection", b"x"),
    (b"content-length", b"12"), (b"content-length", b"1a"), (b"content-length", b""),
    (b"content-length", b" 5"), (b"X-Upper", b"x"), (b"x-upper", b"x"), (b"a:b", b"x"),
    (b"a b", b"x"), (b"a\x7f", b"x"), (b"a\xc3\xa9", b"x"), (b"x-v", b"a\r\nb"),
    (b"x-v", b"a\x00"), (b"x-v", b" lead"), (b"x-v", b"trail\t"), (b"x-v", b""),
    (b"x-v", b"in side"), (b"x-v", b"\xff\xfe"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
    (b"accept", b"*/*"), (b"x-ok!#$%&'*+-.^_`|~09", b"v"),
]


def h2_takes(fields: Fields) -> bool:
    """Whether h2, as Weir configures it, takes a request with this header list."""
    conn = H2Connection(H2_CONFIG)
    conn.initiate_connection()
    headers = HeadersFrame(1)
    headers.flags.add("END_HEADERS")
    headers.flags.add("END_STREAM")
    headers.data = Encoder().encode(fields, huffman=False)
    try:
        conn.receive_data(PREFACE + SettingsFrame(0).serialize() + headers.serialize())
    except ProtocolError:
        return False
    return True


def cases() -> list[Fields]:
    shuffled = random.Random(19)
    out: list[Fields] = [BASE]
    for field in ODD_FIELDS:  # each one added, and each one in place of a base field
        out.append([*BASE, field])
        for i in range(len(BASE)):
            out.append([*BASE[:i], field, *BASE[i + 1:]])
    for pair in itertools.combinations(ODD_FIELDS, 2):
        out.append([*BASE, *pair])
    for _ in range(1500):  # and lists in any order, of any of them
        fields = shuffled.sample(BASE + ODD_FIELDS, shuffled.randint(1, 8))
        out.append(fields)
    return out


def test_weir_refuses_exactly_the_request_header_lists_h2_refuses() -> None:
    differ = [(fields, malformed(fields)) for fields in cases()
              if (malformed(fields) == "") != h2_takes(fields)]
    assert not differ, differ[:5]


RECEIVED: list[bytes] = []


def hpack_result(decoder: Decoder, block: bytes) -> list[tuple[bytes, bytes]] | None:
    try:
        return [tuple(f) for f in decoder.decode(block, raw=True)]  # type: ignore[misc]
    except Exception:  # any refusal of hpack's
        return None


def table_state(decoder: Decoder) -> tuple[list[tuple[bytes, bytes]], int]:
    table = decoder.header_table
    return list(table.dynamic_entries), table._current_size


def test_indexed_fields_decode_as_hpack_does_or_are_left_to_it() -> None:
    """decoded_fields takes blocks of indexed fields: what it decodes is what hpack's decoder
    does, and a block it leaves is one hpack decodes or refuses."""
    shuffled = random.Random(7)
    encoder = Encoder()
    decoder = Decoder(max_header_list_size=1200)
    # Five entries in both dynamic tables (indexes 62-66), one of them 400 bytes long.
    first = [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-long", b"L" * 400), (b"x-c", b"3"),
             (b"x-d", b"4")]
    decoder.decode(encoder.encode(first), raw=True)
    codes = [0x80, 0x81, 0x82, 0x84, 0x88, 0xBD, 0xBE, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4,
             0xFE, 0xFF, 0x00, 0x0F, 0x40, 0x3F]
    taken = 0
    for _ in range(3000):
        block = bytes(shuffled.choice(codes) for _ in range(shuffled.randint(0, 6)))
        before = table_state(decoder)
        mine = decoded_fields(decoder, block)
        assert mine is not None or table_state(decoder) == before, block
        theirs = hpack_result(decoder, block)
        if mine is not None:
            taken += 1
            assert [tuple(f) for f in mine] == theirs, block
        elif all(0x81 <= c <= 0xFE for c in block) and theirs is not None:
            # Left to hpack only when over the list size.
            assert sum(32 + len(n) + len(v) for n, v in theirs) > 1200, block
    assert taken > 500


FIELD_NAMES = [b":method", b":path", b":authority", b"content-type", b"x-request-id",
               b"authorization", b"grpc-timeout", b"x-\xff", b"user-agent"]
FIELD_VALUES = [b"", b"GET", b"/", b"/a/b?c=d", b"example.com:8080", b"application/grpc",
                b"Bearer abc.def", b"\x00\xff\x80", bytes(range(256)), b"z" * 300]


def random_fields(rng: random.Random) -> list[Any]:
    fields: list[Any] = []
    for _ in range(rng.randint(0, 8)):
        name, value = rng.choice(FIELD_NAMES), rng.choice(FIELD_VALUES)
        fields.append(NeverIndexedHeaderTuple(name, value) if rng.random() < 0.2
                      else HeaderTuple(name, value))
    return fields


def decoder_like(decoder: Decoder) -> Decoder:
    """A decoder whose dynamic table is a copy of ``decoder``'s."""
    copy = Decoder()
    copy.max_header_list_size = decoder.max_header_list_size
    table = decoder.header_table
    copy.header_table.dynamic_entries = type(table.dynamic_entries)(table.dynamic_entries)
    copy.header_table._current_size = table._current_size
    return copy


def test_literal_fields_decode_as_hpack_does_and_the_tables_keep_in_step() -> None:
    """Blocks of every representation hpack's encoder makes (literals with and without
    indexing, never indexed, Huffman or not, new names and indexed ones, evictions from a small
    table) decode as hpack decodes them, and leave the dynamic table as hpack leaves it: two
    decoders fed the same blocks, one through decoded_fields, stay equal. A block over the
    list size is left to hpack (which refuses it: the connection's end, so both start again).
    Blocks cut short or with a byte changed are decoded as hpack decodes them from the same
    table, or left to it with the table untouched."""
    rng = random.Random(19)
    decoded = oversized = damaged_taken = 0
    for table_size in (4096, 256):
        encoder = mine_decoder = their_decoder = None
        for n in range(2000):
            if encoder is None or mine_decoder is None or their_decoder is None:
                encoder = Encoder()
                encoder.header_table_size = table_size
                mine_decoder, their_decoder = Decoder(), Decoder()
                for decoder in (mine_decoder, their_decoder):
                    decoder.max_header_list_size = 1000  # some blocks are over it
            block = encoder.encode(random_fields(rng), huffman=rng.random() < 0.5)
            if n % 3 == 0 and block:
                damaged = bytearray(block[:rng.randint(0, len(block) - 1)] if n % 2
                                    else block)
                if damaged:
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
                spare = decoder_like(mine_decoder)
                before = table_state(spare)
                mine = decoded_fields(spare, bytes(damaged))
                if mine is None:
                    assert table_state(spare) == before
                else:
                    damaged_taken += 1
                    check = decoder_like(mine_decoder)
                    assert [tuple(f) for f in mine] == hpack_result(check, bytes(damaged))
                    assert table_state(check) == table_state(spare)
            try:
                theirs = list(their_decoder.decode(block, raw=True))
            except OversizedHeaderListError:
                oversized += 1
                before = table_state(mine_decoder)
                assert decoded_fields(mine_decoder, block) is None
                assert table_state(mine_decoder) == before
                encoder = None
                continue
            mine = decoded_fields(mine_decoder, block)
            if mine is None:  # a table size update starts the block after a resize
                mine = list(mine_decoder.decode(block, raw=True))
            else:
                decoded += 1
            assert [tuple(f) for f in mine] == [tuple(f) for f in theirs]
            # Never-indexed fields stay so, for an encoder that passes them on.
            assert [isinstance(f, NeverIndexedHeaderTuple) for f in mine] == [
                isinstance(f, NeverIndexedHeaderTuple) for f in theirs]
            assert table_state(mine_decoder) == table_state(their_decoder)
    assert decoded > 3000 and oversized > 20 and damaged_taken > 100


# --- stream states moved by Weir, against h2's state machine ----------------------------------

SERVER_PATHS = [  # a server stream's life, as h2 takes the inputs
    [StreamInputs.RECV_HEADERS, StreamInputs.RECV_END_STREAM],
    [StreamInputs.RECV_HEADERS],
    [StreamInputs.RECV_HEADERS, StreamInputs.RECV_RST_STREAM],
    [StreamInputs.RECV_HEADERS, StreamInputs.RECV_END_STREAM, StreamInputs.SEND_RST_STREAM],
    [StreamInputs.RECV_HEADERS, StreamInputs.SEND_HEADERS],
    [StreamInputs.RECV_HEADERS, StreamInputs.RECV_END_STREAM, StreamInputs.SEND_HEADERS],
    [StreamInputs.RECV_HEADERS, StreamInputs.SEND_HEADERS, StreamInputs.SEND_END_STREAM],
    [StreamInputs.RECV_HEADERS, StreamInputs.RECV_END_STREAM, StreamInputs.SEND_HEADERS,
     StreamInputs.SEND_END_STREAM],
    # An answer's body sent: what comes next may be trailers (a gRPC call's status).
    [StreamInputs.RECV_HEADERS, StreamInputs.RECV_END_STREAM, StreamInputs.SEND_HEADERS,
     StreamInputs.SEND_DATA],
    [StreamInputs.RECV_HEADERS, StreamInputs.SEND_HEADERS, StreamInputs.SEND_DATA],
]


def replay(inputs: list[StreamInputs]) -> H2StreamStateMachine | None:
    machine = H2StreamStateMachine(1)
    try:
        for input_ in inputs:
            machine.process_input(input_)
    except ProtocolError:
        return None
    return machine


def weirs(machine: H2StreamStateMachine, step: str) -> H2StreamStateMachine | None:
    try:
        if step == "headers":
            response_headers_out(machine, False)
        elif step == "headers-end":
            response_headers_out(machine, True)
        elif step == "data":
            data_out(machine)
        else:
            end_stream_out(machine)
    except ProtocolError:
        return None
    return machine


STEPS = {"headers": [StreamInputs.SEND_HEADERS],
         "headers-end": [StreamInputs.SEND_HEADERS, StreamInputs.SEND_END_STREAM],
         "data": [StreamInputs.SEND_DATA], "end": [StreamInputs.SEND_END_STREAM]}


@pytest.mark.parametrize("path", SERVER_PATHS, ids=lambda p: "-".join(i.name for i in p))
@pytest.mark.parametrize("step", list(STEPS))
def test_weir_moves_a_stream_as_h2s_state_machine_does(path: list[StreamInputs], step: str):
    """After any of a server stream's usual histories, each input Weir gives a stream leaves
    it as h2's process_input does (state, who closed it, what was sent), or fails as it does."""
    start = replay(path)
    assert start is not None
    expected = replay([*path, *STEPS[step]])
    got = weirs(start, step)
    assert (vars(got) if got else None) == (vars(expected) if expected else None)


def test_a_stream_made_by_weir_is_the_stream_h2_makes() -> None:
    """new_h2_stream copies the attributes h2's three __init__ set: a new h2 release that
    adds one, or changes a default, fails here first."""
    config = H2Configuration(client_side=False)
    mine = new_h2_stream(7, config, 1000, 2000, 16384)
    theirs = H2Stream(7, config=config, inbound_window_size=1000, outbound_window_size=2000)
    theirs.max_outbound_frame_size = 16384
    for ours, h2s in ((mine, theirs), (mine.state_machine, theirs.state_machine),
                      (mine._inbound_window_manager, theirs._inbound_window_manager)):
        assert type(ours) is type(h2s)
        plain = {k: v for k, v in vars(h2s).items()
                 if k not in ("state_machine", "_inbound_window_manager")}
        assert {k: v for k, v in vars(ours).items() if k in plain} == plain
        assert vars(ours).keys() == vars(h2s).keys()
    other = new_h2_stream(9, config, 1000, 2000, 16384)
    assert other.state_machine is not mine.state_machine  # nothing shared between streams
    assert other._inbound_window_manager is not mine._inbound_window_manager


@pytest.mark.parametrize("ended", [True, False])
def test_a_new_streams_request_moves_it_as_h2s_state_machine_does(ended: bool):
    machine = H2StreamStateMachine(1)
    request_headers_in(machine, ended)
    expected = replay([StreamInputs.RECV_HEADERS, *([StreamInputs.RECV_END_STREAM] * ended)])
    assert expected is not None and vars(machine) == vars(expected)


async def body_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a GET; after a POST's head, keeps what follows until the connection closes."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            continue
        body = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while data := await asyncio.wait_for(reader.read(65536), 5):
                body += data
        RECEIVED.append(body)
        writer.close()
        return


@pytest.mark.parametrize("sent", [b"x" * 20, b"x" * 5], ids=["longer", "shorter"])
async def test_a_body_that_is_not_its_content_length_is_refused(raw_backend, start_proxy,
                                                               sent: bytes):
    """A client's body must match its content-length (RFC 9113 8.1.1): h2 refuses the DATA
    that breaks it, and none of the excess reaches the upstream."""
    RECEIVED.clear()
    port = await raw_backend(body_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                          validate_outbound_headers=False))
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                            (b":authority", b"app"), (b":path", b"/first")], end_stream=True)
    writer.write(client.data_to_send())
    answered = b""
    while not answered.endswith(b"ok"):  # the upstream connection is pooled: the POST's head
        answered += await asyncio.wait_for(reader.read(65536), 5)  # reaches it at once
    client.send_headers(3, [(b":method", b"POST"), (b":scheme", b"http"),
                            (b":authority", b"app"), (b":path", b"/up"),
                            (b"content-length", b"10")])
    client.send_data(3, sent, end_stream=True)
    writer.write(client.data_to_send())
    closed = b""
    while True:
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            break
        closed += data
    frames = []
    while len(closed) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(closed[:9]))
        frame.parse_body(memoryview(closed[9:9 + length]))
        frames.append(frame)
        closed = closed[9 + length:]
    assert any(type(f).__name__ == "GoAwayFrame" and f.error_code == 1 for f in frames), frames
    assert not any(type(f).__name__ == "DataFrame" and f.stream_id == 3 for f in frames)
    writer.close()
    await wait_for(lambda: RECEIVED, timeout=5)
    assert RECEIVED == [b""]  # the head alone: the DATA that broke the length went nowhere


# --- WINDOW_UPDATE, taken by Weir or left to h2 --------------------------------------------------


class Raw:
    """Frames written by hand, after a preface (and SETTINGS) Weir has read on its own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""
        self.encoder = Encoder()

    @classmethod
    async def connect(cls, port: int, initial_window: int = 65535) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        settings = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: initial_window})
        writer.write(PREFACE + settings.serialize())
        await raw.frame_of(SettingsFrame)  # Weir's: the preface is read
        writer.write(SettingsFrame(0, flags=["ACK"]).serialize())
        return raw

    def request(self, stream_id: int, path: str) -> bytes:
        frame = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM"])
        frame.data = self.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"),
                                          (b":authority", b"app"),
                                          (b":path", path.encode())])
        return frame.serialize()

    @staticmethod
    def window_update(stream_id: int, increment: int) -> bytes:
        return (4).to_bytes(3) + b"\x08\x00" + stream_id.to_bytes(4) + increment.to_bytes(4)

    async def frames(self) -> list[Frame]:
        """The frames Weir sends until it closes the connection."""
        out: list[Frame] = []
        while True:
            frame = await self.next_frame()
            if frame is None:
                return out
            out.append(frame)

    async def frame_of(self, kind: type[Frame]) -> Frame:
        while True:
            frame = await self.next_frame()
            assert frame is not None, f"closed before a {kind.__name__}"
            if isinstance(frame, kind):
                return frame

    async def next_frame(self) -> Frame | None:
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9:9 + length]))
                    self.buffer = self.buffer[9 + length:]
                    return frame
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                return None
            self.buffer += data


async def sized_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """/size/N answers N bytes."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        size = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"w" * size)
        await writer.drain()


async def test_window_updates_let_held_answers_out_to_the_last_byte(raw_backend, start_proxy):
    """Answers held for a client whose windows start at 100 bytes go out as its
    WINDOW_UPDATEs (in reads with new requests) open them, never past either window."""
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port, initial_window=100)
    raw.writer.write(raw.request(1, "/size/1000") + raw.request(3, "/size/700"))
    got = {1: 0, 3: 0}
    windows = {0: 65535, 1: 100, 3: 100}
    while got != {1: 1000, 3: 700}:
        frame = await raw.frame_of(DataFrame)
        got[frame.stream_id] += len(frame.data)
        windows[0] -= len(frame.data)
        windows[frame.stream_id] -= len(frame.data)
        assert min(windows.values()) >= 0, windows
        if windows[frame.stream_id] == 0 and got[frame.stream_id] < 1000:
            windows[frame.stream_id] += 150
            raw.writer.write(raw.window_update(frame.stream_id, 150)
                             + raw.window_update(0, 150))
            windows[0] += 150
    assert got == {1: 1000, 3: 700}


@pytest.mark.parametrize(("stream_id", "increments", "error"), [
    (0, [2**31 - 65535], "goaway-flow"),             # the connection's window over 2^31-1
    (0, [0], "goaway-protocol"),                     # no increment
    (0, [2**31 + 5], "goaway-protocol"),             # the reserved bit set
    (1, [2**31 - 100, 70_000], "reset-flow"),        # a stream's over 2^31-1: that one only
    (2, [100], "goaway-protocol"),                   # a stream the server never opened
    (9, [100], "goaway-protocol"),                   # nor the client
])
async def test_a_window_update_h2_refuses_is_refused_the_same(raw_backend, start_proxy,
                                                             stream_id: int,
                                                             increments: list[int], error: str):
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port, initial_window=0)  # the answer waits for a window
    raw.writer.write(raw.request(1, "/size/100000"))
    await raw.frame_of(HeadersFrame)
    for increment in increments:
        raw.writer.write(raw.window_update(stream_id, increment))
    if error == "reset-flow":
        reset = await raw.frame_of(RstStreamFrame)
        assert (reset.stream_id, reset.error_code) == (1, 3)  # FLOW_CONTROL_ERROR
        raw.writer.write(raw.request(3, "/size/0"))  # and the connection goes on
        headers = await raw.frame_of(HeadersFrame)
        assert headers.stream_id == 3
    else:
        frames = await raw.frames()
        goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert goaway and goaway[0].error_code == (3 if error == "goaway-flow" else 1), frames
    raw.writer.close()


async def test_a_window_update_for_a_stream_gone_is_ignored(raw_backend, start_proxy):
    """RFC 9113 6.9: a WINDOW_UPDATE can come for a stream that has just ended; h2 (and Weir)
    ignore it, and the requests read with it are served."""
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    raw.writer.write(raw.request(1, "/size/10"))
    assert (await raw.frame_of(DataFrame)).stream_id == 1
    raw.writer.write(raw.window_update(1, 10) + raw.request(3, "/size/20")
                     + raw.window_update(1, 10) + raw.request(5, "/size/30"))
    got = {}
    while len(got) < 2:
        frame = await raw.frame_of(DataFrame)
        got[frame.stream_id] = len(frame.data)
    assert got == {3: 20, 5: 30}
    raw.writer.close()


async def counting_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a chunked request body to its end, then answers with its size."""
    size = 0
    try:
        await reader.readuntil(b"\r\n\r\n")
        while length := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            await reader.readexactly(length + 2)
            size += length
        await reader.readexactly(2)
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    body = b"%d" % size
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()


async def test_a_request_body_gets_its_window_at_once(raw_backend, start_proxy):
    """A stream with a body to come gets BODY_WINDOW at once (a WINDOW_UPDATE for all but the
    initial window), and takes that much before Weir has acknowledged anything."""
    port = await raw_backend(counting_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    headers = HeadersFrame(1, flags=["END_HEADERS"])
    headers.data = raw.encoder.encode([(b":method", b"POST"), (b":scheme", b"http"),
                                       (b":authority", b"app"), (b":path", b"/up")])
    raw.writer.write(headers.serialize())
    update = await raw.frame_of(WindowUpdateFrame)
    while update.stream_id == 0:  # the connection's, at the start
        update = await raw.frame_of(WindowUpdateFrame)
    assert (update.stream_id, update.window_increment) == (1, BODY_WINDOW - DEFAULT_WINDOW)
    chunk = b"u" * 16384
    frames = [DataFrame(1, data=chunk).serialize() for _ in range(BODY_WINDOW // 16384)]
    raw.writer.write(b"".join(frames) + DataFrame(1, flags=["END_STREAM"]).serialize())
    answer = await raw.frame_of(DataFrame)
    assert answer.data == b"%d" % BODY_WINDOW
    raw.writer.close()


@pytest.mark.parametrize("size", [65535, 256 * 1024, 4 * 1024 * 1024, 100])
def test_window_credit_opens_windows_as_h2s_window_manager_does(size: int):
    """Bytes received and consumed in any order and size: window_credit gives the increments
    h2's process_bytes gives, and leaves the window as it does."""
    shuffled = random.Random(size)
    ours, theirs = WindowManager(size), WindowManager(size)
    owed = 0
    for _ in range(5000):
        if owed and shuffled.random() < 0.5:  # consume part of what was received
            consumed = shuffled.randint(1, owed)
            owed -= consumed
            expected = theirs.process_bytes(consumed) or 0
            assert window_credit(ours, consumed) == expected
        else:  # receive what the window takes, at most a frame
            if not theirs.current_window_size:
                continue
            received = shuffled.randint(1, min(theirs.current_window_size, 16384))
            theirs.window_consumed(received)
            ours.window_consumed(received)
            owed += received
        if shuffled.random() < 0.01:  # and opened on its own now and then
            theirs.window_opened(1000)
            ours.window_opened(1000)
        assert vars(ours) == vars(theirs)


async def echo_size_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answers each request with the size and a digest of its body (sized or
    chunked)."""
    while True:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            body = b""
            if match := re.search(rb"content-length: (\d+)", head):
                body = await reader.readexactly(int(match.group(1)))
            elif b"transfer-encoding: chunked" in head:
                while length := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                    body += (await reader.readexactly(length + 2))[:-2]
                await reader.readexactly(2)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        answer = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest()[:16].encode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer)
                     + answer)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_frames_cut_anywhere_across_reads_are_taken_whole(raw_backend, start_proxy,
                                                                seed: int):
    """GETs, POSTs with bodies in several DATA frames (declared or not) and WINDOW_UPDATEs,
    written a few bytes at a time: every frame cut across reads, headers and payloads alike.
    Each request is answered, each body arrives whole."""
    shuffled = random.Random(seed)
    port = await raw_backend(echo_size_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    stream = b""
    bodies: dict[int, bytes] = {}
    for i in range(12):
        stream_id = 2 * i + 1
        if i % 3 == 0:
            stream += raw.request(stream_id, "/get")
            bodies[stream_id] = b""
            continue
        body = bytes(shuffled.randrange(256) for _ in range(shuffled.randint(1, 40_000)))
        bodies[stream_id] = body
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"app"),
                  (b":path", b"/post")]
        if i % 3 == 1:
            fields.append((b"content-length", b"%d" % len(body)))
        headers = HeadersFrame(stream_id, flags=["END_HEADERS"])
        headers.data = raw.encoder.encode(fields)
        stream += headers.serialize() + raw.window_update(0, 100)
        while body:
            piece, body = body[:16384], body[16384:]
            stream += DataFrame(stream_id, data=piece,
                                flags=[] if body else ["END_STREAM"]).serialize()
    while stream:
        cut = shuffled.randint(1, 40)
        raw.writer.write(stream[:cut])
        stream = stream[cut:]
        await raw.writer.drain()
        await asyncio.sleep(0)  # a read of its own for each piece, as often as not
    answers: dict[int, bytes] = {}
    while len(answers) < len(bodies):
        frame = await raw.frame_of(DataFrame)
        answers[frame.stream_id] = answers.get(frame.stream_id, b"") + frame.data
    for stream_id, body in bodies.items():
        expected = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest()[:16].encode())
        assert answers[stream_id] == expected, stream_id
    raw.writer.close()


async def test_a_header_block_in_continuation_frames_cut_across_reads(raw_backend, start_proxy):
    """HEADERS without END_HEADERS and its CONTINUATION frames are h2's, cut anywhere; the
    requests around them are served."""
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    before = raw.request(1, "/size/1")  # encoded in the order sent: one HPACK table
    block = raw.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"),
                                (b":authority", b"app"), (b":path", b"/size/3"),
                                (b"x-long", b"l" * 3000)])
    first = HeadersFrame(3, flags=["END_STREAM"])
    first.data = block[:1000]
    middle = ContinuationFrame(3)
    middle.data = block[1000:2000]
    last = ContinuationFrame(3, flags=["END_HEADERS"])
    last.data = block[2000:]
    stream = (before + first.serialize() + middle.serialize() + last.serialize()
              + raw.request(5, "/size/5"))
    for cut in range(0, len(stream), 700):
        raw.writer.write(stream[cut:cut + 700])
        await raw.writer.drain()
        await asyncio.sleep(0)  # a read of its own for each piece, as often as not
    sizes = {}
    while len(sizes) < 3:
        frame = await raw.frame_of(DataFrame)
        sizes[frame.stream_id] = len(frame.data)
    assert sizes == {1: 1, 3: 3, 5: 5}
    raw.writer.close()


async def test_a_frame_over_the_frame_size_cut_across_reads_is_refused(raw_backend,
                                                                       start_proxy):
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    raw.writer.write(raw.request(1, "/size/1"))
    await raw.frame_of(DataFrame)
    header = (20_000).to_bytes(3) + b"\x00\x00" + (1).to_bytes(4)
    for piece in (header[:5], header[5:]):
        raw.writer.write(piece)
        await raw.writer.drain()
        await asyncio.sleep(0)
    frames = await raw.frames()
    goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[0].error_code == 6, frames  # FRAME_SIZE_ERROR


async def test_a_frame_over_the_frame_size_in_one_read_is_refused(raw_backend, start_proxy):
    """Whole in one read, the frame is not taken as the usual DATA it looks like."""
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    raw.writer.write(raw.request(1, "/size/1"))
    await raw.frame_of(DataFrame)  # the client's SETTINGS are in: Weir takes frames itself
    headers = HeadersFrame(3, flags=["END_HEADERS"])
    headers.data = raw.encoder.encode([(b":method", b"POST"), (b":scheme", b"http"),
                                       (b":authority", b"app"), (b":path", b"/size/1")])
    raw.writer.write(headers.serialize() + (20_000).to_bytes(3) + b"\x00\x00"
                     + (3).to_bytes(4) + b"d" * 20_000)
    frames = await raw.frames()
    goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaway and goaway[0].error_code == 6, frames  # FRAME_SIZE_ERROR


async def test_streams_opened_after_a_settings_change_get_the_new_window(raw_backend,
                                                                         start_proxy):
    """A client that makes its initial window smaller mid-connection: the streams it opens
    next (taken by Weir) start with the new window, not the one the connection began with."""
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    raw.writer.write(raw.request(1, "/size/10"))
    assert (await raw.frame_of(DataFrame)).stream_id == 1
    raw.writer.write(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 100})
                     .serialize())
    while "ACK" not in (await raw.frame_of(SettingsFrame)).flags:
        pass
    raw.writer.write(raw.request(3, "/size/1000"))  # a read of its own: Weir takes it
    first = await raw.frame_of(DataFrame)
    assert (first.stream_id, len(first.data)) == (3, 100)
    raw.writer.write(raw.window_update(3, 900))
    rest = b""
    while len(rest) < 900:
        rest += (await raw.frame_of(DataFrame)).data
    assert len(rest) == 900
    raw.writer.close()


@pytest.mark.parametrize("depends_on", [0, 1, 5])
async def test_headers_with_priority_as_browsers_send_them(raw_backend, start_proxy,
                                                          depends_on: int):
    """HEADERS with the PRIORITY flag (Chrome's and Firefox's every request) are taken; one
    whose stream depends on itself is h2's connection error."""
    port = await raw_backend(sized_upstream)
    proxy = await start_proxy(one_service(f"127.0.0.1:{port}"))
    raw = await Raw.connect(proxy.port)
    raw.writer.write(raw.request(1, "/size/1"))
    assert (await raw.frame_of(DataFrame)).stream_id == 1
    frames = b""
    for stream_id in (3, 5, 7):
        headers = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM", "PRIORITY"],
                               depends_on=depends_on, stream_weight=200, exclusive=True)
        headers.data = raw.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"),
                                           (b":authority", b"app"),
                                           (b":path", b"/size/%d" % stream_id)])
        frames += headers.serialize()
    raw.writer.write(frames)
    if depends_on == 5:
        got = await raw.frames()
        goaway = [f for f in got if isinstance(f, GoAwayFrame)]
        assert goaway and goaway[0].error_code == 1, got  # PROTOCOL_ERROR
        return
    sizes = {}
    while len(sizes) < 3:
        frame = await raw.frame_of(DataFrame)
        sizes[frame.stream_id] = len(frame.data)
    assert sizes == {3: 3, 5: 5, 7: 7}
    raw.writer.close()
