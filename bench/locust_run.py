#!/usr/bin/env python3
"""Run bench/locustfile.py against a Weir with three backends, all on loopback, and summarize.

Starts, on 127.0.0.1: three aiohttp backends in one process (this file, ``--serve-backends``)
for the versions ``stable``, ``canary`` and ``beta``; one Weir with a service that splits
``stable``/``canary`` by weight (90/10 unless ``--canary-weight``), keeps users sticky by the
``x-user-id`` header or ``weir_uid`` cookie, and sends ``x-user-group: internal-beta`` to
``beta`` by a rule; then Locust, headless, for ``--duration`` seconds. Then it stops them all
(also on Ctrl-C or an error) and prints Locust's numbers from its CSV, and the split between
versions as the backends counted it, next to the configured weights.

Weir is pinned to ``--proxy-cpus`` and Locust and the backends to ``--load-cpus`` (with
taskset, if installed), as in bench/run.py. Standard library + aiohttp + locust.

    python bench/locust_run.py                       # 50 users, 30 s, CSV in results/weir_*
    python bench/locust_run.py --users 100 --duration 60 --json locust.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import http.client
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

HOST = bench.HOST
VERSIONS: tuple[str, ...] = ("stable", "canary", "beta")
KINDS: tuple[str, ...] = ("sticky", "anon", "upload", "beta")
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
STATS_PATH = "/__bench/stats"
RESET_PATH = "/__bench/reset"


# --------------------------------------------------------------------------
# Backends: one aiohttp app per version, in one process
# --------------------------------------------------------------------------


def backend_app(name: str, response_bytes: int) -> Any:
    from aiohttp import web

    kinds: Counter[str] = Counter()
    users: set[str] = set()
    totals = {"bytes_in": 0}
    page = (b"<!doctype html><p>" + name.encode() + b"</p>\n").ljust(response_bytes, b".")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({"name": name, "kinds": dict(kinds), "users": sorted(users),
                                  "bytes_in": totals["bytes_in"]})

    async def reset(_request: web.Request) -> web.Response:
        kinds.clear()
        users.clear()
        totals["bytes_in"] = 0
        return web.Response(text="ok")

    async def serve(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        kinds[request.headers.get("x-bench-kind", "other")] += 1
        totals["bytes_in"] += size
        # Weir reads the header first, then the cookie; so do we, to name the same user.
        user = request.headers.get("x-user-id") or request.cookies.get("weir_uid")
        if user:
            users.add(user)
        # The size lets the locustfile check that an upload arrived whole.
        return web.Response(body=page, content_type="text/html",
                            headers={"x-received-bytes": str(size), "x-backend": name})

    # Uploads are at most a few hundred KiB; aiohttp's default limit is 1 MiB.
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.add_routes([web.get(STATS_PATH, stats), web.post(RESET_PATH, reset),
                    web.route("*", "/{tail:.*}", serve)])
    return app


async def serve_backends(ports: dict[str, int], response_bytes: int) -> None:
    from aiohttp import web

    runners = []
    for name, port in ports.items():
        runner = web.AppRunner(backend_app(name, response_bytes), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port, backlog=1024).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def _http(port: int, method: str, path: str, headers: dict[str, str] | None = None,
          timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def backend_stats(port: int) -> dict[str, Any]:
    try:
        status, _, body = _http(port, "GET", STATS_PATH)
    except (OSError, http.client.HTTPException) as exc:
        raise bench.BenchError(f"cannot read backend stats on port {port}: {exc}") from exc
    if status != 200:
        raise bench.BenchError(f"backend stats on port {port} answered {status}")
    return json.loads(body)


# --------------------------------------------------------------------------
# Weir
# --------------------------------------------------------------------------


def weir_conf(port: int, admin_port: int, ports: dict[str, int], canary_weight: int) -> str:
    ups = {name: f'["{HOST}:{p}"]' for name, p in ports.items()}
    return f"""# generated by bench/locust_run.py
