"""Shadow traffic: copies of live requests sent to a shadow version, answers thrown away.

A real Weir (control plane, data plane, admin API) in front of real backends: aiohttp echo
backends that record every request, and hand-written shadows that are slow, refuse
connections or answer with another status. Counts are checked three ways: what the shadow
received, /metrics, and /api/status.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import websockets

from proxy.dataplane.mirror import MirrorPolicy, MirrorStats

from ..conftest import (
    Backend,
    RawHandler,
    StartWeir,
    Weir,
    WeirProcess,
    exchange,
    free_port,
    run_all,
    wait_for,
)

# --- helpers --------------------------------------------------------------------------------


def mirrored(primary: str, shadow: str, mirror: dict[str, Any] | list[dict[str, Any]],
             **extra: Any) -> list[dict[str, Any]]:
    """Service `app`: all traffic to `stable`, copies to `shadow` as `mirror` says."""
    return [{
        "name": "app",
        "versions": {"stable": {"upstreams": [primary]}, "shadow": {"upstreams": [shadow]}},
        "weights": {"stable": 100, "shadow": 0},
        "mirror": mirror if isinstance(mirror, list) else [mirror],
        **extra,
    }]


def policy(weir: Weir, service: str = "app", index: int = 0) -> MirrorPolicy:
    route = next(r for r in weir.control.proxy.table.routes if r.name == service)
    return route.mirrors[index]


def outcomes(weir: Weir, service: str = "app", version: str = "shadow") -> dict[str, int]:
    return dict(mirror_stats(weir, service, version).outcomes)


def mirror_stats(weir: Weir, service: str = "app", version: str = "shadow") -> MirrorStats:
    return weir.control.proxy.stats.for_mirror(service, version)


def settled(weir: Weir, copies: int, service: str = "app") -> Callable[[], bool]:
    """No copy in flight, and `copies` copies accounted for (whatever their outcome)."""
    return lambda: (policy(weir, service).inflight == 0
                    and sum(outcomes(weir, service).values()) == copies)


async def mirror_metrics(weir: Weir, version: str = "shadow") -> dict[str, float]:
    scrape = await weir.scrape()
    return {s.labels["outcome"]: float(s.value)
            for s in scrape.matching("weir_mirror_requests_total", service="app",
                                     version=version)}


def raw_http(seen: list[bytes], status: int = 200, body: bytes = b"shadow",
             delay: float = 0.0) -> RawHandler:
    """A keep-alive HTTP/1.1 server that records each request head (and reads its body),
    waits `delay`, then answers `status` with `body`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and int(value):
                        await reader.readexactly(int(value))
                seen.append(head)
                if delay:
                    await asyncio.sleep(delay)
                writer.write(b"HTTP/1.1 %d Whatever\r\ncontent-length: %d\r\n\r\n%b"
                             % (status, len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- (1) every GET is copied; the user sees only the primary; POST only when asked ------------


async def test_get_is_mirrored_to_the_shadow_and_the_user_sees_the_primary(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address,
                                  {"version": "shadow", "percent": 100}))
    replies = await run_all(lambda i=i: w.request(f"/get/{i}?q={i}") for i in range(20))
    for reply in replies:
        assert reply.status == 200
        assert reply.headers["x-weir-version"] == "stable"
        assert reply.headers["x-backend"] == "stable"
        assert json.loads(reply.body)["backend"] == "stable"
    await wait_for(lambda: len(shadow.requests) == 20, timeout=5)
    assert sorted(r["path"] for r in shadow.requests) == sorted(r["path"] for r in
                                                                 stable.requests)
    assert {r["method"] for r in shadow.requests} == {"GET"}
    await wait_for(settled(w, 20), timeout=5)
    assert await mirror_metrics(w) == {"success": 20, "error": 0, "timeout": 0, "dropped": 0}

    # POST is not mirrored by default (methods default to GET, HEAD, OPTIONS).
    for i in range(5):
        reply = await w.request(f"/post/{i}", method="POST", data=b"payload")
        assert reply.status == 200
    reply = await w.request("/barrier")
    assert reply.status == 200
    await wait_for(lambda: len(shadow.requests) == 21, timeout=5)
    await wait_for(settled(w, 21), timeout=5)
    assert all(r["method"] == "GET" for r in shadow.requests)
    assert len(stable.requests) == 26
    assert (await mirror_metrics(w))["success"] == 21

    # HEAD and OPTIONS are idempotent too, and copied.
    assert (await w.request("/head", method="HEAD")).status == 200
    assert (await w.request("/options", method="OPTIONS")).status == 200
    await wait_for(lambda: len(shadow.requests) == 23, timeout=5)
    await wait_for(settled(w, 23), timeout=5)
    assert [r["method"] for r in shadow.requests[-2:]] == ["HEAD", "OPTIONS"]
    assert await mirror_metrics(w) == {"success": 23, "error": 0, "timeout": 0, "dropped": 0}


async def test_post_is_mirrored_with_its_body_when_asked_up_to_max_body_bytes(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address,
                                  {"version": "shadow", "methods": ["post"],
                                   "max_body_bytes": 1024}))
    small = bytes(range(256)) * 3 + b"tail"  # 772 bytes

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"c" * 200  # 800 bytes, sent with Transfer-Encoding: chunked

    assert (await w.request("/small", method="POST", data=small)).status == 200
    assert (await w.request("/chunked", method="POST", data=chunked())).status == 200
    assert (await w.request("/empty", method="POST", data=b"")).status == 200
    await wait_for(lambda: len(shadow.requests) == 3, timeout=5)
    by_path = {r["path"]: r for r in shadow.requests}
    assert by_path["/small"]["method"] == "POST"
    assert by_path["/small"]["body_sha256"] == hashlib.sha256(small).hexdigest()
    assert by_path["/small"]["body_size"] == len(small)
    assert by_path["/chunked"]["body_sha256"] == hashlib.sha256(b"c" * 800).hexdigest()
    assert by_path["/chunked"]["headers"].get("content-length") == "800"
    assert "transfer-encoding" not in by_path["/chunked"]["headers"]
    assert by_path["/empty"]["body_size"] == 0

    # Over max_body_bytes: the user is served, the copy is dropped and counted.
    big = b"B" * 4096
    reply = await w.request("/big", method="POST", data=big)
    assert reply.status == 200 and json.loads(reply.body)["body_size"] == 4096
    # GET is not in `methods` any more.
    assert (await w.request("/get")).status == 200
    await wait_for(settled(w, 4), timeout=5)
    assert len(shadow.requests) == 3
    assert await mirror_metrics(w) == {"success": 3, "error": 0, "timeout": 0, "dropped": 1}


