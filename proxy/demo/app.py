"""The demo's app versions: small aiohttp apps on loopback whose failure rate and added latency
can be dialled while they run (in-process, or with ``POST /demo/dial`` from a shell)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# A realistic spread of answer times: a few ms for most requests and an occasional slow one,
# so that p99 is a number worth looking at even for a healthy version.
BASE_LATENCY = (0.002, 0.012)
SLOW_SHARE, SLOW_LATENCY = 0.02, 0.040


@dataclass
class DemoApp:
    """One version of the demo shop, e.g. ``stable`` running revision ``v1``."""

    name: str
    revision: str
    error_rate: float = 0.0   # share of requests answered 500
    latency: float = 0.0      # seconds added to every answer
    port: int = 0
    served: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dial(self, error_rate: float | None = None, latency: float | None = None) -> None:
        if error_rate is not None:
            if not 0.0 <= error_rate <= 1.0:
                raise ValueError(f"error_rate must be from 0 to 1, got {error_rate}")
            self.error_rate = error_rate
        if latency is not None:
            if not 0.0 <= latency <= 60.0:
                raise ValueError(f"latency must be from 0 to 60 seconds, got {latency}")
            self.latency = latency

    def describe(self) -> dict[str, Any]:
        return {"version": self.name, "revision": self.revision,
                "error_rate": self.error_rate, "latency_ms": round(self.latency * 1000)}

    # --- HTTP -----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        self.served += 1
        low, high = BASE_LATENCY
        delay = self.rng.uniform(low, high) + self.latency
        if self.rng.random() < SLOW_SHARE:
            delay += SLOW_LATENCY
        await asyncio.sleep(delay)
        await request.read()  # a POST's body, so the connection stays reusable
        body = {"version": self.name, "revision": self.revision, "path": request.path,
                "user": request.headers.get("x-user-id")}
        if self.rng.random() < self.error_rate:
            return web.json_response({**body, "error": "injected failure"}, status=500)
        return web.json_response(body)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.describe()})

    async def show_dial(self, request: web.Request) -> web.Response:
        return web.json_response(self.describe())

    async def set_dial(self, request: web.Request) -> web.Response:
        """``POST /demo/dial?error_rate=0.2&latency_ms=300``: either may be left out."""
        try:
            error_rate = request.query.get("error_rate")
            latency_ms = request.query.get("latency_ms")
            self.dial(None if error_rate is None else float(error_rate),
                      None if latency_ms is None else float(latency_ms) / 1000)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.describe())

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/demo/dial", self.show_dial),
            web.post("/demo/dial", self.set_dial),
            web.route("*", "/{tail:.*}", self.handle),
        ])
        return app

    async def start(self) -> None:
        # A short shutdown timeout: on Ctrl-C an answer still sleeping is not worth waiting for.
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