listen: {HOST}:{port}
admin: {{listen: {HOST}:{admin_port}}}
watch: false
shutdown: {{delay: 0s, timeout: 2s}}
services:
  - name: shop
    versions:
      stable: {{upstreams: {ups["stable"]}}}
      canary: {{upstreams: {ups["canary"]}}}
      beta: {{upstreams: {ups["beta"]}}}
    weights: {{stable: {100 - canary_weight}, canary: {canary_weight}, beta: 0}}
    sticky: {{header: x-user-id, cookie: weir_uid}}
    rules:
      - match: {{headers: {{x-user-group: internal-beta}}}}
        version: beta
"""


_RE_REQUESTS = re.compile(r"^http_requests_total\{([^}]*)\}\s+(\S+)\s*$", re.M)
_RE_VERSION = re.compile(r'version="([^"]*)"')


def weir_requests_by_version(admin_port: int) -> dict[str, int]:
    """http_requests_total summed by version, from Weir's admin /metrics."""
    try:
        status, _, body = _http(admin_port, "GET", "/metrics")
    except (OSError, http.client.HTTPException) as exc:
        raise bench.BenchError(f"cannot read Weir's /metrics: {exc}") from exc
    if status != 200:
        raise bench.BenchError(f"Weir's /metrics answered {status}")
    counts: Counter[str] = Counter()
    for labels, value in _RE_REQUESTS.findall(body.decode("utf-8", "replace")):
        version = _RE_VERSION.search(labels)
        if version:
            counts[version.group(1)] += round(float(value))
    return dict(counts)


def wait_for_weir(proc: bench.Proc, port: int, timeout: float) -> None:
    """Until a GET through Weir reaches a backend and comes back 200 with a version header."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        bench._check_alive(proc)
        try:
            status, headers, _ = _http(port, "GET", "/", {"x-bench-kind": "ready"}, timeout=2.0)
            if status == 200 and "x-weir-version" in headers:
                return
            last = f"status {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise bench.BenchError(f"Weir on port {port} did not proxy GET / within "
                                   f"{timeout:.0f}s (last: {last}); its output ends:\n"
                                   f"{proc.log_tail()}")
        time.sleep(0.1)


# --------------------------------------------------------------------------
# Locust's CSV
# --------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def _ms(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:  # "N/A" when a name had no request
        return None


def read_stats_csv(path: Path) -> list[Row]:
    """Locust's ``PREFIX_stats.csv``: one row per request name, then ``Aggregated``."""
    rows = []
    with path.open(newline="") as f:
        for rec in csv.DictReader(f):
            label = rec["Name"] if rec["Type"] in ("", "None") else f'{rec["Type"]} {rec["Name"]}'
            rows.append(Row(label, int(rec["Request Count"]), int(rec["Failure Count"]),
                            float(rec["Requests/s"]), _ms(rec["50%"]), _ms(rec["95%"]),
                            _ms(rec["99%"])))
    return rows


