"""`weir run --workers N`: the supervisor, which is also the one control plane.

The supervisor does everything a single Weir does except serve the data listener: it loads and
watches the config, owns the state file, serves the admin API and /metrics, runs the rollout
controller and the active health checks. N worker processes (worker.py) serve the listener,
sharing its port with SO_REUSEPORT. The supervisor's ``SupervisorProxy`` compiles the route
table as a single Weir does, so the control plane code runs unchanged on it; each change it
applies is also sent to every worker, and its statistics are the sum of the workers' reports
(report.py). A worker that dies is started again, with a backoff if it keeps dying.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..admin.api import AdminServer
from ..config.model import Config, split_address
from ..config.tls import CompiledTLS
from ..control.plane import ControlPlane
from ..dataplane.listen import DATA_PLANE, ListenError
from ..dataplane.proxyserver import ProxyServer
from . import ipc
from .lifecycle import close_store, open_listeners, run_control, stop
from .process import ProcessSignals, open_store, settle_garbage_collector
from .report import forget_worker, merge

log = logging.getLogger("weir.workers")

READY_TIMEOUT = 30.0        # for a worker to start listening
HEALTH_PUSH_INTERVAL = 0.1  # how often active-check results are compared and pushed
STABLE_AFTER = 10.0         # a worker that lived this long is restarted at once when it dies
MAX_BACKOFF = 10.0
EXIT_GRACE = 5.0            # past the drain timeout, before a worker is killed
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class WorkerStartError(RuntimeError):
    pass


class SupervisorProxy(ProxyServer):
    """A ProxyServer that serves no listener: what it applies goes to the workers as well,
    and its stats, pool gauges and counters are the workers' sums."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 weights_override: dict[str, dict[str, int]] | None = None) -> None:
        super().__init__(config, loop, weights_override)
        self.workers: WorkerSet | None = None
        self.listen = config.listen  # replaced by the address actually reserved
        self._weights = weights_override
        self._previews: dict[str, tuple[str, str]] | None = None
        self._reload_tls = False
        self._health_pusher: asyncio.Task[None] | None = None
        self._health_flags: dict[str, bool] = {}

    def apply_config(self, config: Config,
                     weights_override: dict[str, dict[str, int]] | None = None,
                     generation: int | None = None,
                     previews: dict[str, tuple[str, str]] | None = None,
                     initial: bool = False) -> Any:
        table = super().apply_config(config, weights_override, generation, previews, initial)
        self._weights, self._previews = weights_override, previews
        if self.workers is not None:
            self.workers.broadcast(ipc.CONFIG, self.config_message())
        self._reload_tls = False
        return table

    def use_tls(self, tls: CompiledTLS, config: Config) -> None:
        super().use_tls(tls, config)
        self._reload_tls = True  # the workers load the files again with the next config

    def apply_drained(self, drained: set[str]) -> None:
        changed = drained != self.health.drained
        super().apply_drained(drained)
        if changed and self.workers is not None:
            self.workers.broadcast(ipc.DRAINED, sorted(drained))

    def health_flags(self) -> dict[str, bool]:
        return {key: state.healthy for key, state in self.health.upstreams.items()}

    def config_message(self) -> dict[str, Any]:
        self._health_flags = self.health_flags()
        return {"config": self.config, "listen": self.listen, "weights": self._weights,
                "generation": self.table.generation, "previews": self._previews or {},
                "reload_tls": self._reload_tls, "health": self._health_flags,
                "drained": sorted(self.health.drained)}

    async def _push_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_PUSH_INTERVAL)
            flags = self.health_flags()
            if flags != self._health_flags and self.workers is not None:
                self._health_flags = flags
                self.workers.broadcast(ipc.HEALTH, flags)

    async def start(self) -> None:
        """No listener here: only the health checks."""
        self.health.start()
        self._health_pusher = self.loop.create_task(self._push_health())

    @property
    def port(self) -> int:
        return split_address(self.listen)[1]

    async def shutdown(self, timeout: float) -> None:
        self.draining = True
        if self._health_pusher is not None:
            self._health_pusher.cancel()
        await self.health.stop()
        if self.workers is not None:
            await self.workers.drain(timeout)
        if self.access_log is not None:
            self.access_log.close()


