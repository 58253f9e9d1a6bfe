#!/usr/bin/env python3
"""Throughput/latency benchmark: Weir vs nginx vs HAProxy on one core.

One nginx backend (pinned to the load CPU) answers ``200 hello world`` for every
path. Three reverse proxies sit in front of it, each a single process pinned to
the proxy CPU with keep-alive to the upstream: nginx, HAProxy and Weir (with
routing rules and sticky hashing enabled). wrk, pinned to the load CPU, drives
each proxy in turn (interleaved, rotated per round) and the backend directly as
a baseline. Results are the median per target over ``--rounds`` rounds.

``--load h2load`` drives the same targets over HTTP/2 instead (h2c with prior knowledge, h2load
``-c10 -m10``): nginx and HAProxy listen for HTTP/2 only, Weir takes it on its one port, every
proxy still speaks HTTP/1.1 to the backend, and the baseline is h2load against a second, h2c
port of the backend.

``--grpc`` drives gRPC unary calls (h2load POSTs one pre-framed message with
``content-type: application/grpc`` and ``te: trailers``) through nginx (``grpc_pass``), HAProxy
(``proto h2`` both ways) and Weir (a version with ``protocol: h2c``) to a gRPC-shaped backend:
nghttpd serving a framed message as ``application/grpc`` with the trailer ``grpc-status: 0``.

Stdlib only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = "apt-get install -y nginx haproxy wrk"
H2_INSTALL_HINT = "apt-get install -y nginx haproxy nghttp2-client"
GRPC_INSTALL_HINT = "apt-get install -y nginx haproxy nghttp2-client nghttp2-server"
LOADS = ("wrk", "h2load")
H2_CONNECTIONS = 10  # h2load -c, the default with --load h2load
H2_STREAMS = 10  # h2load -m
# h2load sends the same headers on every request (no per-request script as with wrk): one sticky
# key, so Weir's sticky hashing still runs.
H2_HEADERS = {"x-user-id": "user-1"}

# --grpc: one unary method. The path ends in .grpc so that nghttpd, the backend, answers it with
# content-type application/grpc (its MIME table goes by the file's extension); no proxy here
# looks at the method's name.
GRPC_PATH = "/bench.Echo/Call.grpc"


def grpc_frame(payload: bytes) -> bytes:
    """One gRPC length-prefixed message: compressed flag 0, the length (4 bytes, big-endian),
    the payload."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


# A protobuf message of one string field (field 1, wire type 2): 0x0a, the length, the bytes.
GRPC_REQUEST = grpc_frame(b"\x0a\x05hello")
GRPC_RESPONSE = grpc_frame(b"\x0a\x0bhello world")
GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers", **H2_HEADERS}
GRPC_REQUEST_FILE = "grpc-request.bin"  # GRPC_REQUEST, in the run's temp dir
HOST = "127.0.0.1"
PROXIES: tuple[str, ...] = ("nginx", "haproxy", "weir")
BASELINE = "baseline"
REFERENCE = "nginx"
N_USERS = 1000
EXPECTED_BODY = b"hello world\n"
OTHER_CPU_WARN = 10.0  # % of one core used by unrelated processes during a run
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class BenchError(Exception):
    """A setup or run failure with a message meant for the user."""


# --------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------


