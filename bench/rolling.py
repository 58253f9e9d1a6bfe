#!/usr/bin/env python3
"""Rolling restarts: how many requests fail while app instances come and go behind a proxy.

Three instances of one app (``--instances``) run behind each proxy in turn, in the same run:
Weir with the config a new user writes (like config/weir.yaml: no health, retry or outlier
keys), nginx with a plain ``upstream`` block, HAProxy with a plain backend and no checks. Each
instance is an aiohttp app in a process of its own on its own 127.0.0.1 port (this file,
``--serve-app``), run by aiohttp's ``run_app`` with a 10 s shutdown timeout: on SIGTERM it
stops accepting, closes its idle keep-alive connections, finishes what is in flight and exits.

Under a steady keep-alive load (``--clients`` 6 plain HTTP/1.1 clients that never retry),
each instance in turn is stopped and started again on its port ``--down`` (1 s) after it
exited, and the next one goes ``--settle`` (1 s) after it serves again: first gracefully
(SIGTERM), then by a crash (SIGKILL). Failed means anything but a 200: another status, or a
connection refused, reset or closed before a whole response. At each crash the app's own count
of the requests it had read and not yet answered is read from a shared page it keeps up to
date (a request still in the socket's buffer is not counted, so this can undercount).

The table: per proxy, graceful restarts and crashes as failed/total (requests sent during
that part of the drill), the requests in flight at each crash, and how long after an instance
served again the proxy sent it a request. Below it, the failures by what the client saw.

The bench process itself uses only the standard library (and bench/run.py); the app instances
and Weir need the Weir virtualenv's Python (aiohttp). Everything listens on 127.0.0.1 and is
stopped at the end, on Ctrl-C or an error, or after ``--max-seconds``. See bench/README.md.

    python bench/rolling.py                          # Weir, nginx, HAProxy (~70 s)
    python bench/rolling.py --weir-only --rounds 2
    python bench/rolling.py --weir-tree before=../weir-main --only weir
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

HOST = bench.HOST
PROXIES: tuple[str, ...] = ("weir", "nginx", "haproxy")
KINDS: tuple[str, ...] = ("graceful", "crash")
SLOW = 1.0  # seconds: a request answered later than this is counted as slow
APP_SHUTDOWN_TIMEOUT = 10.0  # the app's run_app(shutdown_timeout=...)
INSTALL_HINT = "apt-get install -y nginx haproxy"


# --------------------------------------------------------------------------
# The app instance (this file, --serve-app)
# --------------------------------------------------------------------------


def serve_app(name: str, port: int, inflight_path: str, delay_ms: float) -> None:
    """One app instance: every path but /healthz reads the body, waits ``delay_ms`` and answers
    200 ``done`` with ``x-backend: NAME``. The number of requests in its handlers is kept in
    the first 4 bytes of ``inflight_path`` (mapped shared), so that it can be read after a
    SIGKILL."""
    import mmap

    from aiohttp import web

    with open(inflight_path, "r+b") as f:
        page = mmap.mmap(f.fileno(), 4)
    inflight = 0
    delay = delay_ms / 1000

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal inflight
        if request.path == "/healthz":
            return await handler(request)
        inflight += 1
        page[:4] = struct.pack("<i", inflight)
        try:
            return await handler(request)
        finally:
            inflight -= 1
            page[:4] = struct.pack("<i", inflight)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def work(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text="done", headers={"x-backend": name})

    app = web.Application(middlewares=[count])
    app.add_routes([web.get("/healthz", healthz), web.route("*", "/{tail:.*}", work)])
    # SIGTERM: the listening socket closes, idle keep-alive connections close, requests in
    # flight finish (for up to the shutdown timeout), and the process exits 0.
    web.run_app(app, host=HOST, port=port, access_log=None, print=None,
                shutdown_timeout=APP_SHUTDOWN_TIMEOUT)


# --------------------------------------------------------------------------
# A plain HTTP/1.1 client
# --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response: framed by Content-Length, chunked, or by the connection's close."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0][:60]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    if status in (204, 304) or 100 <= status < 200:
        return Response(status, headers, b"")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return Response(status, headers, bytes(body))
    if "content-length" in headers:
        return Response(status, headers, await reader.readexactly(int(headers["content-length"])))
    return Response(status, headers, await reader.read())


async def get_once(port: int, path: str, timeout: float = 2.0) -> Response | None:
    """One GET on a new connection; None if it failed."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
                         .encode())
            return await read_response(reader)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()


