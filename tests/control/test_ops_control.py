"""Operating Weir live: the admin API, hot reload (API, file watcher, SIGHUP), and runtime state
that survives restarts and merges with the config file field by field.

Everything here is real: aiohttp backends and the proxy on 127.0.0.1, config files in tmp_path,
the watchfiles watcher on the real file system, Weir subprocesses for restarts and signals.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.admin.api import AdminServer
from proxy.config.loader import parse_config
from proxy.config.model import ConfigError
from proxy.control.plane import ControlPlane

from ..conftest import (
    AUTH,
    REPO_ROOT,
    TOKEN,
    Backend,
    RestartableWeir,
    control_plane,
    free_port,
    sample,
    wait_for,
)

NO_BODY = object()

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and inotify")


# --- configs --------------------------------------------------------------------------------


def shop_config(blue: Backend, green: Backend, **top: Any) -> dict[str, Any]:
    """One service, `shop`, with versions blue (all traffic) and green (none)."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "watch": False,
        "services": [{
            "name": "shop",
            "versions": {"blue": {"upstreams": [blue.address]},
                         "green": {"upstreams": [green.address]}},
            "weights": {"blue": 100, "green": 0},
        }],
    }
    data.update(top)
    return data


BETA_RULE = {"match": {"headers": {"x-beta": "please"}}, "version": "green"}


