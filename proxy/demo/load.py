"""The demo's load generator: a steady, bounded stream of requests to the proxy, from a mix of
signed-in users (a sticky ``x-user-id`` header) and anonymous visitors."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp

from ..tasks import cancel_and_wait

PATHS = ("/", "/products", "/products/42", "/cart", "/search?q=socks")
USER_SHARE = 0.6     # of requests that carry a user ID; the rest are split per request
USERS = 500


class LoadGenerator:
    """``workers`` clients each sending at ``rate / workers`` requests a second. A worker that
    falls behind (a slow version) does not burst to catch up, so the load stays bounded."""

    def __init__(self, url: str, rate: float = 200.0, workers: int = 16,
                 user_header: str = "x-user-id", seed: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.rate = rate
        self.workers = workers
        self.user_header = user_header
        self.rng = random.Random(seed)
        self.sent = 0
        self.answers: Counter[tuple[str, int]] = Counter()  # (x-weir-version, status)
        self.failures = 0  # no answer at all
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.workers),
            timeout=aiohttp.ClientTimeout(total=5),
            cookie_jar=aiohttp.DummyCookieJar())
        loop = asyncio.get_running_loop()
        for index in range(self.workers):
            self._tasks.append(loop.create_task(self._worker(index)))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _request(self) -> tuple[str, str, dict[str, str]]:
        path = self.rng.choice(PATHS)
        headers = {}
        if self.rng.random() < USER_SHARE:
            headers[self.user_header] = f"user-{self.rng.randrange(USERS)}"
        method = "POST" if path == "/cart" else "GET"
        return method, self.url + path, headers

    async def _worker(self, index: int) -> None:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        gap = self.workers / self.rate
        # Spread the workers' first requests over one gap rather than all at once.
        next_at = loop.time() + gap * index / self.workers
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + gap, loop.time())
            method, url, headers = self._request()
            self.sent += 1
            try:
                async with self._session.request(method, url, headers=headers,
                                                 data=b'{"sku": 42}' if method == "POST"
                                                 else None) as response:
                    await response.read()
                    version = response.headers.get("x-weir-version", "?")
                    self.answers[(version, response.status)] += 1
            except (aiohttp.ClientError, TimeoutError, OSError):
                self.failures += 1