def short(body: bytes) -> str:
    """A failure's body in a few words: tags stripped, whitespace collapsed."""
    text = re.sub(r"<[^>]*>", " ", body[:400].decode(errors="replace"))
    text = " ".join(text.split())
    return text[:100]


@dataclass
class Outcome:
    started: float   # time.monotonic() when the request was sent
    kind: str        # warm-up, graceful or crash
    step: str        # e.g. "app1 down"
    method: str
    status: int      # 0: no response
    backend: str     # x-backend of a 200
    detail: str      # a failure: the error, or the status's body in short
    seconds: float   # until the response (or the error)


class Load:
    """``clients`` workers, each sending requests back to back over its own keep-alive
    connection. Never retries: an error is a failure and the next request opens a new
    connection. One request in ``post_every`` is a POST with a 100-byte body (0: none)."""

    def __init__(self, port: int, clients: int, post_every: int) -> None:
        self.port = port
        self.clients = clients
        self.post_every = post_every
        self.outcomes: list[Outcome] = []
        self.kind = "warm-up"
        self.step = "warm-up"
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.clients)]

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in self._tasks:
            task.cancel()

    async def _worker(self, number: int) -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        i = 0
        while not self._stopping:
            i += 1
            post = self.post_every > 0 and (number + i) % self.post_every == 0
            method = "POST" if post else "GET"
            body = b"x" * 100 if post else b""
            request = (f"{method} /w{i} HTTP/1.1\r\nHost: app\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            started, kind, step = time.monotonic(), self.kind, self.step
            try:
                async with asyncio.timeout(10):
                    if connection is None:
                        connection = await asyncio.open_connection(HOST, self.port)
                    reader, writer = connection
                    writer.write(request)
                    response = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                what = type(exc).__name__
                if isinstance(exc, asyncio.IncompleteReadError):
                    what = f"closed after {len(exc.partial)} bytes of a response"
                elif isinstance(exc, TimeoutError):
                    what = "no response within 10 s"
                self.outcomes.append(Outcome(started, kind, step, method, 0, "", what,
                                             time.monotonic() - started))
                if connection is not None:
                    connection[1].close()
                    connection = None
                await asyncio.sleep(0.005)  # a refused connect must not spin
                continue
            ok = response.status == 200
            self.outcomes.append(Outcome(
                started, kind, step, method, response.status,
                response.headers.get("x-backend", "") if ok else "",
                "" if ok else short(response.body), time.monotonic() - started))
            if response.headers.get("connection", "").lower() == "close":
                writer.close()
                connection = None
        if connection is not None:
            connection[1].close()


# --------------------------------------------------------------------------
# App instances
# --------------------------------------------------------------------------


@dataclass
class App:
    name: str
    port: int
    inflight_file: Path
    delay_ms: float
    proc: bench.Proc | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, pm: bench.ProcessManager) -> None:
        self.inflight_file.write_bytes(b"\0" * 4)
        self.starts += 1
        self.proc = pm.start(f"{self.name}-{self.starts}", [
            sys.executable, str(Path(__file__).resolve()), "--serve-app", self.name,
            str(self.port), str(self.inflight_file), str(self.delay_ms)])

    async def serving(self, timeout: float) -> float:
        """Wait until it answers GET /healthz itself; returns that moment."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            bench._check_alive(self.proc)
            response = await get_once(self.port, "/healthz", timeout=1.0)
            if response is not None and response.status == 200:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise bench.BenchError(f"{self.name} did not serve on {self.address} within "
                                       f"{timeout:.0f}s; its output ends:\n"
                                       f"{self.proc.log_tail()}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float) -> str:
        """SIGTERM, and wait for the exit; SIGKILL after ``timeout``. Returns a note if it did
        not exit 0 by itself."""
        assert self.proc is not None
        popen = self.proc.popen
        popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while popen.poll() is None:
            if time.monotonic() > deadline:
                popen.kill()
                popen.wait()
                return f"{self.name} had not exited {timeout:.0f}s after SIGTERM: killed"
            await asyncio.sleep(0.005)
        return "" if popen.returncode == 0 else f"{self.name} exited {popen.returncode}"

    def kill(self) -> int:
        """SIGKILL, and wait until it is gone; returns the requests it was handling."""
        assert self.proc is not None
        self.proc.popen.kill()
        self.proc.popen.wait()
        return int(struct.unpack("<i", self.inflight_file.read_bytes()[:4])[0])


# --------------------------------------------------------------------------
# Proxy configs
# --------------------------------------------------------------------------


def weir_conf(port: int, admin_port: int, apps: list[App]) -> str:
    """What a new user writes from config/weir.yaml: no health, retry or outlier keys."""
    upstreams = ", ".join(app.address for app in apps)
    return f"""listen: {HOST}:{port}
