"""The Redis state store: the same document as the state file (weights with their sources and
timestamps, rollout records), shared by every instance behind one load balancer.

Layout under ``key_prefix`` (default ``weir``):
  ``weir:state``    hash, one JSON value per field: ``weights:<service>``, ``rollout:<service>``,
                    ``drained:<host:port>`` (an upstream an operator drained: ``{"at": time}``),
                    ``version:<service>/<version>`` (a release's revision and/or upstreams
                    set through the API, as the state file's ``versions`` entries)
  ``weir:revs``     hash, a write counter per field (the compare-and-set below)
  ``weir:version``  a counter bumped by every write; ``weir:changes`` is published with it
  ``weir:leader``   the controller lock (leader.py)

Writes go through one Lua script, so they are atomic, and compare-and-set per field: a writer
names the revision of each field it last saw, and if another instance wrote that field since,
nothing is written and the writer re-reads (last writer wins per field, as with the file, but
never by overwriting a change it had not seen). Fields a write does not touch are left alone,
so one instance's weights never undo another's rollout record.

Every write carries a deadline in Redis's own clock, and the script writes nothing if it runs
past it. A write the client gave up on (no reply within REDIS_TIMEOUT: Redis stalled, or the
link to it) is reported as not made, and the control plane undoes the change; but the EVAL may
still sit in Redis's socket buffer and run when Redis resumes. The deadline, set before the
moment the client stops waiting, makes it change nothing then. The client's clock is never
compared with Redis's directly (they may be on different hosts): the store learns the offset
between its monotonic clock and Redis's TIME (``RedisClock``) and converts.

Other instances hear of a write on the pub/sub channel within milliseconds and re-read; they
also poll the version every second, in case a message was missed. A lost connection never
reaches the data plane: the last state applied stays in force, and the store retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from asyncio import Lock
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..config.model import StateStoreSettings
from .leader import Lease
from .state import (
    RuntimeState,
    VersionOverride,
    WeightOverride,
    parse_drained,
    parse_override,
    parse_version_override,
)
from .store import OnChange, RemoteState, StateStore, StoreConflict, StoreError, StoreUnavailable

log = logging.getLogger("weir.store")

POLL_INTERVAL = 1.0
REDIS_TIMEOUT = 1.0  # per command: a dead Redis must not hold up an admin call for long

# A write's deadline is this long before the client stops waiting for its reply: a script that
# starts just before the deadline still has this long for its reply to reach the client (a
# lost packet costs a 200 ms TCP retransmission; a busy Redis writes replies after the other
# commands it read at the same time), so a write that lands is a write reported as made. A
# healthy Redis starts a script within milliseconds, so half the timeout is still plenty.
WRITE_MARGIN = REDIS_TIMEOUT / 2
# How long one measurement of Redis's clock is trusted before a newer one replaces it: keeps
# the drift between the two clocks (NTP slewing Redis's) to a millisecond or so.
CLOCK_WINDOW = 10.0

# ARGV: channel, origin, deadline (µs in Redis's clock), n, then per field: name, expected
# revision, delete flag, value. Redis runs a script whole, so the TIME read first decides it.
WRITE = """
if redis.replicate_commands then redis.replicate_commands() end  -- TIME then writes (Redis < 5)
local now = redis.call('TIME')
local late = tonumber(now[1]) * 1000000 + tonumber(now[2]) - tonumber(ARGV[3])
if late > 0 then return {-2, late} end
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local rev = redis.call('HGET', KEYS[2], ARGV[5 + i * 4]) or '0'
  if rev ~= ARGV[6 + i * 4] then return {-1, ARGV[5 + i * 4]} end
end
local result = {0}
for i = 0, n - 1 do
  local field = ARGV[5 + i * 4]
  if ARGV[7 + i * 4] == '1' then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HSET', KEYS[1], field, ARGV[8 + i * 4])
  end
  result[i + 2] = redis.call('HINCRBY', KEYS[2], field, 1)
end
result[1] = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[1], result[1] .. ' ' .. ARGV[2])
return result
"""

# Fill an empty store (first start, or a Redis that lost its data) unless another instance
# got there first.
SEED = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i], 1)
end
local version = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[1], version .. ' ' .. ARGV[2])
return version
"""


