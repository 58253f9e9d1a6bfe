"""gRPC through Weir, with real grpcio clients and servers (issue 19).

grpcio clients speak HTTP/2 cleartext with prior knowledge to Weir's normal port; each version
says ``protocol: h2c``, so Weir speaks HTTP/2 cleartext to the grpcio servers behind it. The
servers (grpc_harness.py) are generic handlers over raw bytes, each named after its version and
putting that name in every answer. Where the wire itself matters (a trailers-only response,
the headers an upstream is sent) a raw HTTP/2 client or upstream on the `h2` package looks at
the frames.

What is checked:
- unary, server-streaming (10,000 messages, intact and in order), client-streaming and
  interleaved bidi calls pass; initial and trailing metadata (custom ``x-trailer-*`` keys, a
  binary one, ``grpc-status`` and ``grpc-message`` of a non-OK status) arrive intact, and
  ``te: trailers`` reaches the upstream;
- ONE channel's unary calls follow the weights call by call, and a weight change through the
  admin API applies to the calls that follow on the same channel;
- what Weir answers itself to a gRPC request is a trailers-only gRPC response (HTTP 200,
  ``application/grpc``, ``grpc-status`` in the one HEADERS block, which ends the stream):
  14 UNAVAILABLE (no upstream), 4 DEADLINE_EXCEEDED (read timeout), 8 RESOURCE_EXHAUSTED
  (over max_body_bytes), 12 UNIMPLEMENTED (no route);
- ``weir_grpc_responses_total{service, version, grpc_status}`` counts what the servers
  answered, while ``http_requests_total`` counts the same calls as HTTP 200s;
- a client that stops reading one server stream stalls only that stream;
- unary calls are mirrored to a shadow version whose answers the client never sees.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from ..conftest import Scrape, StartWeir, free_port, poll, wait_for
from .grpc_harness import (
    UNARY,
    GrpcFleet,
    RawAnswer,
    RawGrpcUpstream,
    grpc_service,
    raw_grpc_call,
    settles,
    stream_message,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def fleet() -> AsyncIterator[GrpcFleet]:
    async with GrpcFleet() as servers:
        yield servers


def assert_trailers_only(answer: RawAnswer, code: grpc.StatusCode) -> None:
    """Weir's own answer to a gRPC request: HTTP 200, ``content-type: application/grpc``, and
    ``grpc-status`` in the one HEADERS block, which ends the stream (no DATA, no second
    block), as the gRPC over HTTP/2 spec's Trailers-Only response; not an HTTP error page."""
    assert answer.reset in (None, 0), answer  # NO_ERROR only, after a complete answer
    assert answer.status == 200, answer
    assert answer.headers.get("content-type", "").startswith("application/grpc"), answer
    assert answer.headers.get("grpc-status") == str(code.value[0]), answer
    assert answer.ended_by_headers, answer
    assert answer.data == b"" and answer.trailers is None, answer


# === the four kinds of call, with their metadata =================================================


