"""`weir run` as one process: the start and stop sequence of the data plane, the control
plane and the admin API."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..admin.api import AdminServer
from ..config.model import Config
from ..control.plane import ControlPlane
from ..control.store import STORE_CLOSE_SECONDS
from ..dataplane.build import request_path_build
from ..dataplane.listen import ListenError
from ..dataplane.proxyserver import ProxyServer
from ..tasks import finish_within
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
