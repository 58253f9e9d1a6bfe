#!/usr/bin/env python3
"""How throughput scales with worker processes when each worker has a fixed CPU budget.

On a 2-core machine the proxy's second worker cannot have a core of its own: wrk and the
backend need the other one. So this gives each worker a core of its own *speed* instead:
every worker process is put in its own cgroup with a CFS quota of ``--cpu-per-worker`` of a
core (0.3 by default, per 100 ms period), and all of them are pinned to the proxy CPU, whose
capacity (1 core) is more than the quotas add up to. One worker can then use at most 0.3 of
a core, two at most 0.6, and wrk plus the backend keep the other CPU to themselves.

Targets, each started once and measured in turn (interleaved, the order rotating each
round), for every N in ``--workers`` (default 1,2):

- ``weir xN``: ``python -m proxy run`` from this checkout; N=1 is the plain single process
  (it serves and is its own control plane), N>1 is ``--workers N``: a supervisor, outside the
  quotas because it serves no requests (its CPU is reported), and N workers;
- ``nginx xN``: a control, the same way: ``master_process on``, ``worker_processes N``,
  ``reuseport`` (one socket per worker, as Weir's workers have), the master outside the
  quotas. nginx is known to scale with its workers, so its ratio shows what the method allows.

A worker whose cgroup was never throttled during a run did not reach its quota: something
else (the load side) was the limit, and the script warns, as it does when the load CPU was
less than 10% idle. Stdlib only; reuses bench/run.py. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
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
KINDS: tuple[str, ...] = ("weir", "nginx")
CGROUP_PREFIX = "weir-scaling-"
LOAD_IDLE_WARN = 10.0  # % idle of the load CPU below which wrk + backend were the limit
QUOTA_USE_WARN = 90.0  # % of its quota a throttled worker should still have used
TARGET_RATIO = 1.6  # issue 7: two workers at least this many times one worker
V1_MOUNT = Path("/sys/fs/cgroup/cpu")
V2_MOUNT = Path("/sys/fs/cgroup")
RMDIR_TRIES = 40  # x 50 ms: a cgroup whose last process just exited may still be busy


# --------------------------------------------------------------------------
# cgroups: one per worker, each with a CFS quota
# --------------------------------------------------------------------------


@dataclass
class CpuController:
    """Where the cpu controller is: ``root`` is the hierarchy's mount (v1) or the cgroup2
    mount (v2); ``home`` is this script's own cgroup there, where processes go back."""

    version: int
    root: Path
    home: Path


