"""What every Weir process sets up the same way: signals, the event loop, the open-file
limit, the garbage collector, and the runtime state store."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from ..config.model import Config
from ..control.plane import ControlPlane
from ..control.store import StateStore, StoreUnavailable, make_store

log = logging.getLogger("weir")


GC_THRESHOLD = 20_000


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