async def test_a_unary_call_passes_with_its_initial_and_trailing_metadata_intact(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address})])
    client = fleet.client(live.port)

    big = os.urandom(1 << 20)  # 1 MiB each way, many times the HTTP/2 windows
    answer = await client.unary(big, metadata=[
        ("x-request-tag", "t-1"),
        ("x-initial-color", "blue"),
        ("x-trailer-one", "first"),
        ("x-trailer-two", "second value, with spaces"),
        ("x-trailer-blob-bin", b"\x00\x01\xfe\xff binary"),
    ])
    assert answer.code is grpc.StatusCode.OK, answer
    assert answer.body == b"stable:" + big
    assert answer.initial["x-server"] == "stable"
    assert answer.initial["x-initial-color"] == "blue"
    assert answer.trailing["x-server"] == "stable"
    assert answer.trailing["x-trailer-one"] == "first"
    assert answer.trailing["x-trailer-two"] == "second value, with spaces"
    assert answer.trailing["x-trailer-blob-bin"] == b"\x00\x01\xfe\xff binary"
    assert answer.details == ""
    # The request's metadata reached the server too.
    assert server.metadata[-1]["x-request-tag"] == "t-1"
    assert server.requests == [big]

    # A non-OK status: its code, its message (not ASCII, so percent-encoded on the wire as
    # grpc-message) and the custom trailers beside them.
    message = "précondition échouée: 50% done\nsecond line"
    failed = await client.unary(b"x", metadata=[
        ("x-want-status", str(grpc.StatusCode.FAILED_PRECONDITION.value[0])),
        ("x-want-message-bin", message.encode()),
        ("x-trailer-reason", "quota"),
        ("x-trailer-detail-bin", b"\x08\x96\x01"),
    ])
    assert failed.code is grpc.StatusCode.FAILED_PRECONDITION, failed
    assert failed.details == message
    assert failed.trailing["x-server"] == "stable"
    assert failed.trailing["x-trailer-reason"] == "quota"
    assert failed.trailing["x-trailer-detail-bin"] == b"\x08\x96\x01"
    assert dict(server.answered) == {0: 1, grpc.StatusCode.FAILED_PRECONDITION.value[0]: 1}


async def test_te_trailers_and_the_grpc_headers_reach_the_upstream(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """grpcio servers refuse a request without ``te: trailers`` (they reset the stream), so
    every passing call in this file shows it arrived; here a raw upstream shows the fields."""
    upstream = await RawGrpcUpstream().start()
    try:
        live = await weir([grpc_service({"stable": upstream.address})])
        client = fleet.client(live.port)
        answer = await client.unary(b"hello", metadata=[("x-request-tag", "t-2")])
        assert answer.code is grpc.StatusCode.OK, answer
        assert answer.body == b"raw:hello"
        assert len(upstream.requests) == 1
        fields = upstream.requests[0]
        headers = dict(fields)
        assert headers["te"] == "trailers", fields
        assert headers["content-type"] == "application/grpc", fields
        assert headers[":method"] == "POST" and headers[":path"] == UNARY, fields
        assert headers["x-request-tag"] == "t-2", fields
        assert [name for name, _ in fields].count("te") == 1, fields
    finally:
        await upstream.stop()


async def test_a_server_stream_of_10000_messages_arrives_intact_and_in_order(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address})])
    client = fleet.client(live.port)
    call = client.server_stream(10_000, size=32)
    received = [message async for message in call]
    assert await call.code() is grpc.StatusCode.OK
    assert len(received) == 10_000
    assert received == [stream_message(i, 32) for i in range(10_000)]
    assert dict(await call.initial_metadata())["x-server"] == "stable"
    assert server.sent == {1: 10_000}


async def test_a_client_stream_arrives_whole_and_gets_one_answer(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address})])
    client = fleet.client(live.port)
    messages = [os.urandom(size) for size in (0, 1, 100, 5_000, 70_000, 300_000)] * 50
    answer = await client.client_stream(messages)
    digest = hashlib.sha256(b"".join(messages)).hexdigest()
    assert answer == b"stable:%d:%s" % (len(messages), digest.encode())
    assert server.calls["ClientStream"] == 1


async def test_a_bidi_stream_answers_each_message_before_the_next_is_sent(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """Interleaved: the client sends one message and waits for its echo before the next, so
    nothing may sit buffered in Weir in either direction."""
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address})])
    client = fleet.client(live.port)
    call = client.bidi(timeout=15)
    for i in range(300):
        message = b"m%d:" % i + b"x" * (i * 37 % 2_000)
        await call.write(message)
        async with asyncio.timeout(5):
            echoed = await call.read()
        assert echoed == b"stable:" + message, i
    await call.done_writing()
    assert await call.read() is aio.EOF
    assert await call.code() is grpc.StatusCode.OK
    assert dict(await call.initial_metadata())["x-server"] == "stable"
    assert server.calls["Bidi"] == 1


