"""One worker of `weir run --workers N`: a data plane and nothing else.

Started by the supervisor (workers.py) as ``python -m proxy.worker FD``, a fresh interpreter
with its own uvloop (nothing of the supervisor's running loop is inherited), holding one end
of a socketpair at FD. It serves the listen address with SO_REUSEPORT beside its siblings, so
the kernel spreads new connections among them. It has no admin listener, config watcher,
controller or health probes: config, weights, health flags and drained upstreams come from the
supervisor, and it reports its counters back every ``REPORT_INTERVAL``. When the supervisor goes
away (the socket reaches EOF, whatever killed it) the worker drains and exits: it never
outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from ..config.tls import TLSConfigError, compile_tls
from ..dataplane.proxyserver import ProxyServer
from . import ipc
from .process import install_event_loop, settle_garbage_collector
from .report import REPORT_INTERVAL, ReportBuilder

log = logging.getLogger("weir.worker")


class Worker:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.proxy: ProxyServer | None = None
        self.reporter: ReportBuilder | None = None

    def configure(self, body: dict[str, Any]) -> ProxyServer:
        # The supervisor sends the address actually reserved (a config's port 0 included).
        config = body["config"].model_copy(update={"listen": body["listen"]})
        proxy = self.proxy
        if proxy is None:
            proxy = self.proxy = ProxyServer(config, asyncio.get_running_loop(),
                                             body["weights"])
            proxy.reuse_port = True
            proxy.active_checks = False  # the supervisor probes and pushes the results
            if proxy.table.generation != body["generation"] or body["previews"]:
                proxy.apply_config(config, body["weights"], body["generation"],
                                   body["previews"])
        else:
            if body["reload_tls"]:
                try:
                    proxy.use_tls(compile_tls(config), config)
                except TLSConfigError as exc:  # the files changed since the supervisor read them
                    log.error("worker %d: keeping the old certificates: %s", os.getpid(), exc)
            proxy.apply_config(config, body["weights"], body["generation"], body["previews"])
        self.apply_health(body["health"])
        proxy.apply_drained(set(body.get("drained", ())))
        return proxy

    def apply_health(self, flags: dict[str, bool]) -> None:
        """Active-check results from the supervisor; outlier ejection stays this worker's."""
        assert self.proxy is not None
        for key, healthy in flags.items():
            self.proxy.health.set_healthy(key, healthy)

    def report(self) -> None:
        if self.reporter is not None and self.proxy is not None:
            report = self.reporter.build()
            # Its gauges were read with these drained: `weir drain --wait` can trust them.
            report.drained = sorted(self.proxy.health.drained)
            ipc.send(self.writer, ipc.REPORT, report)

    async def reporting(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.report()

    async def run(self) -> int:
        first = await ipc.receive(self.reader)
        if first is None or first[0] != ipc.CONFIG:
            log.error("worker %d: no config from the supervisor; exiting", os.getpid())
            return 1
        proxy = self.configure(first[1])
        await proxy.start()
        self.reporter = ReportBuilder(proxy)
        settle_garbage_collector()
        ipc.send(self.writer, ipc.READY, {"pid": os.getpid(), "port": proxy.port})
        reporting = asyncio.get_running_loop().create_task(self.reporting())
        while True:
            message = await ipc.receive(self.reader)
            if message is None:  # the supervisor is gone (or this worker got a SIGTERM)
                log.warning("worker %d: no supervisor; draining and exiting", os.getpid())
                timeout = proxy.config.shutdown.timeout
                break
            kind, body = message
            if kind == ipc.CONFIG:
                self.configure(body)
            elif kind == ipc.HEALTH:
                self.apply_health(body)
            elif kind == ipc.DRAINED:
                proxy.apply_drained(set(body))
            elif kind == ipc.DRAIN:
                timeout = float(body["timeout"])
                break
        proxy.draining = True
        await proxy.shutdown(timeout)
        reporting.cancel()
        self.report()  # the last counts, so a clean shutdown loses none
        if not self.writer.is_closing():
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        return 0


async def serve_worker(fd: int) -> int:
    loop = asyncio.get_running_loop()
    # Ctrl-C and a terminal hang-up reach the whole process group; the supervisor decides
    # what they mean (shutdown, reload) and tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    worker = Worker(reader, writer)
    # A SIGTERM sent to a worker alone: it drains and exits like on the supervisor's word
    # (and the supervisor starts another).
    loop.add_signal_handler(signal.SIGTERM, reader.feed_eof)
    return await worker.run()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("WEIR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    install_event_loop()
    try:
        return asyncio.run(serve_worker(int(argv[0])))
    except OSError as exc:
        log.error("worker %d cannot start: %s", os.getpid(), exc)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
