"""Controller leadership through a Redis lock: a key naming its holder, set with a TTL, renewed
every third of the TTL by the holder, released on a clean stop.

The holder stops acting *before* its lock can lapse: it counts its lease from the moment it
sent the last successful renewal and gives it up a sixth of the TTL early. So a holder cut off
from Redis (or frozen) is no longer acting by the time another instance can take the lock.

A follower takes the lock as soon as it lapses: when its attempt finds the lock held, Redis
also says how long the lock has left, and the follower tries again just after that (at most a
third of the TTL later, to notice a released lock promptly). So if the holder dies, another
instance leads within ``ttl`` of the holder's last renewal (so of its death) plus
TAKEOVER_MARGIN and a round trip or two, not ``ttl`` plus a whole retry interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..tasks import cancel_and_wait

log = logging.getLogger("weir.leader")

# How long after the lock should have lapsed a follower tries to take it (Redis counts a key
# with 0 ms left as still there), and the shortest wait between two attempts.
TAKEOVER_MARGIN = 0.01

# Take the lock if it is free, or renew it if it is already ours. "Already ours" covers more
# than the holder's renewal: a SET or renewal whose reply this instance gave up waiting for
# (Redis stalled) may still run when Redis resumes and leave the lock naming this instance;
# taking it back at once beats leaving nobody in charge until it lapses. Otherwise, the
# holder and the lock's remaining time (ms), so that a follower retries right at the lapse.
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {0, holder, redis.call('PTTL', KEYS[1])}
"""
# Release only our own lock (never another instance's).
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
            wait = self.ttl / 3
            try:
                wait = await self.attempt()
            except Exception as exc:  # Redis away: not leading; try again next round
                if self.until:
                    log.warning("controller lock: cannot reach Redis (%s); not leading", exc)
                else:
                    log.debug("controller lock: cannot reach Redis (%r)", exc)
                self.until = 0.0
                self.holder = None
            await asyncio.sleep(wait)

    async def attempt(self) -> float:
        """Take or renew the lock; returns how long to wait before the next attempt."""
        sent = time.monotonic()
        result = await self.client.eval(ACQUIRE, 1, self.key, self.identity,
                                        str(int(self.ttl * 1000)))
        if int(result[0]) == 1:
            if not self.until:
                log.info("controller lock: acquired (%s); running the rollout controller",
                         self.identity)
            # Redis set the expiry after `sent`, so the lock lives at least until sent + ttl.
            self.until = sent + self.ttl * 5 / 6
            self.holder = self.identity
            return self.ttl / 3
        if self.until:
            log.warning("controller lock: lost it; following from now on")
            self.until = 0.0
        holder, remaining_ms = result[1], int(result[2])
        self.holder = holder.decode() if isinstance(holder, bytes) else holder
        if remaining_ms < 0:  # a lock without expiry (not one of ours): the usual pace
            return self.ttl / 3
        # Redis read the remaining time after `sent`: waking this long after the reply is
        # after the lapse, unless the holder renews meanwhile (then the next round says so).
        return min(self.ttl / 3, remaining_ms / 1000 + TAKEOVER_MARGIN)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self.until:
            self.until = 0.0
            try:
                await asyncio.wait_for(self.client.eval(RELEASE, 1, self.key, self.identity), 1)
                log.info("controller lock: released")
            except Exception as exc:  # it lapses by itself after its TTL
                log.warning("controller lock: could not release it (%s)", exc)
