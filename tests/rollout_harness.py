"""The rollout tests' harness: aiohttp backends that can fail or slow down on demand, a Weir
control plane, data plane and admin API started in the test's event loop from a config file,
an admin API client that polls with deadlines, and a bounded client load.

Its fixtures (``backends``, ``hooks``, ``weir``) are made available to every test module by
tests/conftest.py; the helpers are imported where they are used.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.admin.api import AdminServer
from proxy.control.plane import ControlPlane
from proxy.runtime.lifecycle import stop

from .conftest import AUTH, TOKEN, control_plane, serve_on_loopback, wait_for

NO_BODY = object()


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


def write_config(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


# --- the admin API ----------------------------------------------------------------------------


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = NO_BODY, *,
                   auth: bool = True, headers: dict[str, str] | None = None,
                   ) -> tuple[int, Any]:
        sent = {**(AUTH if auth else {}), **(headers or {})}
        kwargs: dict[str, Any] = {} if body is NO_BODY else {"json": body}
        async with self.session.request(method, self.base + path, headers=sent,
                                        **kwargs) as response:
            text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    async def rollout(self, name: str = "app") -> dict[str, Any]:
        code, data = await self.call("GET", f"/api/services/{name}/rollout", auth=False)
        assert code == 200, data
        return data

    async def act(self, action: str, body: Any = NO_BODY, name: str = "app",
                  expect: int = 200) -> dict[str, Any]:
        code, data = await self.call("POST", f"/api/services/{name}/rollout/{action}", body)
        assert code == expect, (action, code, data)
        return data

    async def service(self, name: str = "app") -> dict[str, Any]:
        code, data = await self.call("GET", "/api/status", auth=False)
        assert code == 200, data
        return next(s for s in data["services"] if s["name"] == name)

    async def weights(self, name: str = "app") -> dict[str, int]:
        return (await self.service(name))["weights"]

    async def metrics(self) -> str:
        async with self.session.get(self.base + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def reload(self) -> dict[str, Any]:
        code, data = await self.call("POST", "/api/reload")
        assert code == 200, data
        return data

    async def wait_rollout(self, predicate: Callable[[dict[str, Any]], bool],
                           timeout: float = 10.0, what: str = "") -> dict[str, Any]:
        return await poll(self.rollout, predicate, timeout, what)

    async def wait_weights(self, expected: dict[str, int], timeout: float = 5.0,
                           ) -> dict[str, int]:
        return await poll(self.weights, lambda w: w == expected, timeout, f"weights {expected}")

    async def holds(self, predicate: Callable[[dict[str, Any]], bool], seconds: float,
                    what: str = "") -> dict[str, Any]:
        """The rollout keeps satisfying `predicate` for `seconds` (a bounded negative check)."""
        end = time.monotonic() + seconds
        while True:
            rollout = await self.rollout()
            assert predicate(rollout), f"stopped holding ({what}): {rollout}"
            if time.monotonic() >= end:
                return rollout
            await asyncio.sleep(0.05)


async def poll(fetch: Callable[[], Awaitable[Any]], predicate: Callable[[Any], bool],
               timeout: float, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value}")
        await asyncio.sleep(0.03)


# --- Weir in this event loop --------------------------------------------------------------------


@dataclass
class Live:
    control: ControlPlane
    admin: AdminServer
    path: Path
    api: Api
    closed: bool = False

    @property
    def port(self) -> int:
        return self.control.proxy.port

    async def close(self) -> None:
        """Stop the way `weir run` does on SIGTERM."""
        if self.closed:
            return
        self.closed = True
        await self.api.session.close()
        await stop(self.control, self.admin, delay=0, timeout=1)


@pytest.fixture
async def weir(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Live]]]:
    """Control plane (with its rollout controller running), data plane and admin API, started
    from a real config file (tmp_path/weir.yaml) with a state file next to it. Starting again
    after `close()` is a restart on the same files."""
    started: list[Live] = []

    async def start(data: dict[str, Any]) -> Live:
        path = tmp_path / "weir.yaml"
        data.setdefault("state_file", str(tmp_path / "weir.state.json"))
        write_config(path, data)
        control = control_plane(path)
        await control.proxy.start()
        admin = AdminServer(control)
        await admin.start()
        control.rollouts.start()
        session = aiohttp.ClientSession()
        live = Live(control, admin, path, Api(session, f"http://127.0.0.1:{admin.port}"))
        started.append(live)
        return live

    yield start
    for live in started:
        await live.close()


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
