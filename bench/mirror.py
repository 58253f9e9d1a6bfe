#!/usr/bin/env python3
"""Does shadow mirroring hurt the primary? Weir's p99 with and without a 100% mirror.

Three Weir instances (pinned to the proxy CPU) serve the same primary service, one version
``stable`` in front of the shared nginx backend of bench/run.py:

- ``no-mirror``: nothing else;
- ``mirror-slow``: ``mirror: [{version: shadow, percent: 100}]``, where the shadow is a tiny
  asyncio server (this file, ``--serve-slow``) that answers every request after 200 ms;
- ``mirror-refused``: the same, but the shadow's upstream is a port nobody listens on;
- ``shadow-busy``: a control, not a fourth Weir: the ``no-mirror`` Weir again, while a second
  wrk keeps the slow shadow as busy as ``mirror-slow`` does (``max_concurrent`` connections)
  from the load CPU. On a machine where the shadow must share a CPU with wrk and the backend,
  the shadow's own work there moves the measured latency whoever sends it the requests;
  ``mirror-slow`` against ``shadow-busy`` is the part of the change that is Weir's.

wrk drives each one at a FIXED MODERATE RATE (a Lua ``delay()`` between requests on every
connection), not at saturation: the claim is about the primary's latency at a given load, and
at saturation any extra work moves latency. The three are interleaved over ``--rounds``
rounds with the order rotating; the table shows the median p50/p99 per configuration, the p99
change against ``no-mirror`` and the shadow copies by outcome, read from each Weir's
``/metrics`` (``weir_mirror_requests_total``) around each measured run.

Stdlib only; reuses bench/run.py for processes, wrk and CPU accounting. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

HOST = bench.HOST
NO_MIRROR = "no-mirror"
MIRROR_SLOW = "mirror-slow"
MIRROR_REFUSED = "mirror-refused"
SHADOW_BUSY = "shadow-busy"
# Connections the control's wrk holds to the slow shadow: Weir's default mirror max_concurrent.
SHADOW_BUSY_CONNECTIONS = 64
CONFIGS: tuple[str, ...] = (NO_MIRROR, MIRROR_SLOW, MIRROR_REFUSED, SHADOW_BUSY)
OUTCOMES: tuple[str, ...] = ("success", "error", "timeout", "dropped")
TARGET_P99_CHANGE_PCT = 5.0  # the claim: mirroring moves the primary's p99 by at most this
BUSY_WARN = 80.0  # % of a core: above this Weir is near saturation, not at a moderate rate
SETTLE_S = 0.5  # after a run: copies still waiting on the 200 ms shadow finish
SLOW_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nhello world\n"
)


# --------------------------------------------------------------------------
# The slow shadow: a keep-alive HTTP/1.1 server that answers after a delay
# --------------------------------------------------------------------------


async def _slow_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            version = lines[0].rsplit(" ", 1)[-1].upper()
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            length = int(headers.get("content-length", "0") or "0")
            if length:
                await reader.readexactly(length)
            close = headers.get("connection") == "close" or (
                version == "HTTP/1.0" and headers.get("connection") != "keep-alive"
            )
            await asyncio.sleep(delay)
            writer.write(SLOW_RESPONSE)
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve_slow(port: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _slow_connection(reader, writer, delay)

    server = await asyncio.start_server(handle, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------
# Configs and scripts
# --------------------------------------------------------------------------


def weir_mirror_conf(port: int, admin_port: int, backend_port: int, shadow_port: int | None) -> str:
    """The primary service; with ``shadow_port``, a 100% mirror to a shadow version there."""
    text = f"""listen: {HOST}:{port}
admin: {{listen: {HOST}:{admin_port}}}
watch: false
services:
  - name: bench
    versions:
      stable: {{upstreams: ["{HOST}:{backend_port}"]}}
"""
    if shadow_port is not None:
        text += f"""      shadow: {{upstreams: ["{HOST}:{shadow_port}"]}}
    weights: {{stable: 100}}
    mirror: [{{version: shadow, percent: 100}}]