@dataclass
class Proc:
    """A long-running server process started by this script."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-max_chars:].strip() or "(log empty)"


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``(comm)`` field, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """PIDs whose process group and session are both ``pgid``.

    Every server is started with ``start_new_session=True``, so its pid is
    both the session id and the process-group id of it and all its children
    (e.g. Weir's worker processes).
    """
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat_fields(int(entry))
        # fields: 0 state, 1 ppid, 2 pgrp, 3 session, ..., 11 utime, 12 stime
        if fields and int(fields[2]) == pgid and int(fields[3]) == pgid:
            members.append(int(entry))
    return members


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds used by one live process (0 once it is gone)."""
    fields = _proc_stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """Total user+system CPU seconds used by live members of the group."""
    return sum(process_cpu_seconds(pid) for pid in group_members(pgid))


def parse_cpu_list(spec: str) -> set[int]:
    """``"0"``, ``"0,1"`` or ``"0-3"`` as a set of CPU numbers (taskset's syntax)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_ticks(cpus: set[int] | None = None) -> tuple[int, int]:
    """(idle+iowait, total) jiffies of the given CPUs (None: all), from /proc/stat."""
    idle = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            if cpus is None or int(name[3:]) in cpus:
                nums = [int(v) for v in values[:8]]  # user..steal; guest is in user
                idle += nums[3] + nums[4]
                total += sum(nums)
    return idle, total


class ProcessManager:
    """Starts server processes and guarantees they are all stopped."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name=name, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every process group, then SIGKILL whatever is left."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            remaining = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=remaining)
        for proc in self.procs:
            # Leader still alive (pgid certainly ours) or stray group members.
            if proc.popen.poll() is None or group_members(proc.pid):
                _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=2.0)
        self.procs.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def own_cpu_seconds(pm: ProcessManager) -> float:
    """CPU seconds of everything this benchmark runs: the servers, this script, and the
    finished children it waited for (wrk)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return total + sum(group_cpu_seconds(p.pid) for p in pm.procs)


def cleanup(pm: ProcessManager, workdir: Path, keep_tmp: bool) -> None:
    """Stop every process started and remove the temp dir (unless asked to keep it)."""
    # A second Ctrl-C must not interrupt the cleanup.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pm.stop_all()
        if keep_tmp:
            print(f"kept temp dir {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, old)


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


KEEP_TMP_HINT = "(rerun with --keep-tmp to keep configs and logs)"
T = TypeVar("T")


def run_stopping_cleanly(work: Callable[[], T], hint: str = "") -> tuple[T | None, int]:
    """A bench's main work, with SIGTERM and SIGHUP turned into a clean exit (what was started
    is stopped by the work's own cleanup): (result, 0), or (None, exit code) after a
    BenchError (1, said on stderr with ``hint``) or Ctrl-C (130)."""
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    try:
        return work(), 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if hint:
            print(hint, file=sys.stderr)
        return None, 1
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return None, 130


# --------------------------------------------------------------------------
# Readiness checks
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _check_alive(proc: Proc) -> None:
    code = proc.popen.poll()
    if code is not None:
        raise BenchError(
            f"{proc.name} exited with code {code} during startup; "
            f"its output ends:\n{proc.log_tail()}"
        )


def wait_for_port(proc: Proc, port: int, timeout: float) -> None:
    """Poll until ``port`` accepts a TCP connection (or fail at the deadline)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        _check_alive(proc)
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{proc.name} did not accept connections on {HOST}:{port} "
                f"within {timeout:.0f}s; its output ends:\n{proc.log_tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def wait_for_http_ok(
    proc: Proc, port: int, timeout: float, headers: dict[str, str] | None = None
) -> None:
    """Poll until ``GET /`` through ``port`` returns 200 with the backend body."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    delay = 0.01
    while True:
        _check_alive(proc)
        conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
        try:
            conn.request("GET", "/bench-check", headers=headers or {})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200 and body == EXPECTED_BODY:
                return
            last = f"status {resp.status}, body {body[:80]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{proc.name} on port {port} did not answer GET / with 200 "
                f"{EXPECTED_BODY!r} within {timeout:.0f}s (last: {last}); "
                f"its output ends:\n{proc.log_tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def wait_for_h2_ok(
    proc: Proc, port: int, timeout: float, nghttp: str, headers: dict[str, str] | None = None
) -> None:
    """Poll until ``GET /`` through ``port`` over h2c (prior knowledge, with nghttp) answers
    the backend body."""
    deadline = time.monotonic() + timeout
    argv = [nghttp, "--timeout=2"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://{HOST}:{port}/bench-check")
    last = "no attempt"
    delay = 0.01
    while True:
        _check_alive(proc)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=5, check=False)
            if done.returncode == 0 and done.stdout == EXPECTED_BODY:
                return
            last = f"nghttp exit {done.returncode}, {(done.stdout + done.stderr)[:200]!r}"
        except subprocess.TimeoutExpired:
            last = "nghttp timed out"
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{proc.name} on port {port} did not answer GET / over h2c with "
                f"{EXPECTED_BODY!r} within {timeout:.0f}s (last: {last}); "
                f"its output ends:\n{proc.log_tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def check_grpc(proc: Proc, port: int, timeout: float, nghttp: str, request: Path,
               headers: dict[str, str] | None = None) -> H2Answer:
    """--grpc's preflight: one unary call through ``port`` with ``nghttp -v``, until an HTTP
    200 comes back (or the deadline); that answer must be a whole gRPC answer (the message,
    then the trailer grpc-status 0), or the run stops here, loudly: h2load counts only HTTP
    statuses and would count a proxy that drops trailers as fine."""
    deadline = time.monotonic() + timeout
    argv = [nghttp, "-v", "-n", "--no-dep", "--timeout=2", f"--data={request}"]
    for name, value in (GRPC_HEADERS | (headers or {})).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://{HOST}:{port}{GRPC_PATH}")
    last = "no attempt"
    delay = 0.01
    while True:
        _check_alive(proc)
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=5, check=False)
            answer = parse_nghttp_verbose(done.stdout)
            status = answer.header_blocks[0].get(":status") if answer and \
                answer.header_blocks else None
            if status == "200":
                problems = grpc_answer_problems(answer)
                if problems:
                    raise BenchError(
                        f"{proc.name} on port {port} did not pass a whole gRPC answer: "
                        + "; ".join(problems) + f"\n{shlex.join(argv)} said:\n"
                        + done.stdout[-3000:] + done.stderr[-1000:])
                assert answer is not None
                return answer
            last = f"nghttp exit {done.returncode}, status {status}, {done.stderr[-200:]!r}"
        except subprocess.TimeoutExpired:
            last = "nghttp timed out"
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{proc.name} on port {port} did not answer a gRPC call with HTTP 200 within "
                f"{timeout:.0f}s (last: {last}); its output ends:\n{proc.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# --------------------------------------------------------------------------
# Config generation
# --------------------------------------------------------------------------


def _nginx_common(prefix: Path, workers: int = 1, master_process: bool = False) -> str:
    """nginx's top level: in the foreground; by default one process that is its own worker.
    More than one worker needs the master process (without it nginx ignores the count)."""
    return f"""daemon off;
master_process {"on" if master_process else "off"};
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
"""


def nginx_http_common(prefix: Path, keepalive_timeout: str = "75s") -> str:
    """The http block's settings every nginx in bench/ shares: no access log, long keep-alive,
    temp files under its own prefix."""
    tmp = prefix / "tmp"
    return f"""    access_log off;
    keepalive_timeout {keepalive_timeout};
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
"""


def nginx_backend_conf(prefix: Path, port: int, h2_port: int | None = None) -> str:
    """The backend; with ``h2_port`` also a server answering the same over h2c there (the
    baseline of ``--load h2load``; the proxies always reach ``port`` over HTTP/1.1)."""
    location = """        location / {
            default_type text/plain;
            return 200 "hello world\\n";
        }
"""
    h2 = "" if h2_port is None else f"""    server {{
        listen {HOST}:{h2_port} http2 backlog=4096;
{location}    }}
"""
    return (
        _nginx_common(prefix)
        + "http {\n"
        + nginx_http_common(prefix)
        + f"""    server {{
        listen {HOST}:{port} backlog=4096;
{location}    }}
{h2}}}
"""
    )


def nginx_proxy_conf(
    prefix: Path,
    port: int,
    backend_port: int,
    *,
    workers: int = 1,
    master_process: bool = False,
    reuseport: bool = False,
    http2: bool = False,
    keepalive: int = 64,
    grpc: bool = False,
    access_log: Path | None = None,
) -> str:
    """nginx as a keep-alive proxy to the backend; ``reuseport``: one listening socket per
    worker, spread by the kernel, as Weir's workers do (instead of one shared socket);
    ``http2``: clients speak h2c with prior knowledge (nginx 1.22's ``listen ... http2``;
    HTTP/1.1 clients are then refused), the upstream stays HTTP/1.1; ``keepalive``: idle
    upstream connections kept, which must cover the requests in flight, or nginx closes the
    surplus after each answer and opens new ones; ``grpc`` (implies ``http2``): ``grpc_pass``
    to the backend over h2c instead (nginx's gRPC proxy runs one stream per upstream
    connection, so ``keepalive`` matters as much there); ``access_log``: log each request's
    end time, status and path there (``$msec $status $uri``, buffered, flushed every second)
    instead of nothing."""
    http2 = http2 or grpc
    listen = f"{HOST}:{port}" + (" http2" if http2 else "") + " backlog=4096"
    listen += " reuseport" if reuseport else ""
    if grpc:
        location = "            grpc_pass grpc://backend;\n"
    else:
        location = """            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