def redacted(url: str) -> str:
    """The URL without its password, for logs and /api/status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def document_fields(state: RuntimeState) -> dict[str, str]:
    fields = {f"weights:{name}": json.dumps(asdict(o), sort_keys=True)
              for name, o in state.weights.items()}
    fields.update({f"rollout:{name}": json.dumps(r, sort_keys=True)
                   for name, r in state.rollouts.items()})
    # One field per address, so that two instances draining two addresses never conflict.
    fields.update({f"drained:{address}": json.dumps({"at": at})
                   for address, at in state.drained.items()})
    # One field per version (service and version names cannot hold "/" or ":"), so that two
    # instances starting releases of two services never conflict.
    fields.update({f"version:{name}/{version}": json.dumps(asdict(o), sort_keys=True)
                   for name, overrides in state.versions.items()
                   for version, o in overrides.items()})
    return fields


def parse_fields(fields: dict[str, str]) -> RemoteState:
    weights: dict[str, WeightOverride] = {}
    rollouts: dict[str, dict[str, Any]] = {}
    drained: dict[str, float] = {}
    versions: dict[str, dict[str, VersionOverride]] = {}
    for field, text in fields.items():
        kind, _, service = field.partition(":")
        try:
            value = json.loads(text)
            if kind == "version":
                name, slash, version = service.partition("/")
                if not (name and slash and version):
                    raise ValueError("expected version:<service>/<version>")
                versions.setdefault(name, {})[version] = parse_version_override(value)
            elif kind == "weights":
                weights[service] = parse_override(value)
            elif kind == "rollout" and isinstance(value, dict):
                rollouts[service] = value
            elif kind == "drained" and isinstance(value, dict):
                drained.update(parse_drained({service: value.get("at")}))
        except (ValueError, TypeError) as exc:
            log.error("Redis state: ignoring the unreadable field %s (%s)", field, exc)
    return weights, rollouts, drained, versions


class RedisClock:
    """Redis's clock (TIME) as seen through the local monotonic clock.

    A TIME call sent at ``sent`` and answered at ``received`` (local, monotonic) read Redis's
    clock at some moment in between, so the offset (Redis time minus local time) lies in
    ``[redis - received, redis - sent]``. The lower bound (the midpoint less half the round
    trip) is what is used: a local moment converted with it is never later in Redis's clock
    than the true one, so a deadline cannot come out late. Each sample is a valid lower bound,
    so the highest (tightest) recent one is kept; a sample whose upper bound is below it means
    Redis's clock stepped back, or this is another Redis (a failover), and starts afresh."""

    def __init__(self) -> None:
        self.offset: float | None = None  # seconds to add to time.monotonic()
        self.learned_at = 0.0

    def sample(self, sent: float, received: float, redis_time: tuple[int, int]) -> None:
        now = redis_time[0] + redis_time[1] / 1_000_000
        low, high = now - received, now - sent
        if (self.offset is None or self.offset > high
                or received - self.learned_at > CLOCK_WINDOW or low >= self.offset):
            self.offset, self.learned_at = low, received

    def forget(self) -> None:
        """The connection failed: the next one may reach another server with another clock."""
        self.offset = None

    def deadline_us(self, local: float) -> int:
        """A local monotonic moment in Redis's clock, in whole µs (rounded down: earlier)."""
        assert self.offset is not None
        return int((local + self.offset) * 1_000_000)


