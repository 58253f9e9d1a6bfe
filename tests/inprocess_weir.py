"""A real Weir in the test's event loop: control plane, data plane and admin API started from a
config file, with an HTTP client for the data port and the admin API, and a parser for /metrics.
The ``weir`` fixture starts them from config dicts; test modules take it with
``weir = inprocess_weir.weir``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.admin.api import AdminServer
from proxy.control.plane import ControlPlane

from .conftest import AUTH, TOKEN, control_plane

# --- a real Weir in this event loop -----------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


class Weir:
    """Control plane + data plane + admin API, started from a real config file."""

    def __init__(self, control: ControlPlane, admin: AdminServer, path: Path,
                 session: aiohttp.ClientSession) -> None:
        self.control = control
        self.admin = admin
        self.path = path
        self.session = session

    @property
    def port(self) -> int:
        return self.control.proxy.port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin.port}"

    async def request(self, path: str = "/", *, host: str = "app.test", method: str = "GET",
                      headers: dict[str, str] | None = None, data: Any = None) -> Reply:
        sent = {"Host": host, **(headers or {})}
        started = perf_counter()
        async with self.session.request(method, f"http://127.0.0.1:{self.port}{path}",
                                        headers=sent, data=data) as response:
            body = await response.read()
        return Reply(response.status, dict(response.headers), body, perf_counter() - started)

    async def scrape_text(self) -> str:
        async with self.session.get(self.admin_url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return await response.text()

    async def scrape(self) -> Scrape:
        return Scrape(await self.scrape_text())

    async def status(self) -> dict[str, Any]:
        async with self.session.get(self.admin_url + "/api/status") as response:
            assert response.status == 200
            return dict(await response.json())

    async def reload(self) -> tuple[int, dict[str, Any]]:
        async with self.session.post(self.admin_url + "/api/reload", headers=AUTH) as response:
            return response.status, dict(await response.json())

    def rewrite(self, data: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


class WeirLauncher:
    """Starts Weirs from config dicts; stops them all on exit (used by the `weir` fixtures)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Weir] = []

    async def start(self, services: list[dict[str, Any]], **top: Any) -> Weir:
        data: dict[str, Any] = {"listen": "127.0.0.1:0",
                                "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
                                "watch": False, "services": services, **top}
        path = self.tmp_path / f"weir-{len(self.started)}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        control = control_plane(path)
        await control.proxy.start()
        admin = AdminServer(control)
        await admin.start()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100), cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=10))
        weir = Weir(control, admin, path, session)
        self.started.append(weir)
        return weir

    async def close(self) -> None:
        for weir in self.started:
            await weir.session.close()
            await weir.control.proxy.shutdown(1.0)
            await weir.admin.stop()


@pytest.fixture
async def weir(tmp_path: Path) -> AsyncIterator[WeirLauncher]:
    launcher = WeirLauncher(tmp_path)
    try:
        yield launcher
    finally:
        await launcher.close()


async def run_all(calls: Iterable[Callable[[], Any]], concurrency: int = 20) -> list[Any]:
    """Run coroutine factories with at most `concurrency` at a time; results in order."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Any]) -> Any:
        async with semaphore:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


# --- reading the exposition -------------------------------------------------------------------


class Scrape:
    """One parsed scrape: every sample, with lookups by name and label subset."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(family.samples)

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The one sample with these labels (0 if the series does not exist)."""
        found = self.matching(name, **labels)
        assert len(found) <= 1, found
        return float(found[0].value) if found else 0.0

    def total(self, name: str, **labels: str) -> float:
        return float(sum(s.value for s in self.matching(name, **labels)))

    def requests_by(self, service: str, version: str) -> Counter[tuple[str, int]]:
        """http_requests_total of one version as {(method, status): count}."""
        counts: Counter[tuple[str, int]] = Counter()
        for s in self.matching("http_requests_total", service=service, version=version):
            counts[(s.labels["method"], int(s.labels["status"]))] += int(s.value)
        return counts

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        return sorted((float(s.labels["le"]), float(s.value))
                      for s in self.matching(name + "_bucket", **labels))

    def keyed(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): float(s.value) for s in self.samples}
