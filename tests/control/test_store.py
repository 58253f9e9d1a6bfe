"""Several Weir instances sharing a Redis state store, as behind an L4 load balancer.

Everything is real: a redis-server started here on a free port (no persistence), Weir as
subprocesses sharing it, aiohttp backends. A switch through one instance's admin API must be
in force on the other's data plane within a second; exactly one instance runs the controller,
and killing it hands the rollout over at the step it had reached, within leader_ttl; Redis going
away never breaks proxying, and its return re-syncs; a write refused while Redis stalled never
lands when it resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.loader import parse_config
from proxy.config.model import StateStoreSettings
from proxy.control.redisstore import REDIS_TIMEOUT, WRITE_MARGIN, RedisClock, RedisStore
from proxy.control.state import RuntimeState
from proxy.control.store import STORE_CLOSE_SECONDS, StoreError

from ..conftest import (
    AUTH,
    REPO_ROOT,
    StartWeirProcess,
    WeirProcess,
    control_plane,
    free_port,
    port_open,
    sample,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="subprocesses and signals"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]



# --- redis-server -----------------------------------------------------------------------------


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = self.process
        await wait_for(lambda: port_open(self.port) or process.poll() is not None, timeout=10,
                       interval=0.02)
        assert process.poll() is None, "redis-server did not start"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    server.kill()


@contextlib.contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """redis-server frozen (SIGSTOP), as in a stalled disk or a VM pause: connections stay
    open and what clients send queues in its socket buffers, to be run when it resumes.
    Always resumed (SIGCONT), whatever the test does meanwhile."""
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.process.send_signal(signal.SIGCONT)


# --- Weir instances ---------------------------------------------------------------------------


@dataclass
class Instance:
    run: WeirProcess
    port: int
    session: aiohttp.ClientSession

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.run.admin_port}"

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.admin + path, headers=AUTH,
                                        json=body) as response:
            return response.status, await response.json(content_type=None)

    async def status(self) -> dict[str, Any]:
        code, data = await self.call("GET", "/api/status")
        assert code == 200, data
        return data

    async def rollout(self) -> dict[str, Any]:
        code, data = await self.call("GET", "/api/services/app/rollout")
        assert code == 200, data
        return data

    async def served(self) -> str:
        async with self.session.get(f"http://127.0.0.1:{self.port}/item") as response:
            await response.read()
            assert response.status == 200, response.status
            return response.headers["x-weir-version"]

    def alive(self) -> bool:
        return self.run.process is not None and self.run.process.poll() is None


@pytest.fixture
async def fleet(weir_process: StartWeirProcess) -> AsyncIterator[Any]:
    """Weir processes on one config (but their own ports) sharing a Redis prefix; killed at
    the end."""
    started: list[Instance] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                    cookie_jar=aiohttp.DummyCookieJar())
    prefix = f"weir-test-{uuid.uuid4().hex[:8]}"

    async def start(services: list[dict[str, Any]], redis_url: str,
                    leader_ttl: str = "2s") -> Instance:
        run = await weir_process(services, shutdown={"timeout": "2s"}, state_store={
            "type": "redis", "url": redis_url, "key_prefix": prefix, "leader_ttl": leader_ttl})
        started.append(Instance(run, run.port, session))
        return started[-1]

    yield start
    await session.close()
    for instance in started:
        instance.run.kill()


def shop(blue: Any, green: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "app",
             "versions": {"blue": {"upstreams": [blue.address]},
                          "green": {"upstreams": [green.address]}},
             "weights": {"blue": 100, "green": 0}, **extra}]


def canary_service(stable: Any, canary: Any, steps: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    return [{"name": "app",
             "versions": {"stable": {"upstreams": [stable.address], "revision": "s1"},
                          "canary": {"upstreams": [canary.address], "revision": "c1"}},
             "weights": {"stable": 100, "canary": 0},
             "rollout": {"strategy": "canary", "stable": "stable", "canary": "canary",
                         "steps": steps}}]


async def poll(fetch: Any, predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {value}"
        await asyncio.sleep(0.02)


async def leaders(*instances: Instance) -> list[Instance]:
    return [i for i in instances if (await i.status())["state_store"]["leader"]]


async def all_served(instance: Instance, count: int) -> Counter[str]:
    return Counter([await instance.served() for _ in range(count)])


# === the file store stays the default ===========================================================


async def test_the_file_store_is_the_default(tmp_path):
    config = parse_config({"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
                           "state_file": str(tmp_path / "s.json"),
                           "services": [{"name": "app", "versions": {
                               "v1": {"upstreams": ["127.0.0.1:1"]}}}]})
    control = control_plane(None, config)
    store = control.status()["state_store"]
    assert store == {"type": "file", "path": str(tmp_path / "s.json"), "leader": True}


async def test_unreachable_redis_at_start_exits_2_with_the_reason(tmp_path):
    dead = free_port()
    path = tmp_path / "weir.yaml"
    path.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{free_port()}", "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "state_store": {"type": "redis", "url": f"redis://127.0.0.1:{dead}/0"},
        "services": [{"name": "app", "versions": {"v1": {"upstreams": ["127.0.0.1:1"]}}}]}))
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "run", "-c", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert f"cannot reach the Redis state store at redis://127.0.0.1:{dead}/0" in result.stderr


# === changes reach every instance ===============================================================


async def test_a_switch_through_one_instance_is_in_force_on_the_other_within_a_second(
        start_backend, redis_server, fleet):
    blue, green = await start_backend("blue"), await start_backend("green")
    a = await fleet(shop(blue, green), redis_server.url)
    b = await fleet(shop(blue, green), redis_server.url)
    status = await a.status()
    assert status["state_store"]["type"] == "redis"
    assert status["state_store"]["connected"] is True
    assert await all_served(b, 5) == Counter(blue=5)
    await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 5, "exactly one leader")

    switched_at = time.monotonic()
    code, reply = await a.call("POST", "/api/services/app/switch", {"to": "green"})
    assert code == 200, reply
    await poll(b.served, lambda version: version == "green", 3, "green on B")
    delay = time.monotonic() - switched_at
    print(f"\nswitch through A in force on B's data plane after {delay * 1000:.0f} ms")
    assert delay < 1.0, delay
    assert await all_served(b, 20) == Counter(green=20)
    service = (await b.status())["services"][0]
    assert (service["weights"], service["weights_source"]) == ({"blue": 0, "green": 100}, "api")

    # A weight change through B survives a restart of both instances.
    code, reply = await b.call("PUT", "/api/services/app/weights",
                               {"weights": {"blue": 30, "green": 70}})
    assert code == 200, reply
    await poll(lambda: a.status(), lambda s: s["services"][0]["weights"] ==
               {"blue": 30, "green": 70}, 2, "the weights on A")
    for instance in (a, b):
        assert await instance.run.stop() == 0, instance.run.output()
    for instance in (a, b):
        await instance.run.start()
        service = (await instance.status())["services"][0]
        assert service["weights"] == {"blue": 30, "green": 70}
        assert service["weights_source"] == "api"
    await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 5, "one leader again")


async def test_a_write_racing_another_instance_is_refused_with_409_and_then_goes_through(
        start_backend, redis_server, fleet):
    """Another instance wrote the same field since this one last read it: nothing changes,
    409 says try again, and the retry (after the store re-read) goes through. The metrics say
    who leads and whether the store is reachable."""
    import redis.asyncio as aioredis

    blue, green = await start_backend("blue"), await start_backend("green")
    a = await fleet(shop(blue, green), redis_server.url)
    b = await fleet(shop(blue, green), redis_server.url)
    await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 5, "exactly one leader")
    leads = []
    for instance in (a, b):
        async with instance.session.get(instance.admin + "/metrics") as response:
            text = await response.text()
        assert sample(text, "weir_state_store_connected", type="redis") == 1
        leads.append(sample(text, "weir_controller_leader"))
    assert sorted(leads) == [0, 1]

    code, reply = await a.call("PUT", "/api/services/app/weights",
                               {"weights": {"blue": 60, "green": 40}})
    assert code == 200, reply
    prefix = (await a.status())["state_store"]["key_prefix"]
    client = aioredis.from_url(redis_server.url)
    try:
        # A write A has not seen yet, as if another instance had just made it.
        await client.hincrby(f"{prefix}:revs", "weights:app", 1)
    finally:
        await client.aclose()
    code, reply = await a.call("PUT", "/api/services/app/weights",
                               {"weights": {"blue": 10, "green": 90}})
    assert code == 409, reply
    assert "another instance" in reply["error"] and "nothing changed" in reply["error"]
    assert (await a.status())["services"][0]["weights"] == {"blue": 60, "green": 40}

    async def retry() -> int:
        code, _ = await a.call("PUT", "/api/services/app/weights",
                               {"weights": {"blue": 10, "green": 90}})
        return code

    await poll(retry, lambda code: code == 200, 3, "the retry to go through")
    await poll(lambda: b.status(), lambda s: s["services"][0]["weights"] ==
               {"blue": 10, "green": 90}, 2, "the weights on B")


async def test_redis_going_away_keeps_proxying_and_its_return_resyncs(start_backend,
                                                                       redis_server, fleet):
    blue, green = await start_backend("blue"), await start_backend("green")
    a = await fleet(shop(blue, green), redis_server.url)
    b = await fleet(shop(blue, green), redis_server.url)
    code, _ = await a.call("POST", "/api/services/app/switch", {"to": "green"})
    assert code == 200
    await poll(b.served, lambda version: version == "green", 2, "green on B")

    redis_server.kill()
    for instance in (a, b):
        await poll(instance.status, lambda s: s["state_store"]["connected"] is False, 5,
                   "the store noticed Redis is gone")
        # A leader cut off from Redis stops acting before its lock (2s) could lapse.
        await poll(instance.status, lambda s: not s["state_store"]["leader"], 2.5,
                   "no leader without Redis")
    # The data plane keeps the last state: every request still answered, on green.
    for instance in (a, b):
        assert await all_served(instance, 30) == Counter(green=30)
    # A change that cannot be persisted is refused, and nothing changes.
    code, reply = await a.call("POST", "/api/services/app/switch", {"to": "blue"})
    assert code == 500 and "nothing changed" in reply["error"], reply
    assert await all_served(a, 10) == Counter(green=10)

    # Redis comes back empty (no persistence): an instance puts the state back, and changes
    # flow between the instances again.
    await redis_server.start()
    for instance in (a, b):
        await poll(instance.status, lambda s: s["state_store"]["connected"] is True, 10,
                   "the store reconnected")
    await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 6, "one leader again")
    code, reply = await b.call("POST", "/api/services/app/switch", {"to": "blue"})
    assert code == 200, reply
    await poll(a.served, lambda version: version == "blue", 2, "blue on A")
    assert await all_served(a, 10) == Counter(blue=10)


async def test_a_stop_while_redis_does_not_answer_still_ends_in_bounded_time(start_backend,
                                                                             redis_server,
                                                                             fleet):
    """Redis stops answering (paused, as behind a dead link: no reset, no reply) and the
    instance leading the controller is told to stop: its store's close (last writes, the lock
    release, its connections) must not hold the process up past STORE_CLOSE_SECONDS."""
    blue, green = await start_backend("blue"), await start_backend("green")
    a = await fleet(shop(blue, green), redis_server.url)
    await poll(lambda: leaders(a), lambda found: found == [a], 5, "A to lead")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        assert await a.run.stop() == 0, a.run.output()
        took = time.monotonic() - stopped_at
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    print(f"\nstopped in {took:.2f}s with Redis paused")
    # shutdown.timeout (2s) for requests in flight plus the bound on the store's close (5s).
    assert took < 2 + STORE_CLOSE_SECONDS + 2, a.run.output()[-3000:]


# === a write whose answer never came must not land later (issue 17) ============================


def reader_for(redis_server: RedisServer) -> Any:
    """A plain client beside Weir's, to look at what Redis holds."""
    import redis.asyncio as aioredis

    return aioredis.from_url(redis_server.url)


