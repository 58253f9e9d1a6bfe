"""The rollout tests' harness: aiohttp backends that can fail or slow down on demand, a webhook
receiver, the `weir` command run as a pipeline runs it, rollout configs and a bounded client
load. The Weir itself is conftest's ``weir`` fixture, and its admin API client (``Weir.api``,
an ``AdminApi``) polls with deadlines.

Its fixtures (``backends``, ``hooks``) are made available to every test module by
tests/conftest.py; the helpers are imported where they are used.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import TOKEN, serve_on_loopback, wait_for

# --- backends ---------------------------------------------------------------------------------


@dataclass
class App:
    """A backend version: answers with its name, optionally slowly or with some 500s."""

    name: str
    delay: float = 0.0          # seconds before each answer
    fail_every: int = 0         # every Nth request answers 500
    fail_all: bool = False      # every request (but /healthz) answers 500
    health_status: int = 200    # what GET /healthz answers (blue/green smoke checks)
    port: int = 0
    served: int = 0
    failed: int = 0
    health_checks: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def app_for(backend: App) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        backend.health_checks += 1
        return web.Response(status=backend.health_status, text=f"{backend.name} health")

    async def handle(request: web.Request) -> web.Response:
        backend.served += 1
        number = backend.served
        if backend.delay:
            await asyncio.sleep(backend.delay)
        fail = backend.fail_all or (backend.fail_every and number % backend.fail_every == 0)
        if fail:
            backend.failed += 1
        return web.Response(status=500 if fail else 200, text=backend.name,
                            headers={"x-backend": backend.name})

    app = web.Application()
    app.add_routes([web.get("/healthz", health), web.route("*", "/{tail:.*}", handle)])
    return app


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[App]]]:
    runners: list[web.AppRunner] = []

    async def start(name: str, **behaviour: Any) -> App:
        backend = App(name, **behaviour)
        runner, backend.port = await serve_on_loopback(app_for(backend), shutdown_timeout=0.5)
        runners.append(runner)
        return backend

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Hooks:
    """A webhook receiver: /ok/EVENT answers 200, /fail/EVENT answers 500; both record."""

    port: int = 0
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, prefix: str = "") -> list[dict[str, Any]]:
        return [body for path, body in self.received if path.startswith(prefix)]


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    receiver = Hooks()

    async def record(request: web.Request) -> web.Response:
        receiver.received.append((request.path, await request.json()))
        status = 500 if request.path.startswith("/fail/") else 200
        return web.json_response({"ok": status == 200}, status=status)

    app = web.Application()
    app.add_routes([web.post("/{tail:.*}", record)])
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield receiver
    await runner.cleanup()


# --- the weir command, as a pipeline runs it --------------------------------------------------


@dataclass
class Ran:
    code: int
    out: str
    err: str
    ended_at: float  # time.time() when the command exited


async def weir_cli(admin_url: str, *args: str, timeout: float = 30) -> Ran:
    """`weir ARGS --admin URL`, the token in the environment, as a pipeline runs it."""
    env = {**os.environ, "WEIR_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, "--admin", admin_url, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    ran = Ran(process.returncode or 0, out.decode(), err.decode(), time.time())
    print(f"\n$ weir {' '.join(args)}  -> exit {ran.code}\n{ran.out}{ran.err}")
    return ran


# --- configs ----------------------------------------------------------------------------------


def canary_config(stable: App, canary: App, steps: list[dict[str, Any]],
                  analysis: dict[str, Any] | None = None, **rollout: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"strategy": "canary", "stable": "stable", "canary": "canary",
                            "steps": steps, **rollout}
    if analysis is not None:
        spec["analysis"] = analysis
    return base_config({
        "name": "app",
        "versions": {"stable": {"upstreams": [stable.address], "revision": "s1"},
                     "canary": {"upstreams": [canary.address], "revision": "c1"}},
        "weights": {"stable": 100, "canary": 0},
        "rollout": spec,
    })


def blue_green_config(blue: App, green: App, **rollout: Any) -> dict[str, Any]:
    return base_config({
        "name": "app",
        "versions": {"blue": {"upstreams": [blue.address], "revision": "b1"},
                     "green": {"upstreams": [green.address], "revision": "g1"}},
        "weights": {"blue": 100, "green": 0},
        "rollout": {"strategy": "blue_green", "active": "blue", "preview": "green", **rollout},
    })


def base_config(*services: dict[str, Any]) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
            "watch": False, "services": list(services)}


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Hit:
    started: float  # time.time() when the request was sent
    version: str    # x-weir-version of the answer ("error" if none came)
    status: int


class Load:
    """A few client workers sending requests back to back (optionally with a gap) until stopped."""

    def __init__(self, port: int, workers: int = 4, gap: float = 0.0,
                 headers: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/item"
        self.workers = workers
        self.gap = gap
        self.headers = headers or {}
        self.hits: list[Hit] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.workers),
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=5))
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=10)
            self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _worker(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            started = time.time()
            try:
                async with self._session.get(self.url, headers=self.headers) as response:
                    await response.read()
                    self.hits.append(Hit(started, response.headers.get("x-weir-version", "?"),
                                         response.status))
            except (aiohttp.ClientError, TimeoutError):
                self.hits.append(Hit(started, "error", 0))
                await asyncio.sleep(0.01)
            if self.gap:
                await asyncio.sleep(self.gap)

    def count(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(h.version for h in self.hits if since <= h.started <= until)

    def first(self, version: str) -> float:
        return min(h.started for h in self.hits if h.version == version)

    async def wait_hits(self, count: int, version: str | None = None,
                        since: float = 0.0, timeout: float = 5.0) -> None:
        def enough() -> bool:
            return sum(1 for h in self.hits if h.started >= since
                       and (version is None or h.version == version)) >= count

        await wait_for(enough, timeout=timeout)


async def versions_seen(port: int, count: int, headers: dict[str, str] | None = None,
                        ) -> Counter[str]:
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(count):
            async with session.get(f"http://127.0.0.1:{port}/item",
                                   headers=headers or {}) as response:
                await response.read()
                seen[response.headers.get("x-weir-version", "?")] += 1
    return seen


def analyses(rollout: dict[str, Any], outcome: str, kind: str | None = None,
             ) -> list[dict[str, Any]]:
    return [a for a in rollout["analyses"]
            if a["outcome"] == outcome and (kind is None or a.get("kind") == kind)]
