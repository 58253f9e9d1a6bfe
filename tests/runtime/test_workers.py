"""`weir run --workers 2`, as real processes: a supervisor (admin API, controller, state) and
two workers sharing the listener with SO_REUSEPORT.

Every wait is on a condition with a deadline. Requests go on new connections (the kernel
spreads connections, not requests, across the workers)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from ..conftest import (
    AUTH,
    Backend,
    StartWeirProcess,
    WeirProcess,
    read_response,
    sample,
    wait_for,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreading")



class Supervised:
    """`weir run --workers N` (a `WeirProcess`), with what these tests ask of its workers."""

    def __init__(self, run: WeirProcess, session: aiohttp.ClientSession) -> None:
        assert run.process is not None
        self.run = run
        self.process = run.process
        self.port = run.port
        self.admin = run.admin_url
        self.session = session
        self.seen_pids: set[int] = set()

    def output(self) -> str:
        return self.run.output()

    async def get(self, path: str) -> Any:
        async with self.session.get(self.admin + path) as response:
            assert response.status == 200, await response.text()
            return await response.json() if path.startswith("/api") else await response.text()

    async def send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        async with self.session.request(method, self.admin + path, json=body,
                                        headers=AUTH) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def workers(self) -> list[dict[str, Any]]:
        workers = (await self.get("/api/status"))["workers"]
        self.seen_pids.update(w["pid"] for w in workers if w["pid"])
        return workers

    async def wait_workers(self, check: Callable[[list[dict[str, Any]]], bool],
                           timeout: float = 20.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while True:
                assert self.process.poll() is None, self.output()
                try:
                    workers = await self.workers()
                    if check(workers):
                        return workers
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def metric(self, name: str, **labels: str) -> float:
        return sample(await self.get("/metrics"), name, **labels) or 0.0


def alive_pid(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to read its exit code, counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1]
                           for line in status)
    except OSError:
        return False


@pytest.fixture
async def supervised(weir_process: StartWeirProcess,
                     ) -> AsyncIterator[Callable[..., Awaitable[Supervised]]]:
    started: list[Supervised] = []
    session = aiohttp.ClientSession()

    async def start(services: list[dict[str, Any]], workers: int = 2) -> Supervised:
        run = await weir_process(services, args=("--workers", str(workers)), wait=False)
        weir = Supervised(run, session)
        started.append(weir)
        await weir.wait_workers(lambda ws: len(ws) == workers and all(w["alive"] for w in ws))
        return weir

    yield start
    for weir in started:
        if weir.process.poll() is None:
            weir.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(weir.process.wait, 15)
            except subprocess.TimeoutExpired:
                weir.process.kill()
                weir.process.wait()
        for pid in weir.seen_pids:  # never leave a worker behind, whatever happened
            if alive_pid(pid):
                os.kill(pid, signal.SIGKILL)
    await session.close()


def two_versions(stable: Backend, canary: Backend, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "app",
             "versions": {"stable": {"upstreams": [stable.address]},
                          "canary": {"upstreams": [canary.address]}},
             "weights": {"stable": 50, "canary": 50}, **extra}]


async def fetch(port: int, path: str = "/") -> tuple[int, str]:
    """One request on its own connection: (status, version)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(10):
            response = await read_response(reader)
        return response.status, response.header("x-weir-version") or ""
    finally:
        writer.close()


async def burst(port: int, count: int, concurrency: int = 16) -> list[tuple[int, str]]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> tuple[int, str]:
        async with gate:
            return await fetch(port)

    return await asyncio.gather(*(one() for _ in range(count)))