# === weights, call by call on one channel (issue 19's "done when") ==============================


async def test_one_channel_follows_the_weights_and_a_weight_change_applies_to_the_next_calls(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """1,000 unary calls on ONE grpcio channel (one HTTP/2 connection) at 90/10 give the
    canary 10% +- 3%; after the weights are set to 50/50 through the admin API (what
    `weir set-weight svc stable=50 canary=50` sends), the next 1,000 on the same channel split
    50/50 +- 5%. Envoy and Istio pin a connection to one version (envoy#7004)."""
    stable, canary = await fleet.start("stable"), await fleet.start("canary")
    live = await weir([grpc_service({"stable": stable.address, "canary": canary.address},
                                    weights={"stable": 90, "canary": 10})])
    client = fleet.client(live.port)

    first = await client.unary_many(1000)
    assert {a.code for a in first} == {grpc.StatusCode.OK}
    served = client.served.copy()
    assert set(served) == {"stable", "canary"}, served
    assert abs(served["canary"] / 1000 - 0.10) <= 0.03, served
    assert stable.calls["Unary"] + canary.calls["Unary"] == 1000

    code, body = await live.api.call("PUT", "/api/services/svc/weights",
                                     {"weights": {"stable": 50, "canary": 50}})
    assert code == 200, body
    await poll(lambda: live.api.weights("svc"), lambda w: w == {"stable": 50, "canary": 50},
               timeout=5, what="the new weights")

    client.served.clear()
    second = await client.unary_many(1000)
    assert {a.code for a in second} == {grpc.StatusCode.OK}
    assert abs(client.served["canary"] / 1000 - 0.50) <= 0.05, client.served
    assert sum(client.served.values()) == 1000
    # Each answer came from the server it says (the body is the server's own).
    assert all(a.body == a.server.encode() + b":ping" for a in first + second)


async def test_calls_in_flight_finish_when_the_weights_move_away_from_their_version(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """Calls waiting on the canary when its weight goes to 0 (a rollback) are answered by it,
    whole: the version's HTTP/2 connection may stop taking new streams (GOAWAY), but the
    streams in flight finish (RFC 9113 6.8). New calls go to stable."""
    stable, canary = await fleet.start("stable"), await fleet.start("canary")
    live = await weir([grpc_service({"stable": stable.address, "canary": canary.address},
                                    weights={"stable": 0, "canary": 100})])
    client = fleet.client(live.port)
    assert (await client.unary(b"warm")).server == "canary"  # its connection is open
    slow = [asyncio.ensure_future(client.unary(b"slow-%d" % i, metadata=[("x-delay", "0.5")]))
            for i in range(20)]
    await wait_for(lambda: canary.calls["Unary"] == 21, timeout=5)  # all at the server
    code, body = await live.api.call("PUT", "/api/services/svc/weights",
                                     {"weights": {"stable": 100, "canary": 0}})
    assert code == 200, body
    answers = await asyncio.gather(*slow)
    assert [(a.code, a.server) for a in answers] == [(grpc.StatusCode.OK, "canary")] * 20, [
        (a.code, a.details) for a in answers]
    assert sorted(a.body for a in answers) == sorted(b"canary:slow-%d" % i for i in range(20))
    after = await client.unary_many(20)
    assert {(a.code, a.server) for a in after} == {(grpc.StatusCode.OK, "stable")}


# === Weir's own answers are gRPC answers =========================================================


async def test_no_reachable_upstream_is_unavailable_in_a_trailers_only_response(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
    live = await weir([grpc_service({"stable": closed})])
    client = fleet.client(live.port)
    answer = await client.unary(b"x")
    assert answer.code is grpc.StatusCode.UNAVAILABLE, answer
    assert answer.server == ""  # Weir answered, not a server
    assert_trailers_only(await raw_grpc_call(live.port, b"x"), grpc.StatusCode.UNAVAILABLE)


async def test_an_upstream_slower_than_the_read_timeout_is_deadline_exceeded(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    server = await fleet.start("stable", delay=5.0)
    live = await weir([grpc_service({"stable": server.address},
                                    timeouts={"read": "300ms"})])
    client = fleet.client(live.port)
    started = time.monotonic()
    answer = await client.unary(b"x", timeout=15)  # the client's own deadline is far off
    took = time.monotonic() - started
    assert answer.code is grpc.StatusCode.DEADLINE_EXCEEDED, answer
    assert took < 3, took  # Weir's 300 ms read timeout, not the client's 15 s deadline
    assert answer.server == ""
    assert_trailers_only(await raw_grpc_call(live.port, b"x"),
                         grpc.StatusCode.DEADLINE_EXCEEDED)
    assert server.calls["Unary"] == 2  # both calls reached the server, which was too slow


async def test_a_request_over_max_body_bytes_is_resource_exhausted(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address})],
                      limits={"max_body_bytes": 64 * 1024})
    client = fleet.client(live.port)
    answer = await client.unary(b"z" * 200_000)
    assert answer.code is grpc.StatusCode.RESOURCE_EXHAUSTED, answer
    assert answer.server == ""
    assert_trailers_only(await raw_grpc_call(live.port, b"z" * 200_000),
                         grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert server.calls["Unary"] == 0  # the server never got a whole message to answer
    after = await client.unary(b"small")  # the channel goes on
    assert after.code is grpc.StatusCode.OK and after.body == b"stable:small"


async def test_a_call_no_service_matches_is_unimplemented(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """No route: UNIMPLEMENTED (12), as Envoy answers a gRPC request no route matches (the
    method does not exist behind this authority), not UNAVAILABLE (which grpcio clients
    may retry)."""
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address}, hosts=("grpc.test",))])
    stray = fleet.client(live.port, authority="nowhere.test")
    answer = await stray.unary(b"x")
    assert answer.code is grpc.StatusCode.UNIMPLEMENTED, answer
    assert answer.server == ""
    assert_trailers_only(await raw_grpc_call(live.port, b"x", authority="nowhere.test"),
                         grpc.StatusCode.UNIMPLEMENTED)
    assert server.calls["Unary"] == 0
    routed = await fleet.client(live.port).unary(b"x")  # the right authority is served
    assert routed.code is grpc.StatusCode.OK and routed.server == "stable"