async def eval_calls(client: Any) -> int:
    """How many EVALs Redis has run (its command statistics)."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_eval", {}).get("calls", 0))


async def open_store(redis_server: RedisServer) -> tuple[RedisStore, str]:
    prefix = f"weir-test-{uuid.uuid4().hex[:8]}"
    store = RedisStore(StateStoreSettings(type="redis", url=redis_server.url, key_prefix=prefix))
    await store.open()
    return store, prefix


async def test_a_write_that_timed_out_in_a_stall_does_not_land_when_redis_resumes(
        redis_server):
    """The store's write is sent, then Redis freezes: the client gives up after REDIS_TIMEOUT
    and the write is reported as not made. When Redis resumes it runs the EVAL that was queued;
    that must change nothing. The connection that timed out is not used again, so the next
    write gets its own answer, not the late one."""
    store, prefix = await open_store(redis_server)
    reader = reader_for(redis_server)
    state = RuntimeState(None)
    try:
        state.drained["10.0.0.1:80"] = 1.0
        await store.save(state)  # the connection the next write reuses
        assert await reader.hget(f"{prefix}:state", "drained:10.0.0.1:80") is not None
        version = await reader.get(f"{prefix}:version")
        evals = await eval_calls(reader)

        state.drained["10.0.0.2:80"] = 2.0
        with stalled(redis_server):
            sent = time.monotonic()
            with pytest.raises(StoreError) as failed:
                await store.save(state)
            waited = time.monotonic() - sent
        print(f"\nthe write failed after {waited:.2f}s: {failed.value}")
        assert waited < REDIS_TIMEOUT + 0.5, waited

        # Resumed: Redis runs the queued EVAL (before anything sent from now on).
        await poll(lambda: eval_calls(reader), lambda n: n > evals, 5,
                   "Redis to run the write that was queued")
        assert await reader.hget(f"{prefix}:state", "drained:10.0.0.2:80") is None
        assert await reader.get(f"{prefix}:version") == version

        # The same change again, now that Redis answers: it lands, and the store's view of
        # the revisions is Redis's (a late reply read as this write's answer would skew it).
        await store.save(state)
        assert json.loads(await reader.hget(f"{prefix}:state", "drained:10.0.0.2:80")) == \
            {"at": 2.0}
        assert store.version == int(await reader.get(f"{prefix}:version")) == int(version) + 1
        revs = await reader.hgetall(f"{prefix}:revs")
        assert store.revs == {k.decode(): int(v) for k, v in revs.items()}
    finally:
        await store.close()
        await reader.aclose()


async def test_a_write_redis_runs_only_after_its_deadline_changes_nothing(redis_server):
    """Redis holds the write back (CLIENT PAUSE WRITE, as a Redis busy with a slow command
    would) until shortly before the client would give up: the script sees on Redis's own clock
    that it runs past the deadline the store gave it, writes nothing and says so; the store
    reports the write as not made."""
    store, prefix = await open_store(redis_server)
    reader = reader_for(redis_server)
    state = RuntimeState(None)
    try:
        version = await reader.get(f"{prefix}:version")
        state.drained["10.0.0.3:80"] = 3.0
        # Past the deadline (WRITE_MARGIN before the client's timeout), well short of the
        # timeout (Redis ends a pause on its next cron tick, up to 100 ms late).
        await reader.client_pause(int((REDIS_TIMEOUT - WRITE_MARGIN + 0.05) * 1000), all=False)
        try:
            with pytest.raises(StoreError) as refused:
                await store.save(state)
        finally:
            await reader.client_unpause()
        print(f"\nrefused: {refused.value}")
        assert "past its deadline" in str(refused.value)  # the script's answer, not a timeout
        assert await reader.hget(f"{prefix}:state", "drained:10.0.0.3:80") is None
        assert await reader.get(f"{prefix}:version") == version

        await store.save(state)  # unpaused: it goes through
        assert json.loads(await reader.hget(f"{prefix}:state", "drained:10.0.0.3:80")) == \
            {"at": 3.0}
    finally:
        await store.close()
        await reader.aclose()


async def test_the_redis_clock_converts_local_moments_without_ever_putting_them_late(
        redis_server):
    """Deadlines go to Redis in its own clock, converted from the local monotonic clock (never
    the local wall clock, which may disagree with Redis's on another host). The conversion may
    err early by a round trip, never late; a step back of Redis's clock (or a failover to a
    server whose clock is behind) is noticed at the next reading."""
    clock = RedisClock()
    clock.sample(100.0, 100.004, (1_700_000_000, 500_000))  # TIME read in those 4 ms
    true_offsets = [1_700_000_000.5 - t for t in (100.0, 100.002, 100.004)]
    for offset in true_offsets:  # wherever in the round trip Redis read its clock
        assert clock.deadline_us(101.0) <= int((101.0 + offset) * 1_000_000)
    assert clock.deadline_us(101.0) == int((101.0 + min(true_offsets)) * 1_000_000)
    clock.sample(200.0, 200.001, (1_700_000_100, 499_500))  # a tighter bound: taken
    assert abs(clock.deadline_us(201.0) - 1_700_000_101_498_500) <= 1  # float rounding
    clock.sample(201.0, 201.010, (1_700_000_101, 504_000))  # looser: the tighter one stays
    assert abs(clock.deadline_us(201.0) - 1_700_000_101_498_500) <= 1
    clock.sample(202.0, 202.001, (1_700_000_097, 0))  # Redis's clock went back 5 s
    assert abs(clock.deadline_us(203.0) - 1_700_000_097_999_000) <= 1

    # Against a real Redis: a deadline for "now" is at or just before Redis's TIME.
    store, _ = await open_store(redis_server)
    reader = reader_for(redis_server)
    try:
        before = store.clock.deadline_us(time.monotonic())
        seconds, micros = await reader.time()
        after = store.clock.deadline_us(time.monotonic())
        assert before <= seconds * 1_000_000 + micros, (before, seconds, micros)
        assert seconds * 1_000_000 + micros - after < 50_000
    finally:
        await store.close()
        await reader.aclose()


async def test_a_change_refused_while_redis_stalled_is_never_applied_when_it_resumes(
        start_backend, redis_server, fleet):
    """Issue 17: Redis frozen; a switch through A is refused ("nothing changed") while both
    instances keep serving. When Redis resumes, the refused switch must appear neither in
    Redis nor on either instance; a switch made after the recovery goes through."""
    blue, green = await start_backend("blue"), await start_backend("green")
    a = await fleet(shop(blue, green), redis_server.url)
    b = await fleet(shop(blue, green), redis_server.url)
    await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 5, "exactly one leader")
    prefix = (await a.status())["state_store"]["key_prefix"]
    reader = reader_for(redis_server)
    try:
        version = await reader.get(f"{prefix}:version")
        fields = await reader.hgetall(f"{prefix}:state")
        with stalled(redis_server):
            code, reply = await a.call("POST", "/api/services/app/switch", {"to": "green"})
            assert code in (500, 503) and reply.get("error"), (code, reply)
            print(f"\nrefused with {code}: {reply['error']}")
            for instance in (a, b):
                assert await all_served(instance, 5) == Counter(blue=5)
                await poll(instance.status, lambda s: s["state_store"]["connected"] is False, 5,
                           "the store to notice Redis does not answer")
        for instance in (a, b):
            await poll(instance.status, lambda s: s["state_store"]["connected"] is True, 5,
                       "the store to reconnect")

        # For 3 s after the recovery (the issue saw the refused switch in force after 1.5 s):
        # Redis holds what it held, and both instances still say and serve blue.
        watch_until = time.monotonic() + 3.0
        while time.monotonic() < watch_until:
            assert await reader.get(f"{prefix}:version") == version
            assert await reader.hgetall(f"{prefix}:state") == fields
            for instance in (a, b):
                service = (await instance.status())["services"][0]
                assert service["weights"] == {"blue": 100, "green": 0}, service
                assert await instance.served() == "blue"
            await asyncio.sleep(0.05)

        code, reply = await a.call("POST", "/api/services/app/switch", {"to": "green"})
        assert code == 200, reply
        await poll(b.served, lambda version: version == "green", 2, "green on B")
        stored = json.loads(await reader.hget(f"{prefix}:state", "weights:app"))
        assert stored["weights"] == {"blue": 0, "green": 100}
    finally:
        await reader.aclose()


async def test_an_abort_while_redis_stalled_is_in_force_at_once_and_shared_once_saved(
        start_backend, redis_server, fleet):
    """Issue 17: sending traffic back to stable never waits on the store. Redis frozen; an
    abort through A is in force on A at once and answered "applied, not saved"; once Redis
    resumes, A's saver writes it and B takes it too."""
    stable, canary = await start_backend("stable"), await start_backend("canary")
    services = canary_service(stable, canary, [{"set_weight": 50}, {"pause": {}}])
    a = await fleet(services, redis_server.url)
    b = await fleet(services, redis_server.url)
    await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 5, "exactly one leader")
    code, reply = await a.call("POST", "/api/services/app/rollout/start")
    assert code == 200, reply
    for instance in (a, b):
        await poll(instance.status, lambda s: s["services"][0]["weights"]
                   == {"stable": 50, "canary": 50}, 5, "the first step on both")

    with stalled(redis_server):
        asked = time.monotonic()
        code, reply = await a.call("POST", "/api/services/app/rollout/abort")
        assert code == 200, reply
        assert time.monotonic() - asked < 4.5
        assert reply["phase"] == "aborted" and reply["saved"] is False, reply
        assert "applied, not saved" in reply["warning"]
        assert await all_served(a, 10) == Counter(stable=10)
        status = await a.status()
        assert status["state_unsaved"] is not None
        assert status["services"][0]["weights"] == {"stable": 100, "canary": 0}

    await poll(a.status, lambda s: s["state_unsaved"] is None, 10, "A's abort to be saved")
    await poll(b.rollout, lambda r: r["phase"] == "aborted", 5, "B to take the abort")
    await poll(b.status, lambda s: s["services"][0]["weights"]
               == {"stable": 100, "canary": 0}, 5, "B back on stable")
    assert await all_served(b, 10) == Counter(stable=10)


