"""Shared fixtures: real backends (aiohttp apps and raw asyncio servers) and a real proxy, all
on 127.0.0.1 with ports picked by the kernel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.admin.api import AdminServer
from proxy.config.loader import load_config, parse_config
from proxy.config.model import Config
from proxy.control.plane import ControlPlane
from proxy.dataplane.listen import ListenError
from proxy.dataplane.proxyserver import ProxyServer
from proxy.runtime.lifecycle import abandon_start, run_control, stop
from proxy.runtime.process import open_store

from .h2_client import H2Client

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    # The proxy runs on uvloop in production; test it there too.
    return {"uvloop": uvloop.new_event_loop}


# --- backends -------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    port: int
    requests: list[dict[str, Any]] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def backend_app(backend: Backend) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            backend.peers.add(tuple(peer[:2]))
        record = {
            "backend": backend.name,
            "method": request.method,
            "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "header_list": [k.lower() for k in request.headers],
            "body_size": size,
            "body_sha256": digest.hexdigest(),
            "peer_port": peer[1] if peer else None,
        }
        backend.requests.append(record)
        status = int(request.query.get("status", "200"))
        if status in (204, 304):
            return web.Response(status=status, headers={"x-backend": backend.name})
        return web.json_response(record, status=status, headers={"x-backend": backend.name})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="slow done", headers={"x-backend": backend.name})

    async def stream(request: web.Request) -> web.StreamResponse:
        """A chunked (or, with ?length=1, a sized) download of `size` bytes of a pattern."""
        size = int(request.query.get("size", "100000"))
        chunk = bytes(range(256)) * 256  # 64 KiB
        response = web.StreamResponse(headers={"x-backend": backend.name})
        if request.query.get("length"):
            response.content_length = size
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def hop(request: web.Request) -> web.Response:
        return web.Response(text="hop", headers={
            "Connection": "x-secret", "X-Secret": "drop-me", "Keep-Alive": "timeout=5",
            "X-Kept": "yes"})

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                await ws.send_str(f"{backend.name}:{msg.data}")
            elif msg.type == web.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application(client_max_size=2**40)
    app.add_routes([
        web.get("/slow", slow),
        web.get("/stream", stream),
        web.get("/hop", hop),
        web.get("/ws", websocket),
        web.route("*", "/{tail:.*}", echo),
    ])
    return app


async def serve_on_loopback(app: web.Application,
                            shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on 127.0.0.1 at a port the kernel picks."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]


@pytest.fixture
async def start_backend() -> AsyncIterator[Callable[[str], Awaitable[Backend]]]:
    runners: list[web.AppRunner] = []

    async def start(name: str = "backend") -> Backend:
        backend = Backend(name, 0)
        runner, backend.port = await serve_on_loopback(backend_app(backend))
        runners.append(runner)
        return backend

    yield start
    for runner in runners:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[[RawHandler], Awaitable[int]]]:
    """A hand-written upstream for shapes aiohttp will not produce; returns its port."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


# --- the proxy ------------------------------------------------------------------------------


def make_config(services: list[dict[str, Any]], **top: Any) -> Config:
    data: dict[str, Any] = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
                            "services": services}
    data.update(top)
    return parse_config(data, "<test>")


@pytest.fixture
async def h2_client() -> AsyncIterator[Callable[[int], Awaitable[H2Client]]]:
    """HTTP/2 clients (tests/h2_client.py) with prior knowledge to a port, closed at the end."""
    clients: list[H2Client] = []

    async def connect(port: int) -> H2Client:
        client = await H2Client.connect(port)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[..., Awaitable[ProxyServer]]]:
    proxies: list[ProxyServer] = []

    async def start(services: list[dict[str, Any]], **top: Any) -> ProxyServer:
        proxy = ProxyServer(make_config(services, **top), asyncio.get_running_loop())
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.shutdown(timeout=1.0)


def one_service(*upstreams: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "app", "versions": {"stable": {"upstreams": list(upstreams)}}, **extra}]


