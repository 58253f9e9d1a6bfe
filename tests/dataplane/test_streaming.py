"""1 GiB up and 1 GiB down through a real Weir process whose memory must stay flat."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

from ..conftest import one_service, read_response

GIB = 1 << 30
MEMORY_GROWTH_LIMIT = 48 << 20  # bytes of RSS growth allowed while 1 GiB streams through


async def sample_peak_rss(weir, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, weir.rss_bytes())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return peak


async def test_1gib_upload_and_download_with_flat_memory(start_backend, weir_process):
    backend = await start_backend()
    weir = await weir_process(one_service(backend.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", weir.port)
    try:
        writer.write(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
        baseline = weir.rss_bytes()

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_peak_rss(weir, stop))
        chunk = bytes(range(256)) * 1024  # 256 KiB
        expected = hashlib.sha256()
        writer.write(b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % GIB)
        async with asyncio.timeout(120):
            for _ in range(GIB // len(chunk)):
                writer.write(chunk)
                expected.update(chunk)
                await writer.drain()
            upload = await read_response(reader)
        assert upload.status == 200
        assert upload.json()["body_size"] == GIB
        assert upload.json()["body_sha256"] == expected.hexdigest()

        writer.write(b"GET /stream?size=%d&length=1 HTTP/1.1\r\nHost: a\r\n\r\n" % GIB)
        async with asyncio.timeout(120):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            received = 0
            while received < GIB:
                piece = await reader.read(1 << 20)
                assert piece, "download ended early"
                received += len(piece)
        assert received == GIB
        stop.set()
        peak = await sampler
    finally:
        writer.close()
    growth = peak - baseline
    print(f"weir RSS: baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB")
    assert growth < MEMORY_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