admin:
  listen: {HOST}:{admin_port}
services:
  - name: app
    versions:
      stable: {{upstreams: [{upstreams}]}}
"""


def nginx_conf(prefix: Path, port: int, apps: list[App]) -> str:
    """A plain upstream block: nginx's defaults (max_fails=1 fail_timeout=10s, proxy_next_upstream
    error timeout, no keep-alive to the upstream)."""
    servers = "".join(f"        server {app.address};\n" for app in apps)
    return (
        bench._nginx_common(prefix)
        + "http {\n"
        + bench.nginx_http_common(prefix)
        + f"""    upstream app {{
{servers}    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://app;
        }}
    }}
}}
"""
    )


def haproxy_conf(port: int, apps: list[App]) -> str:
    """A plain backend with no checks (round robin; HAProxy's default connect retries)."""
    servers = "".join(f"    server {app.name} {app.address}\n" for app in apps)
    return f"""global
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
    bind {HOST}:{port}
    default_backend app

backend app
{servers}"""


# --------------------------------------------------------------------------
# The drill
# --------------------------------------------------------------------------


@dataclass
class KindResult:
    failed: int = 0
    total: int = 0
    in_flight: list[int] = field(default_factory=list)  # at each crash, the app's count
    back_after: list[float | None] = field(default_factory=list)  # s; None: not within the run
    slow: int = 0  # requests (any outcome) that took over SLOW seconds
    max_seconds: float = 0.0
    p99_ms: float = 0.0
    notes: list[str] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (count, what), top first


@dataclass
class TargetResult:
    name: str
    config: str
    kinds: dict[str, KindResult]
    requests: int
    seconds: float


async def drill(args: argparse.Namespace, pm: bench.ProcessManager, port: int,
                apps: list[App]) -> tuple[dict[str, KindResult], list[Outcome], float]:
    load = Load(port, args.clients, args.post_every)
    t0 = time.monotonic()
    load.start()
    spans: dict[str, tuple[float, float]] = {}
    restarts: dict[str, list[tuple[str, float, float]]] = {}  # (app, serving at, end of kind)
    results = {kind: KindResult() for kind in args.kinds}
    try:
        await asyncio.sleep(args.warmup)
        for kind in args.kinds:
            result = results[kind]
            load.kind = kind
            begin = time.monotonic()
            ready: list[tuple[str, float]] = []
            for _ in range(args.rounds):
                for app in apps:
                    load.step = f"{app.name} stopping"
                    if kind == "graceful":
                        note = await app.stop(args.stop_timeout)
                        if note:
                            result.notes.append(note)
                    else:
                        result.in_flight.append(app.kill())
                    load.step = f"{app.name} down"
                    await asyncio.sleep(args.down)
                    app.start(pm)
                    serving = await app.serving(args.startup_timeout)
                    ready.append((app.name, serving))
                    load.step = f"{app.name} back"
                    await asyncio.sleep(args.settle)
            spans[kind] = (begin, time.monotonic())
            restarts[kind] = [(name, at, spans[kind][1]) for name, at in ready]
    finally:
        await load.stop()
    for kind, (begin, end) in spans.items():
        result = results[kind]
        mine = [o for o in load.outcomes if begin <= o.started < end]
        failed = [o for o in mine if o.status != 200]
        result.total, result.failed = len(mine), len(failed)
        times = sorted(o.seconds for o in mine)
        if times:
            result.slow = sum(1 for t in times if t > SLOW)
            result.max_seconds = times[-1]
            result.p99_ms = 1000 * times[min(len(times) - 1, int(len(times) * 0.99))]
        what = Counter(f"{o.method} {o.status or 'no response'}"
                       f"{': ' + o.detail if o.detail else ''} ({o.step})" for o in failed)
        result.failures = [(n, w) for w, n in what.most_common(args.show_failures)]
        for name, serving, _ in restarts[kind]:
            firsts = [o.started for o in load.outcomes
                      if o.backend == name and o.started >= serving]
            result.back_after.append(min(firsts) - serving if firsts else None)
    return results, load.outcomes, time.monotonic() - t0


def stop_proc(proc: bench.Proc, grace: float = 5.0) -> None:
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=5)


