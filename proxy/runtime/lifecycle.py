"""The order a Weir process starts and stops its parts, in one place: `weir run` as one
process, the supervisor of `--workers N`, `weir demo` and the test harnesses all go through
it. (A worker of `--workers N` runs a data plane alone: it starts and drains that, no more.)

Start: the state store is opened and the control plane built over its data plane (by the
caller, which knows which data plane), then the listeners; only once everything listens does
the control plane follow the shared store, watch its file and run the rollout controller.
Stop: readiness goes 503 and, after ``shutdown.delay`` for load balancers to notice, the file
watcher and the controller stop (its last records saved), the store is closed (releasing the
controller lock), the data plane drains its requests for up to ``shutdown.timeout``, and the
admin listener closes last, so that it answers for as long as there is anything to ask about.
"""

from __future__ import annotations

import asyncio
import logging

from ..admin.api import AdminServer
from ..control.plane import ControlPlane
from ..control.store import STORE_CLOSE_SECONDS
from ..dataplane.listen import ListenError
from ..tasks import finish_within

log = logging.getLogger("weir")


async def open_listeners(control: ControlPlane, admin: AdminServer) -> None:
    """Open the data plane's listeners, then the admin API's. When one cannot bind, nothing
    is left listening and the ListenError goes on to the caller, which says which one."""
    try:
        await control.proxy.start()
        await admin.start()
    except ListenError:
        await abandon_start(control)
        raise


def run_control(control: ControlPlane) -> None:
    """Everything listens: follow the shared store, watch the config file, run the controller."""
    control.start_sync()
    control.start_watching()
    control.rollouts.start()


async def close_store(control: ControlPlane) -> None:
    """Bounded: were Redis to stop answering, the controller lock lapses by itself, and the
    stop must go on."""
    await finish_within(STORE_CLOSE_SECONDS, control.store.close(), "closing the state store")


async def abandon_start(control: ControlPlane) -> None:
    """A listener could not bind: nothing is left listening, and a shared store's lock is let
    go at once."""
    await control.proxy.shutdown(0)
    await close_store(control)


async def stop(control: ControlPlane, admin: AdminServer, delay: float, timeout: float) -> None:
    control.proxy.draining = True
    await asyncio.sleep(delay)
    await control.stop_watching()
    await control.rollouts.stop()
    await close_store(control)  # after the controller's last save
    await control.proxy.shutdown(timeout)
    await admin.stop()
    log.info("stopped")