"""
    return text


def wrk_rate_script(delay_ms: int, stats_file: Path) -> str:
    """wrk script: wait ``delay_ms`` before each request on each connection (fixed rate), and
    write p50/p99/p99.9 in microseconds to ``stats_file`` when done."""
    return f"""-- generated by bench/mirror.py
function delay()
   return {delay_ms}
end

function done(summary, latency, requests)
   local f = io.open({json.dumps(str(stats_file))}, "w")
   f:write(string.format("%d %d %d\\n", latency:percentile(50), latency:percentile(99),
                         latency:percentile(99.9)))
   f:close()
end
"""


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------

_RE_MIRROR = re.compile(r"^weir_mirror_requests_total\{([^}]*)\}\s+(\S+)\s*$", re.M)
_RE_OUTCOME = re.compile(r'outcome="([^"]*)"')


def mirror_counts(admin_port: int) -> dict[str, int]:
    """weir_mirror_requests_total summed by outcome, from Weir's admin /metrics."""
    conn = http.client.HTTPConnection(HOST, admin_port, timeout=5.0)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        raise bench.BenchError(f"cannot read /metrics on admin port {admin_port}: {exc}") from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise bench.BenchError(f"/metrics on admin port {admin_port} answered {resp.status}")
    counts = dict.fromkeys(OUTCOMES, 0)
    for labels, value in _RE_MIRROR.findall(body):
        outcome = _RE_OUTCOME.search(labels)
        if outcome:
            counts[outcome.group(1)] = counts.get(outcome.group(1), 0) + round(float(value))
    return counts


def check_refused(port: int) -> None:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            pass
    except ConnectionRefusedError:
        return
    except OSError as exc:
        raise bench.BenchError(f"port {port} should refuse connections, got {exc}") from exc
    raise bench.BenchError(f"port {port} should refuse connections but something listens there")


@dataclass
class Weir:
    name: str
    target: bench.Target
    admin_port: int
    busy_shadow_url: str | None = None  # the control: load this while measuring


@dataclass
class Run:
    wrk: bench.WrkResult
    p999_ms: float | None
    mirror: dict[str, int]


@dataclass
class Summary:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    p99_min_ms: float
    p99_max_ms: float
    p999_ms: float | None
    errors: int
    requests: int
    cpu_pct: float | None
    other_cpu_pct: float | None
    mirror: dict[str, int]
    runs: list[Run] = field(default_factory=list)
    p99_change_pct: float | None = None


@contextlib.contextmanager
def shadow_kept_busy(
    args: argparse.Namespace, tools: dict[str, str], pm: bench.ProcessManager, weir: Weir
) -> Iterator[None]:
    """For the shadow-busy control: a second wrk holds the slow shadow's connections for the
    length of one measurement. Nothing for the other configurations."""
    if weir.busy_shadow_url is None:
        yield
        return
    # Started through the process manager, so that its CPU counts as the bench's own and not
    # as other processes' (which would void the verdicts).
    seconds = math.ceil(args.warmup + args.duration + 3 * SETTLE_S) + 1
    busy = pm.start("shadow-busy-wrk", [
        tools["taskset"], "-c", args.load_cpus, tools["wrk"], "-t1",
        f"-c{SHADOW_BUSY_CONNECTIONS}", f"-d{seconds}s", weir.busy_shadow_url])
    try:
        time.sleep(SETTLE_S)  # its first answers come back after the shadow's delay
        yield
    finally:
        busy.popen.terminate()
        busy.popen.wait()
        pm.procs.remove(busy)


