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
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.loader import parse_config
from proxy.config.model import ConfigError

from ..conftest import (
    NO_BODY,
    TOKEN,
    AdminApi,
    Backend,
    Weir,
    sample,
    wait_for,
    write_config,
)

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


def parses(text: str) -> bool:
    try:
        parse_config(yaml.safe_load(text), "<half>")
    except (ConfigError, yaml.YAMLError):
        return False
    return True


# --- clients --------------------------------------------------------------------------------


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


# === admin API: tokens ========================================================================

MUTATIONS = [
    ("PUT", "/api/services/shop/weights", {"weights": {"blue": 0, "green": 100}}),
    ("POST", "/api/services/shop/switch", {"to": "green"}),
    ("POST", "/api/reload", NO_BODY),
]
MUTATION_IDS = ["weights", "switch", "reload"]


async def assert_untouched(weir: Weir, generation: int = 1) -> None:
    """Nothing changed: file weights in force, same generation, traffic still on blue."""
    status = await weir.api.status()
    assert status["generation"] == generation
    [shop] = status["services"]
    assert shop["weights"] == {"blue": 100, "green": 0}
    assert shop["weights_source"] == "file"
    assert await versions_served(weir.port, 10) == Counter(blue=10)


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=MUTATION_IDS)
async def test_mutations_without_or_with_wrong_token_are_401(start_backend, weir, method,
                                                             path, body):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    w = await weir(data)
    # A valid edit waits in the file: a reload that slipped through would show.
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(w.path, data)

    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"},
                    {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN},
                    {"Authorization": "Bearer "}):
        code, reply = await w.api.call(method, path, body, headers=headers, auth=False)
        assert code == 401, (headers, reply)
        assert isinstance(reply, dict) and reply.get("error"), reply
    await assert_untouched(w)
    assert not (await w.api.service("shop"))["rules"]

    # The right token works (so the 401s above were about the token alone).
    code, reply = await w.api.call(method, path, body)
    assert code == 200, reply


@pytest.mark.parametrize("token", [None, ""], ids=["absent", "empty"])
@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=MUTATION_IDS)
async def test_without_configured_token_mutations_are_refused(start_backend, weir, token,
                                                              method, path, body):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    if token is None:
        del data["admin"]["token"]
    else:
        data["admin"]["token"] = token
    w = await weir(data)
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(w.path, data)

    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"},
                    {"Authorization": f"Bearer {TOKEN}"}):
        code, reply = await w.api.call(method, path, body, headers=headers, auth=False)
        assert code == 401, reply
        assert "admin.token" in reply["error"], reply  # says how to enable mutations
    await assert_untouched(w)