# === the controller runs on one instance ========================================================


async def test_killing_the_controllers_instance_hands_the_rollout_over(start_backend,
                                                                       redis_server, fleet):
    stable, canary = await start_backend("stable"), await start_backend("canary")
    services = canary_service(stable, canary, [
        {"set_weight": 20}, {"pause": {"duration": "4s"}}, {"set_weight": 50},
        {"pause": {"duration": "1s"}}])
    a = await fleet(services, redis_server.url)
    b = await fleet(services, redis_server.url)
    [leader] = await poll(lambda: leaders(a, b), lambda found: len(found) == 1, 5,
                          "exactly one leader")
    follower = b if leader is a else a
    identity = (await leader.status())["state_store"]["instance"]
    await poll(follower.status, lambda s: s["state_store"]["leader_instance"] == identity, 3,
               "the follower to name the leader")

    # Started through the follower: the leader runs it.
    code, reply = await follower.call("POST", "/api/services/app/rollout/start")
    assert code == 200, reply
    before = await poll(follower.rollout, lambda r: r["step"] == 1, 5, "the 4s pause step")
    assert (await follower.status())["services"][0]["weights"] == {"stable": 80, "canary": 20}

    leader.run.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    leader.run.process.wait()  # type: ignore[union-attr]
    killed_at = time.monotonic()
    await poll(follower.status, lambda s: s["state_store"]["leader"], 5, "the takeover")
    took = time.monotonic() - killed_at
    after = await follower.rollout()
    print(f"\nleader killed at step {before['step']}; the other instance led after "
          f"{took:.2f}s, at step {after['step']}")
    assert took < 2.0 + TAKEOVER_SLACK, took  # within leader_ttl (2s) of the kill
    assert after["started_at"] == before["started_at"]
    assert after["step"] >= 1
    if after["step"] == 1:
        assert after["step_started_at"] == before["step_started_at"]  # the same pause

    steps_seen = [after["step"]]

    async def watch() -> dict[str, Any]:
        rollout = await follower.rollout()
        steps_seen.append(rollout["step"])
        return rollout

    done = await poll(watch, lambda r: r["phase"] == "completed", 15, "completion")
    assert done["started_at"] == before["started_at"]
    assert steps_seen == sorted(steps_seen), steps_seen  # never back to an earlier step
    assert (await follower.status())["services"][0]["weights"] == {"stable": 0, "canary": 100}
    assert await all_served(follower, 10) == Counter(canary=10)


# How late a takeover may be on a busy machine, beyond the bound the lock allows (leader_ttl
# after the holder's last renewal, plus leader.TAKEOVER_MARGIN and a round trip to Redis).
TAKEOVER_SLACK = 0.3


async def test_a_killed_leaders_lock_is_taken_within_leader_ttl(start_backend, redis_server,
                                                                  fleet):
    """SIGKILL the controller's instance just after it renewed its lock (the worst moment: its
    lock then lives a whole leader_ttl on) and time how long the other instance takes to say
    it leads: leader_ttl and a little, not leader_ttl plus a follower's retry interval. Three
    handovers, so that a follower that happened to retry right at the lapse does not pass by
    luck; each also checks the lock was not taken before it lapsed."""
    ttl = 3.0
    blue, green = await start_backend("blue"), await start_backend("green")
    a = await fleet(shop(blue, green), redis_server.url, leader_ttl="3s")
    b = await fleet(shop(blue, green), redis_server.url, leader_ttl="3s")
    key = f"{(await a.status())['state_store']['key_prefix']}:leader"
    reader = reader_for(redis_server)
    took: list[float] = []
    try:
        for _ in range(3):
            [leader] = await poll(lambda: leaders(a, b), lambda found: len(found) == 1,
                                  2 * ttl, "exactly one leader")
            follower = b if leader is a else a
            # A renewal shows as the lock's remaining time jumping back up.
            async with asyncio.timeout(ttl):
                last = await reader.pttl(key)
                while (remaining := await reader.pttl(key)) <= last:
                    last = remaining
                    await asyncio.sleep(0.002)
            assert leader.run.process is not None
            leader.run.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await poll(follower.status, lambda s: s["state_store"]["leader"], ttl + 2,
                       "the takeover")
            took.append(time.monotonic() - killed_at)
            leader.run.process.wait()
            await leader.run.start()  # back, as a follower
    finally:
        await reader.aclose()
    print(f"\nleader_ttl {ttl}s; killed right after a renewal, the other instance led after "
          f"{', '.join(f'{t:.3f}s' for t in took)}")
    assert all(ttl - 0.3 < t < ttl + TAKEOVER_SLACK for t in took), took