async def test_copies_over_max_queued_bytes_are_dropped_until_bytes_are_released(
        start_backend: Callable[..., Any],
        raw_backend: Callable[[RawHandler], Awaitable[int]], weir: StartWeir) -> None:
    stable = await start_backend("stable")
    seen: list[bytes] = []
    shadow_port = await raw_backend(raw_http(seen, delay=2.0))
    w = await weir(mirrored(stable.address, f"127.0.0.1:{shadow_port}",
                                  {"version": "shadow", "methods": ["POST"],
                                   "max_queued_bytes": 1000, "timeout": "300ms"}))
    # Three 600-byte copies at once: the first is held by the (slow) shadow, and the next
    # two would take the bytes held past 1000.
    replies = await run_all([lambda: w.request("/q", method="POST", data=b"q" * 600)] * 3)
    assert all(r.status == 200 for r in replies)
    assert outcomes(w)["dropped"] == 2
    assert policy(w).queued_bytes == 600
    await wait_for(settled(w, 3), timeout=3)
    assert outcomes(w) == {"success": 0, "error": 0, "timeout": 1, "dropped": 2}
    # The bytes are released when a copy ends: the next copy goes out.
    assert policy(w).queued_bytes == 0
    assert (await w.request("/q2", method="POST", data=b"q" * 600)).status == 200
    await wait_for(lambda: len(seen) == 2, timeout=3)
    assert seen[-1].startswith(b"POST /q2 ")