async def wait_proxy(proc: bench.Proc, port: int, timeout: float) -> None:
    """Until a GET through the proxy is answered 200 by one of the apps."""
    deadline = time.monotonic() + timeout
    while True:
        bench._check_alive(proc)
        response = await get_once(port, "/ready")
        if response is not None and response.status == 200 and "x-backend" in response.headers:
            return
        if time.monotonic() > deadline:
            raise bench.BenchError(f"{proc.name} on port {port} did not answer 200 from an app "
                                   f"within {timeout:.0f}s; its output ends:\n{proc.log_tail()}")
        await asyncio.sleep(0.05)


async def run_target(args: argparse.Namespace, pm: bench.ProcessManager,
                     tools: dict[str, str], workdir: Path, name: str, tree: Path | None,
                     apps: list[App]) -> TargetResult:
    port = bench.free_port()
    if name == "nginx":
        prefix = workdir / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, port, apps))
        proc = pm.start("nginx", [tools["nginx"], "-p", f"{prefix}/", "-e",
                                  str(prefix / "error.log"), "-c", str(conf)])
    elif name == "haproxy":
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, apps))
        proc = pm.start("haproxy", [tools["haproxy"], "-db", "-f", str(conf)])
    else:
        assert tree is not None
        conf = workdir / f"{name}.yaml"
        conf.write_text(weir_conf(port, bench.free_port(), apps))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", ""))
                                            if p)
        proc = pm.start(name, [sys.executable, "-m", "proxy", "run", "-c", str(conf)],
                        cwd=tree, env=env)
    try:
        bench.wait_for_port(proc, port, args.startup_timeout)
        await wait_proxy(proc, port, args.startup_timeout)
        where = f" from {tree}" if tree is not None and tree != bench.REPO_ROOT else ""
        print(f"{name} on {HOST}:{port}{where}: drill starts", file=sys.stderr)
        results, outcomes, seconds = await drill(args, pm, port, apps)
        bench._check_alive(proc)
    finally:
        stop_proc(proc)
    for kind, r in results.items():
        extra = f", in flight at each crash {r.in_flight}" if kind == "crash" else ""
        print(f"  {name} {kind}: {r.failed:,} failed of {r.total:,}{extra}", file=sys.stderr)
    return TargetResult(name, conf.read_text(), results, len(outcomes), seconds)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _ratio(r: KindResult | None) -> str:
    return "-" if r is None else f"{r.failed:,} / {r.total:,}"


def _in_flight(r: KindResult | None) -> str:
    if r is None or not r.in_flight:
        return "-"
    return "+".join(map(str, r.in_flight)) + f" = {sum(r.in_flight)}"


def _back(results: dict[str, KindResult]) -> str:
    times = [t for r in results.values() for t in r.back_after]
    if not times:
        return "-"
    never = sum(1 for t in times if t is None)
    seen = [t for t in times if t is not None]
    text = f"{statistics.median(seen):.2f} / {max(seen):.2f}" if seen else ""
    if never:
        text += f"{', ' if text else ''}{never} never"
    return text