def read_failures_csv(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [(f'{r["Method"]} {r["Name"]}', r["Error"], int(r["Occurrences"]))
                for r in csv.DictReader(f)]


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


@dataclass
class Result:
    rows: list[Row]
    failures: list[tuple[str, str, int]]
    backends: dict[str, dict[str, Any]]
    weir_counts: dict[str, int]
    weir_cpu_pct: float | None
    other_cpu_pct: float | None
    locust_exit: int
    wall_s: float
    csv_prefix: Path
    notes: list[str] = field(default_factory=list)


def locust_command() -> list[str] | None:
    # find_spec does not import locust: importing it would monkey-patch this process (gevent).
    if importlib.util.find_spec("locust") is not None:
        return [sys.executable, "-m", "locust"]
    found = shutil.which("locust")
    return [found] if found else None


def run(args: argparse.Namespace) -> Result:
    locust = locust_command()
    if locust is None:
        raise bench.BenchError("locust is not installed: pip install -e '.[bench]' "
                               "(or pip install locust)")
    taskset = None if args.no_pin else bench.find_tool("taskset")
    if taskset is not None:
        bench._check_cpus(args.proxy_cpus, "--proxy-cpus")
        bench._check_cpus(args.load_cpus, "--load-cpus")

    def pinned(cpus: str, argv: list[str]) -> list[str]:
        return [taskset, "-c", cpus, *argv] if taskset else argv

    workdir = Path(tempfile.mkdtemp(prefix="weir-locust-"))
    pm = bench.ProcessManager(workdir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(bench.REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        ports = {name: bench.free_port() for name in VERSIONS}
        spec = ",".join(f"{n}={p}" for n, p in ports.items())
        backends = pm.start("backends", pinned(args.load_cpus, [
            sys.executable, str(Path(__file__).resolve()), "--serve-backends", spec,
            "--response-bytes", str(args.response_bytes)]))
        for port in ports.values():
            bench.wait_for_port(backends, port, args.startup_timeout)

        port, admin_port = bench.free_port(), bench.free_port()
        conf = workdir / "weir.yaml"
        conf.write_text(weir_conf(port, admin_port, ports, args.canary_weight))
        weir = pm.start("weir", pinned(args.proxy_cpus, [
            sys.executable, "-m", "proxy", "run", "-c", str(conf), *args.weir_args]),
            cwd=bench.REPO_ROOT, env=env)
        bench.wait_for_port(weir, port, args.startup_timeout)
        wait_for_weir(weir, port, args.startup_timeout)
        for p in ports.values():  # forget the readiness requests
            _http(p, "POST", RESET_PATH)
        counts0 = weir_requests_by_version(admin_port)
        where = (f"Weir on cpu {args.proxy_cpus}, Locust and backends on cpu {args.load_cpus}"
                 if taskset else "unpinned (no taskset)")
        print(f"weir on {HOST}:{port}, backends {spec}; {where}", file=sys.stderr)

        csv_prefix = args.csv.resolve()
        csv_prefix.parent.mkdir(parents=True, exist_ok=True)
        argv = [*locust, "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users),
                "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
                "--host", f"http://{HOST}:{port}", "--csv", str(csv_prefix),
                "--only-summary", "--stop-timeout", "5", *args.locust_args]
        print(f"running: {shlex.join(argv)}", file=sys.stderr)
        cpu0 = bench.group_cpu_seconds(weir.pid)
        idle0, total0 = bench.cpu_ticks()
        own0 = bench.own_cpu_seconds(pm)
        t0 = time.monotonic()
        locust_proc = pm.start("locust", pinned(args.load_cpus, argv), cwd=bench.REPO_ROOT)
        # Locust stops itself after -t (+ --stop-timeout); this deadline is for a hung one.
        deadline = t0 + args.duration + 60
        while locust_proc.popen.poll() is None:
            if time.monotonic() > deadline:
                raise bench.BenchError(f"locust did not stop within {args.duration + 60}s; "
                                       f"its output ends:\n{locust_proc.log_tail()}")
            # Sample Weir's CPU while Locust runs: after it exits the numbers would be the
            # same, but a Weir that dies mid-run should be reported as such.
            bench._check_alive(weir)
            time.sleep(0.5)
        wall = time.monotonic() - t0
        cpu1 = bench.group_cpu_seconds(weir.pid)
        idle1, total1 = bench.cpu_ticks()
        own1 = bench.own_cpu_seconds(pm)
        code = locust_proc.popen.returncode
        # Locust exits 1 when any request failed; that is a result, not a crash.
        if code not in (0, 1):
            raise bench.BenchError(f"locust exited with {code}; its output ends:\n"
                                   f"{locust_proc.log_tail()}")
        stats_csv = Path(f"{csv_prefix}_stats.csv")
        if not stats_csv.exists():
            raise bench.BenchError(f"locust wrote no {stats_csv}; its output ends:\n"
                                   f"{locust_proc.log_tail()}")
        counts1 = weir_requests_by_version(admin_port)
        stats = {name: backend_stats(p) for name, p in ports.items()}
        busy = ((total1 - total0) - (idle1 - idle0)) / os.sysconf("SC_CLK_TCK")
        return Result(
            rows=read_stats_csv(stats_csv),
            failures=read_failures_csv(Path(f"{csv_prefix}_failures.csv")),
            backends=stats,
            weir_counts={v: counts1.get(v, 0) - counts0.get(v, 0) for v in VERSIONS},
            weir_cpu_pct=100.0 * (cpu1 - cpu0) / wall,
            other_cpu_pct=max(0.0, 100.0 * (busy - (own1 - own0)) / wall),
            locust_exit=code,
            wall_s=wall,
            csv_prefix=csv_prefix,
        )
    finally:
        bench.cleanup(pm, workdir, args.keep_tmp)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def split_summary(result: Result, canary_weight: int) -> dict[str, Any]:
    """Per kind of traffic: requests per version, and users per version for sticky kinds."""
    by_kind = {kind: {v: result.backends[v]["kinds"].get(kind, 0) for v in VERSIONS}
               for kind in KINDS}
    users = {v: set(result.backends[v]["users"]) for v in VERSIONS}
    # Users a rule sent to beta are not hashed; the stickiness question is stable vs canary.
    moved = users["stable"] & users["canary"]
    return {
        "weights": {"stable": 100 - canary_weight, "canary": canary_weight, "beta": 0},
        "requests": by_kind,
        "users": {v: len(users[v]) for v in VERSIONS},
        "users_on_stable_and_canary": len(moved),
        "bytes_in": {v: result.backends[v]["bytes_in"] for v in VERSIONS},
        "weir_counted": result.weir_counts,
    }


def render(args: argparse.Namespace, result: Result) -> str:
    out = [f"locust -u {args.users} -r {args.spawn_rate} -t {args.duration}s "
           f"(FastHttpUser, bench/locustfile.py); {result.wall_s:.0f}s wall"]
    rows: list[tuple[str, ...]] = [("name", "requests", "failures", "req/s", "p50 ms", "p95 ms",
                                    "p99 ms")]
    for r in result.rows:
        rows.append((r.name, f"{r.requests:,}", f"{r.failures:,}", f"{r.rps:.1f}",
                     _f(r.p50_ms), _f(r.p95_ms), _f(r.p99_ms)))
    out.append(bench.format_table(rows))
    for name, error, n in result.failures[:10]:
        out.append(f"failure: {n:,} x {name}: {error}")

    split = split_summary(result, args.canary_weight)
    w = split["weights"]
    out.append("")
    out.append(f"split by version, as the backends counted it (weights stable {w['stable']} / "
               f"canary {w['canary']} / beta 0; x-user-group: internal-beta -> beta by rule)")
    rows = [("kind", "requests", "stable", "canary", "beta", "expected")]
    expected = {"sticky": f"~{w['stable']}/{w['canary']}/0 (hashed per user)",
                "anon": f"~{w['stable']}/{w['canary']}/0 (per request)",
                "upload": f"~{w['stable']}/{w['canary']}/0 (hashed per user)",
                "beta": "0/0/100 (rule)"}
    for kind in KINDS:
        counts = split["requests"][kind]
        total = sum(counts.values())
        cells = [f"{counts[v]:,} ({100 * counts[v] / total:.1f}%)" if total else "0"
                 for v in VERSIONS]
        rows.append((kind, f"{total:,}", *cells, expected[kind]))
    out.append(bench.format_table(rows))
    u = split["users"]
    hashed = u["stable"] + u["canary"]
    share = f"{100 * u['canary'] / hashed:.1f}%" if hashed else "-"
    out.append(f"users: {u['stable']:,} on stable, {u['canary']:,} on canary ({share} canary, "
               f"weight {w['canary']}%), {u['beta']:,} beta testers; "
               f"{split['users_on_stable_and_canary']} user(s) seen on both stable and canary "
               "(should be 0)")
    bw = split["weir_counted"]
    out.append("weir's http_requests_total during the run: "
               + ", ".join(f"{v} {bw.get(v, 0):,}" for v in VERSIONS))
    seen = {"locust": next((r.requests for r in result.rows if r.name == "Aggregated"), 0),
            "weir": sum(bw.values()),
            "backends": sum(sum(c.values()) for c in split["requests"].values())}
    agree = "agree" if len(set(seen.values())) == 1 else "DIFFER (see the logs: --keep-tmp)"
    out.append("requests counted: " + ", ".join(f"{k} {v:,}" for k, v in seen.items())
               + f" ({agree})")
    out.append(f"weir cpu {_f(round(result.weir_cpu_pct or 0))}% of a core; other processes "
               f"{_f(round(result.other_cpu_pct or 0))}% of a core (should be ~0)")
    if result.other_cpu_pct is not None and result.other_cpu_pct >= bench.OTHER_CPU_WARN:
        out.append("note: other processes were busy during the run: latencies are unreliable")
    out.append(f"csv: {result.csv_prefix}_stats.csv (and _failures, _exceptions, _stats_history)")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/locust_run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=50, help="Locust users (default 50)")
    p.add_argument("--spawn-rate", type=float, default=10, help="users started per second")
    p.add_argument("--duration", type=int, default=30, help="seconds of load (default 30)")
    p.add_argument("--canary-weight", type=int, default=10,
                   help="canary's weight out of 100; stable gets the rest (default 10)")
    p.add_argument("--response-bytes", type=int, default=2048,
                   help="body size of each backend answer (default 2048)")
    p.add_argument("--csv", type=Path, default=Path("results/weir"),
                   help="Locust's --csv prefix (default results/weir, from the cwd)")
    p.add_argument("--locust-arg", action="append", default=[], metavar="ARG",
                   help="extra argument(s) for locust, shell-split, e.g. "
                        "--locust-arg '--think-ms 0-100'")
    p.add_argument("--weir-arg", action="append", default=[], metavar="ARG",
                   help="extra argument(s) for `python -m proxy run`, e.g. "
                        "--weir-arg '--workers 2'")
    p.add_argument("--proxy-cpus", default="0", help="taskset CPU list for Weir (default 0)")
    p.add_argument("--load-cpus", default="1",
                   help="taskset CPU list for Locust and the backends (default 1)")
    p.add_argument("--no-pin", action="store_true", help="don't pin anything to CPUs")
    p.add_argument("--startup-timeout", type=float, default=20.0)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, logs)")
    # Internal: the backends' process.
    p.add_argument("--serve-backends", metavar="NAME=PORT,...", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_backends is None:
        if not 0 <= args.canary_weight <= 100:
            p.error("--canary-weight must be within 0..100")
        if args.users < 1 or args.duration < 1 or args.spawn_rate <= 0:
            p.error("--users, --duration and --spawn-rate must be positive")
    args.weir_args = [a for chunk in args.weir_arg for a in shlex.split(chunk)]
    args.locust_args = [a for chunk in args.locust_arg for a in shlex.split(chunk)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_backends is not None:
        ports = {n: int(p) for n, _, p in (s.partition("=") for s in
                                           args.serve_backends.split(","))}
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_backends(ports, args.response_bytes))
        return 0
    result, failed = bench.run_stopping_cleanly(lambda: run(args))
    if result is None:
        return failed
    print(render(args, result))
    if args.json is not None:
        doc = {
            "settings": {"users": args.users, "spawn_rate": args.spawn_rate,
                         "duration_s": args.duration, "canary_weight": args.canary_weight,
                         "response_bytes": args.response_bytes, "weir_args": args.weir_args,
                         "locust_args": args.locust_args},
            "locust": [vars(r) for r in result.rows],
            "failures": result.failures,
            "split": split_summary(result, args.canary_weight),
            "weir_cpu_pct": result.weir_cpu_pct,
            "other_cpu_pct": result.other_cpu_pct,
            "locust_exit": result.locust_exit,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
