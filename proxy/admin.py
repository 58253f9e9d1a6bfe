"""The admin listener (aiohttp.web): health, readiness and a read-only status for now."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import split_address

if TYPE_CHECKING:
    from .app import ProxyServer


class AdminServer:
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.app = web.Application()
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/api/status", self.status),
        ])
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, port = split_address(self.proxy.config.admin.listen)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.proxy.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready"})

    async def status(self, request: web.Request) -> web.Response:
        table = self.proxy.table
        services: list[dict[str, Any]] = []
        for route in sorted(table.routes, key=lambda r: r.name):
            services.append({
                "name": route.name,
                "weights": route.weights,
                "versions": {name: {"upstreams": list(t.upstreams),
                                    "inflight": sum(p.inflight for p in t.balancer.pools)}
                             for name, t in route.versions.items()},
            })
        return web.json_response({"generation": table.generation, "services": services})