# === metrics ======================================================================================


async def test_grpc_statuses_are_counted_per_version_and_http_requests_total_stays_200(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    stable = await fleet.start("stable", fail_rate=0.25,
                               fail_code=grpc.StatusCode.UNAVAILABLE)
    canary = await fleet.start("canary", fail_rate=0.1, fail_code=grpc.StatusCode.INTERNAL)
    live = await weir([grpc_service({"stable": stable.address, "canary": canary.address},
                                    weights={"stable": 50, "canary": 50})])
    client = fleet.client(live.port)
    answers = await client.unary_many(400)
    # A few more statuses, asked for per call: NOT_FOUND and one with a message.
    for _ in range(7):
        answers.append(await client.unary(b"x", metadata=[("x-want-status", "5")]))
    answers.append(await client.unary(b"x", metadata=[("x-want-status", "3"),
                                                      ("x-want-message", "bad argument")]))
    total = len(answers)
    assert stable.answered[14] > 0 and canary.answered[13] > 0  # the mix is there
    assert sum(stable.answered.values()) + sum(canary.answered.values()) == total

    def counted(scrape: Scrape) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {"stable": {}, "canary": {}}
        for s in scrape.matching("weir_grpc_responses_total", service="svc"):
            if s.value:
                found[s.labels["version"]][s.labels["grpc_status"]] = int(s.value)
        return found

    expected = {"stable": stable.answered_by_status, "canary": canary.answered_by_status}
    scrape = await poll(live.scrape, lambda s: counted(s) == expected, timeout=5,
                        what=f"weir_grpc_responses_total == {expected}")
    assert scrape.types.get("weir_grpc_responses") == "counter"
    for version, server in (("stable", stable), ("canary", canary)):
        calls = sum(server.answered.values())
        # Every call was an HTTP 200, whatever its grpc-status.
        assert scrape.requests_by("svc", version) == {("POST", 200): calls}, version


# === flow control: a stalled reader stalls only its own stream ===================================


async def test_a_client_that_stops_reading_one_stream_stalls_only_that_stream(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """32 MiB of server stream the client does not read: the server is held back (its writes
    block: Weir does not buffer it whole), while other calls on the same channel (the same
    HTTP/2 connection to Weir) complete. Read at last, the stalled stream arrives intact."""
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address})])
    client = fleet.client(live.port)
    count, size = 2048, 16 * 1024
    stalled = client.server_stream(count, size=size, timeout=25)
    await wait_for(lambda: server.sent.get(1, 0) > 0, timeout=5)
    held_at = await settles(lambda: server.sent[1], quiet=0.3, timeout=10)
    assert held_at < count, "the whole stream went out to a client that reads nothing"

    async with asyncio.timeout(5):
        answer = await client.unary(b"meanwhile")
        other = client.server_stream(200, size=64)
        others = [message async for message in other]
    assert answer.code is grpc.StatusCode.OK and answer.body == b"stable:meanwhile"
    assert others == [stream_message(i, 64) for i in range(200)]
    assert await other.code() is grpc.StatusCode.OK
    assert server.sent[1] < count  # still held back after the others finished

    index = 0
    async for message in stalled:
        assert message == stream_message(index, size), index
        index += 1
    assert index == count
    assert await stalled.code() is grpc.StatusCode.OK


