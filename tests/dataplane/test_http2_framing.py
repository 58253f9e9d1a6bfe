"""HTTP/2 response framing that Weir does itself (dataplane/http2.py frames a response's
HEADERS, CONTINUATION and DATA frames and encodes its fields with HPACK, rather than h2): what
clients decode is what the upstream sent, whatever the head's size, its status, its names, and
whatever the client's HPACK table size; answers framed by h2 (Weir's own) on the same
connection decode too."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame

from ..conftest import one_service

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
