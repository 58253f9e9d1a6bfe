#!/usr/bin/env python3
"""Memory per idle keep-alive client connection: Weir (and nginx, as a reference).

Starts on loopback a tiny keep-alive backend (this file, ``--serve-backend``) and, one after
the other, Weir (one process) and nginx (one worker, ``master_process off``) in front of it.
For each: a warm-up (a few hundred requests over a few connections, then closed), the
proxy's memory (VmRSS from /proc/PID/status and Pss from /proc/PID/smaps_rollup, summed over
its process group), then ``--connections`` client connections that each send one keep-alive
request, read the answer and stay open and idle, in ``--steps`` steps with the memory read
after each; then all are closed and the memory read once more. The result is
(memory with all connections open - memory before) / connections, and the slope of a
least-squares line through the steps, which is less sensitive to one-off allocations.

What it does not count: kernel socket memory (not in any process's RSS), and for nginx the
connection slots it allocates at start for all ``worker_connections`` (measured apart: the
"upfront" column). The issue's target for Weir is under 10 KiB per idle connection.

``--http2``: the client connections speak HTTP/2 in cleartext with prior knowledge (h2c): the
connection preface and SETTINGS, one GET on stream 1, its answer read to the end (and the
server's SETTINGS acknowledged), then idle. nginx then listens with ``http2`` (1.22's syntax:
h2c only on that port); both proxies still reach the backend over HTTP/1.1. The target for
Weir (issue 19) is at most 32 KiB per idle HTTP/2 connection. The clients use the ``h2``
package (a Weir dependency); the HTTP/1.1 mode needs nothing beyond the standard library.

Each client connection is one file descriptor here and one in the proxy, so this raises its
own RLIMIT_NOFILE soft limit and starts the proxies with the same. Connections come from
``--source-addresses`` addresses (127.0.0.1, 127.0.0.2, ...) to spread them over more
ephemeral ports when one address's range (see /proc/sys/net/ipv4/ip_local_port_range) would
not do. Bounded run time (about 30 s for 10,000 connections); everything it starts is
stopped, even on Ctrl-C. Standard library only.

    python bench/idle_memory.py                     # 10,000 connections, Weir and nginx
    python bench/idle_memory.py --connections 200 --no-nginx
    python bench/idle_memory.py --proxy-nofile 1024 --connections 2000   # a low fd limit
    python bench/idle_memory.py --http2 --connections 2000             # idle h2c connections
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

if TYPE_CHECKING:
    from h2.connection import H2Connection

HOST = bench.HOST
TARGET_BYTES = 10 * 1024  # the target per idle connection, for Weir
H2_TARGET_BYTES = 32 * 1024  # issue 19's, per idle HTTP/2 client connection
FD_MARGIN = 512  # fds beyond the client connections: listeners, upstreams, logs, the loop
PORTS_PER_ADDRESS = 20_000  # stay well inside one address's ephemeral range (28k by default)
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nhello world\n"
DEADLINE_S = 110.0  # the whole run, as promised: under two minutes


# --------------------------------------------------------------------------
# The backend: a keep-alive HTTP/1.1 server that answers at once
# --------------------------------------------------------------------------


async def _backend_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or b"0")
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
        pass
    finally:
        writer.close()


async def serve_backend(port: int) -> None:
    server = await asyncio.start_server(_backend_connection, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------
# Memory and fds of a process group
# --------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


@dataclass
class Memory:
    rss: int  # bytes, summed over the group
    pss: int
    fds: int
    processes: int


def group_memory(pgid: int) -> Memory:
    """VmRSS and Pss (bytes) and open fds, summed over the process group (Weir's workers)."""
    pids = bench.group_members(pgid) or [pgid]
    fds = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fds += len(os.listdir(f"/proc/{pid}/fd"))
    return Memory(rss=sum(_status_kib(p, "VmRSS") for p in pids) * 1024,
                  pss=sum(_pss_kib(p) for p in pids) * 1024, fds=fds, processes=len(pids))


def nofile_limit(pid: int) -> str:
    """The soft and hard 'Max open files' of a process, as /proc/PID/limits shows them."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "?"


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and wanted > hard:
        with contextlib.suppress(ValueError, OSError):  # root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
        raise bench.BenchError(
            f"need {wanted} open files but the hard limit is {hard}: raise it (ulimit -Hn, "
            "LimitNOFILE=) or use fewer --connections")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


def request_bytes(i: int) -> bytes:
    # A sticky key, as in bench/run.py: Weir hashes it like real traffic.
    return (f"GET /idle/{i} HTTP/1.1\r\nHost: {HOST}\r\nx-user-id: user-{i % 1000}\r\n"
            "User-Agent: weir-idle-memory\r\n\r\n").encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep-alive) of one response, its body read."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and b"close" in value.lower():
            keep = False
    if length:
        await reader.readexactly(length)
    return status, keep


# --------------------------------------------------------------------------
# An h2c client (--http2)
# --------------------------------------------------------------------------


def h2_request_headers(i: int, authority: str) -> list[tuple[bytes, bytes]]:
    """The headers of the HTTP/2 request ``i``: the same request as ``request_bytes``."""
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority.encode()),
            (b":path", f"/idle/{i}".encode()), (b"x-user-id", f"user-{i % 1000}".encode()),
            (b"user-agent", b"weir-idle-memory")]


def new_h2_client() -> H2Connection:
    """A client-side h2 state machine, its preface and SETTINGS ready to send."""
    try:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
    except ImportError as exc:
        raise bench.BenchError("--http2 needs the h2 package (a Weir dependency: run this "
                               "from Weir's virtualenv, or pip install h2)") from exc
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


async def h2_exchange(conn: H2Connection, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, stream_id: int,
                      headers: list[tuple[bytes, bytes]]) -> int:
    """Send one GET on ``stream_id`` (with whatever ``conn`` has to send first: the preface
    on a new connection) and read until its answer has ended; the answer's status. What the
    server sent along (SETTINGS, PING, WINDOW_UPDATE) is acknowledged as h2 does, and that
    is sent before this returns, so the connection is then quiet on both sides."""
    from h2.events import (
        ConnectionTerminated,
        DataReceived,
        ResponseReceived,
        StreamEnded,
        StreamReset,
    )

    conn.send_headers(stream_id, headers, end_stream=True)
    writer.write(conn.data_to_send())
    status = 0
    ended = False
    while not ended:
        data = await reader.read(65536)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, ResponseReceived) and event.stream_id == stream_id:
                status = int(dict(event.headers).get(b":status", b"0"))
            elif isinstance(event, DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded) and event.stream_id == stream_id:
                ended = True
            elif isinstance(event, StreamReset) and event.stream_id == stream_id:
                raise ConnectionResetError(f"stream reset ({event.error_code!r})")
            elif isinstance(event, ConnectionTerminated):
                raise ConnectionResetError(f"GOAWAY ({event.error_code!r})")
        writer.write(conn.data_to_send())
    await writer.drain()
    return status


@dataclass
class Opened:
    held: list[asyncio.StreamWriter] = field(default_factory=list)
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, what: str) -> None:
        self.failures += 1
        self.errors[what] = self.errors.get(what, 0) + 1


async def open_idle(port: int, first: int, count: int, sources: list[str], concurrency: int,
                    opened: Opened, timeout: float, http2: bool = False) -> None:
    """Open ``count`` connections, one request each (over h2c with ``http2``), and keep them
    (idle) in ``opened``."""
    gate = asyncio.Semaphore(concurrency)
    authority = f"{HOST}:{port}"

    async def one(i: int) -> None:
        async with gate:
            writer = None
            try:
                async with asyncio.timeout(10):
                    # Round-robin over the source addresses: each has its own port range.
                    local = (sources[i % len(sources)], 0) if len(sources) > 1 else None
                    reader, writer = await asyncio.open_connection(HOST, port, local_addr=local)
                    if http2:
                        # The client's h2 state is dropped once the answer is in: only the
                        # socket stays, as with HTTP/1.1 (this side's memory is not measured).
                        status = await h2_exchange(new_h2_client(), reader, writer, 1,
                                                   h2_request_headers(i, authority))
                        keep = True
                    else:
                        writer.write(request_bytes(i))
                        status, keep = await _read_response(reader)
                if status != 200 or not keep:
                    opened.fail(f"status {status}" + ("" if keep else ", connection: close"))
                    writer.close()
                    return
                opened.held.append(writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, TimeoutError) as exc:
                opened.fail(type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError)
                                                  and exc.errno else ""))
                if writer is not None:
                    writer.close()

    async with asyncio.timeout(timeout):
        await asyncio.gather(*(one(i) for i in range(first, first + count)))


async def close_all(opened: Opened) -> None:
    for writer in opened.held:
        writer.close()
    opened.held.clear()
    await asyncio.sleep(0)


async def _warm_up_h2(port: int, requests: int, connections: int) -> None:
    per = max(1, requests // connections)
    authority = f"{HOST}:{port}"

    async def one(c: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            conn = new_h2_client()
            for i in range(per):
                status = await h2_exchange(conn, reader, writer, 2 * i + 1,
                                           h2_request_headers(c * per + i, authority))
                if status != 200:
                    raise bench.BenchError(f"warm-up request got {status} on port {port}")
        finally:
            writer.close()

    async with asyncio.timeout(30):
        await asyncio.gather(*(one(c) for c in range(connections)))


def warm_up(port: int, requests: int = 300, connections: int = 10, http2: bool = False) -> None:
    """Exercise the request path (imports, caches, the upstream pool) before the baseline;
    with ``http2`` over h2c, several requests on each connection."""
    if http2:
        try:
            asyncio.run(_warm_up_h2(port, requests, connections))
        except (OSError, TimeoutError) as exc:
            raise bench.BenchError(f"warm-up against port {port} over h2c failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        return
    per = max(1, requests // connections)
    for c in range(connections):
        conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
        try:
            for i in range(per):
                conn.request("GET", f"/warm/{i}", headers={"x-user-id": f"user-{c * per + i}"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise bench.BenchError(f"warm-up request got {resp.status} on port {port}")
        except (OSError, http.client.HTTPException) as exc:
            raise bench.BenchError(f"warm-up against port {port} failed: {exc}") from exc
        finally:
            conn.close()


def wait_for_h2_ok(proc: bench.Proc, port: int, timeout: float) -> None:
    """Poll until one GET over h2c through ``port`` is answered 200."""
    authority = f"{HOST}:{port}"

    async def once() -> int:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            async with asyncio.timeout(2):
                return await h2_exchange(new_h2_client(), reader, writer, 1,
                                         h2_request_headers(0, authority))
        finally:
            writer.close()

    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        bench._check_alive(proc)
        try:
            status = asyncio.run(once())
            if status == 200:
                return
            last = f"status {status}"
        except (OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise bench.BenchError(f"{proc.name} on port {port} did not answer a GET over h2c "
                                   f"with 200 within {timeout:.0f}s (last: {last}); its output "
                                   f"ends:\n{proc.log_tail()}")
        time.sleep(0.1)


# --------------------------------------------------------------------------
# One proxy
# --------------------------------------------------------------------------


@dataclass
class Point:
    connections: int
    rss: int
    pss: int
    fds: int


@dataclass
class Result:
    name: str
    nofile: str
    before: Memory
    points: list[Point]
    after_close: Memory
    failures: int
    errors: dict[str, int]
    held: int
    seconds: float
    per_conn_rss: float | None = None
    per_conn_pss: float | None = None
    slope_rss: float | None = None
    upfront_per_slot: float | None = None
    notes: list[str] = field(default_factory=list)


def slope(xs: list[int], ys: list[int]) -> float | None:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den


def settle(seconds: float) -> None:
    # Let the proxy finish the requests' bookkeeping (timers, pool returns) before reading.
    time.sleep(seconds)


def measure(name: str, proc: bench.Proc, port: int, args: argparse.Namespace,
            sources: list[str], deadline: float) -> Result:
    warm_up(port, http2=args.http2)
    settle(2 * args.settle)
    before = group_memory(proc.pid)
    opened = Opened()
    points = [Point(0, before.rss, before.pss, before.fds)]
    t0 = time.monotonic()
    loop = asyncio.new_event_loop()
    try:
        per_step = math.ceil(args.connections / args.steps)
        done = 0
        while done < args.connections:
            count = min(per_step, args.connections - done)
            left = deadline - time.monotonic()
            if left < 5:
                raise bench.BenchError("out of time (the run is bounded at "
                                       f"{DEADLINE_S:.0f}s); try fewer --connections")
            loop.run_until_complete(open_idle(port, done, count, sources, args.concurrency,
                                              opened, timeout=left - 3, http2=args.http2))
            done += count
            bench._check_alive(proc)
            settle(args.settle)
            mem = group_memory(proc.pid)
            points.append(Point(len(opened.held), mem.rss, mem.pss, mem.fds))
            print(f"  {name}: {len(opened.held):,} idle connections held "
                  f"({opened.failures:,} failed), RSS {mem.rss / 2**20:.1f} MiB, "
                  f"Pss {mem.pss / 2**20:.1f} MiB, {mem.fds:,} fds", file=sys.stderr)
        seconds = time.monotonic() - t0
        held = len(opened.held)
        loop.run_until_complete(close_all(opened))
        settle(2 * args.settle)
        after_close = group_memory(proc.pid)
    finally:
        # After Ctrl-C or an error, connections may be half open: cancel them and close all
        # sockets here, before the loop goes, rather than leave it to the garbage collector.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        with contextlib.suppress(BaseException):
            loop.run_until_complete(close_all(opened))
        loop.close()
    last = points[-1]
    result = Result(name=name, nofile=nofile_limit(proc.pid), before=before, points=points,
                    after_close=after_close, failures=opened.failures, errors=opened.errors,
                    held=held, seconds=seconds)
    # The proxy's own count: one more fd per client connection it still holds. A proxy that
    # closed some idle connections (nginx out of slots, an idle timeout) would show fewer.
    proxy_held = last.fds - before.fds
    if held and proxy_held < held * 0.99:
        result.notes.append(f"the client held {held:,} connections but the proxy had only "
                            f"{proxy_held:,} more fds: it closed some of them")
    if held:
        result.per_conn_rss = (last.rss - before.rss) / held
        result.per_conn_pss = (last.pss - before.pss) / held
        result.slope_rss = slope([p.connections for p in points], [p.rss for p in points])
    return result


# --------------------------------------------------------------------------
# Starting the proxies
# --------------------------------------------------------------------------


def _with_nofile(limit: int) -> Any:
    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    return apply


def start_weir(pm: bench.ProcessManager, workdir: Path, backend_port: int,
               args: argparse.Namespace, nofile: int) -> tuple[bench.Proc, int]:
    port, admin_port = bench.free_port(), bench.free_port()
    conf = workdir / "weir.yaml"
    # idle_timeout well above the run time: connections must stay open while they are counted.
    # max_connections set outright: its default (half the open-file limit) is not measured here.
    conf.write_text(f"""# generated by bench/idle_memory.py
listen: {HOST}:{port}
admin: {{listen: {HOST}:{admin_port}}}
watch: false
limits: {{idle_timeout: 600s, max_connections: {args.connections + 1000}}}
services:
  - name: bench
    versions:
      stable: {{upstreams: ["{HOST}:{backend_port}"]}}
      canary: {{upstreams: ["{HOST}:{backend_port}"]}}
    weights: {{stable: 90, canary: 10}}
    sticky: {{header: x-user-id}}
""")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(bench.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "proxy", "run", "-c", str(conf), *args.weir_args]
    proc = start_with_nofile(pm, "weir", argv, nofile, cwd=bench.REPO_ROOT, env=env)
    bench.wait_for_port(proc, port, args.startup_timeout)
    bench.wait_for_http_ok(proc, port, args.startup_timeout, {"x-user-id": "user-1"})
    if args.http2:  # h2c with prior knowledge on the same port
        wait_for_h2_ok(proc, port, args.startup_timeout)
    return proc, port


def start_with_nofile(pm: bench.ProcessManager, name: str, argv: list[str], nofile: int,
                      **kw: Any) -> bench.Proc:
    """pm.start, with the child's soft RLIMIT_NOFILE set to ``nofile`` before it execs."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, hard = old
    # Set it around the fork rather than with preexec_fn (not safe with threads); the child
    # inherits it, and this process's own limit is restored right after.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    try:
        return pm.start(name, argv, **kw)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def nginx_conf(prefix: Path, port: int, backend_port: int, worker_connections: int,
               http2: bool = False) -> str:
    """nginx, one process, proxying to the backend over HTTP/1.1 with keep-alive; ``http2``:
    its clients speak h2c with prior knowledge (``listen ... http2``; idle HTTP/2 connections
    are closed after ``keepalive_timeout`` in nginx 1.19.7 and later, as HTTP/1.1 ones)."""
    listen = f"{HOST}:{port}" + (" http2" if http2 else "") + " backlog=4096"
    return f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {worker_connections + FD_MARGIN};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections {worker_connections};
}}
http {{
{bench.nginx_http_common(prefix, keepalive_timeout="600s")}    upstream backend {{
        server {HOST}:{backend_port};
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(pm: bench.ProcessManager, nginx: str, workdir: Path, name: str,
                backend_port: int, worker_connections: int, nofile: int,
                timeout: float, http2: bool = False) -> tuple[bench.Proc, int]:
    prefix = workdir / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    port = bench.free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, backend_port, worker_connections, http2))
    argv = [nginx, "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]
    proc = start_with_nofile(pm, name, argv, nofile)
    bench.wait_for_port(proc, port, timeout)
    if http2:
        wait_for_h2_ok(proc, port, timeout)
    else:
        bench.wait_for_http_ok(proc, port, timeout)
    return proc, port


def stop(pm: bench.ProcessManager, proc: bench.Proc) -> None:
    """Stop one server now (the next is measured alone), leaving the others running."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=10)
    except Exception:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=5)
    pm.procs.remove(proc)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Result]:
    deadline = time.monotonic() + DEADLINE_S
    wanted = args.connections + FD_MARGIN
    soft, hard = raise_nofile(wanted)
    proxy_nofile = args.proxy_nofile or soft
    n_sources = args.source_addresses or max(1, math.ceil(args.connections / PORTS_PER_ADDRESS))
    sources = [f"127.0.0.{i}" for i in range(1, n_sources + 1)]
    print(f"RLIMIT_NOFILE of this process {soft}/{hard}; proxies started with soft limit "
          f"{proxy_nofile}; {args.connections:,} connections from {', '.join(sources)}",
          file=sys.stderr)

    nginx = None if args.no_nginx else bench.find_tool("nginx")
    if nginx is None and not args.no_nginx:
        print("nginx not found: measuring Weir only (apt-get install -y nginx)", file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="weir-idle-"))
    pm = bench.ProcessManager(workdir)
    results: list[Result] = []
    try:
        backend_port = bench.free_port()
        backend = pm.start("backend", [sys.executable, str(Path(__file__).resolve()),
                                       "--serve-backend", str(backend_port)])
        bench.wait_for_port(backend, backend_port, args.startup_timeout)
        bench.wait_for_http_ok(backend, backend_port, args.startup_timeout)

        proc, port = start_weir(pm, workdir, backend_port, args, proxy_nofile)
        print(f"weir on {HOST}:{port}, max open files {nofile_limit(proc.pid)}", file=sys.stderr)
        results.append(measure("weir", proc, port, args, sources, deadline))
        stop(pm, proc)

        if nginx is not None:
            # nginx closes idle keep-alive connections once fewer than 1/16 of its slots are
            # free ("reusing connections"), so give it room to hold them all.
            slots = args.connections + args.connections // 8 + FD_MARGIN
            # The same nginx with few slots: the difference at rest is what it allocates up
            # front per worker_connections slot, a cost the per-connection number leaves out.
            small, small_port = start_nginx(pm, nginx, workdir, "nginx-small", backend_port,
                                            1024, proxy_nofile, args.startup_timeout,
                                            args.http2)
            warm_up(small_port, http2=args.http2)
            settle(2 * args.settle)
            small_rss = group_memory(small.pid).rss
            stop(pm, small)
            proc, port = start_nginx(pm, nginx, workdir, "nginx", backend_port, slots,
                                     proxy_nofile, args.startup_timeout, args.http2)
            print(f"nginx on {HOST}:{port}, max open files {nofile_limit(proc.pid)}",
                  file=sys.stderr)
            res = measure("nginx", proc, port, args, sources, deadline)
            res.upfront_per_slot = (res.before.rss - small_rss) / (slots - 1024)
            results.append(res)
            stop(pm, proc)
    finally:
        bench.cleanup(pm, workdir, args.keep_tmp)
    for res in results:
        if res.failures:
            res.notes.append(f"{res.failures:,} of {args.connections:,} connections failed: "
                             + ", ".join(f"{k} x{v}" for k, v in sorted(res.errors.items())))
    return results


def target_bytes(http2: bool) -> int:
    """Weir's target per idle client connection: HTTP/1.1's, or HTTP/2's with ``http2``."""
    return H2_TARGET_BYTES if http2 else TARGET_BYTES


def render(results: list[Result], args: argparse.Namespace) -> str:
    rows: list[tuple[str, ...]] = [("proxy", "held", "failed", "RSS before", "RSS all open",
                                    "B/conn (RSS)", "B/conn (Pss)", "slope B/conn",
                                    "upfront B/slot", "RSS closed", "max open files")]
    for r in results:
        last = r.points[-1]
        rows.append((
            r.name, f"{r.held:,}", f"{r.failures:,}", f"{r.before.rss / 2**20:.1f} MiB",
            f"{last.rss / 2**20:.1f} MiB",
            "-" if r.per_conn_rss is None else f"{r.per_conn_rss:,.0f}",
            "-" if r.per_conn_pss is None else f"{r.per_conn_pss:,.0f}",
            "-" if r.slope_rss is None else f"{r.slope_rss:,.0f}",
            "-" if r.upfront_per_slot is None else f"{r.upfront_per_slot:,.0f}",
            f"{r.after_close.rss / 2**20:.1f} MiB", r.nofile))
    kind = ("idle HTTP/2 (h2c) connections, one request on stream 1 each" if args.http2
            else "idle keep-alive connections, one request each")
    lines = [f"{args.connections:,} {kind}, in {args.steps} steps", bench.format_table(rows)]
    weir = next((r for r in results if r.name == "weir"), None)
    ref = next((r for r in results if r.name == "nginx"), None)
    if weir is not None and weir.per_conn_rss is not None:
        target = target_bytes(args.http2)
        # HTTP/1.1's target (issue 15) is "under", HTTP/2's (issue 19) "at most".
        within = weir.per_conn_rss <= target if args.http2 else weir.per_conn_rss < target
        verdict = ("at most" if args.http2 else "under") if within else "OVER"
        what = "HTTP/2 connection" if args.http2 else "connection"
        lines.append(f"weir: {weir.per_conn_rss / 1024:.2f} KiB per idle {what}, {verdict} "
                     f"the {target // 1024} KiB target")
        if ref is not None and ref.per_conn_rss:
            ratio = weir.per_conn_rss / ref.per_conn_rss
            line = f"weir/nginx: {ratio:.1f}x per idle connection"
            if ref.upfront_per_slot is not None:
                # As if nginx were sized with one slot per connection, no more.
                total = ref.per_conn_rss + ref.upfront_per_slot
                line += (f"; {weir.per_conn_rss / total:.1f}x counting nginx's upfront "
                         f"{ref.upfront_per_slot:,.0f} B per worker_connections slot")
            lines.append(line)
    for r in results:
        lines.extend(f"note: {r.name}: {n}" for n in r.notes)
    lines.append("B/conn = (RSS with all open - RSS before) / connections held; slope = "
                 "least-squares fit over the steps; kernel socket buffers are not in RSS")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/idle_memory.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10_000,
                   help="idle client connections to hold (default 10000)")
    p.add_argument("--steps", type=int, default=4, help="steps to open them in (default 4)")
    p.add_argument("--concurrency", type=int, default=200,
                   help="connections being opened at once (default 200)")
    p.add_argument("--source-addresses", type=int, default=0, metavar="N",
                   help="connect from 127.0.0.1..127.0.0.N (default: one per 20,000 "
                        "connections)")
    p.add_argument("--proxy-nofile", type=int, default=0, metavar="N",
                   help="start the proxies with this soft RLIMIT_NOFILE instead of this "
                        "process's raised one (e.g. 1024, a common default)")
    p.add_argument("--settle", type=float, default=0.5, metavar="S",
                   help="seconds to wait before each memory reading (default 0.5)")
    p.add_argument("--http2", action="store_true",
                   help="idle HTTP/2 client connections (h2c with prior knowledge, one request "
                        "on stream 1) instead of HTTP/1.1 keep-alive ones; needs the h2 package")
    p.add_argument("--no-nginx", action="store_true", help="measure Weir only")
    p.add_argument("--weir-arg", action="append", default=[], metavar="ARG",
                   help="extra argument(s) for `python -m proxy run`, shell-split")
    p.add_argument("--startup-timeout", type=float, default=20.0)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.connections < 1 or args.steps < 1 or args.concurrency < 1:
        p.error("--connections, --steps and --concurrency must be >= 1")
    if not 0 <= args.source_addresses <= 254:
        p.error("--source-addresses must be within 0..254")
    args.steps = min(args.steps, args.connections)
    args.weir_args = [a for chunk in args.weir_arg for a in shlex.split(chunk)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backend is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_backend(args.serve_backend))
        return 0
    results, failed = bench.run_stopping_cleanly(lambda: run(args))
    if results is None:
        return failed
    print(render(results, args))
    if args.json is not None:
        doc = {"settings": {"connections": args.connections, "steps": args.steps,
                            "source_addresses": args.source_addresses,
                            "proxy_nofile": args.proxy_nofile, "weir_args": args.weir_args,
                            "http2": args.http2, "target_bytes": target_bytes(args.http2)},
               "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    # Failed connections are a finding (an fd limit, a proxy closing them): exit 1 to say so.
    return 0 if all(r.held and not r.failures for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
