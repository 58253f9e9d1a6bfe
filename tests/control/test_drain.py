"""`weir drain ADDRESS` / `weir undrain ADDRESS`: one app instance out of rotation in every
service and version, and back, as a deploy script does before it stops an instance.

Everything is real: aiohttp backends on 127.0.0.1 (each one's live connections read from its
server), Weir in this event loop or as a process (restarted on the same state file, with
``--workers 2``, or two instances sharing a redis-server), and the command line as a
subprocess. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ..conftest import (
    REPO_ROOT,
    TOKEN,
    Weir,
    free_port,
    poll,
    sample,
    serve_on_loopback,
    wait_for,
)
from ..rollout_harness import Load, base_config
from ..runtime import test_workers
from ..runtime.test_workers import fetch
from . import test_store
from .test_store import Instance

# The harnesses of the --workers and shared-store tests, as fixtures here too.
supervised = test_workers.supervised
redis_server = test_store.redis_server
fleet = test_store.fleet

CLI_TIMEOUT = 30.0  # for each command line run; they take well under a second


# --- app instances that can hold a request, and show their connections ----------------------


@dataclass
class AppInstance:
    """An app instance: answers with its name; with ``hold`` set, GET /hold waits for
    ``release``. ``connections()`` is what its server has open right now."""

    name: str
    hold: bool = False
    port: int = 0
    served: int = 0
    held: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connections(self) -> int:
        assert self.runner is not None and self.runner.server is not None
        return len(self.runner.server.connections)


def instance_app(instance: AppInstance) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        instance.served += 1
        if request.path == "/hold" and instance.hold:
            instance.held += 1
            await instance.release.wait()
        return web.Response(text=instance.name, headers={"x-backend": instance.name})

    app = web.Application()
    app.add_routes([web.route("*", "/{tail:.*}", handle)])
    return app


@pytest.fixture
async def app_instances() -> AsyncIterator[Callable[..., Awaitable[AppInstance]]]:
    started: list[AppInstance] = []

    async def start(name: str, hold: bool = False) -> AppInstance:
        instance = AppInstance(name, hold)
        instance.runner, instance.port = await serve_on_loopback(instance_app(instance),
                                                                 shutdown_timeout=0.5)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.release.set()
        assert instance.runner is not None
        await instance.runner.cleanup()


def shop(stable: list[str], canary: list[str] | None = None,
         **extra: Any) -> dict[str, Any]:
    versions: dict[str, Any] = {"stable": {"upstreams": stable}}
    weights = {"stable": 100}
    if canary:
        versions["canary"] = {"upstreams": canary}
        weights["canary"] = 0
    return {"name": "shop", "versions": versions, "weights": weights, **extra}


async def hold_one(session: aiohttp.ClientSession, port: int,
                   instance: AppInstance) -> asyncio.Task[tuple[int, str]]:
    """Send GET /hold until one is held by ``instance`` (the others answer at once); returns
    the task of the held request."""

    async def get() -> tuple[int, str]:
        async with session.get(f"http://127.0.0.1:{port}/hold") as response:
            return response.status, await response.text()

    async with asyncio.timeout(10):
        while True:
            before = instance.held
            task = asyncio.create_task(get())
            while instance.held == before and not task.done():
                await asyncio.sleep(0.005)
            if instance.held > before:
                return task
            await task


# --- the command line -------------------------------------------------------------------------


def cli_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WEIR_ADMIN_TOKEN", "WEIR_ADMIN_URL")}
    if token is not None:
        env["WEIR_ADMIN_TOKEN"] = token
    return env


async def start_cli(*args: str, token: str | None = TOKEN) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=REPO_ROOT, env=cli_env(token),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def weir_cli(*args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    """Run `weir ARGS...` to the end: (exit code, stdout, stderr)."""
    process = await start_cli(*args, token=token)
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    assert process.returncode is not None
    assert "Traceback" not in err.decode(), err.decode()
    return process.returncode, out.decode(), err.decode()


async def status(live: Weir) -> dict[str, Any]:
    code, data = await live.api.call("GET", "/api/status", auth=False)
    assert code == 200, data
    return dict(data)


def stable_health(data: dict[str, Any], address: str) -> dict[str, Any]:
    service = next(s for s in data["services"] if s["name"] == "shop")
    return dict(service["versions"]["stable"]["upstream_health"][address])


# === draining under load ======================================================================


@pytest.mark.timeout(90)
async def test_drain_under_load_then_wait_then_undrain(app_instances, weir):
    a, b = await app_instances("a"), await app_instances("b", hold=True)
    live: Weir = await weir(base_config(shop([a.address, b.address])))
    admin = ["--admin", live.api.base]

    async with Load(live.port, workers=4) as load, aiohttp.ClientSession() as session:
        await wait_for(lambda: a.served >= 20 and b.served >= 20, timeout=10)
        await wait_for(lambda: b.connections() >= 2, timeout=5)  # pooled keep-alives
        held = await hold_one(session, live.port, b)  # a slow request in flight to b

        # Drained, and --wait gives up at its short timeout, saying what is still open.
        code, out, err = await weir_cli("drain", b.address, "--wait", "--timeout", "0.5s",
                                        *admin)
        assert code == 1, (out, err)
        # (Load requests to b may still be finishing as it answers.)
        assert re.search(rf"^{re.escape(b.address)} drained: no new requests in shop/stable; "
                         rf"\d+ requests? in flight$", out, re.M), out
        assert f"{b.address}: still 1 request in flight on shop/stable after 0.5s" in err, err

        # Only the held request is open to b now: its idle pooled connections are closed
        # (b sees them go), and it gets no new request while the load goes on.
        await wait_for(lambda: b.connections() == 1, timeout=5)
        data = await status(live)
        assert data["drained"] == [{"upstream": b.address, "used_by": ["shop/stable"],
                                    "inflight": 1, "drained_at": data["drained"][0]["drained_at"],
                                    "confirmed": True}]
        assert stable_health(data, b.address)["drained"] is True
        assert stable_health(data, a.address)["drained"] is False
        served_by_b = b.served
        served_by_a = a.served
        await wait_for(lambda: a.served >= served_by_a + 200, timeout=10)
        assert b.served == served_by_b
        metrics = await live.api.metrics()
        assert sample(metrics, "weir_upstream_drained", upstream=b.address) == 1
        assert sample(metrics, "weir_upstream_drained", upstream=a.address) == 0

        # --wait returns 0 once the slow request has finished, with a 200.
        waiting = await start_cli("drain", b.address, "--wait", "--timeout", "30", *admin)
        assert waiting.stdout is not None
        lines = []
        async with asyncio.timeout(CLI_TIMEOUT):
            while not any("1 request in flight on shop/stable;" in line for line in lines):
                line = (await waiting.stdout.readline()).decode()
                assert line, f"drain --wait ended early: {lines}"
                lines.append(line)
        assert waiting.returncode is None
        assert any("already drained" in line for line in lines), lines
        b.release.set()
        assert await asyncio.wait_for(held, 5) == (200, "b")
        rest, err = await asyncio.wait_for(waiting.communicate(), CLI_TIMEOUT)
        assert waiting.returncode == 0, (lines, rest, err)
        assert f"{b.address}: nothing in flight" in rest.decode()
        # Its connection was not pooled again: b has none left.
        await wait_for(lambda: b.connections() == 0, timeout=5)
        assert b.served == served_by_b

        # Undrained: back in rotation.
        code, out, err = await weir_cli("undrain", b.address, *admin)
        assert code == 0, (out, err)
        assert out.strip() == f"{b.address} undrained: in rotation in shop/stable"
        await wait_for(lambda: b.served >= served_by_b + 20, timeout=10)
        data = await status(live)
        assert data["drained"] == []
        assert stable_health(data, b.address)["drained"] is False
        metrics = await live.api.metrics()
        assert sample(metrics, "weir_upstream_drained", upstream=b.address) == 0

        code, out, _ = await weir_cli("undrain", b.address, *admin)
        assert code == 0 and "was not drained" in out
    assert load.hits and all(hit.status == 200 for hit in load.hits), \
        Counter(hit.status for hit in load.hits)


# === what is refused ==========================================================================


async def test_unknown_last_upstream_force_token_and_usage(app_instances, weir):
    a, b, c = (await app_instances("a"), await app_instances("b"), await app_instances("c"))
    live: Weir = await weir(base_config(shop([a.address, b.address], [c.address])))
    api, admin = live.api, ["--admin", live.api.base]
    known = sorted([a.address, b.address, c.address])

    # An unknown address: 404 listing the known ones (the CLI: exit 1, saying so).
    code, reply = await api.call("POST", "/api/upstreams/drain", {"upstream": "127.0.0.1:1"})
    assert code == 404 and reply["known"] == known, reply
    assert all(address in reply["error"] for address in known), reply
    code, reply = await api.call("POST", "/api/upstreams/undrain", {"upstream": "127.0.0.1:1"})
    assert code == 404 and reply["known"] == known, reply
    code, _, err = await weir_cli("drain", "127.0.0.1:1", *admin)
    assert code == 1 and "no upstream '127.0.0.1:1'" in err and c.address in err, err

    # Mutations need the token.
    code, reply = await api.call("POST", "/api/upstreams/drain", {"upstream": a.address},
                                 auth=False)
    assert code == 401 and "error" in reply
    code, reply = await api.call("POST", "/api/upstreams/undrain", {"upstream": a.address},
                                 auth=False)
    assert code == 401 and "error" in reply
    code, _, err = await weir_cli("drain", a.address, *admin, token=None)
    assert code == 1 and "HTTP 401" in err and "WEIR_ADMIN_TOKEN" in err, err
    # Bad bodies.
    for body in ({}, {"upstream": 5}, {"upstream": a.address, "force": "yes"}, ["x"]):
        code, reply = await api.call("POST", "/api/upstreams/drain", body)
        assert code == 400 and "error" in reply, (body, reply)
    assert (await status(live))["drained"] == []

    # The canary has no weight: its only upstream may go.
    code, reply = await api.call("POST", "/api/upstreams/drain", {"upstream": c.address})
    assert code == 200 and reply["drained"] == [c.address] and reply["changed"], reply
    assert reply["used_by"] == ["shop/canary"] and reply["inflight"] == 0
    # a, then b: the last upstream of stable, which has all the weight, is refused.
    code, _, err = await weir_cli("drain", a.address, *admin)
    assert code == 0, err
    code, reply = await api.call("POST", "/api/upstreams/drain", {"upstream": b.address})
    assert code == 409 and reply["versions"] == ["shop/stable"], reply
    assert "'stable'" in reply["error"] and "'shop'" in reply["error"], reply
    code, _, err = await weir_cli("drain", b.address, *admin)
    assert code == 1 and "last upstream" in err, err
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{live.port}/item") as response:
            assert response.status == 200 and await response.text() == "b"
        # Forced: stable has no upstream left and answers 503, as the CLI warned.
        code, _, err = await weir_cli("drain", b.address, "--force", *admin)
        assert code == 0 and "shop/stable has weight and no upstream left" in err, err
        async with session.get(f"http://127.0.0.1:{live.port}/item") as response:
            assert response.status == 503
        assert sorted(e["upstream"] for e in (await status(live))["drained"]) == known

        # Runtime weights count: with the canary at 100 (and c undrained), stable's
        # upstreams may all go, and c is now the one that may not.
        for address in (b.address, c.address):
            assert (await weir_cli("undrain", address, *admin))[0] == 0
        code, reply = await api.call("PUT", "/api/services/shop/weights",
                                     {"weights": {"stable": 0, "canary": 100}})
        assert code == 200, reply
        code, reply = await api.call("POST", "/api/upstreams/drain", {"upstream": b.address})
        assert code == 200, reply
        code, reply = await api.call("POST", "/api/upstreams/drain", {"upstream": c.address})
        assert code == 409 and reply["versions"] == ["shop/canary"], reply
        async with session.get(f"http://127.0.0.1:{live.port}/item") as response:
            assert response.status == 200 and await response.text() == "c"

    # Usage errors and an unreachable admin API: exit 2.
    code, _, err = await weir_cli("drain", *admin)
    assert code == 2 and "ADDRESS" in err
    code, _, err = await weir_cli("drain", a.address, "--wait", "--timeout", "soon", *admin)
    assert code == 2 and "--timeout" in err, err
    for command in ("drain", "undrain"):
        code, _, err = await weir_cli(command, a.address, "--admin",
                                      f"http://127.0.0.1:{free_port()}")
        assert code == 2 and "cannot reach the admin API" in err, err


# === persisted: restarts, a failed write ======================================================


async def served_by(session: aiohttp.ClientSession, port: int, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(count):
        async with session.get(f"http://127.0.0.1:{port}/item") as response:
            assert response.status == 200
            seen[await response.text()] += 1
    return seen


@pytest.mark.timeout(90)
async def test_drained_survives_a_restart_and_a_failed_write_changes_nothing(app_instances,
                                                                            weir_process,
                                                                            tmp_path):
    a, b = await app_instances("a"), await app_instances("b")
    state_file = tmp_path / "weir.state.json"
    # The state file an older Weir wrote (no "drained"): it loads.
    state_file.write_text(json.dumps({"format": 1, "services": {}}), encoding="utf-8")
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as session:
        run = await weir_process([shop([a.address, b.address])], state_file=str(state_file),
                                 shutdown={"delay": 0, "timeout": "2s"})
        port = run.port
        admin = ["--admin", f"http://127.0.0.1:{run.admin_port}"]
        try:
            assert set(await served_by(session, port, 20)) == {"a", "b"}
            code, out, err = await weir_cli("drain", b.address, *admin)
            assert code == 0, (out, err, run.output())
            assert json.loads(state_file.read_text())["drained"][b.address] > 0
            assert await run.stop() == 0

            await run.start()
            assert await served_by(session, port, 30) == Counter(a=30)
            code, out, _ = await weir_cli("status", *admin)
            assert code == 0 and "drained upstreams" in out and b.address in out, out
            code, out, err = await weir_cli("undrain", b.address, *admin)
            assert code == 0, (out, err)
            assert "drained" not in json.loads(state_file.read_text())
            assert set(await served_by(session, port, 20)) == {"a", "b"}
        finally:
            run.kill()

        # A state file that cannot be written: 500, and nothing changed.
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("", encoding="utf-8")
        run = await weir_process([shop([a.address, b.address])],
                                 state_file=str(blocker / "weir.state.json"),
                                 shutdown={"delay": 0, "timeout": "2s"})
        port = run.port
        base = f"http://127.0.0.1:{run.admin_port}"
        try:
            async with session.post(base + "/api/upstreams/drain", json={"upstream": b.address},
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                reply = await response.json()
                assert response.status == 500, reply
            assert "nothing changed" in reply["error"], reply
            async with session.get(base + "/api/status") as response:
                data = await response.json()
            assert data["drained"] == []
            assert set(await served_by(session, port, 20)) == {"a", "b"}
            async with session.get(base + "/metrics") as response:
                metrics = await response.text()
            assert sample(metrics, "weir_upstream_drained", upstream=b.address) == 0
        finally:
            run.kill()


# === every worker of --workers 2 ==============================================================


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreading")
@pytest.mark.timeout(120)
async def test_every_worker_honours_a_drain_including_a_restarted_one(start_backend,
                                                                      supervised):
    a, b = await start_backend("a"), await start_backend("b")
    weir = await supervised([{"name": "app", "versions": {
        "stable": {"upstreams": [a.address, b.address]}}}])

    def by_backend() -> Counter[str]:
        return Counter(a=len(a.requests), b=len(b.requests))

    async def spread(count: int) -> None:
        for _ in range(count):  # each on its own connection: the kernel spreads them
            assert (await fetch(weir.port, "/item"))[0] == 200

    await spread(20)
    assert by_backend()["b"] > 0
    async with weir.session.post(weir.admin + "/api/upstreams/drain",
                                 json={"upstream": b.address},
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200, await r.text()
    # Each worker confirms (its report says it applied the drain) within a second or so.
    entry = await poll(lambda: weir.get("/api/status"),
                       lambda s: s["drained"] and s["drained"][0]["confirmed"], 5,
                       "every worker to confirm the drain")
    assert entry["drained"][0]["used_by"] == ["app/stable"]
    before = by_backend()
    served = {w["pid"]: w["requests"] for w in await weir.workers()}
    await spread(60)
    assert by_backend() == before + Counter(a=60)
    after = {w["pid"]: w["requests"] for w in await weir.wait_workers(
        lambda ws: sum(w["requests"] for w in ws) >= sum(served.values()) + 60)}
    assert all(after[pid] > count for pid, count in served.items()), (served, after)
    assert await weir.metric("weir_upstream_drained", upstream=b.address) == 1

    # A worker started later gets the drained set with its config.
    victim = next(iter(served))
    os.kill(victim, signal.SIGKILL)
    workers = await weir.wait_workers(lambda ws: all(w["alive"] for w in ws)
                                      and victim not in {w["pid"] for w in ws})
    fresh = next(w["pid"] for w in workers if w["pid"] not in served)
    before = by_backend()
    await spread(60)
    assert by_backend() == before + Counter(a=60)
    await weir.wait_workers(lambda ws: next(w for w in ws if w["pid"] == fresh)["requests"] > 0)

    await weir.send("POST", "/api/upstreams/undrain", {"upstream": b.address})
    async with asyncio.timeout(10):
        while by_backend()["b"] == before["b"]:
            await spread(5)


# === instances sharing a Redis store ==========================================================


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
@pytest.mark.timeout(90)
async def test_instances_sharing_redis_all_honour_a_drain(start_backend, redis_server, fleet):
    a, b = await start_backend("a"), await start_backend("b")
    services = [{"name": "app", "versions": {"stable": {"upstreams": [a.address, b.address]}}}]
    one: Instance = await fleet(services, redis_server.url)
    two: Instance = await fleet(services, redis_server.url)

    async def backends_used(instance: Instance, count: int) -> set[str]:
        seen = set()
        for _ in range(count):
            async with instance.session.get(f"http://127.0.0.1:{instance.port}/item") as r:
                assert r.status == 200
                seen.add(r.headers["x-backend"])
        return seen

    code, reply = await one.call("POST", "/api/upstreams/drain", {"upstream": b.address})
    assert code == 200, reply
    await poll(two.status, lambda s: [e["upstream"] for e in s["drained"]] == [b.address], 2,
               "the drain on the other instance")
    for instance in (one, two):
        assert await backends_used(instance, 30) == {"a"}
        async with instance.session.get(instance.admin + "/metrics") as response:
            metrics = await response.text()
        assert sample(metrics, "weir_upstream_drained", upstream=b.address) == 1

    # Undrained on the other one: back everywhere.
    code, reply = await two.call("POST", "/api/upstreams/undrain", {"upstream": b.address})
    assert code == 200, reply
    await poll(one.status, lambda s: s["drained"] == [], 2, "the undrain on the first")
    for instance in (one, two):
        assert await backends_used(instance, 30) == {"a", "b"}

    # Redis gone: a drain cannot be shared, so it is refused, and nothing changes.
    redis_server.kill()
    await poll(one.status, lambda s: s["state_store"]["connected"] is False, 5,
               "the store noticed Redis is gone")
    code, reply = await one.call("POST", "/api/upstreams/drain", {"upstream": b.address})
    assert code == 500 and "nothing changed" in reply["error"], reply
    assert (await one.status())["drained"] == []
    assert await backends_used(one, 30) == {"a", "b"}