async def test_reads_need_no_token(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir(shop_config(blue, green))
    for path in ("/api/status", "/healthz", "/readyz", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            code, reply = await w.api.call("GET", path, headers=headers, auth=False)
            assert code == 200, (path, reply)
    code, reply = await w.api.call("GET", "/readyz", auth=False)
    assert (code, reply) == (200, {"status": "ready"})
    status = await w.api.status()
    assert status["ready"] is True
    assert status["config_file"] == str(w.path)
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


async def test_bad_bodies_are_400_and_change_nothing(start_backend, weir, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "state.json"
    w = await weir(shop_config(blue, green, state_file=str(state)))
    cases = ([("PUT", "/api/services/shop/weights", p.values[0], p.id) for p in BAD_WEIGHTS]
             + [("POST", "/api/services/shop/switch", p.values[0], p.id) for p in BAD_SWITCH])
    for method, path, raw, name in cases:
        code, reply = await w.api.call(method, path, raw=raw)
        assert code == 400, (path, name, reply)
        assert isinstance(reply, dict) and isinstance(reply.get("error"), str), (name, reply)
        assert reply["error"], name
    await assert_untouched(w)
    assert not state.exists()  # nothing was persisted


async def test_unknown_service_or_version_is_404(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir(shop_config(blue, green))
    cases = [
        ("PUT", "/api/services/nope/weights", {"weights": {"blue": 100}}),
        ("PUT", "/api/services/nope/weights", {"bad": "body"}),  # 404 comes before 400
        ("PUT", "/api/services/shop/weights", {"weights": {"purple": 100}}),
        ("PUT", "/api/services/shop/weights", {"weights": {"blue": 50, "purple": 50}}),
        ("POST", "/api/services/nope/switch", {"to": "blue"}),
        ("POST", "/api/services/shop/switch", {"to": "purple"}),
    ]
    for method, path, body in cases:
        code, reply = await w.api.call(method, path, body)
        assert code == 404, (path, body, reply)
        assert isinstance(reply, dict) and reply.get("error"), reply
    await assert_untouched(w)


# === weights and switch drive real traffic ===================================================


async def test_weights_and_switch_change_real_traffic(start_backend, weir, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir(shop_config(blue, green, state_file=str(tmp_path / "state.json")))
    assert await versions_served(w.port, 20) == Counter(blue=20)

    code, reply = await w.api.call("PUT", "/api/services/shop/weights",
                                      {"weights": {"blue": 0, "green": 100}})
    assert (code, reply["weights"]) == (200, {"blue": 0, "green": 100})
    before = len(green.requests)
    assert await versions_served(w.port, 50) == Counter(green=50)
    assert len(green.requests) - before == 50  # the backends agree with the labels
    shop = await w.api.service("shop")
    assert shop["weights"] == {"blue": 0, "green": 100}
    assert shop["weights_source"] == "api"
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="blue") == 0
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 100

    code, reply = await w.api.call("POST", "/api/services/shop/switch", {"to": "blue"})
    assert (code, reply["weights"]) == (200, {"blue": 100, "green": 0})
    assert await versions_served(w.port, 50) == Counter(blue=50)
    shop = await w.api.service("shop")
    assert shop["weights"] == {"blue": 100, "green": 0}
    assert shop["weights_source"] == "api"
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="blue") == 100
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 0

    # Versions left out get 0; a split sends traffic to both.
    code, reply = await w.api.call("PUT", "/api/services/shop/weights",
                                      {"weights": {"green": 3}})
    assert (code, reply["weights"]) == (200, {"blue": 0, "green": 3})
    assert await versions_served(w.port, 20) == Counter(green=20)
    code, _ = await w.api.call("PUT", "/api/services/shop/weights",
                                  {"weights": {"blue": 50, "green": 50}})
    assert code == 200
    split = await versions_served(w.port, 200)
    assert split["blue"] >= 50 and split["green"] >= 50, split
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 50


# === reload through the API ===================================================================


async def test_reload_api_applies_a_valid_edit(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    w = await weir(data)
    status = await w.api.status()
    generation = status["generation"]
    metrics = await w.api.metrics()
    successes, failures = reloads(metrics, "success"), reloads(metrics, "failure")
    assert await versions_served(w.port, 5, {"x-beta": "please"}) == Counter(blue=5)

    data["services"][0]["rules"] = [BETA_RULE]
    write_config(w.path, data)
    code, reply = await w.api.call("POST", "/api/reload")
    assert code == 200, reply
    assert reply["outcome"] == "success" and reply["generation"] == generation + 1

    status = await w.api.status()
    assert status["generation"] == generation + 1
    assert status["last_reload"]["outcome"] == "success"
    assert status["last_reload"]["trigger"] == "api"
    assert status["last_reload"]["errors"] == []
    assert status["services"][0]["rules"] == 1
    assert await versions_served(w.port, 10, {"x-beta": "please"}) == Counter(green=10)
    assert await versions_served(w.port, 10) == Counter(blue=10)
    metrics = await w.api.metrics()
    assert reloads(metrics, "success") == successes + 1
    assert reloads(metrics, "failure") == failures
    assert sample(metrics, "weir_config_generation") == generation + 1


async def test_reload_api_rotates_the_admin_token(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    w = await weir(data)
    data["admin"]["token"] = "the-new-token"
    write_config(w.path, data)
    code, reply = await w.api.call("POST", "/api/reload")
    assert code == 200, reply
    switch = ("POST", "/api/services/shop/switch", {"to": "green"})
    code, _ = await w.api.call(*switch)  # the old token
    assert code == 401
    code, _ = await w.api.call(*switch, auth=False,
                                  headers={"Authorization": "Bearer the-new-token"})
    assert code == 200
    assert await versions_served(w.port, 10) == Counter(green=10)


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
async def test_reload_api_rejects_an_invalid_edit_and_keeps_serving(start_backend, weir,
                                                                    edit, field):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green)
    w = await weir(data)
    generation = (await w.api.status())["generation"]
    metrics = await w.api.metrics()
    successes, failures = reloads(metrics, "success"), reloads(metrics, "failure")

    good = json.loads(json.dumps(data))
    data["services"][0]["rules"] = [BETA_RULE]  # would be visible if the reload applied
    edit(data)
    write_config(w.path, data)
    code, reply = await w.api.call("POST", "/api/reload")
    assert code == 422, reply
    assert reply["error"] and reply["outcome"] == "failure"
    assert any(e.startswith(field) for e in reply["errors"]), reply["errors"]

    status = await w.api.status()
    assert status["generation"] == generation
    assert status["last_reload"]["outcome"] == "failure"
    assert status["last_reload"]["trigger"] == "api"
    assert any(e.startswith(field) for e in status["last_reload"]["errors"])
    assert status["services"][0]["rules"] == 0
    # The old config keeps serving, rule-less.
    assert await versions_served(w.port, 10, {"x-beta": "please"}) == Counter(blue=10)
    metrics = await w.api.metrics()
    assert reloads(metrics, "failure") == failures + 1
    assert reloads(metrics, "success") == successes
    assert sample(metrics, "weir_config_generation") == generation

    # Fixing the file and reloading again recovers.
    good["services"][0]["rules"] = [BETA_RULE]
    write_config(w.path, good)
    code, reply = await w.api.call("POST", "/api/reload")
    assert code == 200, reply
    status = await w.api.status()
    assert status["generation"] == generation + 1
    assert status["last_reload"]["outcome"] == "success"
    assert status["last_reload"]["errors"] == []
    assert await versions_served(w.port, 5, {"x-beta": "please"}) == Counter(green=5)


async def test_reload_api_with_broken_yaml(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir(shop_config(blue, green))
    w.path.write_text("services: [\n  {name: shop, versions: {\n", encoding="utf-8")
    code, reply = await w.api.call("POST", "/api/reload")
    assert code == 422, reply
    assert any("YAML" in e for e in reply["errors"]), reply
    await assert_untouched(w)


# === reload by the file watcher ==============================================================


async def wait_generation(api: AdminApi, generation: int, timeout: float = 5.0) -> dict[str, Any]:
    return await api.wait_status(lambda s: s["generation"] >= generation, timeout)


async def test_watcher_applies_a_valid_edit(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    w = await weir(data)
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(w.path, data)
    status = await wait_generation(w.api, 2)
    assert status["last_reload"]["trigger"] == "file"
    assert status["last_reload"]["outcome"] == "success"
    assert await versions_served(w.port, 5, {"x-beta": "please"}) == Counter(green=5)
    assert reloads(await w.api.metrics(), "failure") == 0


async def test_watcher_reports_a_stable_invalid_file_once(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    w = await weir(data)
    bad = json.loads(json.dumps(data))
    bad_duration(bad)
    write_config(w.path, bad)
    status = await w.api.wait_status(lambda s: s["last_reload"]["outcome"] == "failure")
    assert status["last_reload"]["trigger"] == "file"
    assert any(e.startswith("services[0].drain.timeout") for e in
               status["last_reload"]["errors"])
    assert status["generation"] == 1
    assert await versions_served(w.port, 5) == Counter(blue=5)
    # A later valid edit is applied; by then every earlier event was handled, and the invalid
    # file was reported exactly once.
    data["services"][0]["rules"] = [BETA_RULE]
    write_config(w.path, data)
    await wait_generation(w.api, 2)
    assert reloads(await w.api.metrics(), "failure") == 1


@pytest.mark.parametrize("gap", [0.05, 0.2], ids=["50ms", "200ms"])
async def test_watcher_waits_out_a_half_written_save(start_backend, weir, gap):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    w = await weir(data)

    data["services"][0]["rules"] = [BETA_RULE]
    data["services"][0]["weights"] = {"blue": 0, "green": 100}
    text = yaml.safe_dump(data, sort_keys=False)
    # About half the file, cut where the part written first is not a valid config.
    half = next(i for i in range(len(text) // 2, len(text)) if not parses(text[:i]))
    await save_in_two_steps(w.path, text, half, gap)

    status = await w.api.wait_status(
        lambda s: s["services"][0]["weights"] == {"blue": 0, "green": 100})
    assert status["last_reload"]["outcome"] == "success"
    assert status["services"][0]["rules"] == 1
    assert status["services"][0]["weights_source"] == "file"
    assert await versions_served(w.port, 10) == Counter(green=10)

    # A sentinel edit: once it is applied, the watcher has handled every event before it.
    data["services"][0]["drain"] = {"timeout": "5s"}
    write_config(w.path, data)
    status = await wait_generation(w.api, 3)
    assert reloads(await w.api.metrics(), "failure") == 0
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


async def test_watcher_never_applies_the_first_step_of_a_save(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    w = await weir(data)

    data["services"][0]["weights"] = {"blue": 0, "green": 100}
    text = yaml.safe_dump(data, sort_keys=False)
    assert text.endswith("green: 100\n")
    cut = len(text) - len("0\n")  # "green: 10": valid, but not what is being saved
    assert parses(text[:cut])

    seen: set[tuple[tuple[str, int], ...]] = set()

    async def record_tables() -> None:
        while True:
            seen.add(tuple(sorted(w.control.proxy.table.routes[0].weights.items())))
            await asyncio.sleep(0.002)

    recorder = asyncio.create_task(record_tables())
    try:
        await save_in_two_steps(w.path, text, cut, 0.2)
        await w.api.wait_status(
            lambda s: s["services"][0]["weights"] == {"blue": 0, "green": 100})
        data["services"][0]["drain"] = {"timeout": "5s"}  # the sentinel edit
        write_config(w.path, data)
        status = await wait_generation(w.api, 3)
    finally:
        recorder.cancel()
    assert (("blue", 0), ("green", 10)) not in seen, seen
    assert status["generation"] == 3


async def test_watcher_picks_up_temp_file_renamed_over_the_config(start_backend, weir):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, watch=True)
    w = await weir(data)

    for round_, weights in enumerate(({"blue": 0, "green": 100}, {"blue": 100, "green": 0})):
        data["services"][0]["weights"] = weights
        temp = w.path.with_name(f".{w.path.name}.{round_}.tmp")
        write_config(temp, data)
        os.replace(temp, w.path)  # a new inode each time: the watch must follow the name
        status = await w.api.wait_status(lambda s, w=weights: s["services"][0]["weights"] == w)
        assert status["generation"] >= 2 + round_
        assert status["last_reload"]["trigger"] == "file"
        expected = "green" if weights["green"] else "blue"
        assert await versions_served(w.port, 10) == Counter({expected: 10})
    assert reloads(await w.api.metrics(), "failure") == 0


async def test_watcher_follows_configmap_symlink_swaps(start_backend, weir, tmp_path):
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

    # Start from the ConfigMap path as it is (the fixture waits until its folder is watched).
    control = (await weir(path=volume / "weir.yaml")).control
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


# === SIGHUP to a real process ================================================================


async def test_sighup_reloads_a_running_weir(start_backend, weir_process):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, shutdown={"delay": "500ms", "timeout": "2s"})
    weir = await weir_process(data)
    assert (await weir.api.status())["generation"] == 1
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(blue=5)

    on_disk = yaml.safe_load(weir.path.read_text())
    on_disk["services"][0]["rules"] = [BETA_RULE]
    write_config(weir.path, on_disk)
    weir.send(signal.SIGHUP)
    status = await wait_generation(weir.api, 2)
    assert status["last_reload"]["trigger"] == "signal"
    assert status["last_reload"]["outcome"] == "success"
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(green=5)

    # An invalid file on SIGHUP: reported, the process lives on, the old config serves.
    bad = json.loads(json.dumps(on_disk))
    bad_duration(bad)
    write_config(weir.path, bad)
    weir.send(signal.SIGHUP)
    status = await weir.api.wait_status(lambda s: s["last_reload"]["outcome"] == "failure")
    assert status["generation"] == 2
    assert weir.process is not None and weir.process.poll() is None
    assert await versions_served(weir.port, 5, {"x-beta": "please"}) == Counter(green=5)
    assert reloads(await weir.api.metrics(), "failure") == 1

    # SIGTERM: /readyz turns 503 during the shutdown delay, then the process exits 0.
    process = weir.process
    weir.send(signal.SIGTERM)

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
    assert process.returncode == 0, weir.output()


def wait_port_open(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll a port every millisecond (a blocking loop: run it in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.001)
    raise AssertionError(f"port {port} never opened (exit code {process.poll()})")


async def test_sighup_as_soon_as_the_port_opens_does_not_kill_weir(start_backend, weir_process):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await weir_process(shop_config(blue, green), wait=False)  # not waiting for it...
    process = weir.process
    await asyncio.to_thread(wait_port_open, weir.port, process, 15)
    process.send_signal(signal.SIGHUP)  # e.g. a config tool reloading a fresh start
    api = weir.api

    async def answering() -> bool:
        try:
            return (await api.call("GET", "/healthz", auth=False))[0] == 200
        except aiohttp.ClientError:
            return False

    async with asyncio.timeout(10):
        while process.poll() is None and not await answering():
            await asyncio.sleep(0.02)
    assert process.poll() is None, f"Weir died with exit code {process.returncode}"


# === runtime state ===========================================================================


def read_state(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


async def test_runtime_state_survives_restarts_and_merges_per_field(start_backend, weir_process,
                                                                    tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    weir = await weir_process(shop_config(blue, green, state_file=str(state)))
    assert not state.exists()

    code, _ = await weir.api.call("PUT", "/api/services/shop/weights",
                                  {"weights": {"blue": 0, "green": 100}})
    assert code == 200
    saved = read_state(state)  # exists and is valid JSON
    assert saved["services"]["shop"]["weights"]["weights"] == {"blue": 0, "green": 100}
    assert saved["services"]["shop"]["weights"]["source"] == "api"
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind

    # Restart: the API weights come back.
    assert await weir.stop() == 0, weir.output()
    await weir.start()
    shop = await weir.api.service("shop")
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 0, "green": 100}, "api")
    assert await versions_served(weir.port, 20) == Counter(green=20)

    # Another field of the same service changes in the file: the API weights stand.
    on_disk = yaml.safe_load(weir.path.read_text())
    on_disk["services"][0]["rules"] = [{"match": {"headers": {"x-old": "1"}},
                                        "version": "blue"}]
    on_disk["services"][0]["drain"] = {"timeout": "7s"}
    write_config(weir.path, on_disk)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    shop = await weir.api.service("shop")
    assert shop["rules"] == 1
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 0, "green": 100}, "api")
    assert await versions_served(weir.port, 20) == Counter(green=20)
    assert await versions_served(weir.port, 5, {"x-old": "1"}) == Counter(blue=5)
    assert read_state(state)["services"]["shop"]["weights"]["weights"] == {"blue": 0,
                                                                           "green": 100}

    # The file's weights for the service change: the file is now the newer writer.
    on_disk["services"][0]["weights"] = {"blue": 70, "green": 30}
    write_config(weir.path, on_disk)
    code, reply = await weir.api.call("POST", "/api/reload")
    assert code == 200, reply
    shop = await weir.api.service("shop")
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 70, "green": 30}, "file")
    split = await versions_served(weir.port, 200)
    assert split["blue"] >= 100 and split["green"] >= 20, split
    assert "shop" not in read_state(state).get("services", {})

    # ...and that survives another restart.
    assert await weir.stop() == 0, weir.output()
    await weir.start()
    shop = await weir.api.service("shop")
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 70, "green": 30}, "file")
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") == 30


async def test_corrupt_state_file_is_set_aside_at_start(start_backend, weir_process, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    garbage = b'{"format": 1, "services": {"shop": {"weights": {"weights": {"blue": 0, "gr'
    state.write_bytes(garbage)
    weir = await weir_process(shop_config(blue, green, state_file=str(state)))  # it starts

    shop = await weir.api.service("shop")
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
async def test_unreadable_state_file_does_not_stop_start(start_backend, weir, tmp_path,
                                                          content):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    state.write_text(content, encoding="utf-8")
    w = await weir(shop_config(blue, green, state_file=str(state)))
    shop = await w.api.service("shop")
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 100, "green": 0}, "file")
    assert await versions_served(w.port, 5) == Counter(blue=5)
    assert (tmp_path / "weir.state.json.corrupt").read_text(encoding="utf-8") == content


async def test_unwritable_state_file_gives_a_json_answer_that_tells_the_truth(start_backend,
                                                                               weir, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    w = await weir(shop_config(blue, green, state_file=str(blocker / "weir.state.json")))
    code, reply = await w.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert isinstance(reply, dict), (code, reply)  # JSON, like every other answer of the API
    shop = await w.api.service("shop")
    if code == 200:
        assert shop["weights"] == reply["weights"]
    else:
        assert reply.get("error"), reply
        assert shop["weights"] == {"blue": 100, "green": 0}  # an error means no change
        assert await versions_served(w.port, 5) == Counter(blue=5)


# === an API change to a version the file then removes ========================================


async def test_api_weights_for_a_removed_version_are_dropped_on_reload(start_backend, weir,
                                                                       tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    state = tmp_path / "weir.state.json"
    data = shop_config(blue, green, state_file=str(state))
    w = await weir(data)
    code, _ = await w.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert code == 200
    assert await versions_served(w.port, 10) == Counter(green=10)

    service = data["services"][0]
    del service["versions"]["green"]
    service["weights"] = {"blue": 100}
    write_config(w.path, data)
    code, reply = await w.api.call("POST", "/api/reload")
    assert code == 200, reply

    status = await w.api.status()
    assert status["generation"] == 2
    [shop] = status["services"]
    assert set(shop["versions"]) == {"blue"}
    assert (shop["weights"], shop["weights_source"]) == ({"blue": 100}, "file")
    assert await versions_served(w.port, 10) == Counter(blue=10)
    assert "shop" not in read_state(state).get("services", {})
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="shop", version="blue") == 100
    assert sample(metrics, "weir_traffic_weight", service="shop", version="green") is None
    code, _ = await w.api.call("GET", "/healthz", auth=False)
    assert code == 200
    # The API knows the version is gone.
    code, _ = await w.api.call("POST", "/api/services/shop/switch", {"to": "green"})
    assert code == 404
    code, reply = await w.api.call("PUT", "/api/services/shop/weights",
                                      {"weights": {"blue": 7}})
    assert (code, reply["weights"]) == (200, {"blue": 7})