# --- a client leaving in the middle of its request body -------------------------------------


async def leave_mid_body(weir: Weir, stable: Backend, reset: bool) -> None:
    """Send a POST head and 10 of its 100 body bytes, wait until the primary has the request,
    then go away: with a FIN (close), or with a RST (SO_LINGER 0)."""
    _, writer = await asyncio.open_connection("127.0.0.1", weir.port)
    writer.write(b"POST /cut HTTP/1.1\r\nHost: app.test\r\ncontent-length: 100\r\n\r\n"
                 + b"x" * 10)
    await writer.drain()
    await wait_for(lambda: weir.control.proxy.pools.pools[stable.address].inflight == 1,
                   timeout=3)
    if reset:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
    writer.close()


async def assert_cut_request_settled(weir: Weir, stable: Backend) -> None:
    # The copy of a request whose body never arrived in full is dropped, promptly.
    await wait_for(lambda: outcomes(weir)["dropped"] == 1, timeout=1.5)
    assert outcomes(weir) == {"success": 0, "error": 0, "timeout": 0, "dropped": 1}
    scrape = await weir.scrape()
    # 499: the client closed the request; not a 5xx against the version.
    assert scrape.requests_by("app", "stable") == Counter({("POST", 499): 1})
    assert scrape.value("weir_upstream_timeouts_total", upstream=stable.address) == 0
    assert weir.control.proxy.pools.pools[stable.address].inflight == 0


CUT_CONFIG = {"version": "shadow", "methods": ["POST"]}


async def test_client_resetting_mid_body_drops_the_copy(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address, CUT_CONFIG),
                         upstream={"timeouts": {"read": "3s"}})
    await leave_mid_body(w, stable, reset=True)
    await assert_cut_request_settled(w, stable)
    assert shadow.requests == []


async def test_client_closing_mid_body_drops_the_copy(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address, CUT_CONFIG),
                         upstream={"timeouts": {"read": "3s"}})
    await leave_mid_body(w, stable, reset=False)
    await assert_cut_request_settled(w, stable)
    assert shadow.requests == []


# --- (2) percent ------------------------------------------------------------------------------


async def test_percent_mirrors_that_share_of_requests(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address,
                                  {"version": "shadow", "percent": 50}))
    replies = await run_all([(lambda i=i: w.request(f"/p/{i}")) for i in range(1000)],
                            concurrency=50)
    assert all(r.status == 200 for r in replies)
    await wait_for(lambda: policy(w).inflight == 0
                   and outcomes(w)["success"] == len(shadow.requests), timeout=5)
    copies = sum(outcomes(w).values())
    # Binomial(1000, 0.5): sd ~ 16, so +-100 is over six standard deviations.
    assert 400 <= copies <= 600, copies
    assert outcomes(w)["dropped"] == 0
    assert len(shadow.requests) == copies
    assert (await mirror_metrics(w))["success"] == copies


# --- (3) a slow shadow costs the users nothing -------------------------------------------------


async def test_slow_shadow_does_not_slow_users_and_excess_copies_are_dropped(
        start_backend: Callable[..., Any],
        raw_backend: Callable[[RawHandler], Awaitable[int]], weir: StartWeir) -> None:
    stable = await start_backend("stable")
    seen: list[bytes] = []
    shadow_port = await raw_backend(raw_http(seen, delay=2.0))
    w = await weir(mirrored(stable.address, f"127.0.0.1:{shadow_port}",
                                  {"version": "shadow", "max_concurrent": 4}))
    replies = await run_all([(lambda i=i: w.request(f"/burst/{i}")) for i in range(50)],
                            concurrency=50)
    assert all(r.status == 200 and r.headers["x-backend"] == "stable" for r in replies)
    latencies = [r.seconds for r in replies]
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    assert quantile(latencies, 0.99) < 0.5, sorted(latencies)[-5:]
    # Four copies in flight at the shadow; every other one dropped, at once.
    assert policy(w).inflight == 4
    assert outcomes(w)["dropped"] == 46
    await wait_for(settled(w, 50), timeout=5)
    assert len(seen) == 4
    assert await mirror_metrics(w) == {"success": 4, "error": 0, "timeout": 0, "dropped": 46}
    assert mirror_stats(w).dropped["max_concurrent"] == 46  # each drop says why
    scrape = await w.scrape()
    assert scrape.value("weir_mirror_dropped_total", service="app", version="shadow",
                        reason="max_concurrent") == 46