# --- a raw HTTP client ----------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, head_request: bool = False,
                        ) -> RawResponse:
    """Read one response, framed as RFC 9112 says (length, chunked, or until close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if line]
    response = RawResponse(status, headers, b"")  # type: ignore[arg-type]
    if head_request or status in (204, 304) or 100 <= status < 200:
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    elif response.header("content-length") is not None:
        response.body = await reader.readexactly(int(response.header("content-length") or 0))
    else:
        response.body = await reader.read()
    return response


async def exchange(port: int, request: bytes, count: int = 1, head_request: bool = False,
                   timeout: float = 5.0) -> list[RawResponse]:
    """Send raw bytes, read `count` responses, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return [await read_response(reader, head_request) for _ in range(count)]
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0,
                   interval: float = 0.01) -> None:
    """Wait on a condition with a deadline (never a bare sleep)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


# The admin token every test's Weir is configured with, and the header that carries it.
TOKEN = "weir-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- one Weir: in this event loop (`weir`) or as a real process (`weir_process`) -------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def control_plane(path: Path | None, config: Config | None = None,
                  store: Any = None) -> ControlPlane:
    """A control plane over a fresh data plane, as `weir run` builds them (in the running loop),
    not started: from the config file at ``path``, or from ``config``."""
    if config is None:
        assert path is not None
        config = load_config(path)
    return ControlPlane(path, config, ProxyServer(config, asyncio.get_running_loop()),
                        store=store)


def write_config(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def weir_config(config: dict[str, Any] | list[dict[str, Any]], default_state: Path,
                **top: Any) -> dict[str, Any]:
    """What the `weir` fixtures write: a list is the services, with the rest a test's Weir
    usually has (loopback listeners on ports the kernel picks, the admin TOKEN, no file
    watcher); a dict is the whole config, given loopback listeners where it names none (and
    the TOKEN if it has no ``admin`` at all).
    ``top`` keys are set over either. Runtime state goes to ``default_state`` unless the
    config says where it is kept (``state_file``, or a shared ``state_store``)."""
    if isinstance(config, list):
        data: dict[str, Any] = {"listen": "127.0.0.1:0",
                                "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
                                "watch": False, "services": config}
    else:
        data = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
                **config}
        data["admin"] = {"listen": "127.0.0.1:0", **data["admin"]}
    data.update(top)
    if "state_file" not in data and "state_store" not in data:
        data["state_file"] = str(default_state)
    return data


def inotify_watched_inodes(pid: str = "self") -> set[int]:
    """Inodes watched by a process's inotify instances (a config watcher is ready once its
    directory is among them)."""
    inodes: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("inotify "):
                        fields = dict(f.split(":", 1) for f in line.split()[1:])
                        inodes.add(int(fields["ino"], 16))
        except OSError:
            continue
    return inodes


async def watching(path: Path, pid: str = "self") -> None:
    """Wait until the file watcher of the process ``pid`` watches the directory of ``path``."""
    inode = path.parent.stat().st_ino
    await wait_for(lambda: inode in inotify_watched_inodes(pid), timeout=10)


NO_BODY = object()


async def poll(fetch: Callable[[], Awaitable[Any]], predicate: Callable[[Any], bool],
               timeout: float, what: str = "") -> Any:
    """Fetch until the predicate holds; fail after ``timeout`` seconds with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value}")
        await asyncio.sleep(0.03)