def measure_once(
    args: argparse.Namespace,
    tools: dict[str, str],
    pm: bench.ProcessManager,
    weir: Weir,
    script: Path,
    stats_file: Path,
) -> Run:
    with shadow_kept_busy(args, tools, pm, weir):
        url = f"http://{HOST}:{weir.target.port}/"
        if args.warmup > 0:
            bench.run_wrk(
                tools["wrk"],
                tools["taskset"],
                args.load_cpus,
                url,
                duration=args.warmup,
                connections=args.connections,
                threads=args.threads,
                script=script,
            )
            time.sleep(SETTLE_S)
        stats_file.unlink(missing_ok=True)
        before = mirror_counts(weir.admin_port)
        # bench.measure does its own warm-up when args.warmup > 0; ours is above, so the mirror
        # counts cover exactly the measured run.
        wrk = bench.measure(
            argparse.Namespace(**{**vars(args), "warmup": 0}), tools, pm, weir.target, script
        )
        time.sleep(SETTLE_S)
        after = mirror_counts(weir.admin_port)
        p999: float | None = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            p999 = int(stats_file.read_text().split()[2]) / 1000.0
        return Run(wrk=wrk, p999_ms=p999, mirror={k: after[k] - before.get(k, 0) for k in after})


def summarize(name: str, runs: list[Run]) -> Summary:
    cpus = [r.wrk.cpu_pct for r in runs if r.wrk.cpu_pct is not None]
    others = [r.wrk.other_cpu_pct for r in runs if r.wrk.other_cpu_pct is not None]
    p999s = [r.p999_ms for r in runs if r.p999_ms is not None]
    p99s = [r.wrk.p99_ms for r in runs]
    mirror = dict.fromkeys(OUTCOMES, 0)
    for r in runs:
        for k, v in r.mirror.items():
            mirror[k] = mirror.get(k, 0) + v
    return Summary(
        name=name,
        rps=statistics.median(r.wrk.rps for r in runs),
        p50_ms=statistics.median(r.wrk.p50_ms for r in runs),
        p99_ms=statistics.median(p99s),
        p99_min_ms=min(p99s),
        p99_max_ms=max(p99s),
        p999_ms=statistics.median(p999s) if p999s else None,
        errors=sum(r.wrk.errors for r in runs),
        requests=sum(r.wrk.requests for r in runs),
        cpu_pct=statistics.median(cpus) if cpus else None,
        other_cpu_pct=statistics.median(others) if others else None,
        mirror=mirror,
        runs=runs,
    )


def render_table(summaries: list[Summary]) -> str:
    header = (
        "config",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99 range",
        "p99.9 ms",
        "p99 vs none",
        "errors",
        "cpu%",
        "other%",
        "requests",
        *(f"m.{o}" for o in OUTCOMES),
    )
    rows = [header]
    for s in summaries:
        change = "-" if s.p99_change_pct is None else f"{s.p99_change_pct:+.1f}%"
        mirrored = s.name != NO_MIRROR
        rows.append(
            (
                s.name,
                f"{s.rps:,.0f}",
                f"{s.p50_ms:.3f}",
                f"{s.p99_ms:.3f}",
                f"{s.p99_min_ms:.2f}-{s.p99_max_ms:.2f}",
                "-" if s.p999_ms is None else f"{s.p999_ms:.3f}",
                change,
                str(s.errors),
                "-" if s.cpu_pct is None else f"{s.cpu_pct:.0f}",
                "-" if s.other_cpu_pct is None else f"{s.other_cpu_pct:.0f}",
                f"{s.requests:,}",
                *((f"{s.mirror.get(o, 0):,}" if mirrored else "-") for o in OUTCOMES),
            )
        )
    return bench.format_table(rows)


def _noisy(s: Summary) -> bool:
    return s.other_cpu_pct is not None and s.other_cpu_pct >= bench.OTHER_CPU_WARN


def _verdict(p99_change_pct: float, *compared: Summary) -> str:
    """Whether a p99 change meets the target, unless other processes disturbed the runs."""
    if any(_noisy(s) for s in compared):
        return "no verdict, other processes were busy: rerun on a quiet machine"
    return "within" if p99_change_pct <= TARGET_P99_CHANGE_PCT else "OVER"


