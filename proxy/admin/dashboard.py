"""The dashboard's files, served by the admin listener: one HTML page with its script and style
sheet, shipped in the package (proxy/admin/static/), no build step and nothing fetched from
elsewhere.

The page only reads /api/status and /api/history and calls the admin API like any client, with
the token the person types in; so it adds no way in that the API does not already have.
"""

from __future__ import annotations

import logging
from importlib import resources

from aiohttp import web

log = logging.getLogger("weir.admin")

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

HEADERS = {
    # Everything the page needs comes from this listener; no inline script, so a name in the
    # config that slipped past escaping still could not run as code.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated, so an upgraded Weir serves its own script
}


def load_assets() -> dict[str, bytes]:
    """Read the files once: they are small, and the admin loop should not touch the disk."""
    folder = resources.files("proxy.admin") / "static"
    assets: dict[str, bytes] = {}
    for name in ASSETS:
        try:
            assets[name] = (folder / name).read_bytes()
        except OSError as exc:  # a broken install: the API still works without the page
            log.warning("dashboard file %s is missing (%s); /dashboard will answer 404",
                        name, exc)
    return assets


class Dashboard:
    def __init__(self) -> None:
        self.assets = load_assets()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.root),
            web.get("/dashboard/", self.root),
            web.get("/dashboard", self.page),
            web.get("/dashboard/{asset}", self.asset),
        ]

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    async def page(self, request: web.Request) -> web.Response:
        return self.serve("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        return self.serve(request.match_info["asset"])

    def serve(self, name: str) -> web.Response:
        body = self.assets.get(name)
        if body is None or name not in ASSETS:
            raise web.HTTPNotFound(reason=f"no dashboard file {name!r}")
        return web.Response(body=body, headers={"Content-Type": ASSETS[name], **HEADERS})