class RedisStore(StateStore):
    kind = "redis"

    def __init__(self, settings: StateStoreSettings, seed_file: Path | None = None) -> None:
        super().__init__(None)
        assert settings.url is not None
        self.url = settings.url
        self.settings = settings
        self.seed_file = seed_file
        prefix = settings.key_prefix
        self.keys = (f"{prefix}:state", f"{prefix}:revs", f"{prefix}:version")
        self.channel = f"{prefix}:changes"
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.client: Any = None
        self.lease: Lease | None = None
        self.synced: dict[str, str] = {}  # each field as last read from or written to Redis
        self.revs: dict[str, int] = {}
        self.version = 0
        self.initial: RemoteState = ({}, {}, {}, {})
        self.connected = False
        self.last_error: str | None = None
        self.clock = RedisClock()
        self._lock = Lock()               # one read or write of the store at a time
        self._outer: Lock | None = None   # the control plane's state lock
        self._state: RuntimeState | None = None
        self._on_change: OnChange | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- start ----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise StoreUnavailable("state_store type redis needs the redis package: "
                                   "pip install 'weir[redis]'") from None
        # No retries inside the client: the store's own loops retry, with backoff, and a
        # write is never sent twice. On a timeout redis-py closes the connection (it does not
        # read a late reply as the answer to the next command on it), so what a stalled Redis
        # answers in the end goes nowhere.
        self.client = aioredis.Redis.from_url(
            self.url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0))
        try:
            fields, revs, version = await self._read()
            if version is None:
                await self._seed_from_file()
                fields, revs, version = await self._read()
            await self._sync_clock()
        except Exception as exc:
            await self.client.aclose()
            raise StoreUnavailable(f"cannot reach the Redis state store at "
                                   f"{redacted(self.url)}: {exc}") from None
        self.synced, self.revs, self.version = fields, revs, version or 0
        self.initial = parse_fields(fields)
        self.connected = True
        log.info("state store: Redis at %s, prefix %r, version %d, instance %s",
                 redacted(self.url), self.settings.key_prefix, self.version, self.identity)

    async def _seed_from_file(self) -> None:
        if self.seed_file is None or not self.seed_file.exists():
            return
        state = RuntimeState(self.seed_file)
        state.load()
        fields = document_fields(state)
        if fields and await self._seed(fields):
            log.info("state store: Redis held no state; seeded it from %s", self.seed_file)

    async def _seed(self, fields: dict[str, str]) -> int:
        args = [self.channel, self.identity]
        for field, value in fields.items():
            args += [field, value]
        return int(await self.client.eval(SEED, 3, *self.keys, *args))

    async def _sync_clock(self) -> None:
        """Measure Redis's clock against the local one (see RedisClock)."""
        sent = time.monotonic()
        redis_time = await self.client.time()
        self.clock.sample(sent, time.monotonic(), redis_time)

    async def _read(self) -> tuple[dict[str, str], dict[str, int], int | None]:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys[0]).hgetall(self.keys[1]).get(self.keys[2])
            raw_fields, raw_revs, raw_version = await pipe.execute()
        fields = {k.decode(): v.decode() for k, v in raw_fields.items()}
        revs = {k.decode(): int(v) for k, v in raw_revs.items()}
        return fields, revs, int(raw_version) if raw_version is not None else None

    def load_into(self, state: RuntimeState) -> None:
        weights, rollouts, drained, versions = self.initial
        state.weights, state.rollouts = dict(weights), dict(rollouts)
        state.drained = dict(drained)
        state.versions = {name: dict(own) for name, own in versions.items()}

    def start(self, state: RuntimeState, on_change: OnChange, lock: Lock) -> None:
        self._state, self._on_change, self._outer = state, on_change, lock
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._subscribe()), loop.create_task(self._poll())]
        self.lease = Lease(self.client, f"{self.settings.key_prefix}:leader", self.identity,
                           self.settings.leader_ttl)
        self.lease.start()

    # --- writing --------------------------------------------------------------------------

    async def save(self, state: RuntimeState) -> None:
        wanted = document_fields(state)
        async with self._lock:
            changes: list[tuple[str, str | None]] = [
                (f, v) for f, v in wanted.items() if self.synced.get(f) != v]
            changes += [(f, None) for f in self.synced if f not in wanted]
            if not changes:
                return
            try:
                if self.clock.offset is None:  # not measured since (re)connecting
                    await self._sync_clock()
                # The client stops waiting no earlier than REDIS_TIMEOUT after this (the read
                # timeout starts once the command is sent); Redis must start the script
                # WRITE_MARGIN before that, or write nothing.
                deadline = self.clock.deadline_us(time.monotonic() + REDIS_TIMEOUT
                                                  - WRITE_MARGIN)
                args = [self.channel, self.identity, str(deadline), str(len(changes))]
                for field, value in changes:
                    args += [field, str(self.revs.get(field, 0)),
                             "1" if value is None else "0", value or ""]
                result = await self.client.eval(WRITE, 3, *self.keys, *args)
            except Exception as exc:
                # Not written, and it cannot be later: past its deadline the script refuses.
                self._failed(exc)
                raise StoreError(f"cannot write to the Redis state store: {exc}") from None
            if int(result[0]) == -2:
                raise StoreError(f"Redis got to the write {int(result[1]) / 1000:.0f} ms past "
                                 f"its deadline ({REDIS_TIMEOUT - WRITE_MARGIN:g}s after it "
                                 f"was sent: Redis is too slow) and wrote nothing")
            if int(result[0]) == -1:
                field = result[1].decode() if isinstance(result[1], bytes) else result[1]
                self._spawn_refresh()
                raise StoreConflict(f"{field} was changed by another instance meanwhile; "
                                 f"re-reading it (try again)")
            for (field, value), rev in zip(changes, result[1:], strict=True):
                if value is None:
                    self.synced.pop(field, None)
                else:
                    self.synced[field] = value
                self.revs[field] = int(rev)
            if int(result[0]) != self.version + 1:
                self._spawn_refresh()  # another instance wrote other fields in between
            self.version = int(result[0])

    # --- following other instances --------------------------------------------------------

    async def refresh(self) -> None:
        if self._outer is None or self._on_change is None:
            return
        async with self._outer, self._lock:
            fields, revs, version = await self._read()
            if version is None and self.version and self._state is not None:
                # Redis lost its data (a restart without persistence): put back what this
                # instance has in force, unless another instance already did.
                wanted = document_fields(self._state)
                if wanted and await self._seed(wanted):
                    log.warning("state store: Redis had lost the state; restored it from "
                                "this instance")
                fields, revs, version = await self._read()
            changed = {f for f in fields.keys() | self.synced.keys()
                       if fields.get(f) != self.synced.get(f)}
            self.synced, self.revs, self.version = fields, revs, version or 0
            if changed:
                rollouts = {f.partition(":")[2] for f in changed if f.startswith("rollout:")}
                await self._on_change(parse_fields(fields), rollouts)

    def _spawn_refresh(self) -> None:
        task = asyncio.get_running_loop().create_task(self._refresh_quietly())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
            self._recovered()
        except Exception as exc:
            self._failed(exc)

    async def _subscribe(self) -> None:
        backoff = 0.5
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.5
                await self.refresh()  # whatever was missed while not subscribed
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is None:
                        continue
                    version, _, origin = message["data"].decode().partition(" ")
                    if origin != self.identity and int(version) != self.version:
                        await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), REDIS_TIMEOUT)

    async def _poll(self) -> None:
        """The fallback for a missed message, and how a lost connection is noticed and
        recovered from."""
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                # The version, and a fresh reading of Redis's clock for the writes' deadlines.
                sent = time.monotonic()
                async with self.client.pipeline(transaction=False) as pipe:
                    raw, redis_time = await pipe.get(self.keys[2]).time().execute()
                self.clock.sample(sent, time.monotonic(), redis_time)
                if raw is None or int(raw) != self.version:
                    await self.refresh()
                self._recovered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if self.connected:
            log.error("state store: Redis unreachable (%s); the last state applied stays in "
                      "force; retrying", exc)
        self.connected = False
        self.last_error = str(exc) or type(exc).__name__
        self.clock.forget()

    def _recovered(self) -> None:
        if not self.connected:
            log.info("state store: Redis reachable again; state re-read")
        self.connected = True

    # --- leadership, status, stop ---------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.lease is not None and self.lease.held

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "url": redacted(self.url),
                "key_prefix": self.settings.key_prefix, "instance": self.identity,
                "leader": self.leading,
                "leader_instance": self.lease.holder if self.lease else None,
                "connected": self.connected, "version": self.version,
                "last_error": self.last_error}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.lease is not None:
            await self.lease.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
