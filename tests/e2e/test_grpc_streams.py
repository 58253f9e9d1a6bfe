"""gRPC through a real `weir run` process: a 1 GiB server stream passes with the proxy's memory
flat (flow control holds at most a few windows per stream), and under `--workers 2` gRPC
calls pass and the supervisor's /metrics counts them by grpc-status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from ..conftest import poll, sample

MIB = 1 << 20


@pytest.fixture
async def grpc_server() -> AsyncIterator[int]:
    """A grpcio server: /t.S/Stream sends N MiB as 1 MiB messages (N in the request, as
    text), /t.S/Unary echoes, answering UNAVAILABLE to b"fail"."""

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        chunk = b"z" * MIB
        for _ in range(int(request)):
            yield chunk

    async def unary(request: bytes, context: Any) -> bytes:
        if request == b"fail":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")
        return request

    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


def grpc_service(port: int) -> list[dict[str, Any]]:
    return [{"name": "grpc", "versions": {"stable": {"upstreams": [f"127.0.0.1:{port}"],
                                                     "protocol": "h2c"}}}]


@pytest.mark.timeout(120)
async def test_a_gibibyte_stream_passes_with_flat_memory(weir_process, grpc_server: int):
    weir = await weir_process(grpc_service(grpc_server))
    peak = 0
    warm = 0
    received = 0
    async with aio.insecure_channel(f"127.0.0.1:{weir.port}") as channel:
        call = channel.unary_stream("/t.S/Stream")(b"1024")
        async for message in call:
            received += len(message)
            if received == 64 * MIB:
                warm = weir.rss_bytes()  # pools, buffers and the allocator warmed up
            elif received > 64 * MIB and received % (16 * MIB) == 0:
                peak = max(peak, weir.rss_bytes())
        assert await call.code() == grpc.StatusCode.OK
    assert received == 1024 * MIB
    # Flat: the last 960 MiB cost the proxy no more than a little noise over the first 64.
    assert peak - warm < 24 * MIB, (warm, peak)


@pytest.mark.timeout(60)
async def test_workers_carry_grpc_calls_and_the_supervisor_counts_their_statuses(
        weir_process, grpc_server: int):
    weir = await weir_process(grpc_service(grpc_server), args=("--workers", "2"))
    codes: dict[grpc.StatusCode, int] = {}
    async with aio.insecure_channel(f"127.0.0.1:{weir.port}") as channel:
        unary = channel.unary_unary("/t.S/Unary")
        for i in range(60):
            request = b"fail" if i % 4 == 0 else b"ok %d" % i
            try:
                assert await unary(request) == request
                code = grpc.StatusCode.OK
            except aio.AioRpcError as exc:
                code = exc.code()
            codes[code] = codes.get(code, 0) + 1
    assert codes == {grpc.StatusCode.OK: 45, grpc.StatusCode.UNAVAILABLE: 15}
    assert weir.api is not None

    def counted(text: str) -> bool:
        return (sample(text, "weir_grpc_responses_total", service="grpc", version="stable",
                       grpc_status="0") == 45
                and sample(text, "weir_grpc_responses_total", service="grpc",
                           version="stable", grpc_status="14") == 15)

    await poll(weir.api.metrics, counted, timeout=10, what="the workers' gRPC counts")