def _slow(results: dict[str, KindResult]) -> str:
    return " / ".join(f"{r.slow:,} ({r.max_seconds:.1f})" for r in results.values())


def render(results: list[TargetResult]) -> str:
    rows = [("proxy", "graceful restarts failed", "crashes failed", "in flight at each crash",
             f"over {SLOW:g} s (max s)", "back in rotation s (median / max)")]
    for t in results:
        rows.append((t.name, _ratio(t.kinds.get("graceful")), _ratio(t.kinds.get("crash")),
                     _in_flight(t.kinds.get("crash")), _slow(t.kinds), _back(t.kinds)))
    return bench.format_table(rows)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/rolling.py",
        description="Failed requests during rolling restarts (graceful, then crashes) of app "
                    "instances behind Weir, nginx and HAProxy, in the same run.")
    p.add_argument("--only", default=",".join(PROXIES),
                   help=f"comma-separated proxies, from {','.join(PROXIES)} (default: all)")
    p.add_argument("--weir-only", action="store_true", help="the same as --only weir")
    p.add_argument("--weir-tree", action="append", default=[], metavar="NAME=DIR",
                   help="also drill Weir from another checkout DIR as NAME (an A/B in one run); "
                        "repeatable")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="which drills, in order: graceful (SIGTERM), crash (SIGKILL) "
                        "(default: both)")
    p.add_argument("--rounds", type=int, default=1,
                   help="passes over the instances per drill (default 1)")
    p.add_argument("--instances", type=int, default=3, help="app instances (default 3)")
    p.add_argument("--clients", type=int, default=6,
                   help="keep-alive clients sending back to back (default 6)")
    p.add_argument("--post-every", type=int, default=0, metavar="N",
                   help="one request in N is a POST with a 100-byte body (default 0: GETs only)")
    p.add_argument("--down", type=float, default=1.0,
                   help="seconds an instance stays stopped before it starts again (default 1)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds of load after an instance serves again, before the next one "
                        "is stopped (default 1)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of load before the first drill (default 1)")
    p.add_argument("--app-delay-ms", type=float, default=3.0,
                   help="each app request's time in the handler (default 3)")
    p.add_argument("--stop-timeout", type=float, default=APP_SHUTDOWN_TIMEOUT + 5,
                   help="seconds to wait for an app's exit after SIGTERM before SIGKILL "
                        f"(default {APP_SHUTDOWN_TIMEOUT + 5:g})")
    p.add_argument("--startup-timeout", type=float, default=20.0,
                   help="seconds for a proxy or an app to come up (default 20)")
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="stop everything after this long, whatever is left (default 600)")
    p.add_argument("--show-failures", type=int, default=6, metavar="N",
                   help="kinds of failure listed per proxy and drill (default 6)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temp dir (configs, logs) for debugging")
    p.add_argument("--serve-app", nargs=4, metavar=("NAME", "PORT", "FILE", "DELAY_MS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_app:
        return args
    only = [n.strip().lower() for n in ("weir" if args.weir_only else args.only).split(",")
            if n.strip()]
    if not only or set(only) - set(PROXIES):
        p.error(f"--only takes a subset of {','.join(PROXIES)}; got {args.only!r}")
    args.only = [n for n in PROXIES if n in only]
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.kinds or set(args.kinds) - set(KINDS) or len(set(args.kinds)) < len(args.kinds):
        p.error(f"--kinds takes {','.join(KINDS)} or one of them")
    if args.rounds < 1 or args.instances < 2 or args.clients < 1 or args.post_every < 0:
        p.error("--rounds and --clients must be >= 1, --instances >= 2, --post-every >= 0")
    if min(args.down, args.settle, args.warmup, args.app_delay_ms) < 0:
        p.error("--down, --settle, --warmup and --app-delay-ms must be >= 0")
    args.weir_trees = []
    for spec in args.weir_tree:
        name, sep, tree = spec.partition("=")
        if not sep or not name or name in PROXIES:
            p.error(f"--weir-tree takes NAME=DIR with a new NAME; got {spec!r}")
        if not (Path(tree) / "proxy").is_dir():
            p.error(f"--weir-tree {spec!r}: no proxy package in {tree}")
        args.weir_trees.append((name, Path(tree).resolve()))
    return args


def _git_head(tree: Path) -> str:
    try:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "proxy"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    head = done.stdout.strip() or "?"
    return head + (" + uncommitted changes in proxy/" if dirty.stdout.strip() else "")


async def run_all(args: argparse.Namespace, pm: bench.ProcessManager, tools: dict[str, str],
                  workdir: Path) -> list[TargetResult]:
    apps = [App(f"app{i}", bench.free_port(), workdir / f"app{i}.inflight", args.app_delay_ms)
            for i in range(args.instances)]
    for app in apps:
        app.start(pm)
    for app in apps:
        await app.serving(args.startup_timeout)
    targets: list[tuple[str, Path | None]] = [
        (name, bench.REPO_ROOT if name == "weir" else None)
        for name in args.only if name == "weir" or name in tools]
    targets += args.weir_trees
    results = []
    for name, tree in targets:
        results.append(await run_target(args, pm, tools, workdir, name, tree, apps))
    return results


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("aiohttp") is None:
        print("error: the app instances need aiohttp: run this with the Python of Weir's "
              "virtualenv (. .venv/bin/activate)", file=sys.stderr)
        return 2
    tools = {n: path for n in ("nginx", "haproxy") if n in args.only
             and (path := bench.find_tool(n)) is not None}
    notes = [f"{n} skipped: not installed ({INSTALL_HINT})" for n in args.only
             if n != "weir" and n not in tools]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not any(n == "weir" or n in tools for n in args.only) and not args.weir_trees:
        print("error: no proxy to drill", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="weir-rolling-"))
    pm = bench.ProcessManager(workdir)
    load_before = os.getloadavg()
    try:
        results = asyncio.run(asyncio.wait_for(run_all(args, pm, tools, workdir),
                                               timeout=args.max_seconds))
    except TimeoutError:
        raise bench.BenchError(f"ran over --max-seconds {args.max_seconds:g}; stopped") from None
    finally:
        bench.cleanup(pm, workdir, args.keep_tmp)
    load_after = os.getloadavg()

    per = f"{args.rounds} pass(es) over " if args.rounds > 1 else ""
    print()
    print(f"{per}{args.instances} instances, each stopped and started again {args.down:g}s "
          f"later under {args.clients} keep-alive clients"
          + (f" (1 in {args.post_every} a POST)" if args.post_every else "")
          + f"; weir at {_git_head(bench.REPO_ROOT)}")
    print(render(results))
    print("failed = anything but a 200; in flight = requests the app had read and not "
          f"answered when killed (its own count); over {SLOW:g} s = requests (answered or "
          "not) that took longer, per drill as listed (graceful / crash), with the longest; "
          "back in rotation = from an instance serving again to the proxy's first request to it")
    for t in results:
        for kind, r in t.kinds.items():
            for note in r.notes:
                print(f"note: {t.name} {kind}: {note}")
            if r.failures:
                print(f"{t.name} {kind}, failures:")
                for n, what in r.failures:
                    print(f"  {n:>7,} x {what}")
    for note in notes:
        print(f"note: {note}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"({os.cpu_count()} CPUs)")

    if args.json is not None:
        doc = {
            "settings": {k: v for k, v in vars(args).items()
                         if k not in ("json", "serve_app", "weir_trees", "weir_tree")}
            | {"weir_trees": [[n, str(t)] for n, t in args.weir_trees],
               "weir_commit": _git_head(bench.REPO_ROOT)},
            "results": [asdict(t) for t in results],
            "load_average": [load_before[0], load_after[0]],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_app:
        name, port, path, delay = args.serve_app
        serve_app(name, int(port), path, float(delay))
        return 0
    hint = "" if args.keep_tmp else bench.KEEP_TMP_HINT
    code, failed = bench.run_stopping_cleanly(lambda: run(args), hint)
    return failed or code or 0


if __name__ == "__main__":
    sys.exit(main())