def notes(summaries: list[Summary]) -> list[str]:
    out = []
    for s in summaries:
        if _noisy(s):
            out.append(
                f"{s.name}: other processes used {s.other_cpu_pct:.0f}% of a core during its "
                "runs, so its numbers are unreliable (rerun on a quiet machine)"
            )
        if s.cpu_pct is not None and s.cpu_pct >= BUSY_WARN:
            out.append(
                f"{s.name}: Weir used {s.cpu_pct:.0f}% of a core, so it ran near saturation; "
                "lower the rate (--connections, --delay-ms) to measure at a moderate load"
            )
        if s.errors:
            out.append(f"{s.name}: {s.errors} wrk errors (see --json for the breakdown)")
    base = summaries[0]
    for s in summaries[1:]:
        if s.p99_change_pct is None or s.name == SHADOW_BUSY:
            continue
        verdict = _verdict(s.p99_change_pct, s, base)
        out.append(
            f"{s.name}: p99 {s.p99_change_pct:+.1f}% vs {base.name} at "
            f"{s.rps / base.rps:.2f}x its req/s ({verdict}; "
            f"target: at most +{TARGET_P99_CHANGE_PCT:g}%)"
        )
    by_name = {s.name: s for s in summaries}
    slow, control = by_name.get(MIRROR_SLOW), by_name.get(SHADOW_BUSY)
    if slow is not None and control is not None and control.p99_ms > 0:
        if control.p99_change_pct is not None:
            out.append(
                f"{SHADOW_BUSY}: p99 {control.p99_change_pct:+.1f}% vs {base.name} with no "
                "mirroring at all: what the busy shadow costs the load CPU it shares"
            )
        change = 100.0 * (slow.p99_ms - control.p99_ms) / control.p99_ms
        verdict = _verdict(change, slow, control)
        out.append(
            f"{MIRROR_SLOW}: p99 {change:+.1f}% vs {SHADOW_BUSY}, the shadow as busy in both: "
            f"the part that is Weir's ({verdict}; target: at most +{TARGET_P99_CHANGE_PCT:g}%)"
        )
    return out


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def start_servers(
    args: argparse.Namespace, pm: bench.ProcessManager, tools: dict[str, str], workdir: Path
) -> dict[str, Weir]:
    taskset, timeout = tools["taskset"], args.startup_timeout

    backend_port = bench.free_port()
    prefix = workdir / "backend"
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(bench.nginx_backend_conf(prefix, backend_port))
    nginx_argv = [tools["nginx"], "-p", f"{prefix}/", "-e", str(prefix / "error.log")]
    proc = pm.start("backend", [taskset, "-c", args.load_cpus, *nginx_argv, "-c", str(conf)])
    bench.wait_for_port(proc, backend_port, timeout)
    bench.wait_for_http_ok(proc, backend_port, timeout)
    print(f"backend nginx on {HOST}:{backend_port} (cpu {args.load_cpus})", file=sys.stderr)

    slow_port = bench.free_port()
    slow_argv = [sys.executable, str(Path(__file__).resolve()), "--serve-slow", str(slow_port)]
    slow_argv += ["--shadow-delay-ms", str(args.shadow_delay_ms)]
    proc = pm.start("slow-shadow", [taskset, "-c", args.load_cpus, *slow_argv])
    bench.wait_for_port(proc, slow_port, timeout)
    bench.wait_for_http_ok(proc, slow_port, timeout)
    print(
        f"slow shadow on {HOST}:{slow_port}, answers after {args.shadow_delay_ms} ms "
        f"(cpu {args.load_cpus})",
        file=sys.stderr,
    )

    refused_port = bench.free_port()
    check_refused(refused_port)
    args.refused_port = refused_port
    print(f"refusing shadow port {HOST}:{refused_port} (nothing listens)", file=sys.stderr)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(bench.REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    shadows = {NO_MIRROR: None, MIRROR_SLOW: slow_port, MIRROR_REFUSED: refused_port}
    weirs: dict[str, Weir] = {}
    for name in (NO_MIRROR, MIRROR_SLOW, MIRROR_REFUSED):
        port, admin_port = bench.free_port(), bench.free_port()
        conf = workdir / f"{name}.yaml"
        conf.write_text(weir_mirror_conf(port, admin_port, backend_port, shadows[name]))
        argv = [sys.executable, "-m", "proxy", "run", "-c", str(conf)]
        proc = pm.start(
            f"weir-{name}",
            [taskset, "-c", args.proxy_cpus, *argv],
            cwd=bench.REPO_ROOT,
            env=env,
        )
        bench.wait_for_port(proc, port, timeout)
        bench.wait_for_http_ok(proc, port, timeout)
        print(f"weir {name} on {HOST}:{port} (cpu {args.proxy_cpus})", file=sys.stderr)
        weirs[name] = Weir(name, bench.Target(name, port, proc), admin_port)
    plain = weirs[NO_MIRROR]
    weirs[SHADOW_BUSY] = Weir(SHADOW_BUSY, bench.Target(SHADOW_BUSY, plain.target.port,
                                                        plain.target.proc),
                              plain.admin_port, busy_shadow_url=f"http://{HOST}:{slow_port}/")
    return weirs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/mirror.py",
        description=(
            "Weir's primary latency at a fixed moderate rate with no mirror, a 100%% mirror "
            "to a shadow that answers after 200 ms, and one to a shadow that refuses connections."
        ),
    )
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds per measured wrk run (default 5)"
    )
    p.add_argument("--connections", type=int, default=20, help="wrk connections (default 20)")
    p.add_argument(
        "--delay-ms",
        type=int,
        default=2,
        help="ms each connection waits before each request, via wrk's Lua delay(); sets the "
        "rate with --connections (default 2)",
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds of wrk before each measured run, 0 = off (default 1)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds, order rotating; medians are reported (default 5)",
    )
    p.add_argument(
        "--shadow-delay-ms",
        type=int,
        default=200,
        help="how long the slow shadow waits before answering (default 200)",
    )
    p.add_argument("--proxy-cpus", default="0", help="taskset CPU list for Weir (default 0)")
    p.add_argument(
        "--load-cpus",
        default="1",
        help="taskset CPU list for wrk, the backend and the slow shadow (default 1)",
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
    p.add_argument("--serve-slow", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.threads < 1:
        p.error("--duration, --connections and --threads must be >= 1")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads")
    if args.rounds < 1 or args.warmup < 0 or args.delay_ms < 0 or args.shadow_delay_ms < 0:
        p.error("--rounds must be >= 1; --warmup, --delay-ms, --shadow-delay-ms >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    tools = bench.find_tools(("nginx", "wrk", "taskset"), "apt-get install -y nginx wrk")
    if tools is None:
        return 2
    bench._check_cpus(args.proxy_cpus, "--proxy-cpus")
    bench._check_cpus(args.load_cpus, "--load-cpus")

    workdir = Path(tempfile.mkdtemp(prefix="weir-bench-mirror-"))
    pm = bench.ProcessManager(workdir)
    runs: dict[str, list[Run]] = {name: [] for name in CONFIGS}
    try:
        stats_file = workdir / "latency.txt"
        script = workdir / "rate.lua"
        script.write_text(wrk_rate_script(args.delay_ms, stats_file))
        weirs = start_servers(args, pm, tools, workdir)
        per_run = args.warmup + args.duration + 2 * SETTLE_S
        n_runs = len(CONFIGS) * args.rounds
        print(
            f"{n_runs} runs of {args.duration:g}s (+{args.warmup:g}s warm-up), "
            f"~{n_runs * per_run:.0f}s total",
            file=sys.stderr,
        )
        for rnd in range(args.rounds):
            k = rnd % len(CONFIGS)
            for name in CONFIGS[k:] + CONFIGS[:k]:
                if name == MIRROR_REFUSED:
                    check_refused(args.refused_port)
                res = measure_once(args, tools, pm, weirs[name], script, stats_file)
                runs[name].append(res)
                w = res.wrk
                cpu = "-" if w.cpu_pct is None else f"{w.cpu_pct:.0f}%"
                other = "-" if w.other_cpu_pct is None else f"{w.other_cpu_pct:.0f}%"
                p999 = "-" if res.p999_ms is None else f"{res.p999_ms:.3f}"
                copies = " ".join(f"{o} {res.mirror.get(o, 0)}" for o in OUTCOMES)
                print(
                    f"[round {rnd + 1}/{args.rounds}] {name:<14} {w.rps:>8,.0f} req/s  "
                    f"p50 {w.p50_ms:.3f}  p99 {w.p99_ms:.3f}  p99.9 {p999} ms  "
                    f"errors {w.errors}  cpu {cpu}  other {other}  mirror: {copies}",
                    file=sys.stderr,
                )
    finally:
        bench.cleanup(pm, workdir, args.keep_tmp)

    summaries = [summarize(name, runs[name]) for name in CONFIGS]
    base = summaries[0]
    for s in summaries[1:]:
        if base.p99_ms > 0:
            s.p99_change_pct = 100.0 * (s.p99_ms - base.p99_ms) / base.p99_ms

    stat = "median of" if args.rounds > 1 else "single run,"
    print()
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, delay {args.delay_ms} ms "
        f"per request per connection ({stat} {args.rounds} round(s)); Weir on cpu "
        f"{args.proxy_cpus}, wrk+backend+slow shadow on cpu {args.load_cpus}"
    )
    print(render_table(summaries))
    for line in notes(summaries):
        print(f"note: {line}")
    print(
        "p99 range = lowest-highest p99 over the rounds; cpu% = Weir's CPU during the run; "
        "other% = CPU of processes this benchmark did not start (should be ~0); "
        "requests and m.* (shadow copies by outcome, from /metrics) are summed over the "
        "measured runs"
    )

    if args.json is not None:
        doc: dict[str, Any] = {
            "settings": {
                "duration_s": args.duration,
                "connections": args.connections,
                "delay_ms": args.delay_ms,
                "threads": args.threads,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "statistic": "median",
                "shadow_delay_ms": args.shadow_delay_ms,
                "proxy_cpus": args.proxy_cpus,
                "load_cpus": args.load_cpus,
                "target_p99_change_pct": TARGET_P99_CHANGE_PCT,
                "python": sys.version.split()[0],
            },
            "results": {
                s.name: {
                    "rps": s.rps,
                    "p50_ms": s.p50_ms,
                    "p99_ms": s.p99_ms,
                    "p99_min_ms": s.p99_min_ms,
                    "p99_max_ms": s.p99_max_ms,
                    "p999_ms": s.p999_ms,
                    "p99_change_pct": s.p99_change_pct,
                    "errors": s.errors,
                    "requests": s.requests,
                    "cpu_pct": s.cpu_pct,
                    "other_cpu_pct": s.other_cpu_pct,
                    "mirror": s.mirror,
                    "runs": [
                        asdict(r.wrk)
                        | {"errors": r.wrk.errors, "p999_ms": r.p999_ms, "mirror": r.mirror}
                        for r in s.runs
                    ],
                }
                for s in summaries
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_slow is not None:
        # On uvloop where it is installed (it is with Weir): the shadow shares the load CPU
        # with wrk and the backend, and every microsecond it spends there is latency that
        # wrk would blame on the proxy.
        try:
            import uvloop
        except ImportError:
            run_loop: Any = asyncio.run
        else:
            run_loop = uvloop.run
        with contextlib.suppress(KeyboardInterrupt):
            run_loop(serve_slow(args.serve_slow, args.shadow_delay_ms / 1000.0))
        return 0
    hint = "" if args.keep_tmp else bench.KEEP_TMP_HINT
    code, failed = bench.run_stopping_cleanly(lambda: run(args), hint)
    return failed or code or 0


if __name__ == "__main__":
    sys.exit(main())