"""
    # In the server block: an access_log beside the http block's "access_log off" is off too.
    log_format = "" if access_log is None else "    log_format timed '$msec $status $uri';\n"
    log = "" if access_log is None else (
        f"        access_log {access_log} timed buffer=64k flush=1s;\n")
    return (
        _nginx_common(prefix, workers, master_process)
        + "http {\n"
        + nginx_http_common(prefix)
        + log_format
        + f"""    upstream backend {{
        server {HOST}:{backend_port};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
{log}        location / {{
{location}        }}
    }}
}}
"""
    )


def start_nginx(pm: ProcessManager, tools: dict[str, str], workdir: Path, name: str, cpus: str,
                conf_text: str) -> Proc:
    """nginx with ``conf_text`` as its config, under ``workdir/name`` (the prefix the configs
    above were made for, with the temp dirs they name), pinned to ``cpus`` with taskset."""
    prefix = workdir / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    argv = [tools["nginx"], "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]
    return pm.start(name, [tools["taskset"], "-c", cpus, *argv])


def haproxy_conf(port: int, backend_port: int, http2: bool = False,
                 backend_h2: bool = False) -> str:
    """HAProxy as a keep-alive proxy; ``http2``: clients speak h2c (``proto h2``);
    ``backend_h2``: so does the backend (``proto h2`` on the server line, for --grpc)."""
    bind = f"{HOST}:{port}" + (" proto h2" if http2 else "")
    server = f"{HOST}:{backend_port}" + (" proto h2" if backend_h2 else "")
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend fe
    bind {bind}
    default_backend be

backend be
    server s1 {server}
"""


def weir_conf(port: int, admin_port: int, backend_port: int, protocol: str | None = None) -> str:
    """Weir with two versions (90/10), sticky users and a header rule; ``protocol``: what the
    versions' upstreams speak (``h2c`` for --grpc), left to Weir's default when None."""
    upstream = f'["{HOST}:{backend_port}"]'
    version = f"upstreams: {upstream}" + (f", protocol: {protocol}" if protocol else "")
    return f"""listen: {HOST}:{port}
admin: {{listen: {HOST}:{admin_port}}}
services:
  - name: bench
    versions:
      stable: {{{version}}}
      canary: {{{version}}}
    weights: {{stable: 90, canary: 10}}
    sticky: {{header: x-user-id}}
    rules:
      - match: {{headers: {{x-beta: "yes"}}}}
        version: canary
"""


def grpc_backend_files(root: Path) -> Path:
    """The backend's document root for --grpc (under ``root``): ``GRPC_PATH`` holding
    ``GRPC_RESPONSE``, and beside it the MIME table that makes nghttpd answer it as
    application/grpc. Returns the document root."""
    docroot = root / "docroot"
    answer = docroot / GRPC_PATH.lstrip("/")
    answer.parent.mkdir(parents=True, exist_ok=True)
    answer.write_bytes(GRPC_RESPONSE)
    (root / "mime.types").write_text("application/grpc grpc\n")
    return docroot


def nghttpd_argv(nghttpd: str, port: int, docroot: Path) -> list[str]:
    """nghttpd as a gRPC-shaped backend over h2c: every answer is a static file (read once
    the request has ended, as a gRPC server does), followed by the trailer ``grpc-status: 0``
    (nghttpd sends a trailer only after a body, so a missing file would show: 404, no
    trailer). ``docroot`` from ``grpc_backend_files``."""
    return [nghttpd, "--no-tls", "-a", HOST, "-d", str(docroot),
            f"--mime-types-file={docroot.parent / 'mime.types'}",
            "--trailer=grpc-status: 0", str(port)]


def wrk_user_script(n_users: int, delay_ms: int = 0) -> str:
    """wrk script cycling through pre-formatted requests with x-user-id set.

    The requests are built once in ``init`` so the per-request Lua cost is a
    table lookup; the same script is used for every target so the load
    generator does identical work everywhere. With ``delay_ms`` each connection
    waits that long before each request: a moderate, equal load for every
    target, so that latency shows what a proxy adds rather than how soon it
    saturates (wrk's latency does not include the wait).
    """
    pacing = f"\nfunction delay()\n   return {delay_ms}\nend\n" if delay_ms else ""
    return pacing + f"""-- generated by bench/run.py
local requests = {{}}
local n = {n_users}
local i = 0

function init(args)
   for u = 1, n do
      requests[u] = wrk.format("GET", "/", {{["x-user-id"] = "user-" .. u}})
   end
   i = math.random(0, n - 1)
end

function request()
   i = i % n + 1
   return requests[i]
end
"""


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_RE_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_RE_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RE_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_RE_SOCK = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_RE_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def to_ms(value: str, unit: str) -> float:
    return round(float(value) * _UNIT_MS[unit], 6)


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    cpu_pct: float | None = None
    pinned_cpu_idle_pct: float | None = None
    other_cpu_pct: float | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(output: str) -> WrkResult:
    """Parse wrk ``--latency`` output; raises BenchError if it is incomplete."""
    rps = _RE_RPS.search(output)
    pcts = {float(p): to_ms(v, u) for p, v, u in _RE_PCT.findall(output)}
    if rps is None or 50.0 not in pcts or 99.0 not in pcts:
        raise BenchError(f"could not parse wrk output:\n{output}")
    total = _RE_TOTAL.search(output)
    sock = _RE_SOCK.search(output)
    non2xx = _RE_NON2XX.search(output)
    names = ("connect", "read", "write", "timeout")
    counts = map(int, sock.groups()) if sock else (0,) * len(names)
    socket_errors = dict(zip(names, counts, strict=True))
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=pcts[50.0],
        p99_ms=pcts[99.0],
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