def _own_cgroup(version: int, proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """This process's cgroup path in the cpu hierarchy (v1) or the unified one (v2)."""
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (version == 1 and "cpu" in controllers.split(",")) or (
                version == 2 and controllers == ""
            ):
                return path
    return "/"


def _mounts(proc_mounts: Path = Path("/proc/mounts")) -> list[tuple[Path, str, set[str]]]:
    found = []
    with contextlib.suppress(OSError):
        for line in proc_mounts.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                found.append((Path(parts[1]), parts[2], set(parts[3].split(","))))
    return found


def find_cpu_controller(root: Path | None = None) -> CpuController:
    """The cpu controller to use (``root``, or found in /proc/mounts), checked to be usable;
    raises BenchError naming what is missing."""
    if root is None:
        mounts = _mounts()
        v1 = [m for m, kind, opts in mounts if kind == "cgroup" and "cpu" in opts]
        v2 = [m for m, kind, _ in mounts if kind == "cgroup2"]
        if v1:
            root = V1_MOUNT if V1_MOUNT in v1 else v1[0]
        elif v2:
            root = V2_MOUNT if V2_MOUNT in v2 else v2[0]
        else:
            raise bench.BenchError(
                "no cgroup cpu controller is mounted (no cgroup v1 hierarchy with the cpu "
                "controller and no cgroup2 mount in /proc/mounts); this benchmark needs one to "
                "give each worker a CPU quota"
            )
    if (root / "cpu.cfs_quota_us").exists():
        version = 1
    elif (root / "cgroup.controllers").exists():
        version = 2
        controllers = (root / "cgroup.controllers").read_text().split()
        if "cpu" not in controllers:
            raise bench.BenchError(
                f"the cgroup2 hierarchy at {root} has no cpu controller (cgroup.controllers: "
                f"{' '.join(controllers) or 'empty'}); it may be bound to a cgroup v1 "
                "hierarchy instead, or be disabled"
            )
        enabled = (root / "cgroup.subtree_control").read_text().split()
        if "cpu" not in enabled:
            raise bench.BenchError(
                f"the cpu controller is not enabled for child cgroups of {root} "
                f"(cgroup.subtree_control: {' '.join(enabled) or 'empty'}); enable it with: "
                f"echo +cpu > {root}/cgroup.subtree_control"
            )
    else:
        raise bench.BenchError(
            f"{root} is not a cgroup cpu controller: it has neither cpu.cfs_quota_us "
            "(cgroup v1) nor cgroup.controllers (cgroup v2)"
        )
    if not os.access(root, os.W_OK):
        raise bench.BenchError(
            f"cannot create cgroups in {root} (not writable by uid {os.geteuid()}); run as root"
        )
    home = root / _own_cgroup(version).lstrip("/")
    if not (home / "cgroup.procs").exists():
        home = root
    return CpuController(version, root, home)


def _write(path: Path, text: str) -> None:
    # One write() per value: the kernel parses each write on its own.
    with path.open("w") as f:
        f.write(text)


def cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def cpu_stat(group: Path) -> dict[str, int]:
    """The cgroup's cpu.stat (nr_periods, nr_throttled, and throttled time in µs)."""
    stat: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in (group / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                stat[key] = int(value)
    if "throttled_time" in stat:  # v1: nanoseconds
        stat["throttled_usec"] = stat["throttled_time"] // 1000
    return stat


def _still_running(pid: int) -> bool:
    """Whether ``pid`` is a live run of this script (not gone, a zombie, or a reused pid)."""
    fields = bench._proc_stat_fields(pid)
    if not fields or fields[0] == "Z":
        return False
    try:
        return Path(__file__).name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Cgroups:
    """The cgroups of one run, all under ``ROOT/weir-scaling-PID``; ``close`` moves any
    process still in them back to this script's cgroup and removes them."""

    def __init__(self, ctl: CpuController, period_us: int, quota_us: int) -> None:
        self.ctl = ctl
        self.period_us = period_us
        self.quota_us = quota_us
        self.base = ctl.root / f"{CGROUP_PREFIX}{os.getpid()}"

    def open(self) -> None:
        self._remove_stale()
        try:
            self.base.mkdir()
            if self.ctl.version == 2:
                _write(self.base / "cgroup.subtree_control", "+cpu")
        except OSError as exc:
            raise bench.BenchError(f"cannot set up the cgroup {self.base}: {exc}") from exc

    def limit(self, name: str, pid: int) -> Path:
        """A new cgroup ``name`` with the quota, holding process ``pid`` (all its threads)."""
        group = self.base / name
        try:
            group.mkdir()
            if self.ctl.version == 1:
                _write(group / "cpu.cfs_period_us", str(self.period_us))
                _write(group / "cpu.cfs_quota_us", str(self.quota_us))
            else:
                _write(group / "cpu.max", f"{self.quota_us} {self.period_us}")
            _write(group / "cgroup.procs", str(pid))
        except OSError as exc:
            raise bench.BenchError(f"cannot limit pid {pid} in the cgroup {group}: {exc}") from exc
        return group

    def close(self) -> list[str]:
        """Remove every cgroup of this run; returns the ones that could not be removed."""
        return self._remove_tree(self.base)

    def _remove_tree(self, top: Path) -> list[str]:
        if not top.is_dir():
            return []
        failed: list[str] = []
        groups = [p for p in top.iterdir() if p.is_dir()] + [top]
        for group in groups:
            for pid in cgroup_pids(group):
                for back in (self.ctl.home, self.ctl.root):
                    try:
                        _write(back / "cgroup.procs", str(pid))
                        break
                    except ProcessLookupError:  # it has just exited
                        break
                    except OSError:
                        continue
            for attempt in range(RMDIR_TRIES):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or attempt == RMDIR_TRIES - 1:
                        failed.append(f"{group} ({exc.strerror})")
                        break
                    time.sleep(0.05)
        return failed

    def _remove_stale(self) -> None:
        """Cgroups left by a run of this script that was killed (SIGKILL leaves no chance to
        clean up): its pid is gone."""
        pattern = re.compile(re.escape(CGROUP_PREFIX) + r"(\d+)$")
        for entry in self.ctl.root.iterdir():
            found = pattern.match(entry.name)
            if found and entry.is_dir() and not _still_running(int(found.group(1))):
                failed = self._remove_tree(entry)
                print(
                    f"removed the cgroups of an earlier run that was killed: {entry}"
                    + (f" (could not remove {', '.join(failed)})" if failed else ""),
                    file=sys.stderr,
                )


# --------------------------------------------------------------------------
# Servers and their workers
# --------------------------------------------------------------------------


@dataclass
class Worker:
    pid: int
    cgroup: Path


@dataclass
class Server:
    """One target: ``kind`` with ``n`` workers; ``supervisor`` is None when the only process
    is the worker (Weir with one worker)."""

    kind: str
    n: int
    port: int
    proc: bench.Proc
    supervisor: int | None = None
    workers: list[Worker] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.kind} x{self.n}"


def children(pid: int) -> list[int]:
    """Live processes in ``pid``'s group whose parent is ``pid``."""
    kids = []
    for member in bench.group_members(pid):
        fields = bench._proc_stat_fields(member)
        if member != pid and fields and int(fields[1]) == pid:
            kids.append(member)
    return sorted(kids)


def find_workers(server: Server, timeout: float) -> list[int]:
    """The worker processes, once there are exactly ``server.n`` of them, the same twice."""
    if server.kind == "weir" and server.n == 1:
        return [server.proc.pid]
    deadline = time.monotonic() + timeout
    last: list[int] = []
    while True:
        bench._check_alive(server.proc)
        kids = children(server.proc.pid)
        if len(kids) == server.n and kids == last:
            return kids
        if time.monotonic() >= deadline:
            raise bench.BenchError(
                f"{server.name}: expected {server.n} worker processes, found {len(kids)} "
                f"after {timeout:.0f}s; its output ends:\n{server.proc.log_tail()}"
            )
        last = kids
        time.sleep(0.2)


def check_workers(server: Server) -> None:
    """Fail if a worker was replaced (a new one would be outside its cgroup)."""
    bench._check_alive(server.proc)
    gone = [w.pid for w in server.workers if not bench._proc_stat_fields(w.pid)]
    if server.supervisor is not None and children(server.proc.pid) != sorted(
        w.pid for w in server.workers
    ):
        gone = gone or [w.pid for w in server.workers]
    if gone:
        raise bench.BenchError(
            f"{server.name}: worker(s) {gone} exited or were replaced during the benchmark; "
            f"its output ends:\n{server.proc.log_tail()}"
        )


def start_servers(
    args: argparse.Namespace,
    pm: bench.ProcessManager,
    tools: dict[str, str],
    workdir: Path,
    cgroups: Cgroups,
) -> list[Server]:
    timeout = args.startup_timeout
    backend_port = bench.free_port()
    proc = bench.start_nginx(pm, tools, workdir, "backend", args.load_cpus,
                             bench.nginx_backend_conf(workdir / "backend", backend_port))
    bench.wait_for_port(proc, backend_port, timeout)
    bench.wait_for_http_ok(proc, backend_port, timeout)
    print(f"backend nginx on {HOST}:{backend_port} (cpu {args.load_cpus})", file=sys.stderr)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(bench.REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    sticky = {"x-user-id": "user-1"}
    servers: list[Server] = []
    for kind in args.only:
        for n in args.workers:
            port = bench.free_port()
            slug = f"{kind}-x{n}"
            headers: dict[str, str] | None = None
            if kind == "weir":
                conf = workdir / f"{slug}.yaml"
                conf.write_text(bench.weir_conf(port, bench.free_port(), backend_port))
                argv = [sys.executable, "-m", "proxy", "run", "-c", str(conf)]
                if n > 1:
                    argv += ["--workers", str(n)]
                proc = pm.start(slug, [tools["taskset"], "-c", args.proxy_cpus, *argv],
                                cwd=bench.REPO_ROOT, env=env)
                headers = sticky
            else:
                text = bench.nginx_proxy_conf(workdir / slug, port, backend_port, workers=n,
                                              master_process=True, reuseport=True)
                proc = bench.start_nginx(pm, tools, workdir, slug, args.proxy_cpus, text)
            server = Server(kind, n, port, proc)
            bench.wait_for_port(proc, port, timeout)
            bench.wait_for_http_ok(proc, port, timeout, headers)
            pids = find_workers(server, timeout)
            server.supervisor = None if pids == [proc.pid] else proc.pid
            for i, pid in enumerate(pids, 1):
                server.workers.append(Worker(pid, cgroups.limit(f"{slug}-w{i}", pid)))
            print(
                f"{server.name} on {HOST}:{port} (cpu {args.proxy_cpus}), worker pid(s) "
                f"{' '.join(str(p) for p in pids)}, each held to {args.cpu_per_worker:g} of a "
                "core" + ("" if server.supervisor is None else
                          f"; supervisor pid {server.supervisor} not limited"),
                file=sys.stderr,
            )
            servers.append(server)
    return servers


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclass
class WorkerRun:
    pid: int
    cpu_s: float
    quota_use_pct: float  # cpu_s against what the quota allowed over the run
    nr_periods: int
    nr_throttled: int
    throttled_ms: float


@dataclass
class Run:
    wrk: bench.WrkResult
    wall_s: float
    workers: list[WorkerRun]
    supervisor_cpu_s: float | None
    load_idle_pct: float | None


def measure(
    args: argparse.Namespace,
    tools: dict[str, str],
    pm: bench.ProcessManager,
    server: Server,
    script: Path,
) -> Run:
    url = f"http://{HOST}:{server.port}/"
    if args.warmup > 0:
        bench.run_wrk(tools["wrk"], tools["taskset"], args.load_cpus, url,
                      duration=args.warmup, connections=args.connections,
                      threads=args.threads, script=script)
    check_workers(server)
    load_cpus = bench.parse_cpu_list(args.load_cpus)

    def snapshot() -> tuple[list[float], list[dict[str, int]], float | None, tuple[int, int]]:
        return (
            [bench.process_cpu_seconds(w.pid) for w in server.workers],
            [cpu_stat(w.cgroup) for w in server.workers],
            None if server.supervisor is None else bench.process_cpu_seconds(server.supervisor),
            bench.cpu_ticks(load_cpus),
        )

    cpu0, stat0, sup0, (idle0, total0) = snapshot()
    t0 = time.monotonic()
    # run.py's measurement (its own cpu%, proxy-CPU idle and other% around wrk), no warm-up.
    wrk = bench.measure(argparse.Namespace(**{**vars(args), "warmup": 0}), tools, pm,
                        bench.Target(server.name, server.port, server.proc), script)
    wall = time.monotonic() - t0
    cpu1, stat1, sup1, (idle1, total1) = snapshot()
    check_workers(server)

    allowed = args.cpu_per_worker * wall
    workers = []
    for w, c0, c1, s0, s1 in zip(server.workers, cpu0, cpu1, stat0, stat1, strict=True):
        def delta(key: str, s0: dict[str, int] = s0, s1: dict[str, int] = s1) -> int:
            return s1.get(key, 0) - s0.get(key, 0)

        workers.append(WorkerRun(
            pid=w.pid,
            cpu_s=round(c1 - c0, 3),
            quota_use_pct=100.0 * (c1 - c0) / allowed if allowed > 0 else 0.0,
            nr_periods=delta("nr_periods"),
            nr_throttled=delta("nr_throttled"),
            throttled_ms=delta("throttled_usec") / 1000.0,
        ))
    return Run(
        wrk=wrk,
        wall_s=wall,
        workers=workers,
        supervisor_cpu_s=None if sup0 is None or sup1 is None else sup1 - sup0,
        load_idle_pct=100.0 * (idle1 - idle0) / (total1 - total0) if total1 > total0 else None,
    )


@dataclass
class Summary:
    name: str
    kind: str
    n: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    worker_cpu_s: list[float]  # median per worker over the runs
    quota_use_pct: list[float]
    throttled_runs: list[int]  # per worker: in how many runs its cgroup was throttled
    supervisor_cpu_s: float | None
    load_idle_pct: float | None  # the lowest over the runs
    other_cpu_pct: float | None  # the highest over the runs
    requests_per_cpu_s: float | None  # requests answered per CPU second of the workers
    runs: list[Run]


def summarize(server: Server, runs: list[Run]) -> Summary:
    per_worker = list(zip(*(r.workers for r in runs), strict=True))
    sups = [r.supervisor_cpu_s for r in runs if r.supervisor_cpu_s is not None]
    idles = [r.load_idle_pct for r in runs if r.load_idle_pct is not None]
    others = [r.wrk.other_cpu_pct for r in runs if r.wrk.other_cpu_pct is not None]
    per_cpu = [
        r.wrk.requests / cpu for r in runs if (cpu := sum(w.cpu_s for w in r.workers)) > 0
    ]
    return Summary(
        name=server.name,
        kind=server.kind,
        n=server.n,
        rps=statistics.median(r.wrk.rps for r in runs),
        p50_ms=statistics.median(r.wrk.p50_ms for r in runs),
        p99_ms=statistics.median(r.wrk.p99_ms for r in runs),
        errors=sum(r.wrk.errors for r in runs),
        worker_cpu_s=[statistics.median(w.cpu_s for w in ws) for ws in per_worker],
        quota_use_pct=[statistics.median(w.quota_use_pct for w in ws) for ws in per_worker],
        throttled_runs=[sum(w.nr_throttled > 0 for w in ws) for ws in per_worker],
        supervisor_cpu_s=statistics.median(sups) if sups else None,
        load_idle_pct=min(idles) if idles else None,
        other_cpu_pct=max(others) if others else None,
        requests_per_cpu_s=statistics.median(per_cpu) if per_cpu else None,
        runs=runs,
    )


def warnings_for(s: Summary, args: argparse.Namespace) -> list[str]:
    """Why this target's req/s may not be what its workers' quotas allow."""
    found = []
    for i, (pid, throttled) in enumerate(
        zip((w.pid for w in s.runs[0].workers), s.throttled_runs, strict=True), 1
    ):
        if throttled < len(s.runs):
            found.append(
                f"{s.name}: worker {i} (pid {pid}) never reached its quota in "
                f"{len(s.runs) - throttled} of {len(s.runs)} run(s) (its cgroup was not "
                "throttled): something other than the worker's quota was the limit there (the "
                "load side, or other processes on the proxy CPU), so "
                f"{s.name}'s req/s is a lower bound and its ratio is not valid"
            )
        elif s.quota_use_pct[i - 1] < QUOTA_USE_WARN:
            found.append(
                f"{s.name}: worker {i} (pid {pid}) was throttled but used only "
                f"{s.quota_use_pct[i - 1]:.0f}% of its quota: it was idle part of the time "
                "(too few connections, or an uneven spread of them over the workers)"
            )
    if s.load_idle_pct is not None and s.load_idle_pct < LOAD_IDLE_WARN:
        found.append(
            f"{s.name}: the load CPU ({args.load_cpus}: wrk + backend) was only "
            f"{s.load_idle_pct:.0f}% idle: the load side was saturated, so the ratio is not "
            "valid (lower --cpu-per-worker)"
        )
    if s.other_cpu_pct is not None and s.other_cpu_pct >= bench.OTHER_CPU_WARN:
        found.append(
            f"{s.name}: other processes used up to {s.other_cpu_pct:.0f}% of a core during "
            "its runs; its numbers are noisy (rerun on a quiet machine)"
        )
    return found


@dataclass
class Ratio:
    kind: str
    n: int
    base: int
    ratio: float | None  # of the median req/s
    per_round: list[float]  # of the req/s in each round (same machine state, interleaved)
    valid: bool


def ratios(summaries: list[Summary], warned: set[str]) -> list[Ratio]:
    found = []
    for kind in KINDS:
        mine = sorted((s for s in summaries if s.kind == kind), key=lambda s: s.n)
        if len(mine) < 2:
            continue
        base = mine[0]
        for s in mine[1:]:
            value = s.rps / base.rps if base.rps > 0 else None
            per_round = [
                a.wrk.rps / b.wrk.rps
                for a, b in zip(s.runs, base.runs, strict=True)
                if b.wrk.rps > 0
            ]
            valid = value is not None and s.name not in warned and base.name not in warned
            found.append(Ratio(kind, s.n, base.n, value, per_round, valid))
    return found


def _workers_word(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def ratio_line(r: Ratio) -> str:
    text = f"{r.kind} {_workers_word(r.n)} / {_workers_word(r.base)}: "
    text += "-" if r.ratio is None else f"{r.ratio:.2f}x"
    spread = ""
    if len(r.per_round) > 1:
        spread = f"; per round {min(r.per_round):.2f}-{max(r.per_round):.2f}x"
    text += f" (ideal {r.n / r.base:.2f}x{spread})"
    if r.kind == "weir" and (r.base, r.n) == (1, 2) and r.ratio is not None:
        text += f"; target >= {TARGET_RATIO:g}x: {'met' if r.ratio >= TARGET_RATIO else 'NOT met'}"
    if not r.valid:
        text += " [not valid: see the warnings]"
    return text


def render_table(summaries: list[Summary], rounds: int) -> str:
    header = ("target", "req/s", "p50 ms", "p99 ms", "errors", "worker CPU s",
              "quota use", "throttled", "req/CPU s", "sup. CPU s", "load idle", "other%")
    rows = [header]
    for s in summaries:
        rows.append((
            s.name,
            f"{s.rps:,.0f}",
            f"{s.p50_ms:.3f}",
            f"{s.p99_ms:.3f}",
            str(s.errors),
            " ".join(f"{c:.2f}" for c in s.worker_cpu_s),
            " ".join(f"{q:.0f}%" for q in s.quota_use_pct),
            " ".join(f"{t}/{rounds}" for t in s.throttled_runs),
            "-" if s.requests_per_cpu_s is None else f"{s.requests_per_cpu_s:,.0f}",
            "-" if s.supervisor_cpu_s is None else f"{s.supervisor_cpu_s:.2f}",
            "-" if s.load_idle_pct is None else f"{s.load_idle_pct:.0f}%",
            "-" if s.other_cpu_pct is None else f"{s.other_cpu_pct:.0f}",
        ))
    return bench.format_table(rows)


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def parse_workers(spec: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,2; got {spec!r}") from None
    if len(counts) < 2 or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"expected at least two worker counts >= 1; got {spec!r}")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/scaling.py",
        description=(
            "Throughput of Weir (and nginx as a control) with 1 and 2 worker processes, each "
            "worker held to a fixed CPU quota by its own cgroup, so that the load side never "
            "runs short of CPU. Needs root (or a writable cgroup cpu controller), nginx, wrk."
        ),
    )
    p.add_argument("--workers", type=parse_workers, default=[1, 2], metavar="N,M",
                   help="worker counts to compare, the ratios against the smallest "
                   "(default 1,2)")
    p.add_argument("--cpu-per-worker", type=float, default=0.3, metavar="CORES",
                   help="CPU quota of each worker, in cores (default 0.3)")
    p.add_argument("--period-ms", type=float, default=100.0,
                   help="CFS period of the quota, in ms (default 100)")
    p.add_argument("--only", default=",".join(KINDS),
                   help=f"comma-separated subset of {','.join(KINDS)} (default: both)")
    p.add_argument("--duration", type=float, default=8.0,
                   help="seconds per measured wrk run (default 8)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of wrk before each measured run, 0 = off (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds, order rotating; medians are reported (default 3)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--proxy-cpus", default="0",
                   help="taskset CPU list for every proxy process (default 0)")
    p.add_argument("--load-cpus", default="1",
                   help="taskset CPU list for wrk and the backend (default 1)")
    p.add_argument("--cgroup-root", type=Path, metavar="DIR",
                   help="the cpu controller's cgroup directory (default: found in /proc/mounts; "
                   f"{V1_MOUNT} for cgroup v1)")
    p.add_argument("--startup-timeout", type=float, default=20.0,
                   help="seconds to wait for each server to come up (default 20)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write the results as JSON to FILE")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temp dir (configs, logs) for debugging")
    args = p.parse_args(argv)

    only = [n.strip().lower() for n in args.only.split(",") if n.strip()]
    if not only or set(only) - set(KINDS):
        p.error(f"--only takes a subset of {','.join(KINDS)}; got {args.only!r}")
    args.only = [k for k in KINDS if k in only]
    if args.duration < 1 or args.connections < 1 or args.threads < 1:
        p.error("--duration, --connections and --threads must be >= 1")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    args.period_us = round(args.period_ms * 1000)
    args.quota_us = round(args.cpu_per_worker * args.period_us)
    if not 1000 <= args.period_us <= 1_000_000:
        p.error("--period-ms must be from 1 to 1000")
    if args.quota_us < 1000:
        p.error("--cpu-per-worker x --period-ms must be at least 1 ms of CPU per period")
    try:
        proxy_cpus = len(bench.parse_cpu_list(args.proxy_cpus))
    except ValueError:
        p.error(f"--proxy-cpus: bad CPU list {args.proxy_cpus!r}")
    budget = args.cpu_per_worker * max(args.workers)
    if budget > 0.9 * proxy_cpus:
        p.error(
            f"--cpu-per-worker {args.cpu_per_worker:g} x {max(args.workers)} workers = "
            f"{budget:g} cores, more than 90% of the {proxy_cpus} proxy CPU(s): the workers "
            "would compete for a core instead of each having its own budget"
        )
    return args


def cleanup(pm: bench.ProcessManager, cgroups: Cgroups | None, workdir: Path,
            keep_tmp: bool) -> None:
    """Stop every process, then remove the cgroups; no signal may interrupt this."""
    caught = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in caught}
    try:
        bench.cleanup(pm, workdir, keep_tmp)
    finally:
        failed = cgroups.close() if cgroups is not None else []
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if failed:
        print(f"warning: could not remove cgroup(s): {', '.join(failed)}", file=sys.stderr)


@contextlib.contextmanager
def bench_session(
    args: argparse.Namespace, ctl: CpuController
) -> Iterator[tuple[bench.ProcessManager, Cgroups, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="weir-bench-scaling-"))
    pm = bench.ProcessManager(workdir)
    cgroups: Cgroups | None = None
    try:
        cgroups = Cgroups(ctl, args.period_us, args.quota_us)
        cgroups.open()
        yield pm, cgroups, workdir
    finally:
        cleanup(pm, cgroups, workdir, args.keep_tmp)


def run(args: argparse.Namespace, ctl: CpuController) -> int:
    tools = bench.find_tools(("nginx", "wrk", "taskset"), "apt-get install -y nginx wrk")
    if tools is None:
        return 2
    if "weir" in args.only and not (bench.REPO_ROOT / "proxy").is_dir():
        raise bench.BenchError(f"Weir package not found at {bench.REPO_ROOT / 'proxy'}")
    bench._check_cpus(args.proxy_cpus, "--proxy-cpus")
    bench._check_cpus(args.load_cpus, "--load-cpus")
    print(
        f"cgroup v{ctl.version} cpu controller at {ctl.root}: each worker gets "
        f"{args.quota_us} us per {args.period_us} us ({args.cpu_per_worker:g} of a core)",
        file=sys.stderr,
    )

    runs: dict[str, list[Run]] = {}
    with bench_session(args, ctl) as (pm, cgroups, workdir):
        script = workdir / "users.lua"
        script.write_text(bench.wrk_user_script(bench.N_USERS))
        servers = start_servers(args, pm, tools, workdir, cgroups)
        runs = {s.name: [] for s in servers}
        n_runs = len(servers) * args.rounds
        print(
            f"{n_runs} runs of {args.duration:g}s (+{args.warmup:g}s warm-up), "
            f"~{n_runs * (args.duration + args.warmup):.0f}s total",
            file=sys.stderr,
        )
        for rnd in range(args.rounds):
            k = rnd % len(servers)
            for server in servers[k:] + servers[:k]:
                res = measure(args, tools, pm, server, script)
                runs[server.name].append(res)
                per_worker = ", ".join(
                    f"{w.cpu_s:.2f}s ({w.quota_use_pct:.0f}% of quota, throttled "
                    f"{w.nr_throttled}/{w.nr_periods})"
                    for w in res.workers
                )
                sup = ("" if res.supervisor_cpu_s is None
                       else f"; supervisor {res.supervisor_cpu_s:.2f}s")
                idle = "-" if res.load_idle_pct is None else f"{res.load_idle_pct:.0f}%"
                other = "-" if res.wrk.other_cpu_pct is None else f"{res.wrk.other_cpu_pct:.0f}%"
                print(
                    f"[round {rnd + 1}/{args.rounds}] {server.name:<8} {res.wrk.rps:>9,.0f} "
                    f"req/s  p50 {res.wrk.p50_ms:.3f}  p99 {res.wrk.p99_ms:.3f} ms  errors "
                    f"{res.wrk.errors}  workers: {per_worker}{sup}  load idle {idle}  "
                    f"other {other}",
                    file=sys.stderr,
                )
        by_name = {s.name: s for s in servers}
        versions = bench._versions(tools)

    summaries = [summarize(by_name[name], runs[name]) for name in runs]
    warned: set[str] = set()
    warnings: list[str] = []
    for s in summaries:
        found = warnings_for(s, args)
        if any("not valid" in w for w in found):
            warned.add(s.name)
        warnings += found
    found_ratios = ratios(summaries, warned)

    stat = "median of" if args.rounds > 1 else "single run,"
    print()
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s ({stat} {args.rounds} "
        f"round(s)); each worker in its own cgroup with {args.cpu_per_worker:g} of a core "
        f"({args.quota_us} us per {args.period_us} us, cgroup v{ctl.version}); proxies on cpu "
        f"{args.proxy_cpus}, wrk+backend on cpu {args.load_cpus}"
    )
    print(render_table(summaries, args.rounds))
    for line in warnings:
        print(f"warning: {line}")
    for r in found_ratios:
        print(ratio_line(r))
    print(
        "worker CPU s = CPU seconds each worker used in the measured run; quota use = that "
        "against what its quota allowed; throttled = runs in which the worker's cgroup was "
        "throttled (it reached its quota); req/CPU s = requests answered per CPU second of "
        "the workers; sup. CPU s = the supervisor's / nginx master's CPU seconds (not "
        "limited); load idle = the lowest idle share of the load CPU; other% = the most CPU "
        "other processes used (% of a core, should be ~0)"
    )

    if args.json is not None:
        doc: dict[str, Any] = {
            "settings": {
                "workers": args.workers,
                "cpu_per_worker": args.cpu_per_worker,
                "period_us": args.period_us,
                "quota_us": args.quota_us,
                "cgroup_version": ctl.version,
                "cgroup_root": str(ctl.root),
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "statistic": "median",
                "connections": args.connections,
                "threads": args.threads,
                "proxy_cpus": args.proxy_cpus,
                "load_cpus": args.load_cpus,
                "versions": versions,
            },
            "results": {
                s.name: {
                    k: v for k, v in asdict(s).items() if k != "runs"
                } | {
                    "runs": [
                        asdict(r) | {"wrk": asdict(r.wrk) | {"errors": r.wrk.errors}}
                        for r in s.runs
                    ]
                }
                for s in summaries
            },
            "ratios": [asdict(r) for r in found_ratios],
            "warnings": warnings,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctl = find_cpu_controller(args.cgroup_root)
    except bench.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hint = "" if args.keep_tmp else bench.KEEP_TMP_HINT
    code, failed = bench.run_stopping_cleanly(lambda: run(args, ctl), hint)
    return failed or code or 0


if __name__ == "__main__":
    sys.exit(main())
