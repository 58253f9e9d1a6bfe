"""A small HTTP/2 client for the tests, on the h2 package: requests in parallel over one
connection, each answered on its own stream (trailers kept), response DATA acknowledged as it
is read unless told otherwise. The ``h2_client`` fixture in conftest.py hands them out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)


@dataclass
class Stream:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    reset: int | None = None


class H2Client:
    """A small HTTP/2 client over one connection, on the h2 package: requests in parallel,
    each answered on its own stream; response DATA acknowledged as it is read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, Stream] = {}
        self.window_open = asyncio.Event()
        self.terminated: Any = None
        self.slots = asyncio.Semaphore(50)  # under Weir's max_concurrent_streams
        self.ack_data = True  # acknowledge response DATA as it is read (a reader keeping up)
        self.conn.initiate_connection()
        self.flush()
        self.reading = asyncio.create_task(self.read())

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            if not data:
                break
            for event in self.conn.receive_data(data):
                stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
                if isinstance(event, ResponseReceived) and stream is not None:
                    head = dict(event.headers)
                    stream.status = int(head.pop(b":status"))
                    stream.headers = head
                elif isinstance(event, DataReceived) and stream is not None:
                    stream.body += event.data
                    if self.ack_data:
                        self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                            event.stream_id)
                elif isinstance(event, TrailersReceived) and stream is not None:
                    stream.trailers = dict(event.headers)
                    if event.stream_ended is not None:
                        stream.done.set()
                elif isinstance(event, StreamEnded) and stream is not None:
                    stream.done.set()
                elif isinstance(event, StreamReset) and stream is not None:
                    stream.reset = event.error_code
                    stream.done.set()
                elif isinstance(event, WindowUpdated):
                    self.window_open.set()
                elif isinstance(event, ConnectionTerminated):
                    self.terminated = event
            self.flush()
        for stream in self.streams.values():
            stream.done.set()

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """Within the windows Weir opens; stops when the stream ends early (an early answer
        and its RST_STREAM)."""
        done = self.streams[stream_id].done
        while body:
            if done.is_set():
                return
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window_open.clear()
                waiting = asyncio.ensure_future(self.window_open.wait())
                await asyncio.wait([waiting, asyncio.ensure_future(done.wait())], timeout=10,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                continue
            self.conn.send_data(stream_id, body[:window])
            body = body[window:]
            self.flush()
            await self.writer.drain()
        if not done.is_set():
            self.conn.end_stream(stream_id)
            self.flush()

    async def request(self, path: str, method: str = "GET", body: bytes | None = None,
                      headers: tuple[tuple[str, str], ...] = ()) -> Stream:
        async with self.slots:
            return await self.exchange(path, method, body, headers)

    async def exchange(self, path: str, method: str, body: bytes | None,
                       headers: tuple[tuple[str, str], ...]) -> Stream:
        stream_id = self.conn.get_next_available_stream_id()
        stream = self.streams[stream_id] = Stream()
        head = [(":method", method), (":scheme", "http"), (":authority", "app"),
                (":path", path), *headers]
        self.conn.send_headers(stream_id, head, end_stream=body is None)
        self.flush()
        if body is not None:
            await self.send_body(stream_id, body)
        await asyncio.wait_for(stream.done.wait(), 15)
        return stream

    async def close(self) -> None:
        self.reading.cancel()
        self.writer.close()
        await asyncio.gather(self.reading, return_exceptions=True)
