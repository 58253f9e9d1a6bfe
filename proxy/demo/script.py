"""The ``weir demo`` script: starts the demo apps, Weir and the load, plays the two phases,
and stops everything on Ctrl-C or SIGTERM (see ``demo`` for the options and exit codes)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import signal
import sys
import time
from typing import Any

import aiohttp

from ..admin.api import AdminServer
from ..config.loader import parse_config
from ..control.plane import ControlPlane
from ..dataplane.proxyserver import ProxyServer
from ..runtime.lifecycle import open_listeners, run_control, stop
from ..tasks import cancel_and_wait
from .app import DemoApp
from .load import LoadGenerator
from .options import (
    BAD_ERROR_RATE,
    BAD_LATENCY,
    DEFAULT_ADMIN_PORT,
    DEFAULT_PORT,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    INTERVAL,
    MAX_ERROR_RATE,
    MAX_P99,
    MIN_INTERVAL,
    PAUSE,
    RATE,
    SERVICE,
    SETTLE,
    WEIGHTS,
    WORKERS,
    DemoOptions,
    choose_port,
    demo_config,
)
from .view import LiveView, Printer, percent, seconds

log = logging.getLogger("weir.demo")

EXIT_SIGNALS = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}


class DemoError(Exception):
    """The demo cannot go on; the message says why (exit 1, no traceback)."""


class Demo:
    """Everything the demo starts, and the script it plays."""

    def __init__(self, options: DemoOptions, printer: Printer) -> None:
        self.options = options
        self.out = printer
        self.token = secrets.token_urlsafe(16)
        self.stable = DemoApp("stable", "v1")
        self.canary = DemoApp("canary", "v2")
        self.control: ControlPlane | None = None
        self.admin: AdminServer | None = None
        self.load: LoadGenerator | None = None
        self.view: LiveView | None = None
        self.session: aiohttp.ClientSession | None = None
        self.outcomes: list[str] = []
        self.finished = False  # the script ran to its end
        self.result = 1

    # --- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        await self.stable.start()
        await self.canary.start()
        port, port_busy = choose_port(self.options.port, DEFAULT_PORT)
        admin_port, admin_busy = choose_port(self.options.admin_port, DEFAULT_ADMIN_PORT)
        config = parse_config(demo_config(self.stable, self.canary, port, admin_port,
                                          self.token, self.options), "<weir demo>")
        loop = asyncio.get_running_loop()
        control = ControlPlane(None, config, ProxyServer(config, loop))
        admin = AdminServer(control)
        try:
            await open_listeners(control, admin)
        except OSError as exc:
            what = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
            raise DemoError(f"cannot listen on 127.0.0.1 (port {port} for the proxy, "
                            f"{admin_port} for the admin API): {what}; choose others with "
                            "--port and --admin-port (0: any free port)") from None
        self.control, self.admin = control, admin  # started: close() stops them
        run_control(control)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.load = LoadGenerator(self.proxy_url, RATE, WORKERS)
        self.intro(port_busy, admin_busy)
        await self.load.start()
        self.view = LiveView(self.control, SERVICE, self.out)
        self.view.start()

    async def close(self) -> None:
        """Stop everything that started, in the order that leaves nothing waiting: the
        clients, then the proxy, then the apps behind it. Safe after a partial start."""
        steps: list[tuple[str, Any]] = []
        if self.view is not None:
            steps.append(("view", self.view.stop()))
        if self.load is not None:
            steps.append(("load", self.load.stop()))
        if self.session is not None:
            steps.append(("admin client", self.session.close()))
        if self.control is not None and self.admin is not None:
            steps.append(("proxy", stop(self.control, self.admin, delay=0, timeout=0.5)))
        steps += [("stable app", self.stable.stop()), ("canary app", self.canary.stop())]
        for what, step in steps:
            try:
                await step
            except Exception as exc:  # keep closing the rest; a shutdown needs no traceback
                log.warning("stopping the %s: %s", what, exc)

    # --- addresses ------------------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        assert self.control is not None
        return f"http://127.0.0.1:{self.control.proxy.port}"

    @property
    def admin_url(self) -> str:
        assert self.admin is not None
        return f"http://127.0.0.1:{self.admin.port}"

    # --- the script -----------------------------------------------------------------------

    def intro(self, port_busy: bool, admin_busy: bool) -> None:
        out, style = self.out, self.out.style
        out.line(style("Weir demo: a canary rollout, then an automatic rollback", "bold")
                 + (f" (speed x{self.options.speed:g})" if self.options.speed != 1 else ""))
        out.line()
        out.line(f"  proxy       {self.proxy_url}/   <- the load generator: ~{RATE:.0f} "
                 "requests/s, 60% of them")
        out.line("              from users with an x-user-id header (each sticks to one "
                 "version)")
        out.line(f"  dashboard   {self.admin_url}/   (admin API, /metrics)")
        out.line(f"  token       {self.token}")
        out.line(f"  stable app  {self.stable.url}/   revision {self.stable.revision}")
        out.line(f"  canary app  {self.canary.url}/   revision {self.canary.revision}")
        for busy, default in ((port_busy, DEFAULT_PORT), (admin_busy, DEFAULT_ADMIN_PORT)):
            if busy:
                out.line(style(f"  (port {default} is busy, so a free port is used)", "dim"))
        out.line()
        out.line("  Try it from another terminal:")
        out.line(f"    export WEIR_ADMIN_TOKEN={self.token}")
        out.line(f"    weir status --admin {self.admin_url}")
        out.line(f"    weir rollout status {SERVICE} --admin {self.admin_url}")
        out.line(f"    curl -si {self.proxy_url}/ -H 'x-user-id: alice'")
        out.line()

    def plan(self) -> str:
        pause = seconds(self.options.scaled(PAUSE))
        interval = seconds(max(MIN_INTERVAL, self.options.scaled(INTERVAL)))
        route = " -> ".join(f"{w}% (pause {pause}" + (", analysis)" if i == 0 else ")")
                            for i, w in enumerate(WEIGHTS))
        return (f"  steps: {route} -> 100%\n"
                f"  analysis every {interval}: canary error rate <= {percent(MAX_ERROR_RATE)}"
                f" and p99 <= {MAX_P99 * 1000:.0f}ms; a second failed window rolls back")

    async def run(self) -> int:
        await self.start()
        await self.settle()
        self.outcomes.append(await self.phase_one())
        await self.settle()
        self.outcomes.append(await self.phase_two())
        self.summary()
        self.finished = True
        if self.options.keep_running:
            self.keep_running_note()
            await asyncio.Event().wait()  # until a signal cancels this
        return self.result

    async def settle(self) -> None:
        await asyncio.sleep(self.options.scaled(SETTLE))

    async def phase_one(self) -> str:
        out = self.out
        out.line()
        out.line(out.style("Phase 1: a healthy canary is rolled out step by step to 100%",
                           "bold"))
        out.line(self.plan())
        await self.api("POST", f"/api/services/{SERVICE}/rollout/start",
                       f"weir rollout start {SERVICE}")
        status = await self.wait_for_end()
        weights = self.view.weights() if self.view is not None else {}
        if status["phase"] == "completed" and weights.get("canary") == 100:
            return (f"phase 1: rollout completed, canary at 100% "
                    f"(weights stable={weights.get('stable')} canary={weights.get('canary')})")
        return f"phase 1: UNEXPECTED: rollout {status['phase']}: {status.get('reason')}"

    async def phase_two(self) -> str:
        out = self.out
        out.line()
        out.line(out.style(f"Phase 2: the canary turns bad ({percent(BAD_ERROR_RATE)} errors, "
                           f"+{BAD_LATENCY * 1000:.0f}ms); a new rollout is rolled back by "
                           "the analysis", "bold"))
        await self.api("PUT", f"/api/services/{SERVICE}/weights",
                       f"weir set-weight {SERVICE} stable=100 canary=0",
                       {"weights": {"stable": 100, "canary": 0}})
        self.canary.dial(BAD_ERROR_RATE, BAD_LATENCY)
        self.out.event(f"canary dialled: curl -X POST '{self.canary.url}/demo/dial?"
                       f"error_rate={BAD_ERROR_RATE:g}&latency_ms={BAD_LATENCY * 1000:.0f}'")
        await self.api("POST", f"/api/services/{SERVICE}/rollout/start",
                       f"weir rollout start {SERVICE}")
        status = await self.wait_for_end()
        reason = str(status.get("reason") or "")
        if status["phase"] == "aborted" and reason.startswith("analysis failed"):
            return f"phase 2: rollout rolled back automatically: {reason}"
        return f"phase 2: UNEXPECTED: rollout {status['phase']}: {reason}"

    async def rolled_back(self) -> None:
        """"aborted" is the controller's decision; the weights follow as soon as they are
        persisted, a moment later. Shown once they have."""
        assert self.control is not None
        settle_by = time.monotonic() + 5
        while time.monotonic() < settle_by:
            route = next(r for r in self.control.proxy.table.routes if r.name == SERVICE)
            if route.weights.get("canary", 0) == 0:
                return
            await asyncio.sleep(0.02)

    async def wait_for_end(self) -> dict[str, Any]:
        """The rollout's status once it completed or aborted; the demo gives up after about
        twice as long as the steps take (a machine too busy to show anything)."""
        assert self.control is not None
        rollout = self.control.rollouts.get(SERVICE)
        interval = max(MIN_INTERVAL, self.options.scaled(INTERVAL))
        expected = self.options.scaled(PAUSE) * len(WEIGHTS) + interval * 2
        deadline = time.monotonic() + 2 * expected + 15
        while True:
            status = rollout.status()
            if status["phase"] in ("completed", "aborted"):
                if status["phase"] == "aborted":
                    await self.rolled_back()
                if self.view is not None:
                    self.view.check()  # the decision is on screen before the verdict
                return status
            if time.monotonic() > deadline:
                raise DemoError(f"the rollout did not finish in {2 * expected + 15:.0f}s "
                                f"(phase {status['phase']}, step {status['step']}); the "
                                "machine may be too busy")
            await asyncio.sleep(0.05)

    async def api(self, method: str, path: str, command: str,
                  body: dict[str, Any] | None = None) -> Any:
        """Drive Weir through its admin API with the token, as an operator would; shows the
        command that does the same."""
        assert self.session is not None
        self.out.event(f"$ {command}")
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            async with self.session.request(method, self.admin_url + path, json=body,
                                            headers=headers) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DemoError(f"{method} {path}: {exc or type(exc).__name__}") from None
        if response.status >= 300:
            raise DemoError(f"{method} {path}: {response.status} {text}")
        return json.loads(text)

    def summary(self) -> None:
        out = self.out
        ok = not any("UNEXPECTED" in outcome for outcome in self.outcomes)
        self.result = 0 if ok else 1
        out.line()
        out.line(out.style("Summary", "bold"))
        for outcome in self.outcomes:
            out.line("  " + out.style(outcome, "green" if "UNEXPECTED" not in outcome
                                      else "red"))
        if self.load is not None:
            load = self.load
            by_version: dict[str, int] = {}
            errors = 0
            for (version, status), count in load.answers.items():
                by_version[version] = by_version.get(version, 0) + count
                errors += count if status >= 500 else 0
            spread = ", ".join(f"{v} {n}" for v, n in sorted(by_version.items()))
            out.line(f"  load: {load.sent} requests sent ({spread}); {errors} answered 5xx, "
                     f"{load.failures} without an answer")
        if not ok:
            out.line(out.style("  The demo did not go as scripted (a very busy machine can "
                               "do this); try again, or a lower --speed.", "red"))

    def keep_running_note(self) -> None:
        out = self.out
        out.line()
        out.line(out.style("Still running: explore the dashboard and the API; Ctrl-C to stop.",
                           "bold"))
        out.line(f"  dashboard  {self.admin_url}/")
        out.line(f"  heal the canary:  curl -X POST '{self.canary.url}/demo/dial?"
                 "error_rate=0&latency_ms=0'")
        out.line(f"  roll it out:      WEIR_ADMIN_TOKEN={self.token} weir rollout start "
                 f"{SERVICE} --admin {self.admin_url}")
        out.line()


async def main(options: DemoOptions) -> int:
    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[int] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if stopping.done():
            os._exit(EXIT_SIGNALS[sig])  # a second one: the user wants out now
        stopping.set_result(EXIT_SIGNALS[sig])

    # First thing: a signal must never find the demo on Python's default handlers.
    for sig in EXIT_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)

    def on_closed() -> None:  # stdout went away (`weir demo | head`): stop quietly
        if not stopping.done():
            stopping.set_result(0)

    printer = Printer(on_closed=on_closed)
    demo = Demo(options, printer)
    script = loop.create_task(demo.run())
    try:
        await asyncio.wait([script, stopping], return_when=asyncio.FIRST_COMPLETED)
        if script.done():
            code = script.result()
        else:
            await cancel_and_wait(script)
            code = demo.result if demo.finished else stopping.result()
            printer.line()
            printer.line("Stopping...")
    except DemoError as exc:
        print(f"weir demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        await demo.close()
    printer.line("Stopped: the proxy, the admin API, the apps and the load generator are "
                 "all closed.")
    return code


def run(options: DemoOptions) -> int:
    """The demo's entry point. Everything it needs is imported here, not at the top: the
    command line builds its parser from this module, and ``weir status`` should stay quick."""
    import asyncio
    import logging

    from ..runtime.process import install_event_loop
    from .script import main

    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The demo prints the controller's decisions itself, in full.
    logging.getLogger("weir.rollout").setLevel(logging.ERROR)
    install_event_loop()
    return asyncio.run(main(options))