class AdminApi:
    """A JSON client of a Weir's admin API; mutations carry the TOKEN unless ``auth=False``."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = NO_BODY, *,
                   raw: bytes | None = None, headers: dict[str, str] | None = None,
                   auth: bool = True) -> tuple[int, Any]:
        sent = {**(AUTH if auth else {}), **(headers or {})}
        kwargs: dict[str, Any] = {}
        if raw is not None:
            kwargs["data"] = raw
            sent.setdefault("Content-Type", "application/json")
        elif body is not NO_BODY:
            kwargs["json"] = body
        async with self.session.request(method, self.base + path, headers=sent,
                                        **kwargs) as response:
            text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    async def status(self) -> dict[str, Any]:
        code, data = await self.call("GET", "/api/status", auth=False)
        assert code == 200, data
        return data

    async def service(self, name: str = "app") -> dict[str, Any]:
        return next(s for s in (await self.status())["services"] if s["name"] == name)

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

    async def rollout(self, name: str = "app") -> dict[str, Any]:
        code, data = await self.call("GET", f"/api/services/{name}/rollout", auth=False)
        assert code == 200, data
        return data

    async def act(self, action: str, body: Any = NO_BODY, name: str = "app",
                  expect: int = 200) -> dict[str, Any]:
        code, data = await self.call("POST", f"/api/services/{name}/rollout/{action}", body)
        assert code == expect, (action, code, data)
        return data

    async def wait_status(self, predicate: Callable[[dict[str, Any]], bool],
                          timeout: float = 5.0) -> dict[str, Any]:
        """Poll /api/status until the predicate holds (deadline: timeout)."""
        async with asyncio.timeout(timeout):
            while True:
                status = await self.status()
                if predicate(status):
                    return status
                await asyncio.sleep(0.02)

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


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


class Weir:
    """A Weir in the test's event loop: data plane, control plane (file watcher and rollout
    controller running) and admin API, started from a real config file the way `weir run`
    starts them (proxy/runtime/single.py), with an HTTP client for both ports."""

    token = TOKEN

    def __init__(self, control: ControlPlane, admin: AdminServer, path: Path) -> None:
        self.control = control
        self.admin = admin
        self.path = path
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100), cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=10))
        self.api = AdminApi(self.session, self.admin_url)
        self.closed = False

    @property
    def port(self) -> int:
        return self.control.proxy.port

    @property
    def admin_port(self) -> int:
        return self.admin.port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    async def request(self, path: str = "/", *, host: str = "app.test", method: str = "GET",
                      headers: dict[str, str] | None = None, data: Any = None) -> Reply:
        sent = {"Host": host, **(headers or {})}
        started = time.perf_counter()
        async with self.session.request(method, f"http://127.0.0.1:{self.port}{path}",
                                        headers=sent, data=data) as response:
            body = await response.read()
        return Reply(response.status, dict(response.headers), body,
                     time.perf_counter() - started)

    async def scrape_text(self) -> str:
        async with self.session.get(self.admin_url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return await response.text()

    async def scrape(self) -> Scrape:
        return Scrape(await self.scrape_text())

    async def status(self) -> dict[str, Any]:
        return await self.api.status()

    async def reload(self) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.admin_url + "/api/reload", headers=AUTH) as response:
            return response.status, dict(await response.json())

    def rewrite(self, data: dict[str, Any]) -> None:
        write_config(self.path, data)

    async def close(self) -> None:
        """Stop the way `weir run` does on SIGTERM (proxy/runtime/lifecycle.py), at once."""
        if self.closed:
            return
        self.closed = True
        await self.session.close()
        await stop(self.control, self.admin, delay=0, timeout=1)


StartWeir = Callable[..., Awaitable[Weir]]


@pytest.fixture
async def weir(tmp_path: Path) -> AsyncIterator[StartWeir]:
    """``await weir(config, *, path=None, **top)``: a running in-process `Weir`.

    ``config`` is a list of services or a whole config dict (see `weir_config`); it is written
    to tmp_path/weir.yaml (weir-N.yaml while an earlier one still runs) with its runtime state
    in weir.state.json beside it, so starting again after ``close()`` is a restart on the same
    files. ``path``: start from that config file as it is instead. Every Weir still running at
    the end of the test is stopped."""
    started: list[Weir] = []

    async def start(config: dict[str, Any] | list[dict[str, Any]] | None = None, *,
                    path: Path | None = None, **top: Any) -> Weir:
        if path is None:
            assert config is not None
            running = {w.path.name for w in started if not w.closed}
            name = "weir" if "weir.yaml" not in running else f"weir-{len(started)}"
            path = tmp_path / f"{name}.yaml"
            write_config(path, weir_config(config, tmp_path / f"{name}.state.json", **top))
        loaded = load_config(path)
        store = await open_store(loaded)
        assert store is not None, "the state store did not open"
        control = control_plane(path, loaded, store)
        admin = AdminServer(control)
        try:
            await control.proxy.start()
            await admin.start()
        except ListenError:
            await abandon_start(control)
            raise
        run_control(control)
        live = Weir(control, admin, path)
        started.append(live)
        if loaded.watch:
            await watching(path)
        return live

    yield start
    for live in started:
        await live.close()


class WeirProcess:
    """`python -m proxy run -c PATH [ARGS]` as a real process, on the config file written at
    ``path`` (``data``) with fixed ports; restartable on the same files. Its output goes to
    the file ``log`` (a pipe nobody reads could fill up and stall it)."""

    def __init__(self, path: Path, data: dict[str, Any], log: Path, args: tuple[str, ...] = (),
                 wrap: Callable[[list[str]], list[str]] | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.path = path
        self.data = data
        self.log = log
        self.port = int(str(data["listen"]).rsplit(":", 1)[1])
        self.admin_port = int(str(data["admin"]["listen"]).rsplit(":", 1)[1])
        self.args = args
        self.wrap = wrap
        self.session = session
        self.api = AdminApi(session, self.admin_url) if session is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process, without waiting for it to serve."""
        with self.log.open("ab") as log:
            # PYTHONFAULTHANDLER: a hung process (see stop) prints its threads' stacks on
            # SIGABRT before it dies.
            argv = [sys.executable, "-m", "proxy", "run", "-c", str(self.path), *self.args]
            self.process = subprocess.Popen(
                self.wrap(argv) if self.wrap else argv, cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        return self.process

    def ready(self) -> bool:
        """Serving: both ports open, and the signal handlers in place (they are installed a
        moment after the listeners open; a SIGHUP before that would kill the process)."""
        wanted = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1))
        return (port_open(self.admin_port) and port_open(self.port)
                and caught_signals(self.pid) & wanted == wanted)

    async def start(self) -> None:
        """Spawn, and wait until it serves (15 s) and, with ``watch`` on, until its file
        watcher watches the config's folder."""
        process = self.spawn()
        await wait_for(lambda: process.poll() is not None or self.ready(), timeout=15,
                       interval=0.05)
        assert process.poll() is None, self.output()
        if self.data.get("watch", True):
            await watching(self.path, str(process.pid))

    def start_sync(self, timeout: float = 15.0) -> None:
        """`start` for a test (or a module fixture) without an event loop."""
        process = self.spawn()
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert process.poll() is None, \
                f"weir exited {process.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"weir did not serve:\n{self.output()}"
            time.sleep(0.05)

    def send(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        process = self.process
        assert process is not None
        await wait_for(lambda: process.poll() is not None, timeout=timeout, interval=0.02)
        assert process.returncode is not None
        return process.returncode

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        assert self.process is not None
        process = self.process
        process.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except TimeoutError:
            process.send_signal(signal.SIGABRT)  # faulthandler dumps where it is stuck
            process.wait(10)
            raise AssertionError(f"no exit within {timeout} s of SIGTERM; the end of its log, "
                                 f"with its stacks at SIGABRT:\n{self.output()[-8000:]}"
                                 ) from None

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop_sync(self, timeout: float = 10.0) -> None:
        """SIGTERM if still running, SIGKILL if it has not exited ``timeout`` s later."""
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def write_config(self, data: dict[str, Any], atomic: bool = True) -> None:
        """Atomic: a temp file in the same directory, then os.replace. Otherwise the file is
        truncated and rewritten in place, as a plain editor save does."""
        self.data = data
        text = yaml.safe_dump(data, sort_keys=False)
        if atomic:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
        else:
            with open(self.path, "w") as handle:
                handle.write(text)

    def rss_bytes(self) -> int:
        return proc_status_bytes(self.pid, "VmRSS")

    def peak_rss(self) -> int:
        return proc_status_bytes(self.pid, "VmHWM")


def process_config(config: dict[str, Any] | list[dict[str, Any]], default_state: Path,
                   **top: Any) -> dict[str, Any]:
    """`weir_config` on fixed free ports (a process's ports must be known before it starts)."""
    data = weir_config(config, default_state, **top)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["admin"] = {**data["admin"], "listen": f"127.0.0.1:{free_port()}"}
    return data


StartWeirProcess = Callable[..., Awaitable[WeirProcess]]


@pytest.fixture
async def weir_process(tmp_path: Path) -> AsyncIterator[StartWeirProcess]:
    """``await weir_process(config, *, args=(), wrap=None, wait=True, **top)``: `weir run`
    as a real process (a `WeirProcess`), for what needs one: signals, ``--workers``, restarts,
    memory, limits of its own.

    ``config`` as for `weir`, on free fixed ports, written to tmp_path/weir-N.yaml (log
    weir-N.log, state weir-N.state.json). ``args`` follow ``run -c PATH`` (``--workers 2``);
    ``wrap`` turns the command line into the one to run (under a shell's ``ulimit``, say);
    ``wait=False`` only spawns it. Each one still running at the end gets SIGTERM, and SIGKILL
    10 s later; the last of its log is printed."""
    started: list[WeirProcess] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    cookie_jar=aiohttp.DummyCookieJar())

    async def start(config: dict[str, Any] | list[dict[str, Any]], *,
                    args: tuple[str, ...] = (),
                    wrap: Callable[[list[str]], list[str]] | None = None,
                    wait: bool = True, **top: Any) -> WeirProcess:
        name = f"weir-{len(started)}"
        data = process_config(config, tmp_path / f"{name}.state.json", **top)
        path = tmp_path / f"{name}.yaml"
        write_config(path, data)
        proc = WeirProcess(path, data, tmp_path / f"{name}.log", args, wrap, session)
        started.append(proc)
        if wait:
            await proc.start()
        else:
            proc.spawn()
        return proc

    yield start
    await session.close()
    for proc in started:
        await asyncio.to_thread(proc.stop_sync)
        print(f"--- weir log ({proc.path.name}), last lines ---")
        print("\n".join(proc.output().splitlines()[-15:]))


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/PID/status (``VmRSS``, ``VmHWM``: kB there)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def caught_signals(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus exposition, or None if it is not there."""
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None



async def run_all(calls: Iterable[Callable[[], Any]], concurrency: int = 20) -> list[Any]:
    """Run coroutine factories with at most `concurrency` at a time; results in order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Any]) -> Any:
        async with semaphore:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


# --- reading the exposition -------------------------------------------------------------------


class Scrape:
    """One parsed scrape: every sample, with lookups by name and label subset."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The one sample with these labels (0 if the series does not exist)."""
        found = self.matching(name, **labels)
        assert len(found) <= 1, found
        return float(found[0].value) if found else 0.0

    def total(self, name: str, **labels: str) -> float:
        return float(sum(s.value for s in self.matching(name, **labels)))

    def requests_by(self, service: str, version: str) -> Counter[tuple[str, int]]:
        """http_requests_total of one version as {(method, status): count}."""
        counts: Counter[tuple[str, int]] = Counter()
        for s in self.matching("http_requests_total", service=service, version=version):
            counts[(s.labels["method"], int(s.labels["status"]))] += int(s.value)
        return counts

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        return sorted((float(s.labels["le"]), float(s.value))
                      for s in self.matching(name + "_bucket", **labels))

    def keyed(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): float(s.value) for s in self.samples}


# The rollout harness's fixtures (backends that fail or slow down on demand, webhook hooks), for
# the rollout, Prometheus analysis, fail-safe, dashboard and drain tests.
# Imported last: the harness itself uses the helpers above.
from .rollout_harness import backends, hooks  # noqa: E402, F401