def write_config(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def parses(text: str) -> bool:
    try:
        parse_config(yaml.safe_load(text), "<half>")
    except (ConfigError, yaml.YAMLError):
        return False
    return True


# --- clients --------------------------------------------------------------------------------


class Api:
    """A small JSON client of the admin API."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = NO_BODY, *,
                   raw: bytes | None = None, headers: dict[str, str] | None = None,
                   auth: bool = True) -> tuple[int, Any]:
        sent = dict(AUTH if auth else {})
        sent.update(headers or {})
        kwargs: dict[str, Any] = {}
        if raw is not None:
            kwargs["data"] = raw
            sent.setdefault("Content-Type", "application/json")
        elif body is not NO_BODY:
            kwargs["json"] = body
        async with self.session.request(method, self.base + path, headers=sent,
                                        **kwargs) as response:
            text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    async def status(self) -> dict[str, Any]:
        code, data = await self.call("GET", "/api/status", auth=False)
        assert code == 200, data
        return data

    async def service(self, name: str = "shop") -> dict[str, Any]:
        return next(s for s in (await self.status())["services"] if s["name"] == name)

    async def metrics(self) -> str:
        async with self.session.get(self.base + "/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def wait_status(self, predicate: Callable[[dict[str, Any]], bool],
                          timeout: float = 5.0) -> dict[str, Any]:
        """Poll /api/status until the predicate holds (deadline: timeout)."""
        async with asyncio.timeout(timeout):
            while True:
                status = await self.status()
                if predicate(status):
                    return status
                await asyncio.sleep(0.02)


def reloads(exposition: str, outcome: str) -> float:
    value = sample(exposition, "weir_config_reloads_total", outcome=outcome)
    assert value is not None, exposition
    return value


async def versions_served(port: int, count: int = 30,
                          headers: dict[str, str] | None = None) -> Counter[str]:
    """Send `count` requests through the data port; count the x-weir-version of each."""
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(count):
            async with session.get(f"http://127.0.0.1:{port}/item",
                                   headers=headers or {}) as response:
                assert response.status == 200, await response.text()
                await response.read()
                version = response.headers["x-weir-version"]
                assert response.headers["x-backend"] == version  # the label is the truth
                seen[version] += 1
    return seen


# --- Weir in-process --------------------------------------------------------------------------


@dataclass
class Live:
    control: ControlPlane
    admin: AdminServer
    path: Path
    api: Api

    @property
    def port(self) -> int:
        return self.control.proxy.port


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Live]]]:
    """Start the control plane, data plane and admin API in this event loop from a real file."""
    started: list[tuple[Live, aiohttp.ClientSession]] = []

    async def start(data: dict[str, Any], name: str = "weir.yaml") -> Live:
        path = tmp_path / name
        write_config(path, data)
        control = control_plane(path)
        await control.proxy.start()
        admin = AdminServer(control)
        await admin.start()
        session = aiohttp.ClientSession()
        weir = Live(control, admin, path, Api(session, f"http://127.0.0.1:{admin.port}"))
        started.append((weir, session))
        if control.config.watch:
            control.start_watching()
            directory = path.parent
            await wait_for(lambda: directory.stat().st_ino in inotify_watched_inodes(),
                           timeout=5)
        return weir

    yield start
    for weir, session in started:
        await session.close()
        await weir.control.stop_watching()
        await weir.control.proxy.shutdown(1)
        await weir.admin.stop()


def inotify_watched_inodes(pid: str = "self") -> set[int]:
    """Inodes watched by this process's inotify instances (the watcher is ready once its
    directory is among them)."""
    inodes: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("inotify "):
                        fields = dict(f.split(":", 1) for f in line.split()[1:])
                        inodes.add(int(fields["ino"], 16))
        except OSError:
            continue
    return inodes


# --- Weir as a subprocess ---------------------------------------------------------------------


@dataclass
class Sub:
    run: RestartableWeir
    port: int
    api: Api
    session: aiohttp.ClientSession


@pytest.fixture
async def weir_run(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Sub]]]:
    """Write a config with fixed ports to tmp_path and run Weir on it as a subprocess."""
    runs: list[RestartableWeir] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def start(data: dict[str, Any]) -> Sub:
        port, admin_port = free_port(), free_port()
        data = {**data, "listen": f"127.0.0.1:{port}",
                "admin": {**data["admin"], "listen": f"127.0.0.1:{admin_port}"}}
        path = tmp_path / f"weir-{len(runs)}.yaml"
        write_config(path, data)
        run = RestartableWeir(path, admin_port, tmp_path / f"weir-{len(runs)}.log")
        runs.append(run)
        await run.start(session)
        return Sub(run, port, Api(session, f"http://127.0.0.1:{admin_port}"), session)

    yield start
    await session.close()
    for run in runs:
        if run.process is not None and run.process.poll() is None:
            run.process.terminate()
            try:
                run.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                run.kill()


# === admin API: tokens ========================================================================

MUTATIONS = [
    ("PUT", "/api/services/shop/weights", {"weights": {"blue": 0, "green": 100}}),
    ("POST", "/api/services/shop/switch", {"to": "green"}),
    ("POST", "/api/reload", NO_BODY),
]
MUTATION_IDS = ["weights", "switch", "reload"]


async def assert_untouched(weir: Live, generation: int = 1) -> None:
    """Nothing changed: file weights in force, same generation, traffic still on blue."""
    status = await weir.api.status()
    assert status["generation"] == generation
    [shop] = status["services"]
    assert shop["weights"] == {"blue": 100, "green": 0}
    assert shop["weights_source"] == "file"
    assert await versions_served(weir.port, 10) == Counter(blue=10)


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=MUTATION_IDS)
async def test_mutations_without_or_with_wrong_token_are_401(start_backend, live, method,
                                                             path, body):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    weir = await live(data)
    # A valid edit waits in the file: a reload that slipped through would show.
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, data)

    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN},
                    {"Authorization": "Bearer "}):
        code, reply = await weir.api.call(method, path, body, headers=headers, auth=False)
        assert code == 401, (headers, reply)
        assert isinstance(reply, dict) and reply.get("error"), reply
    await assert_untouched(weir)
    assert not (await weir.api.service())["rules"]

    # The right token works (so the 401s above were about the token alone).
    code, reply = await weir.api.call(method, path, body)
    assert code == 200, reply


@pytest.mark.parametrize("token", [None, ""], ids=["absent", "empty"])
@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=MUTATION_IDS)
async def test_without_configured_token_mutations_are_refused(start_backend, live, token,
                                                              method, path, body):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    if token is None:
        del data["admin"]["token"]
    else:
        data["admin"]["token"] = token
    weir = await live(data)
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, data)

    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"},
                    {"Authorization": f"Bearer {TOKEN}"}):
        code, reply = await weir.api.call(method, path, body, headers=headers, auth=False)
        assert code == 401, reply
        assert "admin.token" in reply["error"], reply  # says how to enable mutations
    await assert_untouched(weir)


async def test_reads_need_no_token(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await live(shop_config(blue, green))
    for path in ("/api/status", "/healthz", "/readyz", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            code, reply = await weir.api.call("GET", path, headers=headers, auth=False)
            assert code == 200, (path, reply)
    code, reply = await weir.api.call("GET", "/readyz", auth=False)
    assert (code, reply) == (200, {"status": "ready"})
    status = await weir.api.status()
    assert status["ready"] is True
    assert status["config_file"] == str(weir.path)
    assert status["last_reload"]["outcome"] == "success"


# === admin API: bad requests ==================================================================

BAD_WEIGHTS = [
    pytest.param(b"", id="empty-body"),
    pytest.param(b"{weights: nope", id="not-json"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b"[1, 2]", id="array"),
    pytest.param(b'"weights"', id="string"),
    pytest.param(b"null", id="null"),
    pytest.param(b"{}", id="missing-weights"),
    pytest.param(b'{"weights": null}', id="weights-null"),
    pytest.param(b'{"weights": {}}', id="weights-empty"),
    pytest.param(b'{"weights": [100, 0]}', id="weights-list"),
    pytest.param(b'{"weights": {"blue": -1, "green": 100}}', id="negative"),
    pytest.param(b'{"weights": {"blue": 50.5}}', id="float"),
    pytest.param(b'{"weights": {"blue": "50"}}', id="string-weight"),
    pytest.param(b'{"weights": {"blue": true}}', id="bool"),
    pytest.param(b'{"weights": {"blue": null}}', id="null-weight"),
    pytest.param(b'{"weights": {"blue": 0, "green": 0}}', id="all-zero"),
]
BAD_SWITCH = [
    pytest.param(b"", id="empty-body"),
    pytest.param(b"green", id="not-json"),
    pytest.param(b'["green"]', id="array"),
    pytest.param(b"{}", id="missing-to"),
    pytest.param(b'{"to": ""}', id="to-empty"),
    pytest.param(b'{"to": 1}', id="to-int"),
    pytest.param(b'{"to": ["green"]}', id="to-list"),
]


async def test_bad_bodies_are_400_and_change_nothing(start_backend, live, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "state.json"
    weir = await live(shop_config(blue, green, state_file=str(state)))
    cases = ([("PUT", "/api/services/shop/weights", p.values[0], p.id) for p in BAD_WEIGHTS]
             + [("POST", "/api/services/shop/switch", p.values[0], p.id) for p in BAD_SWITCH])
    for method, path, raw, name in cases:
        code, reply = await weir.api.call(method, path, raw=raw)
        assert code == 400, (path, name, reply)
        assert isinstance(reply, dict) and isinstance(reply.get("error"), str), (name, reply)
        assert reply["error"], name
    await assert_untouched(weir)
    assert not state.exists()  # nothing was persisted


async def test_unknown_service_or_version_is_404(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await live(shop_config(blue, green))
    cases = [
        ("PUT", "/api/services/nope/weights", {"weights": {"blue": 100}}),
        ("PUT", "/api/services/nope/weights", {"bad": "body"}),  # 404 comes before 400
        ("PUT", "/api/services/shop/weights", {"weights": {"purple": 100}}),
        ("PUT", "/api/services/shop/weights", {"weights": {"blue": 50, "purple": 50}}),
        ("POST", "/api/services/nope/switch", {"to": "blue"}),
        ("POST", "/api/services/shop/switch", {"to": "purple"}),
    ]
    for method, path, body in cases:
        code, reply = await weir.api.call(method, path, body)
        assert code == 404, (path, body, reply)
        assert isinstance(reply, dict) and reply.get("error"), reply
    await assert_untouched(weir)


# === weights and switch drive real traffic ===================================================


async def test_weights_and_switch_change_real_traffic(start_backend, live, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await live(shop_config(blue, green, state_file=str(tmp_path / "state.json")))
    assert await versions_served(weir.port, 20) == Counter(blue=20)

    code, reply = await weir.api.call("PUT", "/api/services/shop/weights",
                                      {"weights": {"blue": 0, "green": 100}})
    assert (code, reply["weights"]) == (200, {"blue": 0, "green": 100})
    before = len(green.requests)
    assert await versions_served(weir.port, 50) == Counter(green=50)
    assert len(green.requests) - before == 50  # the backends agree with the labels
    shop = await weir.api.service()
    assert shop["weights"] == {"blue": 0, "green": 100}
    assert shop["weights_source"] == "api"
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="blue") == 0
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 100

    code, reply = await weir.api.call("POST", "/api/services/shop/switch", {"to": "blue"})
    assert (code, reply["weights"]) == (200, {"blue": 100, "green": 0})
    assert await versions_served(weir.port, 50) == Counter(blue=50)
    shop = await weir.api.service()
    assert shop["weights"] == {"blue": 100, "green": 0}
    assert shop["weights_source"] == "api"
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="blue") == 100
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 0

    # Versions left out get 0; a split sends traffic to both.
    code, reply = await weir.api.call("PUT", "/api/services/shop/weights",
                                      {"weights": {"green": 3}})
    assert (code, reply["weights"]) == (200, {"blue": 0, "green": 3})
    assert await versions_served(weir.port, 20) == Counter(green=20)
    code, _ = await weir.api.call("PUT", "/api/services/shop/weights",
                                  {"weights": {"blue": 50, "green": 50}})
    assert code == 200
    split = await versions_served(weir.port, 200)
    assert split["blue"] >= 50 and split["green"] >= 50, split
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 50


# === reload through the API ===================================================================


async def test_reload_api_applies_a_valid_edit(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    weir = await live(data)
    status = await weir.api.status()
    generation = status["generation"]
    metrics = await weir.api.metrics()
    successes, failures = reloads(metrics, "success"), reloads(metrics, "failure")
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(blue=5)

    data["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, data)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    assert reply["outcome"] == "success" and reply["generation"] == generation + 1

    status = await weir.api.status()
    assert status["generation"] == generation + 1
    assert status["last_reload"]["outcome"] == "success"
    assert status["last_reload"]["trigger"] == "api"
    assert status["last_reload"]["errors"] == []
    assert status["services"][0]["rules"] == 1
    assert await versions_served(weir.port, 10, {"x-beta": "please"}) == Counter(green=10)
    assert await versions_served(weir.port, 10) == Counter(blue=10)
    metrics = await weir.api.metrics()
    assert reloads(metrics, "success") == successes + 1
    assert reloads(metrics, "failure") == failures
    assert sample(metrics, "weir_config_generation") == generation + 1


async def test_reload_api_rotates_the_admin_token(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    weir = await live(data)
    data["admin"]["token"] = "the-new-token"
    write_config(weir.path, data)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    switch = ("POST", "/api/services/shop/switch", {"to": "green"})
    code, _ = await weir.api.call(*switch)  # the old token
    assert code == 401
    code, _ = await weir.api.call(*switch, auth=False,
                                  headers={"Authorization": "Bearer the-new-token"})
    assert code == 200
    assert await versions_served(weir.port, 10) == Counter(green=10)


def bad_duration(data: dict[str, Any]) -> None:
    data["services"][0]["drain"] = {"timeout": "soonish"}


def typo_field(data: dict[str, Any]) -> None:
    data["services"][0]["wieghts"] = data["services"][0].pop("weights")


def unknown_version_weight(data: dict[str, Any]) -> None:
    data["services"][0]["weights"] = {"blue": 50, "purple": 50}


@pytest.mark.parametrize(("edit", "field"), [
    (bad_duration, "services[0].drain.timeout"),
    (typo_field, "services[0].wieghts"),
    (unknown_version_weight, "services[0].weights.purple"),
], ids=["bad-duration", "typo", "unknown-version"])
async def test_reload_api_rejects_an_invalid_edit_and_keeps_serving(start_backend, live,
                                                                    edit, field):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    weir = await live(data)
    generation = (await weir.api.status())["generation"]
    metrics = await weir.api.metrics()
    successes, failures = reloads(metrics, "success"), reloads(metrics, "failure")

    good = json.loads(json.dumps(data))
    data["services"][0]["rules"] = [BETA_RULE]  # would be visible if the reload applied
    edit(data)
    write_config(weir.path, data)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 422, reply
    assert reply["error"] and reply["outcome"] == "failure"
    assert any(e.startswith(field) for e in reply["errors"]), reply["errors"]

    status = await weir.api.status()
    assert status["generation"] == generation
    assert status["last_reload"]["outcome"] == "failure"
    assert status["last_reload"]["trigger"] == "api"
    assert any(e.startswith(field) for e in status["last_reload"]["errors"])
    assert status["services"][0]["rules"] == 0
    # The old config keeps serving, rule-less.
    assert await versions_served(weir.port, 10, {"x-beta": "please"}) == Counter(blue=10)
    metrics = await weir.api.metrics()
    assert reloads(metrics, "failure") == failures + 1
    assert reloads(metrics, "success") == successes
    assert sample(metrics, "weir_config_generation") == generation

    # Fixing the file and reloading again recovers.
    good["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, good)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    status = await weir.api.status()
    assert status["generation"] == generation + 1
    assert status["last_reload"]["outcome"] == "success"
    assert status["last_reload"]["errors"] == []
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(green=5)


async def test_reload_api_with_broken_yaml(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await live(shop_config(blue, green))
    weir.path.write_text("services: [\n  {name: shop, versions: {\n", encoding="utf-8")
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 422, reply
    assert any("YAML" in e for e in reply["errors"]), reply
    await assert_untouched(weir)


# === reload by the file watcher ==============================================================


async def wait_generation(api: Api, generation: int, timeout: float = 5.0) -> dict[str, Any]:
    return await api.wait_status(lambda s: s["generation"] >= generation, timeout)


async def test_watcher_applies_a_valid_edit(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    weir = await live(data)
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, data)
    status = await wait_generation(weir.api, 2)
    assert status["last_reload"]["trigger"] == "file"
    assert status["last_reload"]["outcome"] == "success"
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(green=5)
    assert reloads(await weir.api.metrics(), "failure") == 0


async def test_watcher_reports_a_stable_invalid_file_once(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    weir = await live(data)
    bad = json.loads(json.dumps(data))
    bad_duration(bad)
    write_config(weir.path, bad)
    status = await weir.api.wait_status(lambda s: s["last_reload"]["outcome"] == "failure")
    assert status["last_reload"]["trigger"] == "file"
    assert any(e.startswith("services[0].drain.timeout") for e in
               status["last_reload"]["errors"])
    assert status["generation"] == 1
    assert await versions_served(weir.port, 5) == Counter(blue=5)
    # A later valid edit is applied; by then every earlier event was handled, and the invalid
    # file was reported exactly once.
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, data)
    await wait_generation(weir.api, 2)
    assert reloads(await weir.api.metrics(), "failure") == 1


@pytest.mark.parametrize("gap", [0.05, 0.2], ids=["50ms", "200ms"])
async def test_watcher_waits_out_a_half_written_save(start_backend, live, gap):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    weir = await live(data)

    data["services"][0]["rules"] = [BETA_RULE]
    data["services"][0]["weights"] = {"blue": 0, "green": 100}
    text = yaml.safe_dump(data, sort_keys=False)
    # About half the file, cut where the part written first is not a valid config.
    half = next(i for i in range(len(text) // 2, len(text)) if not parses(text[:i]))
    await save_in_two_steps(weir.path, text, half, gap)

    status = await weir.api.wait_status(
        lambda s: s["services"][0]["weights"] == {"blue": 0, "green": 100})
    assert status["last_reload"]["outcome"] == "success"
    assert status["services"][0]["rules"] == 1
    assert status["services"][0]["weights_source"] == "file"
    assert await versions_served(weir.port, 10) == Counter(green=10)

    # A sentinel edit: once it is applied, the watcher has handled every event before it.
    data["services"][0]["drain"] = {"timeout": "5s"}
    write_config(weir.path, data)
    status = await wait_generation(weir.api, 3)
    assert reloads(await weir.api.metrics(), "failure") == 0
    assert status["last_reload"]["outcome"] == "success"
    assert status["generation"] == 3  # one reload for the save, one for the sentinel


async def save_in_two_steps(path: Path, text: str, cut: int, gap: float) -> None:
    """Save like an editor that writes in two steps: truncate and write text[:cut], then the
    rest `gap` seconds later."""
    raw = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, raw[:cut])
        await asyncio.sleep(gap)  # the editor's pause between its two writes (the stimulus)
        os.write(fd, raw[cut:])
    finally:
        os.close(fd)


async def test_watcher_never_applies_the_first_step_of_a_save(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    weir = await live(data)

    data["services"][0]["weights"] = {"blue": 0, "green": 100}
    text = yaml.safe_dump(data, sort_keys=False)
    assert text.endswith("green: 100\n")
    cut = len(text) - len("0\n")  # "green: 10": valid, but not what is being saved
    assert parses(text[:cut])

    seen: set[tuple[tuple[str, int], ...]] = set()

    async def record_tables() -> None:
        while True:
            seen.add(tuple(sorted(weir.control.proxy.table.routes[0].weights.items())))
            await asyncio.sleep(0.002)

    recorder = asyncio.create_task(record_tables())
    try:
        await save_in_two_steps(weir.path, text, cut, 0.2)
        await weir.api.wait_status(
            lambda s: s["services"][0]["weights"] == {"blue": 0, "green": 100})
        data["services"][0]["drain"] = {"timeout": "5s"}  # the sentinel edit
        write_config(weir.path, data)
        status = await wait_generation(weir.api, 3)
    finally:
        recorder.cancel()
    assert (("blue", 0), ("green", 10)) not in seen, seen
    assert status["generation"] == 3


async def test_watcher_picks_up_temp_file_renamed_over_the_config(start_backend, live):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    weir = await live(data)

    for round_, weights in enumerate(({"blue": 0, "green": 100}, {"blue": 100, "green": 0})):
        data["services"][0]["weights"] = weights
        temp = weir.path.with_name(f".{weir.path.name}.{round_}.tmp")
        write_config(temp, data)
        os.replace(temp, weir.path)  # a new inode each time: the watch must follow the name
        status = await weir.api.wait_status(lambda s, w=weights: s["services"][0]["weights"] == w)
        assert status["generation"] >= 2 + round_
        assert status["last_reload"]["trigger"] == "file"
        expected = "green" if weights["green"] else "blue"
        assert await versions_served(weir.port, 10) == Counter({expected: 10})
    assert reloads(await weir.api.metrics(), "failure") == 0


async def test_watcher_follows_configmap_symlink_swaps(start_backend, live, tmp_path):
    """A ConfigMap volume: weir.yaml -> ..data/weir.yaml, ..data -> ..<timestamp>/. Kubelet
    updates by writing a new timestamped directory, renaming a new '..data' symlink over the
    old one, then deleting the old directory."""
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    volume = tmp_path / "configmap"
    volume.mkdir()
    first = volume / "..2024_01_01_00_00_00.000000001"
    first.mkdir()
    write_config(first / "weir.yaml", data)
    (volume / "..data").symlink_to(first.name)
    (volume / "weir.yaml").symlink_to("..data/weir.yaml")

    # Start from the ConfigMap path (the live fixture writes a plain file; do it by hand).
    path = volume / "weir.yaml"
    control = control_plane(path)
    await control.proxy.start()
    admin = AdminServer(control)
    await admin.start()
    try:
        control.start_watching()
        either = {volume.stat().st_ino, first.stat().st_ino}
        await wait_for(lambda: bool(either & inotify_watched_inodes()), timeout=5)
        old = first
        for round_, weights in enumerate(({"blue": 0, "green": 100},
                                          {"blue": 100, "green": 0})):
            data["services"][0]["weights"] = weights
            new = volume / f"..2024_01_01_00_00_0{round_ + 1}.000000001"
            new.mkdir()
            write_config(new / "weir.yaml", data)
            (volume / "..data_tmp").symlink_to(new.name)
            os.replace(volume / "..data_tmp", volume / "..data")
            shutil.rmtree(old)
            old = new
            await wait_for(lambda w=weights: control.proxy.table.routes[0].weights == w,
                           timeout=3)
            assert control.generation == 2 + round_
    finally:
        await control.stop_watching()
        await control.proxy.shutdown(1)
        await admin.stop()


# === SIGHUP to a real process ================================================================


async def test_sighup_reloads_a_running_weir(start_backend, weir_run):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, shutdown={"delay": "500ms", "timeout": "2s"})
    weir = await weir_run(data)
    assert (await weir.api.status())["generation"] == 1
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(blue=5)

    on_disk = yaml.safe_load(weir.run.path.read_text())
    on_disk["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.run.path, on_disk)
    weir.run.send(signal.SIGHUP)
    status = await wait_generation(weir.api, 2)
    assert status["last_reload"]["trigger"] == "signal"
    assert status["last_reload"]["outcome"] == "success"
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(green=5)

    # An invalid file on SIGHUP: reported, the process lives on, the old config serves.
    bad = json.loads(json.dumps(on_disk))
    bad_duration(bad)
    write_config(weir.run.path, bad)
    weir.run.send(signal.SIGHUP)
    status = await weir.api.wait_status(lambda s: s["last_reload"]["outcome"] == "failure")
    assert status["generation"] == 2
    assert weir.run.process is not None and weir.run.process.poll() is None
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(green=5)
    assert reloads(await weir.api.metrics(), "failure") == 1

    # SIGTERM: /readyz turns 503 during the shutdown delay, then the process exits 0.
    process = weir.run.process
    weir.run.send(signal.SIGTERM)

    async def readyz() -> int:
        try:
            code, _ = await weir.api.call("GET", "/readyz", auth=False)
            return code
        except aiohttp.ClientError:
            return -1

    async with asyncio.timeout(5):
        while (code := await readyz()) == 200:
            await asyncio.sleep(0.02)
    assert code == 503
    await wait_for(lambda: process.poll() is not None, timeout=10)
    assert process.returncode == 0, weir.run.output()


def wait_port_open(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll a port every millisecond (a blocking loop: run it in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.001)
    raise AssertionError(f"port {port} never opened (exit code {process.poll()})")


async def test_sighup_as_soon_as_the_port_opens_does_not_kill_weir(start_backend, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    port, admin_port = free_port(), free_port()
    data = shop_config(blue, green)
    data["listen"] = f"127.0.0.1:{port}"
    data["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    path = tmp_path / "weir.yaml"
    write_config(path, data)
    process = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(path)],
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        await asyncio.to_thread(wait_port_open, port, process, 15)
        process.send_signal(signal.SIGHUP)  # e.g. a config tool reloading a fresh start
        api = Api(session := aiohttp.ClientSession(), f"http://127.0.0.1:{admin_port}")
        async with session:
            async def answering() -> bool:
                try:
                    return (await api.call("GET", "/healthz", auth=False))[0] == 200
                except aiohttp.ClientError:
                    return False

            async with asyncio.timeout(10):
                while process.poll() is None and not await answering():
                    await asyncio.sleep(0.02)
        assert process.poll() is None, f"Weir died with exit code {process.returncode}"
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


# === runtime state ===========================================================================


def read_state(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


async def test_runtime_state_survives_restarts_and_merges_per_field(start_backend, weir_run,
                                                                    tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    weir = await weir_run(shop_config(blue, green, state_file=str(state)))
    assert not state.exists()

    code, _ = await weir.api.call("PUT", "/api/services/shop/weights",
                                  {"weights": {"blue": 0, "green": 100}})
    assert code == 200
    saved = read_state(state)  # exists and is valid JSON
    assert saved["services"]["shop"]["weights"]["weights"] == {"blue": 0, "green": 100}
    assert saved["services"]["shop"]["weights"]["source"] == "api"
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind

    # Restart: the API weights come back.
    assert await weir.run.stop() == 0, weir.run.output()
    await weir.run.start(weir.session)
    shop = await weir.api.service()
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 0, "green": 100}, "api")
    assert await versions_served(weir.port, 20) == Counter(green=20)

    # Another field of the same service changes in the file: the API weights stand.
    on_disk = yaml.safe_load(weir.run.path.read_text())
    on_disk["services"][0]["rules"] = [{"match": {"headers": {"x-old": "1"}},
                                        "version": "blue"}]
    on_disk["services"][0]["drain"] = {"timeout": "7s"}
    write_config(weir.run.path, on_disk)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    shop = await weir.api.service()
    assert shop["rules"] == 1
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 0, "green": 100}, "api")
    assert await versions_served(weir.port, 20) == Counter(green=20)
    assert await versions_served(weir.port, 5, {"x-old": "1"}) == Counter(blue=5)
    assert read_state(state)["services"]["shop"]["weights"]["weights"] == {"blue": 0,
                                                                           "green": 100}

    # The file's weights for the service change: the file is now the newer writer.
    on_disk["services"][0]["weights"] = {"blue": 70, "green": 30}
    write_config(weir.run.path, on_disk)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    shop = await weir.api.service()
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 70, "green": 30}, "file")
    split = await versions_served(weir.port, 200)
    assert split["blue"] >= 100 and split["green"] >= 20, split
    assert "shop" not in read_state(state).get("services", {})

    # ...and that survives another restart.
    assert await weir.run.stop() == 0, weir.run.output()
    await weir.run.start(weir.session)
    shop = await weir.api.service()
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 70, "green": 30}, "file")
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 30


async def test_corrupt_state_file_is_set_aside_at_start(start_backend, weir_run, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    garbage = b'{"format": 1, "services": {"shop": {"weights": {"weights": {"blue": 0, "gr'
    state.write_bytes(garbage)
    weir = await weir_run(shop_config(blue, green, state_file=str(state)))  # it starts

    shop = await weir.api.service()
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 100, "green": 0}, "file")
    assert await versions_served(weir.port, 10) == Counter(blue=10)
    aside = tmp_path / "weir.state.json.corrupt"
    assert aside.read_bytes() == garbage
    assert not state.exists()
    # The next runtime change writes a fresh, valid state file.
    code, _ = await weir.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert code == 200
    assert read_state(state)["services"]["shop"]["weights"]["weights"] == {"blue": 0,
                                                                           "green": 100}
    assert aside.read_bytes() == garbage


def wrong_types_state() -> str:
    """Well-formed JSON whose weights are not integers (a hand edit gone wrong)."""
    return json.dumps({"format": 1, "services": {"shop": {"weights": {
        "weights": {"blue": "lots", "green": 0}, "source": "api",
        "file_weights": {"blue": 100, "green": 0}, "changed_at": 0}}}})


@pytest.mark.parametrize("content", [
    pytest.param("", id="empty"),
    pytest.param("\x00\x00\x00\x00", id="zeros"),
    pytest.param("[1, 2, 3]", id="json-list"),
    pytest.param('{"services": []}', id="services-list"),
    pytest.param('{"services": {"shop": {"weights": {"weights": {}}}}}', id="missing-fields"),
    pytest.param(wrong_types_state(), id="wrong-types"),
])
async def test_unreadable_state_file_does_not_stop_start(start_backend, live, tmp_path,
                                                          content):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    state.write_text(content, encoding="utf-8")
    weir = await live(shop_config(blue, green, state_file=str(state)))
    shop = await weir.api.service()
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 100, "green": 0}, "file")
    assert await versions_served(weir.port, 5) == Counter(blue=5)
    assert (tmp_path / "weir.state.json.corrupt").read_text(encoding="utf-8") == content


async def test_unwritable_state_file_gives_a_json_answer_that_tells_the_truth(start_backend,
                                                                               live, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    weir = await live(shop_config(blue, green, state_file=str(blocker / "weir.state.json")))
    code, reply = await weir.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert isinstance(reply, dict), (code, reply)  # JSON, like every other answer of the API
    shop = await weir.api.service()
    if code == 200:
        assert shop["weights"] == reply["weights"]
    else:
        assert reply.get("error"), reply
        assert shop["weights"] == {"blue": 100, "green": 0}  # an error means no change
        assert await versions_served(weir.port, 5) == Counter(blue=5)


# === an API change to a version the file then removes ========================================


async def test_api_weights_for_a_removed_version_are_dropped_on_reload(start_backend, live,
                                                                       tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    data = shop_config(blue, green, state_file=str(state))
    weir = await live(data)
    code, _ = await weir.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert code == 200
    assert await versions_served(weir.port, 10) == Counter(green=10)

    service = data["services"][0]
    del service["versions"]["green"]
    service["weights"] = {"blue": 100}
    write_config(weir.path, data)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply

    status = await weir.api.status()
    assert status["generation"] == 2
    [shop] = status["services"]
    assert set(shop["versions"]) == {"blue"}
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 100}, "file")
    assert await versions_served(weir.port, 10) == Counter(blue=10)
    assert "shop" not in read_state(state).get("services", {})
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="blue") == 100
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") is None
    code, _ = await weir.api.call("GET", "/healthz", auth=False)
    assert code == 200
    # The API knows the version is gone.
    code, _ = await weir.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert code == 404
    code, reply = await weir.api.call("PUT", "/api/services/shop/weights",
                                      {"weights": {"blue": 7}})
    assert (code, reply["weights"]) == (200, {"blue": 7})
