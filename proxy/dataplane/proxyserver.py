"""The running data plane: owns the route table, the upstream pools, the health monitor,
the statistics and the listeners, and swaps in what the control plane compiles."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..config.model import Config, split_address
from ..config.tls import CompiledTLS, ListenerTLS, compile_tls, warn_unverified
from .accesslog import AccessLog
from .context import ClientSide, DataPlaneContext, DataPlaneSettings
from .health import HealthMonitor
from .http1 import Http1Connection
from .listen import DATA_PLANE, ListenError
from .pools import PoolRegistry
from .routing import RouteTable, build_route_table
from .stats import StatsRegistry
from .upstream import UpstreamPool

log = logging.getLogger("weir")


SWEEP_INTERVAL = 1.0


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
        tls = compile_tls(config)
        warn_unverified(config)
        # Whether the data listener speaks TLS is decided here, for the life of the process.
        self.listener_tls = ListenerTLS(tls.listener) if tls.listener is not None else None
        self.scheme = b"https" if self.listener_tls is not None else b"http"
        self.pools = PoolRegistry(config.upstream, loop, tls.upstream, tls.upstream_h2)
        self.health = HealthMonitor(self.pools, loop)
        self.stats = StatsRegistry()
        # What every connection reads of the process: the route table, the access log,
        # whether it is draining, the settings (see the properties below), and the rest.
        self.plane = DataPlaneContext(
            build_route_table(config, self.pools.balancer_for, weights_override,
                              stats=self.stats),
            AccessLog(config.access_log) if config.access_log else None,
            DataPlaneSettings(config), self.stats, self.health, self.pools.corker, loop,
            self.scheme, self.listener_tls)
        self.health.sync(config, self.table, initial=True)
        # Blue/green: the idle colour each service's preview header reaches (see live_pools).
        self.previews: dict[str, tuple[str, str]] = {}
        self.listeners: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        # A worker of `weir run --workers N` (see worker.py) shares its port with its siblings
        # (SO_REUSEPORT) and leaves the active health checks to the supervisor.
        self.reuse_port = False
        self.active_checks = True

    @property
    def connections(self) -> set[ClientSide]:
        return self.plane.connections

    @property
    def settings(self) -> DataPlaneSettings:
        return self.plane.settings

    @settings.setter
    def settings(self, settings: DataPlaneSettings) -> None:
        self.plane.settings = settings

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
                     previews: dict[str, tuple[str, str]] | None = None,
                     initial: bool = False) -> RouteTable:
        """Swap in a new config: compiled off to the side, then replaced in one assignment.
        Upstreams that lose all their traffic start draining; those that regain it stop.
        ``initial``: the runtime state's weights taken in at start, before anything was served
        (nothing drains, nothing slow-starts)."""
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
        # Before any request can pick an upstream it added.
        self.health.sync(config, table, initial=initial)
        if config.access_log != old_config.access_log:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = AccessLog(config.access_log) if config.access_log else None
        drain_timeouts = {s.name: s.drain.timeout for s in old_config.services}
        drain_timeouts.update({s.name: s.drain.timeout for s in config.services})
        for pool, label in ([] if initial else old_live.items()):
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
        self.pools.use_contexts(tls.upstream, tls.upstream_h2)
        warn_unverified(config)

    def apply_drained(self, drained: set[str]) -> None:
        """Exactly these upstream addresses are drained by an operator (weir drain): out of
        rotation in every service and version, their idle connections closed; the others
        back in (as far as their health allows)."""
        for address in sorted(self.health.drained - drained):
            self.health.set_drained(address, False)
        for address in sorted(drained - self.health.drained):
            self.health.set_drained(address, True)

    def protocol(self) -> Http1Connection:
        return Http1Connection(self.plane)

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