# === mirroring ====================================================================================


async def test_unary_calls_are_mirrored_to_a_shadow_whose_answers_the_client_never_sees(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    primary = await fleet.start("stable")
    shadow = await fleet.start("shadow", fail_rate=1.0, fail_code=grpc.StatusCode.INTERNAL)
    service: dict[str, Any] = grpc_service(
        {"stable": primary.address, "shadow": shadow.address},
        weights={"stable": 100, "shadow": 0},
        mirror=[{"version": "shadow", "methods": ["POST"]}])
    live = await weir([service])
    client = fleet.client(live.port)
    requests = [b"call-%d" % i for i in range(40)]
    answers = [await client.unary(request, metadata=[("x-request-tag", "m")])
               for request in requests]
    assert [a.code for a in answers] == [grpc.StatusCode.OK] * 40
    assert [a.body for a in answers] == [b"stable:" + r for r in requests]
    assert client.served == {"stable": 40}

    # Each copy is counted as the shadow answers it (it takes the calls as they come).
    await wait_for(lambda: sum(shadow.answered.values()) == 40, timeout=5)
    assert sorted(shadow.requests) == sorted(requests)  # the same calls, whole
    assert all(m.get("x-request-tag") == "m" for m in shadow.metadata)
    assert shadow.answered == {grpc.StatusCode.INTERNAL.value[0]: 40}
    assert primary.requests == requests


async def test_a_stream_idle_past_the_read_timeout_ends_with_deadline_exceeded(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """Once the answer has begun, the read timeout ends the call with grpc-status 4 in
    trailers, which the client reports as such, not with a reset it can only call
    INTERNAL; the messages before it arrive."""
    server = await fleet.start("stable")
    live = await weir([grpc_service({"stable": server.address},
                                    timeouts={"read": "300ms"})])
    client = fleet.client(live.port)
    call = client.bidi(timeout=15)
    await call.write(b"first")
    assert await call.read() == b"stable:first"
    started = time.monotonic()
    with pytest.raises(aio.AioRpcError) as ended:  # nothing more: Weir's timeout ends it
        await call.read()
    assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer in time" in (ended.value.details() or "")
    assert time.monotonic() - started < 3
    scrape = await live.scrape()
    assert scrape.value("weir_grpc_responses_total", service="svc", version="stable",
                        grpc_status="4") == 1