class WorkerProcess:
    """One running worker (a restart is a new WorkerProcess in the same slot)."""

    def __init__(self, slot: int, ident: int, process: subprocess.Popen[bytes],
                 writer: asyncio.StreamWriter) -> None:
        self.slot = slot
        self.ident = ident  # unique over the supervisor's life: keys its gauges
        self.process = process
        self.writer = writer
        self.ready = asyncio.Event()
        self.alive = True
        self.requests = 0
        self.started = time.monotonic()
        # The drained addresses this worker had applied when it built its last report (None
        # before its first): its in-flight counts for those include all it still has open.
        self.drained: frozenset[str] | None = None


class WorkerSet:
    def __init__(self, proxy: SupervisorProxy, count: int) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.count = count
        self.slots: list[WorkerProcess | None] = [None] * count
        self.restarts = [0] * count
        self.backoff = [0.0] * count
        self.stopping = False
        self._next_ident = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reserved: socket.socket | None = None

    def reserve_port(self) -> None:
        """Bind (without listening) the listen address with SO_REUSEPORT for the supervisor's
        whole life: a config's port 0 becomes one port that every worker, restarts included,
        then shares, and no other program can take the port while workers restart."""
        listen = self.proxy.config.listen
        host, port = split_address(listen)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except OSError as exc:
            raise ListenError(DATA_PLANE, listen, exc) from exc
        # First bound as a single Weir would bind it, without SO_REUSEPORT: that fails if
        # anything listens there, even another `weir run --workers` (whose SO_REUSEPORT
        # sockets would otherwise take ours in and split the traffic with us in silence).
        # Held until the reservation is bound: the two do not conflict while neither listens.
        probe = socket.socket(family, kind, proto)
        sock = socket.socket(family, kind, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(probe.getsockname())  # port 0: the port the probe got
        except OSError as exc:
            sock.close()
            raise ListenError(DATA_PLANE, listen, exc) from exc
        finally:
            probe.close()
        self._reserved = sock
        bound = sock.getsockname()[1]
        self.proxy.listen = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    async def start(self) -> None:
        self.reserve_port()
        started = [await self.spawn(slot) for slot in range(self.count)]
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                for worker in started:
                    ready = self.loop.create_task(worker.ready.wait())
                    exited = self.loop.create_task(self._exited(worker))
                    await asyncio.wait((ready, exited), return_when=asyncio.FIRST_COMPLETED)
                    ready.cancel()
                    exited.cancel()
                    if not worker.ready.is_set():
                        raise WorkerStartError(f"worker {worker.process.pid} exited with "
                                               f"code {worker.process.returncode} before "
                                               f"listening")
        except TimeoutError:
            raise WorkerStartError(f"workers not listening after {READY_TIMEOUT:.0f}s") from None

    async def _exited(self, worker: WorkerProcess) -> None:
        while worker.alive:
            await asyncio.sleep(0.05)

    async def spawn(self, slot: int) -> WorkerProcess:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, WEIR_LOG_LEVEL=self.proxy.config.log_level.upper())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
        try:
            process = subprocess.Popen([sys.executable, "-m", "proxy.runtime.worker",
                                        str(child.fileno())], pass_fds=(child.fileno(),),
                                       env=env)
        finally:
            child.close()  # the worker's copy is its own: its death is our EOF
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        self._next_ident += 1
        worker = WorkerProcess(slot, self._next_ident, process, writer)
        self.slots[slot] = worker
        ipc.send(writer, ipc.CONFIG, self.proxy.config_message())
        task = self.loop.create_task(self._supervise(worker, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    async def _supervise(self, worker: WorkerProcess, reader: asyncio.StreamReader) -> None:
        while (message := await ipc.receive(reader)) is not None:
            kind, body = message
            if kind == ipc.REPORT:
                merge(self.proxy, worker.ident, body)
                worker.requests += body.requests
                worker.drained = frozenset(body.drained)
            elif kind == ipc.READY:
                worker.ready.set()
                log.info("worker %d (pid %d) listening on %s", worker.slot, body["pid"],
                         self.proxy.listen)
        # EOF: the worker has exited or is about to.
        worker.alive = False
        worker.writer.close()
        forget_worker(self.proxy, worker.ident)
        code = await self._reap(worker.process)
        if self.stopping:
            if code != 0:
                log.warning("worker %d (pid %d) exited with %s while stopping", worker.slot,
                            worker.process.pid, describe_exit(code))
            return
        slot = worker.slot
        lived = time.monotonic() - worker.started
        delay = 0.0 if lived >= STABLE_AFTER else min(MAX_BACKOFF,
                                                      max(0.5, self.backoff[slot] * 2))
        self.backoff[slot] = delay
        log.error("worker %d (pid %d) %s after %.1fs; starting another%s", slot,
                  worker.process.pid, describe_exit(code), lived,
                  f" in {delay:.1f}s" if delay else "")
        if delay:
            await asyncio.sleep(delay)
        if not self.stopping:
            self.restarts[slot] += 1
            await self.spawn(slot)

    async def _reap(self, process: subprocess.Popen[bytes]) -> int:
        try:
            return await asyncio.to_thread(process.wait, EXIT_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d closed its pipe but did not exit: killing it",
                        process.pid)
            process.kill()
            return await asyncio.to_thread(process.wait)

    def broadcast(self, kind: str, body: Any) -> None:
        frame = ipc.encode(kind, body)  # pickled once for all
        for worker in self.slots:
            if worker is not None and worker.alive and not worker.writer.is_closing():
                worker.writer.write(frame)

    async def drain(self, timeout: float) -> None:
        """Every worker closes its listener, finishes its requests (up to ``timeout``) and
        exits; the ones that take longer than that and a grace period are killed."""
        self.stopping = True
        self.broadcast(ipc.DRAIN, {"timeout": timeout})
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout + EXIT_GRACE)
            for worker in self.slots:
                if worker is not None and worker.process.poll() is None:
                    log.warning("worker pid %d did not exit in time: killing it",
                                worker.process.pid)
                    worker.process.kill()
            if late:
                await asyncio.wait(late, timeout=EXIT_GRACE)
        if self._reserved is not None:
            self._reserved.close()

    async def kill_all(self) -> None:
        """Start-up failed: stop whatever did start."""
        self.stopping = True
        for worker in self.slots:
            if worker is not None and worker.process.poll() is None:
                worker.process.kill()
        for worker in self.slots:
            if worker is not None:
                await asyncio.to_thread(worker.process.wait)

    def confirmed_drained(self, address: str) -> bool:
        """Whether every serving worker has reported since it applied the drain of
        ``address``, so that the in-flight sum counts all that is still open to it."""
        return all(w.drained is not None and address in w.drained for w in self.slots
                   if w is not None and w.alive and w.ready.is_set())

    def describe(self) -> list[dict[str, Any]]:
        """For /api/status: each slot's current worker."""
        return [{"slot": slot, "pid": w.process.pid if w else None,
                 "alive": bool(w and w.alive and w.ready.is_set()),
                 "requests": w.requests if w else 0, "restarts": self.restarts[slot]}
                for slot, w in enumerate(self.slots)]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


async def serve_supervised(config_path: Path, config: Config, count: int) -> int:
    """`weir run --workers N` (N > 1): the twin of app.serve for the supervisor."""
    loop = asyncio.get_running_loop()
    signals = ProcessSignals(loop, " (workers drain on their own)")
    store = await open_store(config)
    if store is None:
        return 2
    control = signals.control = ControlPlane(config_path, config,
                                             SupervisorProxy(config, loop), store=store)
    proxy = control.proxy
    assert isinstance(proxy, SupervisorProxy)
    workers = proxy.workers = WorkerSet(proxy, count)
    try:
        await workers.start()
    except WorkerStartError as exc:
        log.error("cannot start: %s", exc)
        await workers.kill_all()
        return 1
    except ListenError:
        await close_store(control)
        raise
    admin = AdminServer(control)
    # The workers listen already: when the admin API cannot, they are stopped before the
    # error is told, so that nothing is left listening once `weir run` has exited.
    await open_listeners(control, admin)
    run_control(control)
    log.info("weir listening on %s with %d workers (admin on %s), %d service(s), config "
             "generation %d", proxy.listen, count, config.admin.listen, len(config.services),
             control.generation)
    settle_garbage_collector()
    await signals.stop.wait()

    shutdown = control.config.shutdown
    log.info("shutting down: /readyz is 503; workers close the listener in %.1fs",
             shutdown.delay)
    await stop(control, admin, shutdown.delay, shutdown.timeout)
    return 0