async def test_workers_share_the_listener_and_metrics_add_up_exactly(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    weir = await supervised(two_versions(stable, canary))
    results = await burst(weir.port, 300)
    assert all(status == 200 for status, _ in results), Counter(results)

    # Within a report interval or two, the supervisor has every worker's counts.
    workers = await weir.wait_workers(lambda ws: sum(w["requests"] for w in ws) == 300,
                                      timeout=5)
    assert all(w["requests"] > 0 for w in workers), workers  # both served
    assert len({w["pid"] for w in workers}) == 2
    for backend in (stable, canary):
        assert await weir.metric("http_requests_total", service="app",
                                 version=backend.name, method="GET",
                                 status="200") == len(backend.requests) > 0
    count = await weir.metric("http_request_duration_seconds_count", service="app",
                              version="stable")
    assert count == len(stable.requests)


async def test_a_weight_change_reaches_every_worker_within_a_second(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    weir = await supervised(two_versions(stable, canary))
    # Traffic first, so that the workers hold idle upstream connections (the supervisor shows
    # their sum) when the stable version loses its traffic and starts draining.
    await burst(weir.port, 40)
    async with asyncio.timeout(5):
        while not await weir.metric("weir_upstream_pool_idle", upstream=stable.address):
            await asyncio.sleep(0.05)
    await weir.send("PUT", "/api/services/app/weights", {"weights": {"canary": 100}})
    changed = asyncio.get_running_loop().time()
    # Batches of new connections until one is all canary: that must come within 1 s ...
    async with asyncio.timeout(1.0):
        while {version for _, version in await burst(weir.port, 20)} != {"canary"}:
            pass
    took = asyncio.get_running_loop().time() - changed
    # ... and from then on every connection, whichever worker takes it, goes to the canary.
    results = await burst(weir.port, 200)
    assert Counter(results) == {(200, "canary"): 200}, f"after {took:.3f}s: {Counter(results)}"
    workers = await weir.wait_workers(lambda ws: sum(w["requests"] for w in ws) >= 240,
                                      timeout=5)
    assert all(w["requests"] > 0 for w in workers), workers


async def test_a_killed_worker_is_replaced_and_counters_never_go_down(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    weir = await supervised(two_versions(stable, canary))

    async def total() -> float:
        return sum([await weir.metric("http_requests_total", service="app", version=v,
                                      method="GET", status="200")
                    for v in ("stable", "canary")])

    await burst(weir.port, 100)
    await weir.wait_workers(lambda ws: sum(w["requests"] for w in ws) == 100, timeout=5)
    before = await total()
    assert before == 100
    victim = (await weir.workers())[0]
    os.kill(victim["pid"], signal.SIGKILL)
    # Connections the kernel had already queued on the victim's socket die with it (as with
    # any killed server); once its files are closed (the supervisor sees its pipe's end, which
    # a zombie leader with threads still exiting would not show), new connections go to the
    # survivor.
    await weir.wait_workers(lambda ws: ws[0]["pid"] != victim["pid"] or not ws[0]["alive"],
                            timeout=5)

    # While it is replaced the service keeps answering, and the totals never drop.
    seen = [before]
    workers = []
    async with asyncio.timeout(20):
        while True:
            results = await burst(weir.port, 10, concurrency=5)
            assert all(status == 200 for status, _ in results), results
            seen.append(await total())
            workers = await weir.workers()
            if workers[0]["pid"] != victim["pid"] and workers[0]["alive"]:
                break
    assert workers[0]["restarts"] == 1
    assert "was killed by SIGKILL" in weir.output()

    await burst(weir.port, 100)
    # The victim had reported all it served before it died, so here nothing is lost: the
    # totals come to exactly what the backends saw (a worker killed under load may take its
    # last report interval's counts with it).
    served = sum(len(b.requests) for b in (stable, canary))
    async with asyncio.timeout(5):
        while (now := await total()) != served:
            seen.append(now)
            await asyncio.sleep(0.05)
    seen.append(now)
    assert seen == sorted(seen), seen
    both = await weir.wait_workers(lambda ws: all(w["requests"] > 0 for w in ws), timeout=5)
    assert len({w["pid"] for w in both} | {victim["pid"]}) == 3


async def test_the_controller_judges_every_workers_traffic(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    rollout = {"strategy": "canary", "stable": "stable", "canary": "canary",
               "steps": [{"set_weight": 50}, {"pause": {}}],
               "analysis": {"interval": "500ms", "min_requests": 1, "failure_limit": 10,
                            "inconclusive_limit": 1000,
                            "start_step": 0, "checks": {"max_error_rate": 0.5}}}
    services = two_versions(stable, canary, rollout=rollout)
    services[0]["weights"] = {"stable": 100, "canary": 0}
    weir = await supervised(services)
    await weir.send("POST", "/api/services/app/rollout/start", {})

    async def analyses() -> list[dict[str, Any]]:
        rollout = await weir.get("/api/services/app/rollout")
        return [a for a in rollout["analyses"] if a.get("kind") == "background"]

    # Once one background analysis is done, the next windows follow each other with no gap.
    async with asyncio.timeout(10):
        while not (done := await analyses()):
            await asyncio.sleep(0.05)
    before = done[-1]["at"]
    results = await burst(weir.port, 200)
    assert all(status == 200 for status, _ in results)
    to_canary = len(canary.requests)
    assert to_canary > 0

    judged = 0
    async with asyncio.timeout(10):
        while judged < to_canary:
            judged = sum(a["values"]["canary_requests"] for a in await analyses()
                         if a["at"] > before)
            await asyncio.sleep(0.05)
    workers = await weir.workers()
    assert all(w["requests"] > 0 for w in workers), workers
    assert judged == to_canary  # every worker's canary requests, no more, no fewer
    print(f"\nanalysis judged {judged} canary requests; per-worker requests "
          f"{[w['requests'] for w in workers]}")


async def test_sigterm_drains_every_process_and_exits_zero(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    weir = await supervised(two_versions(stable, canary))
    pids = [w["pid"] for w in await weir.workers()]
    # Requests in flight on every worker when the SIGTERM comes still get their answers.
    slow = [asyncio.create_task(fetch(weir.port, "/slow?delay=0.8")) for _ in range(12)]
    async with asyncio.timeout(5):  # the slow requests have reached the workers
        while True:
            status = await weir.get("/api/status")
            inflight = sum(v["inflight"] for s in status["services"]
                           for v in s["versions"].values())
            if inflight == len(slow):
                break
            await asyncio.sleep(0.02)
    weir.process.send_signal(signal.SIGTERM)
    assert [status for status, _ in await asyncio.gather(*slow)] == [200] * len(slow)
    code = await asyncio.to_thread(weir.process.wait, 15)
    assert code == 0, weir.output()
    await wait_for(lambda: not any(alive_pid(pid) for pid in pids), timeout=5)
    assert "Traceback" not in weir.output(), weir.output()


async def test_workers_exit_when_the_supervisor_dies(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    weir = await supervised(two_versions(stable, canary))
    pids = [w["pid"] for w in await weir.workers()]
    weir.process.kill()
    weir.process.wait()
    await wait_for(lambda: not any(alive_pid(pid) for pid in pids), timeout=10,
                   interval=0.05)


async def test_shadow_diffs_from_every_worker_reach_the_status(
        supervised: Callable[..., Awaitable[Supervised]],
        start_backend: Callable[[str], Awaitable[Backend]]) -> None:
    """Field diffs are counted where the copies are made, in the workers: their reports
    carry them to the supervisor's /api/status, as they do the copies' outcomes."""
    stable, canary = await start_backend("stable"), await start_backend("canary")
    weir = await supervised([{
        "name": "app",
        "versions": {"stable": {"upstreams": [stable.address]},
                     "canary": {"upstreams": [canary.address]}},
        "weights": {"stable": 100, "canary": 0},
        "mirror": [{"version": "canary", "percent": 100, "baseline": "stable",
                    "baseline_percent": 100}]}])
    results = await burst(weir.port, 60)
    assert all(status == 200 for status, _ in results)

    async def diff() -> dict[str, Any]:
        service = (await weir.get("/api/status"))["services"][0]
        return next(m for m in service["mirror"] if m["version"] == "canary")["diff"] or {}

    async with asyncio.timeout(10):
        while (report := await diff()).get("compared", 0) < 60 or report.get(
                "baseline_compared", 0) < 60:
            await asyncio.sleep(0.1)
    fields = {f["field"] for f in report["fields"]}
    assert "body.backend" in fields, report  # each backend names itself in its answer
    assert report["mismatch_rate"] == 1.0
    assert report["fields"][0]["example"]["request"].startswith("GET /")
