"""`weir run` as one process: the start and stop sequence of the data plane, the control
plane and the admin API."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..admin.api import AdminServer
from ..config.model import Config
from ..control.plane import ControlPlane
from ..dataplane.build import request_path_build
from ..dataplane.proxyserver import ProxyServer
from .lifecycle import open_listeners, run_control, stop
from .process import ProcessSignals, open_store, settle_garbage_collector

log = logging.getLogger("weir")


async def serve(config_path: Path, config: Config) -> int:
    loop = asyncio.get_running_loop()
    signals = ProcessSignals(loop)
    store = await open_store(config)
    if store is None:
        return 2
    control = signals.control = ControlPlane(config_path, config, ProxyServer(config, loop),
                                             store=store)
    admin = AdminServer(control)
    await open_listeners(control, admin)
    run_control(control)
    log.info("weir listening on %s (admin on %s), %d service(s), config generation %d, "
             "request path %s", config.listen, config.admin.listen, len(config.services),
             control.generation, request_path_build())
    settle_garbage_collector()
    await signals.stop.wait()

    shutdown = control.config.shutdown
    log.info("shutting down: /readyz is 503; closing the listener in %.1fs", shutdown.delay)
    await stop(control, admin, shutdown.delay, shutdown.timeout)
    return 0