def run_load_tool(tool: str, argv: list[str], duration: float) -> str:
    """Run a load generator to its end (bounded), and return what it printed."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{tool} hung: {shlex.join(argv)}") from exc
    if done.returncode != 0:
        raise BenchError(
            f"{tool} failed ({done.returncode}): {shlex.join(argv)}\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def run_wrk(
    wrk: str,
    taskset: str,
    cpus: str,
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int,
    script: Path | None,
) -> str:
    argv = [taskset, "-c", cpus, wrk, f"-t{threads}", f"-c{connections}"]
    argv += [f"-d{max(1, round(duration))}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    return run_load_tool("wrk", argv, duration)


# --------------------------------------------------------------------------
# h2load (--load h2load)
# --------------------------------------------------------------------------

_RE_H2_RPS = re.compile(r"^finished in [\d.]+\w+, ([\d.]+) req/s", re.M)
_RE_H2_REQS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.M,
)
_RE_H2_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)
# "traffic: 1.17MB (1230647) total, 517.58KB (530000) headers (space savings 49.52%),
# 175.78KB (180000) data": the last count is the bytes of DATA frames' payloads received.
_RE_H2_TRAFFIC = re.compile(
    r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?\((\d+)\) data", re.M)
_DURATION = r"([\d.]+)(us|ms|s|m|h)"
_RE_H2_TIME = re.compile(
    rf"^time for request:\s+{_DURATION}\s+{_DURATION}\s+{_DURATION}\s+{_DURATION}", re.M
)
# Percentile lines, should an h2load print them ("50%  1.23ms", as wrk does); 1.52 does not,
# and they are then taken from its --log-file.
_RE_H2_PCT = re.compile(rf"^\s*(\d+(?:\.\d+)?)%\s+{_DURATION}\s*$", re.M)


@dataclass
class H2loadResult(WrkResult):
    """One h2load run: req/s, p50/p99 (from its per-request log) and its own latency summary
    (``time for request``: mean, sd, max), its request counts and status classes."""

    mean_ms: float = 0.0
    sd_ms: float = 0.0
    max_ms: float = 0.0
    succeeded: int = 0
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    status: dict[str, int] = field(default_factory=dict)
    # Bytes of response bodies (DATA frames) received; None if h2load did not say.
    data_bytes: int | None = None
    # --grpc: succeeded answers that did not carry the response message (a trailers-only
    # gRPC error is an HTTP 200 with no body, which h2load counts as a success).
    missing_messages: int = 0

    @property
    def errors(self) -> int:
        # h2load counts every request that did not end in a 2xx/3xx as failed: 4xx/5xx answers,
        # resets, and those lost with their connection ("errored") or timed out.
        return self.failed + self.missing_messages


def log_percentiles(log_text: str, pcts: tuple[float, ...] = (50.0, 99.0)) -> dict[float, float]:
    """Percentiles (nearest rank), in ms, of the request times in an h2load ``--log-file``:
    tab-separated rows of start time (us since the epoch), status, and us to the response's
    end. Empty if the log has no rows."""
    times = sorted(int(cols[2]) for line in log_text.splitlines()
                   if len(cols := line.split("\t")) >= 3)
    if not times:
        return {}
    n = len(times)
    return {p: round(times[min(n - 1, max(0, math.ceil(n * p / 100) - 1))] / 1000, 6)
            for p in pcts}


def parse_h2load(output: str, log_text: str | None = None) -> H2loadResult:
    """Parse h2load's summary (and, for p50/p99, its ``--log-file`` if the summary has no
    percentiles); raises BenchError if either is incomplete."""
    rps = _RE_H2_RPS.search(output)
    reqs = _RE_H2_REQS.search(output)
    status = _RE_H2_STATUS.search(output)
    times = _RE_H2_TIME.search(output)
    if rps is None or reqs is None or status is None or times is None:
        raise BenchError(f"could not parse h2load output:\n{output}")
    pcts = {float(p): to_ms(v, u) for p, v, u in _RE_H2_PCT.findall(output)}
    if not (50.0 in pcts and 99.0 in pcts) and log_text is not None:
        pcts = log_percentiles(log_text)
    if 50.0 not in pcts or 99.0 not in pcts:
        raise BenchError(f"no request times in h2load's output or log:\n{output}")
    _total, _started, done, succeeded, failed, errored, timeout = map(int, reqs.groups())
    traffic = _RE_H2_TRAFFIC.search(output)
    codes = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, status.groups()), strict=True))
    g = times.groups()  # min, max, mean, sd: each a number and its unit
    _min_ms, max_ms, mean_ms, sd_ms = (to_ms(g[i], g[i + 1]) for i in range(0, 8, 2))
    return H2loadResult(
        rps=float(rps.group(1)),
        p50_ms=pcts[50.0],
        p99_ms=pcts[99.0],
        requests=done,
        non_2xx=codes["4xx"] + codes["5xx"],
        mean_ms=mean_ms,
        sd_ms=sd_ms,
        max_ms=max_ms,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=codes,
        data_bytes=int(traffic.group(3)) if traffic else None,
    )


def missing_messages(succeeded: int, data_bytes: int | None, message_len: int) -> int:
    """How many of ``succeeded`` answers cannot have carried their ``message_len``-byte
    message, given the body bytes h2load received in all (failed answers' bodies, such as
    error pages, only make the count lower). Raises BenchError without the byte count."""
    if data_bytes is None:
        raise BenchError("h2load printed no traffic line: cannot tell whether the gRPC "
                         "answers carried their message")
    short = succeeded * message_len - data_bytes
    return max(0, math.ceil(short / message_len))


# --------------------------------------------------------------------------
# A gRPC answer as nghttp -v shows it (--grpc's preflight)
# --------------------------------------------------------------------------

_RE_NGHTTP_FIELD = re.compile(r"^\[[\s\d.]+\] recv \(stream_id=(\d+)\) (:?[^:]+): (.*)$")
_RE_NGHTTP_FRAME = re.compile(
    r"^\[[\s\d.]+\] recv (HEADERS|DATA|RST_STREAM) frame <length=(\d+), flags=0x([0-9a-f]+), "
    r"stream_id=(\d+)>")
_RE_NGHTTP_ERROR = re.compile(r"error_code=(\w+)")


@dataclass
class H2Answer:
    """What one stream received: its header blocks in order (the answer's headers, then any
    trailers), whether each ended the stream, the body bytes and a reset's error code."""

    header_blocks: list[dict[str, str]] = field(default_factory=list)
    block_end_stream: list[bool] = field(default_factory=list)
    data_bytes: int = 0
    data_end_stream: bool = False
    reset: str | None = None


def parse_nghttp_verbose(output: str) -> H2Answer | None:
    """The answer on the first stream that received a header block, from ``nghttp -v -n``'s
    transcript; None if no stream did."""
    fields: dict[int, dict[str, str]] = {}
    answers: dict[int, H2Answer] = {}
    first: int | None = None
    pending_reset: H2Answer | None = None
    for line in output.splitlines():
        if pending_reset is not None:
            if code := _RE_NGHTTP_ERROR.search(line):
                pending_reset.reset = code.group(1)
                pending_reset = None
            continue
        if m := _RE_NGHTTP_FIELD.match(line):
            fields.setdefault(int(m.group(1)), {})[m.group(2).lower()] = m.group(3)
            continue
        m = _RE_NGHTTP_FRAME.match(line)
        if m is None:
            continue
        kind, length, flags, stream = m.group(1), int(m.group(2)), int(m.group(3), 16), \
            int(m.group(4))
        end_stream = bool(flags & 0x1)
        if kind == "HEADERS":
            answer = answers.setdefault(stream, H2Answer())
            first = stream if first is None else first
            answer.header_blocks.append(fields.pop(stream, {}))
            answer.block_end_stream.append(end_stream)
        elif kind == "DATA":
            answer = answers.setdefault(stream, H2Answer())
            answer.data_bytes += length
            answer.data_end_stream = answer.data_end_stream or end_stream
        else:
            pending_reset = answers.setdefault(stream, H2Answer())
            pending_reset.reset = "?"
    return None if first is None else answers[first]


