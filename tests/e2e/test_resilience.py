"""Issue 6's outage drill: one of two upstreams dies under load and comes back.

Health checks, outlier ejection and retries together must cost no more than the requests that
were in flight on the dead upstream and could not be retried (those with a body), and the
upstream must get traffic again within one check interval of its restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from ..conftest import free_port, one_service, port_open, wait_for

CHECK_INTERVAL = 0.5

# An app server in a process of its own, so that it can die the way a real one does: SIGKILL,
# every socket closed by the kernel at once.
APP = """
import asyncio, sys
from aiohttp import web

async def healthz(request):
    return web.Response(text="ok")

async def work(request):
    await request.read()
    await asyncio.sleep(0.003)  # long enough for requests to be caught in flight
    return web.Response(text="done", headers={"x-backend": sys.argv[1]})

app = web.Application()
app.add_routes([web.get("/healthz", healthz), web.route("*", "/{tail:.*}", work)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
"""


@dataclass
class Upstream:
    name: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    async def start(self) -> float:
        self.process = subprocess.Popen([sys.executable, "-c", APP, self.name, str(self.port)])
        await wait_for(lambda: port_open(self.port), timeout=10)
        return time.monotonic()

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone (the event loop stands still meanwhile)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Load:
    port: int
    served: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    last_seen: dict[str, float] = field(default_factory=dict)
    first_seen_after: dict[str, float] = field(default_factory=dict)
    watching: dict[str, float] = field(default_factory=dict)
    stopping: bool = False

    async def worker(self, session: aiohttp.ClientSession, number: int) -> None:
        i = 0
        while not self.stopping:
            i += 1
            post = (number + i) % 10 == 0  # one in ten carries a body
            method = "POST" if post else "GET"
            try:
                async with session.request(method, f"http://127.0.0.1:{self.port}/w{i}",
                                           data=b"x" * 100 if post else None) as response:
                    await response.read()
                    if response.status != 200:
                        self.failures.append(f"{method} {response.status}")
                        continue
                    backend = response.headers["x-backend"]
                    self.served[backend] += 1
                    since = self.watching.get(backend)
                    if since is not None and backend not in self.first_seen_after:
                        self.first_seen_after[backend] = time.monotonic() - since
            except aiohttp.ClientError as exc:
                self.failures.append(f"{method} {type(exc).__name__}")


async def test_killing_one_of_two_upstreams_costs_at_most_what_was_in_flight(start_proxy):
    a, b = Upstream("a"), Upstream("b")
    await a.start()
    await b.start()
    proxy = await start_proxy(one_service(
        a.address, b.address,
        health_check={"path": "/healthz", "interval": f"{CHECK_INTERVAL}s", "timeout": "250ms",
                      "unhealthy_threshold": 1, "healthy_threshold": 1},
        outlier_detection={"consecutive_failures": 3, "base_ejection_time": "30s"},
        retries={"attempts": 2, "on_connect_failure": True, "on_reset": True}))
    pool_a = proxy.pools.pools[a.address]
    load = Load(proxy.port)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            workers = [asyncio.create_task(load.worker(session, n)) for n in range(16)]
            try:
                await wait_for(lambda: min(load.served["a"], load.served["b"]) > 200,
                               timeout=10)
                a.kill()
                # Sent to a before it died and not answered: nothing can have been sent since,
                # as the loop has not run in between.
                in_flight = len(pool_a.active)
                served_b = load.served["b"]
                await wait_for(lambda: load.served["b"] > served_b + 300, timeout=10)
                load.watching["a"] = await a.start()
                await wait_for(lambda: load.served["a"] > 0 and "a" in load.first_seen_after
                               and load.served["b"] > served_b + 600, timeout=10)
            finally:
                load.stopping = True
                await asyncio.gather(*workers)
    finally:
        for upstream in (a, b):
            if upstream.process is not None and upstream.process.poll() is None:
                upstream.kill()

    back_after = load.first_seen_after["a"]
    print(f"\nserved {dict(load.served)}, {in_flight} in flight on a when it died, failures "
          f"{load.failures}, a back {back_after * 1000:.0f} ms after its restart")
    # Only requests that were on a when it died may fail, and only those that carried a body
    # (a GET cut off is retried on b).
    assert len(load.failures) <= in_flight, load.failures
    assert all(f.startswith("POST") for f in load.failures), load.failures
    # Back in rotation within one check interval (plus the time to answer one check).
    assert back_after <= CHECK_INTERVAL + 0.3, back_after
