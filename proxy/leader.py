"""Controller leadership through a Redis lock: ``SET key id NX PX ttl``, renewed every third of
the TTL by the holder, released on a clean stop.

The holder stops acting *before* its lock can lapse: it counts its lease from the moment it
sent the last successful renewal and gives it up a sixth of the TTL early. So a holder cut off
from Redis (or frozen) is no longer acting by the time another instance can take the lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .tasks import cancel_and_wait

log = logging.getLogger("weir.leader")

# Renew only if we still hold it; release only our own lock (never another instance's).
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, client: Any, key: str, identity: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.identity = identity
        self.ttl = ttl
        self.until = 0.0           # monotonic time this instance may act until
        self.holder: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return time.monotonic() < self.until

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.attempt()
            except Exception as exc:  # Redis away: not leading; try again next round
                if self.until:
                    log.warning("controller lock: cannot reach Redis (%s); not leading", exc)
                else:
                    log.debug("controller lock: cannot reach Redis (%r)", exc)
                self.until = 0.0
                self.holder = None
            await asyncio.sleep(self.ttl / 3)

    async def attempt(self) -> None:
        sent = time.monotonic()
        ttl_ms = str(int(self.ttl * 1000))
        if self.until:
            ok = await self.client.eval(RENEW, 1, self.key, self.identity, ttl_ms)
            if not ok:
                log.warning("controller lock: lost it; following from now on")
                self.until = 0.0
        if not self.until:
            ok = await self.client.set(self.key, self.identity, nx=True, px=int(ttl_ms))
            if ok:
                log.info("controller lock: acquired (%s); running the rollout controller",
                         self.identity)
        if ok:
            self.until = sent + self.ttl * 5 / 6
            self.holder = self.identity
        else:
            holder = await self.client.get(self.key)
            self.holder = holder.decode() if isinstance(holder, bytes) else holder

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self.until:
            self.until = 0.0
            try:
                await asyncio.wait_for(self.client.eval(RELEASE, 1, self.key, self.identity), 1)
                log.info("controller lock: released")
            except Exception as exc:  # it lapses by itself after its TTL
                log.warning("controller lock: could not release it (%s)", exc)