def grpc_answer_problems(answer: H2Answer | None, message: bytes = GRPC_RESPONSE) -> list[str]:
    """What is wrong with a unary gRPC answer (empty if nothing): it must be HTTP 200 with
    content-type application/grpc, carry ``message`` (by its length) and end with trailers
    holding grpc-status 0."""
    if answer is None:
        return ["no answer (no HEADERS frame received)"]
    if not answer.header_blocks:
        return ["no header block" + (f"; stream reset ({answer.reset})" if answer.reset else "")]
    problems: list[str] = []
    head = answer.header_blocks[0]
    if head.get(":status") != "200":
        problems.append(f"HTTP status {head.get(':status', 'missing')}, not 200")
    ctype = head.get("content-type", "")
    if not ctype.startswith("application/grpc"):
        problems.append(f"content-type {ctype or 'missing'}, not application/grpc")
    if answer.data_bytes != len(message):
        problems.append(f"{answer.data_bytes} body bytes, not the {len(message)}-byte message")
    if len(answer.header_blocks) < 2:
        if "grpc-status" in head:
            problems.append(f"no trailers: grpc-status {head['grpc-status']} came with the "
                            "answer's headers (a trailers-only answer)")
        else:
            problems.append("no trailers: no grpc-status at all")
    else:
        trailers = answer.header_blocks[-1]
        if trailers.get("grpc-status") != "0":
            problems.append(f"trailer grpc-status {trailers.get('grpc-status', 'missing')}, "
                            "not 0")
        if not answer.block_end_stream[-1]:
            problems.append("the trailers did not end the stream")
    if answer.reset is not None:
        problems.append(f"stream reset ({answer.reset})")
    return problems


def run_h2load(
    h2load: str,
    taskset: str,
    cpus: str,
    url: str,
    *,
    duration: float,
    connections: int,
    streams: int,
    threads: int,
    headers: dict[str, str],
    log_file: Path | None,
    data: Path | None = None,
) -> str:
    """h2load over h2c (prior knowledge) for ``duration`` seconds; its stdout. With ``data``
    every request is a POST of that file's bytes."""
    argv = [taskset, "-c", cpus, h2load, f"-t{threads}", f"-c{connections}", f"-m{streams}"]
    argv += [f"-D{max(1, round(duration))}"]
    if data is not None:
        argv.append(f"--data={data}")
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    return run_load_tool("h2load", argv, duration)


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    proc: Proc


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def find_tools(names: tuple[str, ...], install_hint: str) -> dict[str, str] | None:
    """The paths of the tools named; None, after saying on stderr which are missing and how
    to install them."""
    tools = {name: path for name in names if (path := find_tool(name)) is not None}
    missing = [name for name in names if name not in tools]
    if missing:
        print(
            f"error: missing {', '.join(missing)}; install with:\n    {install_hint}"
            + ("\n(taskset is in util-linux)" if "taskset" in missing else ""),
            file=sys.stderr,
        )
        return None
    return tools


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=(
            "Benchmark Weir against nginx and HAProxy (single core, "
            "keep-alive upstream, shared nginx backend)."
        ),
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)"
    )
    p.add_argument(
        "--load", choices=LOADS, default=None,
        help="wrk: HTTP/1.1 (default); h2load: HTTP/2 over h2c with prior knowledge, "
             "nginx and HAProxy listening for HTTP/2, every proxy's upstream still HTTP/1.1")
    p.add_argument(
        "--connections", type=int, default=None,
        help=f"wrk (or h2load) connections (default 50; {H2_CONNECTIONS} with --load h2load)")
    p.add_argument(
        "--streams", type=int, default=H2_STREAMS,
        help=f"h2load -m: requests in flight per connection (default {H2_STREAMS}; "
             "--load h2load only)")
    p.add_argument(
        "--grpc", action="store_true",
        help="gRPC unary calls (implies --load h2load): h2load POSTs a framed message to "
             "nginx (grpc_pass), HAProxy (proto h2 both ways) and Weir (protocol: h2c), all "
             "in front of nghttpd answering application/grpc with the trailer grpc-status 0; "
             "needs nghttp2-server")
    p.add_argument(
        "--delay-ms", type=int, default=0,
        help="each wrk connection waits this long before each request: a fixed moderate "
             "load instead of saturation, for comparing the latency each proxy adds "
             "(default 0: as fast as possible)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of wrk before each measured run, 0 = off (default 2)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds; the median per target is reported (default 1)",
    )
    p.add_argument(
        "--only",
        default=",".join(PROXIES),
        help=f"comma-separated proxies to run, from {','.join(PROXIES)} (default: all)",
    )
    p.add_argument(
        "--no-baseline", action="store_true", help="skip the direct-to-backend reference run"
    )
    p.add_argument(
        "--weir-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument(s) for `python -m proxy run`; "
        "repeatable, shell-split, e.g. --weir-arg '--workers 2' "
        "or --weir-arg=--workers --weir-arg=2",
    )
    p.add_argument(
        "--weir-tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run Weir from another checkout DIR as target NAME, in the same rounds: "
        "an A/B comparison of two builds on one machine state; repeatable",
    )
    p.add_argument("--proxy-cpus", default="0", help="taskset CPU list for the proxies (default 0)")
    p.add_argument(
        "--load-cpus", default="1", help="taskset CPU list for wrk and the backend (default 1)"
    )
    p.add_argument(
        "--users",
        type=int,
        default=N_USERS,
        help=f"distinct x-user-id values sent (default {N_USERS})",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=20.0,
        help="seconds to wait for each server to come up (default 20)",
    )
    p.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE"
    )
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for debugging"
    )
    args = p.parse_args(argv)

    only = [n.strip().lower() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(PROXIES))
    if unknown or not only:
        p.error(f"--only takes a subset of {','.join(PROXIES)}; got {args.only!r}")
    args.only = [n for n in PROXIES if n in only]
    if args.grpc and args.load == "wrk":
        p.error("--grpc runs h2load (gRPC is HTTP/2); leave out --load wrk")
    if args.load is None:
        args.load = "h2load" if args.grpc else "wrk"
    h2load = args.load == "h2load"
    if args.connections is None:
        args.connections = H2_CONNECTIONS if h2load else 50
    if h2load and args.delay_ms:
        p.error("--delay-ms needs --load wrk (h2load has no per-request delay)")
    if args.streams < 1:
        p.error("--streams must be >= 1")
    if args.duration < 1 or args.connections < 1 or args.threads < 1:
        p.error("--duration, --connections and --threads must be >= 1")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads")
    if args.rounds < 1 or args.users < 1 or args.warmup < 0:
        p.error("--rounds and --users must be >= 1, --warmup >= 0")
    args.weir_args = [a for chunk in args.weir_arg for a in shlex.split(chunk)]
    args.weir_trees = []
    for spec in args.weir_tree:
        name, sep, tree = spec.partition("=")
        if not sep or not name or name in PROXIES or name == BASELINE:
            p.error(f"--weir-tree takes NAME=DIR with a new NAME; got {spec!r}")
        if not (Path(tree) / "proxy").is_dir():
            p.error(f"--weir-tree {spec!r}: no proxy package in {tree}")
        args.weir_trees.append((name, Path(tree).resolve()))
    return args


def _check_cpus(spec: str, flag: str) -> None:
    allowed = os.sched_getaffinity(0)
    try:
        wanted = parse_cpu_list(spec)
    except ValueError as exc:
        raise BenchError(f"{flag}: bad CPU list {spec!r}") from exc
    if not wanted or not wanted <= allowed:
        raise BenchError(
            f"{flag} {spec!r} is not within the CPUs available to this process ({sorted(allowed)})"
        )


def start_servers(
    args: argparse.Namespace,
    pm: ProcessManager,
    tools: dict[str, str],
    workdir: Path,
) -> tuple[Target, list[Target]]:
    taskset = tools["taskset"]
    timeout = args.startup_timeout
    sticky = {"x-user-id": "user-1"}
    h2 = args.load == "h2load"
    grpc = args.grpc
    backend_h2_port = free_port() if h2 and not grpc else None
    request = workdir / GRPC_REQUEST_FILE
    if grpc:
        request.write_bytes(GRPC_REQUEST)

    def ready(proc: Proc, port: int, headers: dict[str, str] | None = None) -> None:
        """The target answers the way the load will ask: HTTP/1.1, h2c with --load h2load, a
        whole gRPC answer with --grpc."""
        if grpc:
            answer = check_grpc(proc, port, timeout, tools["nghttp"], request, headers)
            head, trailers = answer.header_blocks[0], answer.header_blocks[-1]
            print(f"{proc.name}: gRPC answer {head[':status']} {head['content-type']}, "
                  f"{answer.data_bytes}-byte message, trailer grpc-status "
                  f"{trailers['grpc-status']}", file=sys.stderr)
        elif h2:
            wait_for_h2_ok(proc, port, timeout, tools["nghttp"], headers)
        else:
            wait_for_http_ok(proc, port, timeout, headers)

    def pinned(cpus: str, *cmd: str) -> list[str]:
        return [taskset, "-c", cpus, *cmd]

    def nginx(name: str, port: int, upstream_port: int | None) -> Proc:
        """nginx as the backend (no upstream) or as a proxy to upstream_port."""
        prefix = workdir / name
        if upstream_port is None:
            text, cpus = nginx_backend_conf(prefix, port, backend_h2_port), args.load_cpus
        else:
            # h2load keeps connections x streams requests in flight (100 by default), more
            # than the 64 idle upstream connections kept for wrk's 50: enough for all of them
            # (HAProxy shares its idle connections without a cap; Weir keeps 128).
            in_flight = args.connections * args.streams if h2 else 0
            text = nginx_proxy_conf(prefix, port, upstream_port, http2=h2,
                                    keepalive=max(64, in_flight), grpc=grpc)
            cpus = args.proxy_cpus
        return start_nginx(pm, tools, workdir, name, cpus, text)

    def weir(name: str, port: int, tree: Path) -> Proc:
        """Weir from the checkout at tree (this one, or another for an A/B run)."""
        admin_port = free_port()
        conf = workdir / f"{name}.yaml"
        conf.write_text(weir_conf(port, admin_port, backend_port,
                                  protocol="h2c" if grpc else None))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tree), env.get("PYTHONPATH", "")) if p
        )
        return pm.start(
            name,
            pinned(args.proxy_cpus, sys.executable, "-m", "proxy", "run", "-c", str(conf),
                   *args.weir_args),
            cwd=tree,
            env=env,
        )

    backend_port = free_port()
    if grpc:  # nghttpd: h2c only, the baseline straight on its one port
        docroot = grpc_backend_files(workdir / "backend")
        proc = pm.start("backend", pinned(args.load_cpus,
                                          *nghttpd_argv(tools["nghttpd"], backend_port, docroot)))
        wait_for_port(proc, backend_port, timeout)
        ready(proc, backend_port)
        what = "nghttpd (h2c, gRPC-shaped answers)"
    else:
        proc = nginx("backend", backend_port, None)
        wait_for_port(proc, backend_port, timeout)
        wait_for_http_ok(proc, backend_port, timeout)
        what = "nginx"
    backend = Target(BASELINE, backend_port, proc)
    print(f"backend {what} on {HOST}:{backend_port} (cpu {args.load_cpus})", file=sys.stderr)
    if backend_h2_port is not None:  # the baseline: h2load straight to the backend's h2c port
        ready(proc, backend_h2_port)
        backend = Target(BASELINE, backend_h2_port, proc)
        print(f"backend nginx h2c on {HOST}:{backend_h2_port}", file=sys.stderr)

    targets: list[Target] = []
    for name in args.only:
        port = free_port()
        headers: dict[str, str] | None = None
        if name == "nginx":
            proc = nginx("nginx", port, backend_port)
        elif name == "haproxy":
            conf = workdir / "haproxy.cfg"
            conf.write_text(haproxy_conf(port, backend_port, http2=h2, backend_h2=grpc))
            proc = pm.start(
                "haproxy", pinned(args.proxy_cpus, tools["haproxy"], "-db", "-f", str(conf))
            )
        else:
            proc = weir(name, port, REPO_ROOT)
            headers = sticky
        wait_for_port(proc, port, timeout)
        ready(proc, port, headers)
        print(f"{name} on {HOST}:{port} (cpu {args.proxy_cpus})", file=sys.stderr)
        targets.append(Target(name, port, proc))
    for name, tree in args.weir_trees:
        port = free_port()
        proc = weir(name, port, tree)
        wait_for_port(proc, port, timeout)
        ready(proc, port, sticky)
        print(f"{name} on {HOST}:{port} from {tree} (cpu {args.proxy_cpus})", file=sys.stderr)
        targets.append(Target(name, port, proc))
    return backend, targets


def measure(
    args: argparse.Namespace,
    tools: dict[str, str],
    pm: ProcessManager,
    target: Target,
    script: Path,
) -> WrkResult:
    grpc = getattr(args, "grpc", False)
    url = f"http://{HOST}:{target.port}" + (GRPC_PATH if grpc else "/")
    common = {
        "connections": args.connections,
        "threads": args.threads,
        "script": script,
    }
    # mirror.py and scaling.py call this with arguments of their own, without --load.
    h2load = getattr(args, "load", "wrk") == "h2load"
    h2_log: Path | None = None
    if h2load:
        # h2load's per-request log (for p50/p99), in memory where there is a tmpfs: the load
        # CPU then spends nothing on disk writes for it.
        shm = Path("/dev/shm")
        log_dir = shm if shm.is_dir() and os.access(shm, os.W_OK) else pm.workdir
        h2_log = log_dir / f"{pm.workdir.name}-h2load-{target.name}.tsv"

    def drive(duration: float, log: bool = False) -> str:
        if h2load:
            return run_h2load(
                tools["h2load"], tools["taskset"], args.load_cpus, url, duration=duration,
                connections=args.connections, streams=args.streams, threads=args.threads,
                headers=GRPC_HEADERS if grpc else H2_HEADERS, log_file=h2_log if log else None,
                data=pm.workdir / GRPC_REQUEST_FILE if grpc else None,
            )
        return run_wrk(
            tools["wrk"], tools["taskset"], args.load_cpus, url, duration=duration, **common
        )

    if args.warmup > 0:
        drive(args.warmup)
    _check_alive(target.proc)
    pinned = parse_cpu_list(args.load_cpus if target.name == BASELINE else args.proxy_cpus)
    cpu0 = group_cpu_seconds(target.proc.pid)
    idle0, total0 = cpu_ticks(pinned)
    all_idle0, all_total0 = cpu_ticks()
    own0 = own_cpu_seconds(pm)
    t0 = time.monotonic()
    try:
        out = drive(args.duration, log=True)
        wall = time.monotonic() - t0
        cpu1 = group_cpu_seconds(target.proc.pid)
        idle1, total1 = cpu_ticks(pinned)
        all_idle1, all_total1 = cpu_ticks()
        own1 = own_cpu_seconds(pm)
        log_text = None if h2_log is None else h2_log.read_text()
    finally:
        if h2_log is not None:
            h2_log.unlink(missing_ok=True)
    _check_alive(target.proc)
    result = parse_wrk(out) if log_text is None else parse_h2load(out, log_text)
    if grpc and isinstance(result, H2loadResult):
        result.missing_messages = missing_messages(result.succeeded, result.data_bytes,
                                                   len(GRPC_RESPONSE))
    result.cpu_pct = 100.0 * (cpu1 - cpu0) / wall if wall > 0 else None
    if total1 > total0:
        result.pinned_cpu_idle_pct = 100.0 * (idle1 - idle0) / (total1 - total0)
    if wall > 0:
        ticks = os.sysconf("SC_CLK_TCK")
        busy = ((all_total1 - all_total0) - (all_idle1 - all_idle0)) / ticks
        result.other_cpu_pct = max(0.0, 100.0 * (busy - (own1 - own0)) / wall)
    return result


@dataclass
class Summary:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_pct: float | None
    pinned_cpu_idle_pct: float | None
    other_cpu_pct: float | None
    runs: list[WrkResult]
    rps_vs_nginx: float | None = None
    p99_vs_nginx: float | None = None
    # h2load's own latency summary (--load h2load only): medians of its mean, sd and max
    mean_ms: float | None = None
    sd_ms: float | None = None
    max_ms: float | None = None


def summarize(name: str, runs: list[WrkResult]) -> Summary:
    cpus = [r.cpu_pct for r in runs if r.cpu_pct is not None]
    idles = [r.pinned_cpu_idle_pct for r in runs if r.pinned_cpu_idle_pct is not None]
    others = [r.other_cpu_pct for r in runs if r.other_cpu_pct is not None]
    summary = Summary(
        name=name,
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
        cpu_pct=statistics.median(cpus) if cpus else None,
        pinned_cpu_idle_pct=statistics.median(idles) if idles else None,
        other_cpu_pct=statistics.median(others) if others else None,
        runs=runs,
    )
    h2 = [r for r in runs if isinstance(r, H2loadResult)]
    if h2:
        summary.mean_ms = statistics.median(r.mean_ms for r in h2)
        summary.sd_ms = statistics.median(r.sd_ms for r in h2)
        summary.max_ms = statistics.median(r.max_ms for r in h2)
    return summary


def cpu_note(s: Summary, proxy_cpus: str, load_cpus: str, load: str = "wrk") -> str | None:
    """Why a target's numbers may not show the proxy's own limit, if they may not."""
    if s.other_cpu_pct is not None and s.other_cpu_pct >= OTHER_CPU_WARN:
        return (
            f"{s.name}: other processes used {s.other_cpu_pct:.0f}% of a core during the "
            "run, so its numbers are unreliable (rerun on a quiet machine)"
        )
    if s.name == BASELINE or s.cpu_pct is None or s.cpu_pct >= 90:
        return None
    idle = s.pinned_cpu_idle_pct
    if idle is not None and idle >= 10:
        return (
            f"{s.name} used {s.cpu_pct:.0f}% of a core and cpu {proxy_cpus} was {idle:.0f}% "
            f"idle: the load side ({load} + backend on cpu {load_cpus}) was the limit, so "
            f"{s.name}'s req/s is a lower bound"
        )
    return f"{s.name} used only {s.cpu_pct:.0f}% of a core although cpu {proxy_cpus} was busy"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_table(summaries: list[Summary]) -> str:
    """The results table; with h2load's numbers (--load h2load) also its mean, sd and max of
    the request time."""
    h2 = any(s.mean_ms is not None for s in summaries)
    header = (
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        *(("mean ms", "sd ms", "max ms") if h2 else ()),
        "rps/nginx",
        "p99/nginx",
        "errors",
        "cpu%",
        "other%",
    )
    rows = [header]
    for s in summaries:
        h2_cells = tuple("-" if v is None else f"{v:.3f}" for v in (s.mean_ms, s.sd_ms, s.max_ms))
        rows.append(
            (
                s.name,
                f"{s.rps:,.0f}",
                f"{s.p50_ms:.3f}",
                f"{s.p99_ms:.3f}",
                *(h2_cells if h2 else ()),
                _fmt_ratio(s.rps_vs_nginx),
                _fmt_ratio(s.p99_vs_nginx),
                str(s.errors),
                "-" if s.cpu_pct is None else f"{s.cpu_pct:.0f}",
                "-" if s.other_cpu_pct is None else f"{s.other_cpu_pct:.0f}",
            )
        )
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of text as aligned columns: the first (a header, underlined) and the first column
    left-aligned, the numbers right-aligned. Shared by every script in bench/."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _versions(tools: dict[str, str]) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    flags = {"nginx": "-v", "haproxy": "-v", "wrk": "--version", "h2load": "--version"}
    found = {name: first_line([tools[name], flag]) for name, flag in flags.items() if name in tools}
    return found | {"python": sys.version.split()[0]}