async def test_a_shadow_that_keeps_up_gets_every_copy_even_once_paced(
        start_backend: Callable[..., Any],
        raw_backend: Callable[[RawHandler], Awaitable[int]], weir: StartWeir) -> None:
    """Issue 21's measurement: a 200 ms shadow with the default 64 slots, near its 320 a
    second (about 55 copies in flight: the pacing applies from 32). The pacing spaces the
    copies out; it never drops one. Only the limits do."""
    stable = await start_backend("stable")
    seen: list[bytes] = []
    shadow_port = await raw_backend(raw_http(seen, delay=0.2))
    w = await weir(mirrored(stable.address, f"127.0.0.1:{shadow_port}", {"version": "shadow"}))
    sent = 300
    # Below the shadow's 320 a second: here the shadow, Weir and the client share one event
    # loop, which adds a few ms to every copy (bench/mirror.py measures 300 a second).
    RATE = 250
    BURST = 10
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def user(i: int) -> int:
        # An open loop, in bursts as a load balancer's connections bring them.
        await asyncio.sleep(max(0.0, started + (i // BURST) * BURST / RATE - loop.time()))
        return (await w.request(f"/paced/{i}")).status

    statuses = await asyncio.gather(*(user(i) for i in range(sent)))
    assert statuses == [200] * sent
    await wait_for(settled(w, sent), timeout=10)
    counts = outcomes(w)
    paced = policy(w).average_seconds > 0  # the copies' average was learnt: pacing was on
    print(f"\n300 copies at {RATE}/s to a 200 ms shadow: {counts}, {len(seen)} received, "
          f"dropped {mirror_stats(w).dropped}")
    assert paced
    assert counts["success"] >= 0.99 * sent, counts
    assert len(seen) == counts["success"]
    assert mirror_stats(w).dropped == {"max_concurrent": counts["dropped"],
                                       "max_queued_bytes": 0, "max_body_bytes": 0,
                                       "shadow_unreachable": 0}
    shadow = next(m for m in (await w.api.service())["mirror"] if m["version"] == "shadow")
    assert shadow["delivered_share"] >= 0.99 and shadow["dropped_share"] <= 0.01, shadow
    assert shadow["dropped_by_reason"]["max_concurrent"] == counts["dropped"]


async def test_copy_that_outlives_the_mirror_timeout_counts_as_timeout(
        start_backend: Callable[..., Any],
        raw_backend: Callable[[RawHandler], Awaitable[int]], weir: StartWeir) -> None:
    stable = await start_backend("stable")
    seen: list[bytes] = []
    shadow_port = await raw_backend(raw_http(seen, delay=2.0))
    w = await weir(mirrored(stable.address, f"127.0.0.1:{shadow_port}",
                                  {"version": "shadow", "timeout": "300ms"}))
    replies = await run_all([lambda: w.request("/t")] * 3)
    assert all(r.status == 200 and r.seconds < 0.3 for r in replies)
    await wait_for(settled(w, 3), timeout=3)
    assert await mirror_metrics(w) == {"success": 0, "error": 0, "timeout": 3, "dropped": 0}
    scrape = await w.scrape()
    assert scrape.value("weir_upstream_timeouts_total",
                        upstream=f"127.0.0.1:{shadow_port}") == 3


# --- (4) a shadow that refuses connections -------------------------------------------------


async def test_refusing_shadow_counts_errors_then_backs_off(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable = await start_backend("stable")
    dead = f"127.0.0.1:{free_port()}"
    w = await weir(mirrored(stable.address, dead, {"version": "shadow"}))
    for i in range(30):
        reply = await w.request(f"/r/{i}")
        assert reply.status == 200 and reply.headers["x-weir-version"] == "stable"
    await wait_for(settled(w, 30), timeout=5)
    first = outcomes(w)
    # Five failed connects in a row, then copies are dropped without trying (backoff).
    assert 5 <= first["error"] <= 10, first
    assert first["dropped"] >= 15, first
    assert first["error"] + first["dropped"] == 30
    assert mirror_stats(w).dropped["shadow_unreachable"] == first["dropped"]
    assert await mirror_metrics(w) == {k: float(v) for k, v in first.items()}
    scrape = await w.scrape()
    assert scrape.value("weir_upstream_connect_errors_total", upstream=dead) == first["error"]
    # The backoff lasts about a second: after it, copies are tried (and fail) again.
    async with asyncio.timeout(3):
        while outcomes(w)["error"] == first["error"]:
            assert (await w.request("/later")).status == 200
            await asyncio.sleep(0.05)


# --- (5) host_suffix -----------------------------------------------------------------------


async def test_host_suffix_marks_the_shadow_host(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address,
                                  {"version": "shadow", "host_suffix": True}))
    assert (await w.request("/a", host="app.test")).status == 200
    assert (await w.request("/b", host="app.test:8080")).status == 200
    await wait_for(lambda: len(shadow.requests) == 2, timeout=5)
    shadow_hosts = {r["path"]: r["headers"]["host"] for r in shadow.requests}
    primary_hosts = {r["path"]: r["headers"]["host"] for r in stable.requests}
    assert shadow_hosts == {"/a": "app.test-shadow", "/b": "app.test-shadow:8080"}
    assert primary_hosts == {"/a": "app.test", "/b": "app.test:8080"}
    # One Host header only, whatever the case the client used.
    for record in shadow.requests:
        assert record["header_list"].count("host") == 1


async def test_http10_request_without_host_is_mirrored_with_one_host(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    """Regression, found by tests/test_fuzz.py: the copy of an HTTP/1.0 request without a
    Host carried two, its own and the primary upstream's address (which Weir adds for such
    clients), and the shadow refused every such copy as malformed."""
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address, {"version": "shadow"}))
    [reply] = await exchange(w.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert reply.status == 200
    await wait_for(lambda: len(shadow.requests) == 1, timeout=5)
    await wait_for(settled(w, 1), timeout=5)
    assert outcomes(w)["success"] == 1
    assert shadow.requests[0]["header_list"].count("host") == 1
    assert stable.requests[0]["headers"]["host"] == stable.address


async def test_upgrade_requests_are_not_mirrored(
        start_backend: Callable[..., Any], weir: StartWeir) -> None:
    """A copy cannot carry a tunnel. A mirrored WebSocket upgrade held a shadow connection,
    and a max_concurrent slot, for as long as the shadow kept its socket open."""
    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    w = await weir(mirrored(stable.address, shadow.address,
                                  {"version": "shadow", "max_concurrent": 1}))
    async with websockets.connect(f"ws://127.0.0.1:{w.port}/ws") as ws:
        await ws.send("x")
        assert await asyncio.wait_for(ws.recv(), 5) == "stable:x"
        # While it is open, the one slot is still free for copies of ordinary requests.
        assert (await w.request("/after")).status == 200
        await wait_for(lambda: len(shadow.requests) == 1, timeout=5)
        await wait_for(settled(w, 1), timeout=5)
    assert outcomes(w) == {"success": 1, "error": 0, "timeout": 0, "dropped": 0}
    assert [r["path"] for r in shadow.requests] == ["/after"]

# --- (6) compare ---------------------------------------------------------------------------


async def test_compare_counts_matches_and_mismatches_and_lists_the_last_ones(
        start_backend: Callable[..., Any],
        raw_backend: Callable[[RawHandler], Awaitable[int]], weir: StartWeir) -> None:
    a, b = await start_backend("a"), await start_backend("b")
    c, d = await start_backend("c"), await start_backend("d")
    seen: list[bytes] = []
    failing = f"127.0.0.1:{await raw_backend(raw_http(seen, status=503, body=b'no'))}"

    def service(name: str, primary: str, shadow: str) -> dict[str, Any]:
        return {**mirrored(primary, shadow, {"version": "shadow", "compare": True})[0],
                "name": name, "match": {"hosts": [f"{name}.test"]}}

    w = await weir([service("same", a.address, b.address),
                          service("status", c.address, failing),
                          service("body", d.address, c.address)])
    # Identical answers: the pattern download is the same from every backend (chunked or
    # sized), and so are /hop and /slow.
    paths = ["/stream?size=3000", "/stream?size=70000&length=1", "/slow?delay=0", "/hop"]
    for path in paths:
        assert (await w.request(path, host="same.test")).status == 200
    # A shadow answering 503 where the primary says 200.
    for path in ("/one", "/two?x=1", "/stream?size=10"):
        assert (await w.request(path, host="status.test")).status == 200
    # Same status, another body (the echo names its backend).
    assert (await w.request("/echo", host="body.test")).status == 200

    def compared(service: str) -> int:
        return sum(mirror_stats(w, service).comparisons.values())

    await wait_for(lambda: compared("same") == 4 and compared("status") == 3
                   and compared("body") == 1, timeout=5)
    assert mirror_stats(w, "same").comparisons == {"match": 4, "mismatch": 0}
    assert mirror_stats(w, "status").comparisons == {"match": 0, "mismatch": 3}
    assert mirror_stats(w, "body").comparisons == {"match": 0, "mismatch": 1}

    scrape = await w.scrape()
    for name, match, mismatch in (("same", 4, 0), ("status", 0, 3), ("body", 0, 1)):
        for result, count in (("match", match), ("mismatch", mismatch)):
            assert scrape.value("weir_mirror_comparisons_total", service=name,
                                version="shadow", result=result) == count, (name, result)
        assert scrape.value("weir_mirror_requests_total", service=name, version="shadow",
                            outcome="success") == match + mismatch

    status = await w.status()
    services = {s["name"]: s for s in status["services"]}
    assert services["same"]["mirror"][0]["last_mismatches"] == []
    mismatches = services["status"]["mirror"][0]["last_mismatches"]
    assert [(m["method"], m["path"], m["primary_status"], m["shadow_status"])
            for m in mismatches] == [("GET", "/one", 200, 503), ("GET", "/two?x=1", 200, 503),
                                     ("GET", "/stream?size=10", 200, 503)]
    assert services["status"]["mirror"][0]["comparisons"] == {"match": 0, "mismatch": 3}
    [body_mismatch] = services["body"]["mirror"][0]["last_mismatches"]
    assert body_mismatch["path"] == "/echo"
    assert body_mismatch["primary_status"] == body_mismatch["shadow_status"] == 200
    assert body_mismatch["same_body"] is False


# --- (7) the access log ------------------------------------------------------------------


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


async def test_access_log_has_a_line_per_request_and_per_copy_flushed_within_seconds(
        start_backend: Callable[..., Any], tmp_path: Path, weir: StartWeir) -> None:
    stable, canary, shadow = (await start_backend("stable"), await start_backend("canary"),
                              await start_backend("shadow"))
    log_path = tmp_path / "access.jsonl"
    w = await weir([{
        "name": "app",
        "versions": {"stable": {"upstreams": [stable.address]},
                     "canary": {"upstreams": [canary.address]},
                     "shadow": {"upstreams": [shadow.address]}},
        "weights": {"stable": 50, "canary": 50},
        "sticky": {"header": "x-user-id"},
        "rules": [{"match": {"headers": {"x-beta": "yes"}}, "version": "canary"}],
        "mirror": [{"version": "shadow"}],
    }], access_log=str(log_path))
    address = {"stable": stable.address, "canary": canary.address}
    sent = {
        "/weight": await w.request("/weight"),
        "/rule": await w.request("/rule", headers={"x-beta": "yes"}),
        "/sticky": await w.request("/sticky", headers={"x-user-id": "alice"}),
        "/post": await w.request("/post", method="POST", data=b"p" * 123),
    }
    done_at = asyncio.get_running_loop().time()
    await wait_for(lambda: len(read_log(log_path)) >= 7, timeout=3, interval=0.02)
    assert asyncio.get_running_loop().time() - done_at < 2.5
    lines = read_log(log_path)
    users = [e for e in lines if e["reason"] != "mirror"]
    copies = [e for e in lines if e["reason"] == "mirror"]
    assert len(users) == 4 and len(copies) == 3, lines
    by_path = {e["path"]: e for e in users}
    assert set(by_path) == set(sent)
    assert by_path["/weight"]["reason"] == "weight"
    assert by_path["/rule"]["reason"] == "rule"
    assert by_path["/sticky"]["reason"] == "sticky"
    assert by_path["/post"]["reason"] == "weight"
    assert by_path["/rule"]["version"] == "canary"
    for path, entry in by_path.items():
        reply = sent[path]
        assert entry["service"] == "app"
        assert entry["version"] == reply.headers["x-weir-version"]
        assert entry["upstream"] == address[entry["version"]]
        assert entry["status"] == reply.status == 200
        assert entry["bytes_out"] == len(reply.body)
        assert entry["bytes_in"] == (123 if path == "/post" else 0)
        assert isinstance(entry["duration_ms"], int | float) and entry["duration_ms"] > 0
        assert entry["method"] == ("POST" if path == "/post" else "GET")
    assert sorted(e["path"] for e in copies) == ["/rule", "/sticky", "/weight"]
    for entry in copies:
        assert entry["service"] == "app" and entry["version"] == "shadow"
        assert entry["status"] == 200 and entry["outcome"] == "success"


async def test_access_log_is_flushed_at_shutdown(
        weir_process: Callable[..., Awaitable[WeirProcess]], start_backend: Callable[..., Any],
        tmp_path: Path) -> None:
    stable = await start_backend("stable")
    log_path = tmp_path / "shutdown.jsonl"
    proc = await weir_process([{"name": "app",
                                "versions": {"stable": {"upstreams": [stable.address]}}}],
                              access_log=str(log_path))
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            async with session.get(f"http://127.0.0.1:{proc.port}/bye/{i}") as response:
                assert response.status == 200
                await response.read()
    proc.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: proc.process.poll() is not None, timeout=10, interval=0.02)
    assert proc.process.returncode == 0
    paths = [e["path"] for e in read_log(log_path)]
    assert paths == [f"/bye/{i}" for i in range(5)]


async def test_exchanges_and_copies_are_freed_without_the_cycle_collector(start_backend,
                                                                          start_proxy):
    """Reference cycles per request would make the cyclic GC run often and long, which shows
    up as latency spikes (measured: 5-29 ms pauses with mirroring before this was fixed)."""
    import gc

    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.mirror import MirrorCopy

    from ..conftest import exchange as raw_exchange

    stable, shadow = await start_backend("stable"), await start_backend("shadow")
    proxy = await start_proxy([{
        "name": "app",
        "versions": {"stable": {"upstreams": [stable.address]},
                     "shadow": {"upstreams": [shadow.address]}},
        "weights": {"stable": 100},
        # max_concurrent 1: most copies are dropped, the path that used to leak a cycle.
        "mirror": [{"version": "shadow", "percent": 100, "max_concurrent": 1,
                    "compare": True}],
    }])
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        request = b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n"
        for _ in range(10):
            await raw_exchange(proxy.port, request * 5, count=5)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, Exchange | MirrorCopy)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []
