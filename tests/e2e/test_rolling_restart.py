"""Issue 16's rolling-restart drills: app instances come and go under load, with the config a
new user writes, and no request fails that did not have to.

Each app instance is an aiohttp app in a process of its own on its own loopback port (so that it
can stop the way a real one does: SIGTERM, or SIGKILL with every socket closed by the kernel at
once), run by aiohttp's ``run_app`` with a shutdown timeout: on SIGTERM it stops accepting,
closes its idle keep-alive connections and finishes what is in flight
(``test_the_app_stops_gracefully_on_sigterm`` checks that it really does). Clients keep a steady
keep-alive load on Weir throughout; failed means anything but a 200, an error included.

What each drill needs from issue 16 (until it lands, the drill fails, saying why):

- the rolling restarts with a plain config and one of two upstreams killed with only
  ``health_check`` set: connect failures retried on another upstream of the version by default,
  and an upstream whose connects fail taken out of rotation at once, let back in by a background
  connect probe;
- the deploy script: ``weir drain ADDR --wait`` / ``weir undrain ADDR`` and the admin API's
  ``POST /api/upstreams/drain`` and ``/undrain``;
- the slow start: ``slow_start: {window: …}`` on a service (and the drain API, which takes the
  instance out and lets it back in).

``test_the_app_stops_gracefully_on_sigterm`` and the bench smoke test at the end need nothing
new.

Every wait has a deadline; the one-second sleeps are the drill itself (an instance stays down
that long; a share is measured over that long). bench/rolling.py runs the same drill against
Weir, nginx and HAProxy side by side.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from ..conftest import AUTH, REPO_ROOT, TOKEN, Weir, free_port, one_service, port_open, wait_for

CLIENTS = 6
DOWN_SECONDS = 1.0  # an instance stopped is started again on its port this much later

APP = """
import asyncio, sys
from aiohttp import web

async def healthz(request):
    return web.Response(text="ok")

async def slow(request):
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.Response(text="slow done", headers={"x-backend": sys.argv[1]})

async def work(request):
    await request.read()
    await asyncio.sleep(0.003)  # long enough for requests to be caught in flight
    return web.Response(text="done", headers={"x-backend": sys.argv[1]})

app = web.Application()
app.add_routes([web.get("/healthz", healthz), web.get("/slow", slow),
                web.route("*", "/{tail:.*}", work)])
# SIGTERM: stop accepting, close idle keep-alive connections, finish what is in flight (for
# up to 10 s), exit 0.
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None,
            shutdown_timeout=10)
"""


@dataclass
class Instance:
    """One app instance: a process that can be stopped, killed and started again on its port."""

    name: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", APP, self.name, str(self.port)],
                                        stdin=subprocess.DEVNULL)

    async def serving(self, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        """Wait until it answers GET /healthz itself (not through Weir)."""
        process = self.process
        assert process is not None

        async def answers() -> bool:
            try:
                async with session.get(f"http://{self.address}/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        deadline = time.monotonic() + timeout
        while not await answers():
            assert process.poll() is None, f"{self.name} exited with {process.returncode}"
            assert time.monotonic() < deadline, f"{self.name} did not serve within {timeout} s"
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, and wait for the exit (the event loop, and so Weir, keeps running)."""
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        await wait_for(lambda: process.poll() is not None, timeout=timeout, interval=0.005)
        return process.returncode

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone: the event loop stands still meanwhile, so Weir's
        pools still show what was in flight to it when it died."""
        process = self.process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@asynccontextmanager
async def instances(*names: str) -> AsyncIterator[list[Instance]]:
    started = [Instance(name) for name in names]
    try:
        async with aiohttp.ClientSession() as session:
            for instance in started:
                instance.start()
            for instance in started:
                await instance.serving(session)
        yield started
    finally:
        for instance in started:
            instance.reap()


def load_rolling_bench() -> ModuleType:
    """bench/rolling.py as a module, for its load client (it imports bench/run.py)."""
    spec = importlib.util.spec_from_file_location("bench_rolling",
                                                  REPO_ROOT / "bench" / "rolling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rolling = load_rolling_bench()


class Load(rolling.Load):  # type: ignore[name-defined,misc]
    """bench/rolling.py's load, the same client the bench measures with: ``clients``
    workers, each sending requests back to back over a keep-alive connection of its own; one
    in ``post_every`` a POST with a 100-byte body (0: GETs only). A plain client that never
    retries (aiohttp's would send a GET again, once, after a kept-alive connection failed).
    ``step`` labels what the drill is doing; here, with what a test needs to read of it."""

    def __init__(self, port: int, clients: int = CLIENTS, post_every: int = 0) -> None:
        super().__init__(port, clients, post_every)

    async def __aenter__(self) -> Load:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        async with asyncio.timeout(15):  # each worker ends after its request in flight
            await asyncio.gather(*self._tasks)

    @property
    def failures(self) -> list[Any]:
        return [o for o in self.outcomes if o.status != 200]

    def served(self, backend: str, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for o in self.outcomes
                   if o.status == 200 and o.backend == backend and since <= o.started < until)

    def share(self, backend: str, since: float, until: float) -> float:
        answered = [o for o in self.outcomes if o.status == 200 and since <= o.started < until]
        assert answered, f"no request answered between {since:.2f} and {until:.2f}"
        return sum(1 for o in answered if o.backend == backend) / len(answered)

    def report(self) -> str:
        counts = Counter((o.step, o.method, o.status or "error", o.detail)
                         for o in self.failures)
        lines = [f"{len(self.failures)} failed of {len(self.outcomes)}"]
        lines += [f"  {n:5d} x {step}: {method} {status} {detail!r}"
                  for (step, method, status, detail), n in counts.most_common(12)]
        return "\n".join(lines)


async def wait_served(load: Load, names: Iterable[str], count: int, since: float = 0.0,
                      timeout: float = 10.0) -> None:
    names = list(names)
    try:
        await wait_for(lambda: all(load.served(n, since) >= count for n in names),
                       timeout=timeout)
    except TimeoutError:
        got = {n: load.served(n, since) for n in names}
        raise AssertionError(f"within {timeout} s, not every one of {names} served {count} "
                             f"requests through Weir: {got}\n{load.report()}") from None


# --- the app itself --------------------------------------------------------------------------


async def test_the_app_stops_gracefully_on_sigterm() -> None:
    """The drills' app does what a graceful stop means: on SIGTERM it closes its idle keep-alive
    connections at once, refuses new ones, finishes the request in flight with a 200 and
    exits 0. Otherwise the graceful drills would measure something else."""
    async with instances("solo") as (app,):
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", app.port)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", app.port)
        try:
            idle_writer.write(b"GET /w HTTP/1.1\r\nHost: app\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await idle_reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
                await idle_reader.readuntil(b"done")
            busy_writer.write(b"GET /slow?delay=0.8 HTTP/1.1\r\nHost: app\r\n\r\n")
            await asyncio.sleep(0.2)  # the slow request is in the handler
            assert app.process is not None
            app.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(0.5):  # the idle connection is closed at once
                assert await idle_reader.read() == b""
            await wait_for(lambda: not port_open(app.port), timeout=0.5)
            async with asyncio.timeout(5):
                head = await busy_reader.readuntil(b"\r\n")
                rest = await busy_reader.read()  # and then the connection closes
            assert head.startswith(b"HTTP/1.1 200"), head
            assert rest.endswith(b"slow done"), rest
            await wait_for(lambda: app.process is not None and app.process.poll() is not None,
                           timeout=5)
            assert app.process.returncode == 0
        finally:
            idle_writer.close()
            busy_writer.close()


# --- rolling restarts, the config a new user writes -------------------------------------------


@pytest.mark.parametrize("how", ["graceful", "crash"])
async def test_rolling_restart_of_three_instances_with_a_plain_config(start_proxy, how: str,
                                                                      ) -> None:
    """Each of three instances in turn is stopped (SIGTERM, or SIGKILL) under load and started
    again on its port a second later. With no health, retry or outlier keys: 0 failed
    requests across graceful restarts; across crashes at most the requests in flight to the
    instance when it died."""
    async with instances("app0", "app1", "app2") as apps:
        proxy = await start_proxy(one_service(*(app.address for app in apps)))
        pools = {app.name: proxy.pools.pools[app.address] for app in apps}
        in_flight: list[int] = []
        back_after: list[float] = []
        async with aiohttp.ClientSession() as checks, Load(proxy.port) as load:
            await wait_served(load, list(pools), 50)
            for app in apps:
                load.step = f"{app.name} stopping"
                if how == "graceful":
                    code = await app.stop()
                    assert code == 0, f"{app.name} exited {code} after SIGTERM"
                else:
                    app.kill()
                    # Sent to it before it died and not answered: nothing can have been sent
                    # since, as the loop has not run in between.
                    in_flight.append(len(pools[app.name].active))
                load.step = f"{app.name} down"
                await asyncio.sleep(DOWN_SECONDS)
                app.start()
                await app.serving(checks)
                load.step = f"{app.name} back"
                restarted = time.monotonic()
                # Back in rotation before the next one goes.
                await wait_served(load, [app.name], 20, since=restarted)
                back_after.append(min(o.started for o in load.outcomes
                                      if o.backend == app.name and o.started >= restarted)
                                  - restarted)
            load.step = "after"
            settled = time.monotonic()
            await wait_served(load, list(pools), 20, since=settled)

    served = Counter(o.backend for o in load.outcomes if o.status == 200)
    print(f"\n{how}: served {dict(served)}, in flight at each crash {in_flight}, back in "
          f"rotation {[round(t, 3) for t in back_after]} s after each restart\n{load.report()}")
    if how == "graceful":
        assert not load.failures, load.report()
    else:
        assert len(load.failures) <= sum(in_flight), (in_flight, load.report())


# --- one of two upstreams dies, only health_check set ------------------------------------------


async def test_killing_one_of_two_upstreams_with_only_health_checks_costs_what_was_in_flight(
        start_proxy) -> None:
    """With only ``health_check: {interval: 1s}`` (three failed checks to go out): the dead
    upstream's refused connects must neither fail requests nor draw traffic to it while the
    checks catch up. One request in ten is a POST."""
    async with instances("a", "b") as (a, b):
        proxy = await start_proxy(one_service(a.address, b.address,
                                              health_check={"interval": "1s"}))
        pool_a = proxy.pools.pools[a.address]
        async with Load(proxy.port, post_every=10) as load:
            await wait_served(load, ["a", "b"], 200)
            load.step = "a killed"
            a.kill()
            in_flight = len(pool_a.active)
            killed = time.monotonic()
            # Past three failed checks, the window in which the old default failed requests.
            await wait_for(lambda: time.monotonic() > killed + 4
                           and load.served("b", since=killed) >= 300, timeout=15)
    print(f"\n{in_flight} in flight on a when it died\n{load.report()}")
    assert len(load.failures) <= in_flight, (in_flight, load.report())


# --- the deploy script: drain, stop, start, undrain -------------------------------------------


async def weir_cli(*args: str, admin: str, timeout: float = 40.0) -> tuple[int, str]:
    """``python -m proxy ARGS --admin URL`` as a subprocess, without blocking the loop (Weir
    runs in it); returns the exit code and its output."""
    env = {k: v for k, v in os.environ.items() if k != "WEIR_ADMIN_URL"}
    env["WEIR_ADMIN_TOKEN"] = TOKEN
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, "--admin", admin, cwd=REPO_ROOT, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"weir {' '.join(args)} did not finish within {timeout} s"
                             ) from None
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_deploy_script_drain_stop_start_undrain_fails_nothing(weir) -> None:
    """For each of three instances: ``weir drain ADDR --wait`` → SIGTERM → start it again →
    ``weir undrain ADDR``, under load with POSTs, and no health checks: 0 failed requests, and
    nothing sent to an instance between its drain and its undrain."""
    async with instances("app0", "app1", "app2") as apps:
        live = await weir(one_service(*(app.address for app in apps)))
        admin = live.admin_url
        async with aiohttp.ClientSession() as checks, \
                Load(live.port, post_every=10) as load:
            await wait_served(load, [app.name for app in apps], 50)
            for app in apps:
                load.step = f"{app.name} draining"
                code, output = await weir_cli("drain", app.address, "--wait", "--timeout", "20s",
                                              admin=admin)
                assert code == 0, f"weir drain {app.address} --wait exited {code}:\n{output}"
                drained = time.monotonic()
                load.step = f"{app.name} drained, stopping"
                code = await app.stop()
                assert code == 0, f"{app.name} exited {code} after SIGTERM"
                load.step = f"{app.name} down"
                await asyncio.sleep(DOWN_SECONDS)
                app.start()
                await app.serving(checks)
                load.step = f"{app.name} undraining"
                undraining = time.monotonic()
                code, output = await weir_cli("undrain", app.address, admin=admin)
                assert code == 0, f"weir undrain {app.address} exited {code}:\n{output}"
                undrained = time.monotonic()
                load.step = f"{app.name} back"
                await wait_served(load, [app.name], 20, since=undrained)
                # Counted now, with every request sent before the undrain answered.
                sent_while_drained = load.served(app.name, since=drained, until=undraining)
                assert sent_while_drained == 0, \
                    f"{sent_while_drained} requests sent to {app.name} after its drain returned"
            load.step = "after"

    posts = sum(1 for o in load.outcomes if o.method == "POST")
    print(f"\n{posts} POSTs\n{load.report()}")
    assert posts > 50, "the load had too few POSTs to say anything about them"
    assert not load.failures, load.report()


# --- slow start ---------------------------------------------------------------------------------


WINDOW = 4.0


async def test_slow_start_ramps_an_undrained_instance_over_the_window(weir) -> None:
    """With ``slow_start: {window: 4s}``, an instance that comes back (undrained) while the
    others serve gets a share that grows over the window: in its first second under half of
    its full share (its share before the drain), by the last second more than in the first,
    and near its full share after the window."""
    async with instances("app0", "app1", "app2") as apps:
        service = one_service(*(app.address for app in apps),
                              slow_start={"window": f"{WINDOW:g}s"})
        try:
            live = await weir(service)
        except Exception as exc:
            pytest.fail(f"a service's slow_start is not accepted yet: {exc}")
        target = apps[2]
        pool = live.control.proxy.pools.pools[target.address]
        async with Load(live.port) as load:
            await wait_served(load, [app.name for app in apps], 50)
            before = time.monotonic()
            await asyncio.sleep(2.0)  # its share while everything serves
            full = load.share(target.name, before, time.monotonic())

            status, body = await api(live, "/api/upstreams/drain", {"upstream": target.address})
            assert status == 200, (status, body)
            await wait_for(lambda: not pool.active, timeout=10)
            drained = time.monotonic()
            await asyncio.sleep(0.5)
            assert load.served(target.name, since=drained) == 0
            status, body = await api(live, "/api/upstreams/undrain", {"upstream": target.address})
            assert status == 200, (status, body)
            back = time.monotonic()
            await asyncio.sleep(WINDOW + 2.5)

    seconds = [load.share(target.name, back + i, back + i + 1) for i in range(int(WINDOW))]
    after = load.share(target.name, back + WINDOW + 0.5, back + WINDOW + 2.5)
    shares = f"full share {full:.3f}; per second of the window " \
             f"{[round(s, 3) for s in seconds]}; after it {after:.3f}"
    print(f"\n{shares}\n{load.report()}")
    assert full > 0.2, f"the three instances did not share the load: {shares}"
    assert not load.failures, load.report()
    assert seconds[0] < full / 2, f"its first second is not under half its full share: {shares}"
    assert seconds[-1] > seconds[0], f"no growth over the window: {shares}"
    for earlier, later in itertools.pairwise(seconds):
        assert later >= earlier - 0.06, f"its share fell during the window: {shares}"
    assert after >= 0.75 * full, f"not near its full share after the window: {shares}"


async def api(live: Weir, path: str, body: dict[str, str]) -> tuple[int, str]:
    async with live.session.post(live.admin_url + path, json=body,
                                 headers=AUTH) as response:
        return response.status, await response.text()


# --- bench/rolling.py, the same drill against Weir, nginx and HAProxy -------------------------


def test_bench_rolling_runs_and_stops_what_it_started(tmp_path) -> None:
    """A short Weir-only run of bench/rolling.py: it drills, writes its table and JSON, and
    leaves none of its app instances listening."""
    out = tmp_path / "rolling.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "rolling.py"), "--weir-only",
         "--instances", "2", "--down", "0.3", "--settle", "0.3", "--warmup", "0.3",
         "--max-seconds", "60", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "graceful restarts failed" in done.stdout, done.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["name"] == "weir"
    assert list(result["kinds"]) == ["graceful", "crash"]
    for kind in result["kinds"].values():
        assert kind["total"] > 0, result
    assert len(result["kinds"]["crash"]["in_flight"]) == 2, result
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", result["config"])]
    assert len(ports) == 4, result["config"]  # listen, admin and the two instances
    assert not any(port_open(port) for port in ports)
