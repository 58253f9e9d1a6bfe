"""The running proxy: owns the route table, the upstream pools and the listeners."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from .admin import AdminServer
from .config import Config, ConfigError, load_config, split_address
from .routing import RouteTable, build_route_table
from .server import ClientConnection, DataPlaneSettings
from .upstream import PoolRegistry

log = logging.getLogger("weir")

SWEEP_INTERVAL = 1.0
GC_THRESHOLD = 20_000


class ProxyServer:
    """The data plane's shared state. Connections read ``table`` and ``settings`` at the start
    of each request, so replacing either is atomic from their point of view."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 config_path: Path | None = None) -> None:
        self.loop = loop
        self.config = config
        self.config_path = config_path
        self.settings = DataPlaneSettings(config)
        self.pools = PoolRegistry(config.upstream, loop)
        self.table: RouteTable = build_route_table(config, self.pools.balancer_for)
        self.connections: set[ClientConnection] = set()
        self.listeners: list[asyncio.Server] = []
        self.draining = False
        self._sweeper: asyncio.TimerHandle | None = None

    def apply_config(self, config: Config,
                     weights_override: dict[str, dict[str, int]] | None = None) -> None:
        """Swap in a new config: compiled off to the side, then replaced in one assignment."""
        self.pools.apply(config.upstream)
        table = build_route_table(config, self.pools.balancer_for, weights_override,
                                  generation=self.table.generation + 1)
        self.config = config
        self.settings = DataPlaneSettings(config)
        self.table = table

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self) -> None:
        host, port = split_address(self.config.listen)
        server = await self.loop.create_server(self.protocol, host, port, reuse_address=True,
                                               backlog=4096)
        self.listeners.append(server)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    @property
    def port(self) -> int:
        """The data-plane port actually bound (useful when the config says port 0)."""
        return int(self.listeners[0].sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        self.pools.sweep()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish up to ``timeout``, then close."""
        self.draining = True
        for server in self.listeners:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pools.close_all()


def settle_garbage_collector() -> None:
    """The request path makes no reference cycles, so the cyclic collector only costs time;
    and a full collection walking every object imported at start-up shows up as latency
    spikes. Freeze what start-up made, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def shutdown_timeout(config: Config) -> float:
    return max((s.drain.timeout for s in config.services), default=30.0)


async def serve(config: Config, config_path: Path | None = None) -> None:
    loop = asyncio.get_running_loop()
    proxy = ProxyServer(config, loop, config_path)
    admin = AdminServer(proxy)
    await proxy.start()
    await admin.start()
    log.info("weir listening on %s (admin on %s), %d service(s)", config.listen,
             config.admin.listen, len(config.services))
    settle_garbage_collector()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing requests in flight")
    await proxy.shutdown(shutdown_timeout(config))
    await admin.stop()
    log.info("stopped")


def install_event_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        log.warning("uvloop is not installed; running on the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(config_path: str) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_event_loop()
    try:
        asyncio.run(serve(config, Path(config_path)))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
