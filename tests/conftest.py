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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.loader import load_config, parse_config
from proxy.config.model import Config
from proxy.control.plane import ControlPlane
from proxy.dataplane.proxyserver import ProxyServer

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


# --- Weir as a real process -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def control_plane(path: Path | None, config: Config | None = None,
                  store: Any = None) -> ControlPlane:
    """A control plane over a fresh data plane, as `weir run` builds them (in the running loop):
    from the config file at ``path``, or from ``config``."""
    if config is None:
        assert path is not None
        config = load_config(path)
    return ControlPlane(path, config, ProxyServer(config, asyncio.get_running_loop()),
                        store=store)


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/PID/status (``VmRSS``, ``VmHWM``: kB there)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@dataclass
class WeirProcess:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int

    def rss_bytes(self) -> int:
        return proc_status_bytes(self.process.pid, "VmRSS")


@pytest.fixture
async def weir_process(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[WeirProcess]]]:
    started: list[subprocess.Popen[bytes]] = []

    async def start(services: list[dict[str, Any]], **top: Any) -> WeirProcess:
        port, admin_port = free_port(), free_port()
        config = {"listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{admin_port}"},
                  "services": services, **top}
        path = tmp_path / f"weir-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        # The log goes to a file: an unread pipe could fill up and block the process.
        log_path = tmp_path / f"weir-{len(started)}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(path)],
                cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        started.append(process)
        await wait_for(lambda: port_open(port) or process.poll() is not None, timeout=15,
                       interval=0.05)
        assert process.poll() is None, log_path.read_text()
        return WeirProcess(process, port, admin_port)

    yield start
    stop_processes(started)


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each one still running, SIGKILL it if it has not exited 10 s later."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RestartableWeir:
    """`python -m proxy run -c PATH`, restartable with the same config and state file."""

    def __init__(self, path: Path, admin_port: int, log: Path) -> None:
        self.path = path
        self.admin_port = admin_port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self, session: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as log:
            # PYTHONFAULTHANDLER: a hung process (see stop) prints its threads' stacks on
            # SIGABRT before it dies.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.path)],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        process = self.process

        async def answering() -> bool:
            try:
                async with session.get(f"http://127.0.0.1:{self.admin_port}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        async with asyncio.timeout(15):
            while not await answering():
                assert process.poll() is None, self.output()
                await asyncio.sleep(0.05)
        # The signal handlers are installed a moment after the listeners open; a SIGHUP
        # before that would kill the process, so wait until both are caught.
        wanted = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1))
        await wait_for(lambda: caught_signals(process.pid) & wanted == wanted, timeout=5)

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def stop(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        assert self.process is not None
        process = self.process
        process.send_signal(signal.SIGTERM)
        try:
            await wait_for(lambda: process.poll() is not None, timeout=15, interval=0.02)
        except TimeoutError:
            process.send_signal(signal.SIGABRT)  # faulthandler dumps where it is stuck
            process.wait(10)
            raise AssertionError("no exit within 15 s of SIGTERM; the end of its log, with its "
                                 f"stacks at SIGABRT:\n{self.output()[-8000:]}") from None
        return process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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


# The rollout harness's fixtures (backends that fail or slow down on demand, an in-process Weir
# with its admin API, webhook hooks), for the rollout tests and the Prometheus analysis tests.
# Imported last: the harness itself uses the helpers above.
from .rollout_harness import backends, hooks, weir  # noqa: E402, F401