def run(args: argparse.Namespace) -> int:
    h2 = args.load == "h2load"
    if args.grpc:
        tools = find_tools(("nginx", "haproxy", "h2load", "nghttp", "nghttpd", "taskset"),
                           GRPC_INSTALL_HINT)
    elif h2:
        tools = find_tools(("nginx", "haproxy", "h2load", "nghttp", "taskset"), H2_INSTALL_HINT)
    else:
        tools = find_tools(("nginx", "haproxy", "wrk", "taskset"), INSTALL_HINT)
    if tools is None:
        return 2
    if "weir" in args.only and not (REPO_ROOT / "proxy").is_dir():
        print(
            f"error: Weir package not found at {REPO_ROOT / 'proxy'}; "
            "run with --only nginx,haproxy to skip it",
            file=sys.stderr,
        )
        return 2
    _check_cpus(args.proxy_cpus, "--proxy-cpus")
    _check_cpus(args.load_cpus, "--load-cpus")

    workdir = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    pm = ProcessManager(workdir)
    try:
        script = workdir / "users.lua"
        if not h2:
            script.write_text(wrk_user_script(args.users, args.delay_ms))
        backend, proxies = start_servers(args, pm, tools, workdir)

        runs: dict[str, list[WrkResult]] = {t.name: [] for t in proxies}
        if not args.no_baseline:
            runs[BASELINE] = []
        per_run = args.warmup + args.duration
        n_runs = len(runs) * args.rounds
        print(
            f"{n_runs} runs of {args.duration:g}s (+{args.warmup:g}s warm-up), "
            f"~{n_runs * per_run:.0f}s total",
            file=sys.stderr,
        )
        for rnd in range(args.rounds):
            # Rotate the proxy order each round so none is always first/last.
            k = rnd % len(proxies)
            order = proxies[k:] + proxies[:k]
            if not args.no_baseline:
                order = [backend, *order]
            for target in order:
                res = measure(args, tools, pm, target, script)
                runs[target.name].append(res)
                cpu = "-" if res.cpu_pct is None else f"{res.cpu_pct:.0f}%"
                idle = _fmt_pct(res.pinned_cpu_idle_pct)
                other = _fmt_pct(res.other_cpu_pct)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {target.name:<8} "
                    f"{res.rps:>10,.0f} req/s  p50 {res.p50_ms:.3f} ms  "
                    f"p99 {res.p99_ms:.3f} ms  errors {res.errors}  cpu {cpu} "
                    f"(its cpu idle {idle}, other processes {other})",
                    file=sys.stderr,
                )
    finally:
        cleanup(pm, workdir, args.keep_tmp)

    names = [n for n in (BASELINE, *PROXIES, *(n for n, _ in args.weir_trees)) if n in runs]
    summaries = [summarize(n, runs[n]) for n in names]
    ref = next((s for s in summaries if s.name == REFERENCE), None)
    for s in summaries:
        if ref is not None and ref.rps > 0:
            s.rps_vs_nginx = s.rps / ref.rps
        if ref is not None and ref.p99_ms > 0:
            s.p99_vs_nginx = s.p99_ms / ref.p99_ms

    stat = "median of" if args.rounds > 1 else "single run,"
    print()
    if args.grpc:
        print(
            f"gRPC unary calls: h2load -t{args.threads} -c{args.connections} -m{args.streams} "
            f"-D{max(1, round(args.duration))} over h2c, POST {GRPC_PATH} "
            f"({len(GRPC_REQUEST)}-byte message in, {len(GRPC_RESPONSE)} out, trailer "
            f"grpc-status 0) ({stat} {args.rounds} round(s)); proxies on cpu {args.proxy_cpus}, "
            f"h2load+backend (nghttpd) on cpu {args.load_cpus}; upstreams h2c"
        )
    elif h2:
        print(
            f"h2load -t{args.threads} -c{args.connections} -m{args.streams} "
            f"-D{max(1, round(args.duration))} over h2c "
            f"({stat} {args.rounds} round(s)); proxies on cpu {args.proxy_cpus}, "
            f"h2load+backend on cpu {args.load_cpus}; upstreams HTTP/1.1"
        )
    else:
        print(
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
            f"({stat} {args.rounds} round(s)); proxies on cpu {args.proxy_cpus}, "
            f"wrk+backend on cpu {args.load_cpus}"
        )
    print(render_table(summaries))
    for s in summaries:
        note = cpu_note(s, args.proxy_cpus, args.load_cpus, args.load)
        if note:
            print(f"note: {note}")
    if h2:
        print(
            "p50/p99 from h2load's per-request log; mean/sd/max = h2load's \"time for "
            "request\"; errors = h2load's failed requests (non-2xx/3xx, errored, timed out)"
            + (" plus 200s without the response message (by the body bytes received)"
               if args.grpc else "")
            + ", summed over rounds; cpu% = CPU used by the target's processes during the run; "
            "other% = CPU used meanwhile by processes this benchmark did not start "
            "(should be ~0)"
        )
    else:
        print(
            "errors = socket errors + non-2xx/3xx responses, summed over rounds; "
            "cpu% = CPU used by the target's processes during the run; "
            "other% = CPU used meanwhile by processes this benchmark did not start "
            "(should be ~0)"
        )

    if args.json is not None:
        doc = {
            "settings": {
                "duration_s": args.duration,
                "connections": args.connections,
                "threads": args.threads,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "statistic": "median",
                "users": args.users,
                "proxy_cpus": args.proxy_cpus,
                "load_cpus": args.load_cpus,
                "weir_args": args.weir_args,
                "versions": _versions(tools),
            }
            | ({"load": "h2load", "protocol": "h2c", "streams": args.streams,
                "headers": H2_HEADERS} if h2 else {})
            | ({"grpc": True, "path": GRPC_PATH, "headers": GRPC_HEADERS,
                "request_bytes": len(GRPC_REQUEST), "response_bytes": len(GRPC_RESPONSE),
                "backend": "nghttpd", "upstream_protocol": "h2c"} if args.grpc else {}),
            "results": {
                s.name: {
                    "rps": s.rps,
                    "p50_ms": s.p50_ms,
                    "p99_ms": s.p99_ms,
                    "rps_vs_nginx": s.rps_vs_nginx,
                    "p99_vs_nginx": s.p99_vs_nginx,
                    "errors": s.errors,
                    "cpu_pct": s.cpu_pct,
                    "pinned_cpu_idle_pct": s.pinned_cpu_idle_pct,
                    "other_cpu_pct": s.other_cpu_pct,
                    "runs": [asdict(r) | {"errors": r.errors} for r in s.runs],
                }
                | ({"mean_ms": s.mean_ms, "sd_ms": s.sd_ms, "max_ms": s.max_ms} if h2 else {})
                for s in summaries
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hint = "" if args.keep_tmp else KEEP_TMP_HINT
    code, failed = run_stopping_cleanly(lambda: run(args), hint)
    return failed or code or 0


if __name__ == "__main__":
    sys.exit(main())
