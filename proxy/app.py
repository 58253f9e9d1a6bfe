"""The running proxy: owns the route table, the upstream pools and the listeners."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import request_path_build
from .accesslog import AccessLog
from .admin import AdminServer
from .config import Config, ConfigError, load_config, split_address
from .control import ControlPlane
from .health import HealthMonitor
from .listen import DATA_PLANE, ListenError
from .routing import RouteTable, build_route_table
from .server import ClientConnection, DataPlaneSettings, PlaneState
from .stats import StatsRegistry
from .store import STORE_CLOSE_SECONDS, StateStore, StoreUnavailable, make_store
from .tasks import finish_within
from .tls import CompiledTLS, ListenerTLS, TLSConfigError, compile_tls, warn_unverified
from .upstream import PoolRegistry, UpstreamPool

log = logging.getLogger("weir")

SWEEP_INTERVAL = 1.0
GC_THRESHOLD = 20_000
# After Weir closes a TLS connection it waits this long for the client's close_notify before
# dropping it (uvloop's default is 30 s, which would hold up a shutdown).
TLS_SHUTDOWN_TIMEOUT = 5.0


class ProxyServer:
    """The data plane's shared state. Connections read ``table`` and ``settings`` at the start
    of each request, so replacing either is atomic from their point of view."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 weights_override: dict[str, dict[str, int]] | None = None) -> None:
        self.loop = loop
        self.config = config
        self.settings = DataPlaneSettings(config)
        tls = compile_tls(config)
        warn_unverified(config)
        # Whether the data listener speaks TLS is decided here, for the life of the process.
        self.listener_tls = ListenerTLS(tls.listener) if tls.listener is not None else None
        self.scheme = b"https" if self.listener_tls is not None else b"http"
        self.pools = PoolRegistry(config.upstream, loop, tls.upstream)
        self.health = HealthMonitor(self.pools, loop)
        self.stats = StatsRegistry()
        # The route table, the access log and whether it is draining: read by the request
        # path on every request (see the properties below).
        self.plane = PlaneState(
            build_route_table(config, self.pools.balancer_for, weights_override,
                              stats=self.stats),
            AccessLog(config.access_log) if config.access_log else None)
        self.health.sync(config, self.table, initial=True)
        # Blue/green: the idle colour each service's preview header reaches (see live_pools).
        self.previews: dict[str, tuple[str, str]] = {}
        self.connections: set[ClientConnection] = set()
        self.listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        # A worker of `weir run --workers N` (see worker.py) shares its port with its siblings
        # (SO_REUSEPORT) and leaves the active health checks to the supervisor.
        self.reuse_port = False
        self.active_checks = True

    @property
    def table(self) -> RouteTable:
        return self.plane.table

    @table.setter
    def table(self, table: RouteTable) -> None:
        self.plane.table = table

    @property
    def access_log(self) -> AccessLog | None:
        return self.plane.access_log

    @access_log.setter
    def access_log(self, access_log: AccessLog | None) -> None:
        self.plane.access_log = access_log

    @property
    def draining(self) -> bool:
        return self.plane.draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self.plane.draining = draining

    def apply_config(self, config: Config,
                     weights_override: dict[str, dict[str, int]] | None = None,
                     generation: int | None = None,
                     previews: dict[str, tuple[str, str]] | None = None) -> RouteTable:
        """Swap in a new config: compiled off to the side, then replaced in one assignment.
        Upstreams that lose all their traffic start draining; those that regain it stop."""
        self.pools.apply(config.upstream)
        previews = previews or {}
        table = build_route_table(config, self.pools.balancer_for, weights_override,
                                  generation or self.table.generation + 1, self.stats, previews)
        old_config, old_live = self.config, live_pools(self.table, self.previews)
        new_live = live_pools(table, previews)
        self.previews = previews
        self.config = config
        self.settings = DataPlaneSettings(config)
        self.table = table
        self.health.sync(config, table)  # before any request can pick an upstream it added
        if config.access_log != old_config.access_log:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = AccessLog(config.access_log) if config.access_log else None
        drain_timeouts = {s.name: s.drain.timeout for s in old_config.services}
        drain_timeouts.update({s.name: s.drain.timeout for s in config.services})
        for pool, label in old_live.items():
            if pool not in new_live:
                pool.start_draining(drain_timeouts.get(label[0], 30.0), label)
        for pool in new_live:
            if pool.draining:
                pool.stop_draining()
        return table

    def use_tls(self, tls: CompiledTLS, config: Config) -> None:
        """A reload's freshly loaded certificates and CAs: new handshakes use them."""
        if self.listener_tls is not None and tls.listener is not None:
            self.listener_tls.swap(tls.listener)
        self.pools.use_contexts(tls.upstream)
        warn_unverified(config)

    def apply_drained(self, drained: set[str]) -> None:
        """Exactly these upstream addresses are drained by an operator (weir drain): out of
        rotation in every service and version, their idle connections closed; the others
        back in (as far as their health allows)."""
        for address in sorted(self.health.drained - drained):
            self.health.set_drained(address, False)
        for address in sorted(drained - self.health.drained):
            self.health.set_drained(address, True)

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self) -> None:
        host, port = split_address(self.config.listen)
        tls: dict[str, Any] = {}
        if self.listener_tls is not None:
            # A client gets as long for its handshake as for its request head.
            tls = {"ssl": self.listener_tls.listener,
                   "ssl_handshake_timeout": self.settings.header_timeout or None,
                   "ssl_shutdown_timeout": TLS_SHUTDOWN_TIMEOUT}
        try:
            server = await self.loop.create_server(self.protocol, host, port,
                                                   reuse_address=True,
                                                   reuse_port=self.reuse_port or None,
                                                   backlog=4096, **tls)
        except OSError as exc:
            raise ListenError(DATA_PLANE, self.config.listen, exc) from exc
        self.listeners.append(server)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        if self.active_checks:
            self.health.start()

    @property
    def port(self) -> int:
        """The data-plane port actually bound (useful when the config says port 0)."""
        return int(self.listeners[0].sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        self.pools.sweep()
        if self.access_log is not None:
            self.access_log.flush()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def stop_listening(self) -> None:
        """New connections are refused from here on; open ones carry on."""
        for server in self.listeners:
            server.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish up to ``timeout``, then close."""
        self.draining = True
        self.stop_listening()
        await self.health.stop()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.connections:
            log.warning("shutdown timeout: closing %d connection(s) still open",
                        len(self.connections))
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pools.close_all()
        if self.access_log is not None:
            self.access_log.close()


def live_pools(table: RouteTable, previews: dict[str, tuple[str, str]]
               ) -> dict[UpstreamPool, tuple[str, str]]:
    """Upstream pools that can receive traffic under ``table`` (a weight above 0, or a rule
    or a mirror pointing at their version), each with a (service, version) that uses it.

    A blue/green preview rule (``previews``: service → (header, idle colour); the route puts it
    first among its rules) does not keep a colour live: after a promotion the colour just
    vacated becomes the preview target, and its users' connections must still drain. Preview
    requests reach it as before, over fresh connections."""
    live: dict[UpstreamPool, tuple[str, str]] = {}
    for route in table.routes:
        names = {name for name, weight in route.weights.items() if weight > 0}
        rules = route.rules[1:] if route.name in previews else route.rules
        names.update(rule.version.name for rule in rules)
        names.update(mirror.target.name for mirror in route.mirrors)
        for name in names:
            for pool in route.versions[name].balancer.pools:
                live.setdefault(pool, (route.name, name))
    return live


def settle_garbage_collector() -> None:
    """The request path makes no reference cycles, so the cyclic collector only costs time;
    and a full collection walking every object imported at start-up shows up as latency
    spikes. Freeze what start-up made, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


class ProcessSignals:
    """SIGTERM and SIGINT stop the process (a second one exits at once); SIGHUP reloads the
    config once ``control`` is set. Installed before anything listens: a signal must never
    find the process on its default action (exit)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, forced: str = "") -> None:
        self.stop = asyncio.Event()
        self.control: ControlPlane | None = None
        self.forced = forced
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_term)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)

    def on_term(self) -> None:
        if self.stop.is_set():
            log.warning("second termination signal: exiting now%s", self.forced)
            os._exit(1)
        self.stop.set()

    def on_hup(self) -> None:
        if self.control is not None:
            self.control.reload_soon("signal")


async def open_store(config: Config) -> StateStore | None:
    """The runtime state store, opened; None (after saying why) when it cannot be. Starting
    without a shared state could send traffic to a version the fleet has moved off: better not
    to start, and let whatever restarts Weir try again."""
    store = make_store(config)
    try:
        await store.open()
    except StoreUnavailable as exc:
        print(f"weir: {exc}", file=sys.stderr)
        return None
    return store


async def serve(config_path: Path, config: Config) -> int:
    loop = asyncio.get_running_loop()
    signals = ProcessSignals(loop)
    store = await open_store(config)
    if store is None:
        return 2
    control = signals.control = ControlPlane(config_path, config, loop, store=store)
    admin = AdminServer(control)
    try:
        await control.proxy.start()
        await admin.start()
    except ListenError:
        # Nothing is left listening, and a shared store's lock is let go at once.
        await control.proxy.shutdown(0)
        await finish_within(STORE_CLOSE_SECONDS, control.store.close(),
                            "closing the state store")
        raise
    control.start_sync()
    control.start_watching()
    control.rollouts.start()
    log.info("weir listening on %s (admin on %s), %d service(s), config generation %d, "
             "request path %s", config.listen, config.admin.listen, len(config.services),
             control.generation, request_path_build())
    settle_garbage_collector()
    await signals.stop.wait()

    shutdown = control.config.shutdown
    log.info("shutting down: /readyz is 503; closing the listener in %.1fs", shutdown.delay)
    control.proxy.draining = True
    await asyncio.sleep(shutdown.delay)
    await control.stop_watching()
    await control.rollouts.stop()
    # After the controller's last save; releases its lock. Bounded: were Redis to stop
    # answering, the lock lapses by itself, and the stop must go on.
    await finish_within(STORE_CLOSE_SECONDS, control.store.close(), "closing the state store")
    await control.proxy.shutdown(shutdown.timeout)
    await admin.stop()
    log.info("stopped")
    return 0


def install_event_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        log.warning("uvloop is not installed; running on the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_open_file_limit() -> None:
    """Every client connection takes a file descriptor and most take a second one upstream, so
    the usual soft limit of 1024 would hold Weir to a few hundred clients (and the default
    max_connections is derived from it). Like HAProxy, raise the soft limit to the hard one;
    nginx needs worker_rlimit_nofile for the same. Worker processes inherit it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
            return
        log.info("open-file limit raised from %d to %d", soft, wanted)


def run(config_path: str, workers: int = 1) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # we log reloads ourselves
    raise_open_file_limit()
    install_event_loop()
    if workers > 1:
        from .workers import serve_supervised

        main = serve_supervised(Path(config_path), config, workers)
    else:
        main = serve(Path(config_path), config)
    try:
        return asyncio.run(main)
    except TLSConfigError as exc:  # a file changed since it was validated a moment ago
        print(ConfigError(config_path, exc.errors), file=sys.stderr)
        return 2
    except ListenError as exc:  # like an invalid config: exit 2, one line, nothing listens
        print(f"weir: {exc.message(config_path)}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
