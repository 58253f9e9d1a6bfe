"""Config files that could hurt, and reloads that must say what they did (issue 17).

- A YAML alias bomb (each level an anchored list of aliases of the level below: some hundred
  bytes that stand for hundreds of millions of strings) once froze the data plane for
  seconds and took gigabytes. Now the file is refused at once, naming the bound it broke,
  and the parse runs off the event loop.
- A restart-only setting (``listen`` and the like) changed in the file is reported in the
  reload's answer and in /api/status against what the process runs with, and a revert
  clears it.

Weir runs here as a real process (``python -m proxy run``) under an address-space limit, so
that, were the bounds ever lost, a test fails with a MemoryError in Weir instead of taking
the machine's memory; the in-process tests only use bombs whose full expansion is small.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config.loader import (
    MAX_CONFIG_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    YAMLLimitError,
    load_config,
    load_yaml,
)
from proxy.config.model import ConfigError

from ..conftest import REPO_ROOT, TOKEN, free_port, port_open, sample, wait_for, write_config
from ..control.test_ops_control import shop_config, versions_served

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and inotify")

# Address space for a Weir subprocess: it runs at about 450 MB (mostly reserved, not used),
# so this leaves it some 500 MB, where expanding the 9-level bomb would want gigabytes.
MEMORY_LIMIT_KIB = 1 << 20


def alias_bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs" under the key ``bomb``: ``width ** levels`` strings once expanded."""
    lines = ["bomb:", f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def with_bomb(data: dict[str, Any], levels: int) -> str:
    """A config that is otherwise fine, with an alias bomb appended."""
    return yaml.safe_dump(data, sort_keys=False) + alias_bomb(levels)


def under_limit(argv: list[str]) -> list[str]:
    """A command line run under the address-space limit (set by the shell before exec, so it
    holds from the first byte and no pre-exec hook runs in this threaded process)."""
    return ["sh", "-c", f"ulimit -v {MEMORY_LIMIT_KIB} && exec {shlex.join(argv)}"]


def limited(*args: str) -> list[str]:
    """``python -m proxy ARGS`` under the address-space limit."""
    return under_limit([sys.executable, "-m", "proxy", *args])


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the bounds, in process (bombs small enough to expand anyway, were the bounds lost) ------


def base_config() -> dict[str, Any]:
    return {"listen": "127.0.0.1:0",
            "services": [{"name": "shop",
                          "versions": {"stable": {"upstreams": ["127.0.0.1:9001"]}}}]}


def test_load_config_refuses_an_alias_bomb_at_once(tmp_path: Path) -> None:
    # 9**7 = 4.8 million strings: expanding them took about 3 s and 150 MB.
    path = tmp_path / "bomb.yaml"
    text = with_bomb(base_config(), 7)
    path.write_text(text, encoding="utf-8")
    # The 66k values under &l4 are within the limit; &l5, nine times that, goes past it.
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  l5:"))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    elapsed = time.perf_counter() - started
    [error] = caught.value.errors
    assert f"more than {MAX_YAML_NODES} values once aliases (*name) are expanded" in error
    assert f"the limit is {MAX_YAML_NODES}" in error
    assert f"line {line}, column 7:" in error  # the anchor "&l5"
    assert elapsed < 0.5, f"took {elapsed:.2f}s to refuse"


def test_weir_validate_refuses_the_full_alias_bomb_fast(tmp_path: Path) -> None:
    """The 9-level bomb of the report (`weir validate` ran for minutes and reached 10 GB)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(with_bomb(base_config(), 9), encoding="utf-8")
    started = time.monotonic()
    try:
        result = subprocess.run(limited("validate", "-c", str(path)), cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("weir validate was still at the alias bomb after 30 s")
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"more than {MAX_YAML_NODES} values" in result.stderr
    assert f"the limit is {MAX_YAML_NODES}" in result.stderr
    assert str(path) in result.stderr
    assert elapsed < 5, f"took {elapsed:.1f}s (the interpreter starts in well under 1 s)"


def merge_key_bomb(levels: int) -> str:
    # Merge keys copy the merged mapping's pairs: each level holds twice the one below.
    lines = ["m0: &m0 {a: 1, b: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: {i}}}"
              for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE = {
    # name: (text, what the single error says)
    "nested_100k_deep": ("[" * 100_000, f"nested more than {MAX_YAML_DEPTH} levels deep"),
    "nested_through_aliases": (
        f"a: &a {'[' * 40}1{']' * 40}\nb: {'[' * 30}*a{']' * 30}\n",
        f"nested more than {MAX_YAML_DEPTH} levels deep once aliases are expanded"),
    "recursive_alias": ("a: &a [1, *a]\n", "recursive alias"),
    "alias_count": ("a: &a x\nb: [" + ", ".join(["*a"] * (MAX_YAML_ALIASES + 1)) + "]\n",
                    f"more than {MAX_YAML_ALIASES} alias uses"),
    "merge_keys": (merge_key_bomb(16), f"more than {MAX_YAML_NODES} values"),
    "plain_values": ("[" + "1, " * (MAX_YAML_NODES + 1) + "]\n",
                     f"more than {MAX_YAML_NODES} values"),
    "huge_integer": ("a: " + "7" * 5000 + "\n", "not a usable YAML value"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_yaml_is_a_config_error_naming_its_limit(tmp_path: Path, name: str) -> None:
    text, expected = HOSTILE[name]
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:  # not a RecursionError or a ValueError
        load_config(path)
    [error] = caught.value.errors
    assert expected in error
    # Refused before the work grows with the input (the 9-level bomb took minutes and GBs
    # before the bounds); generous, as a busy machine runs the 100k-value case in seconds.
    assert time.perf_counter() - started < 20


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    text = yaml.safe_dump(base_config())
    path = tmp_path / "big.yaml"
    padding = "# " + "x" * 98 + "\n"
    path.write_text(text + padding * (MAX_CONFIG_BYTES // len(padding) + 1), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [f"refused: the file is larger than {MAX_CONFIG_BYTES} "
                                   f"bytes, the limit for a config file"]
    path.write_text(text + padding * ((MAX_CONFIG_BYTES - len(text)) // len(padding)))
    assert load_config(path).services[0].name == "shop"  # just under it: fine


def test_the_limits_are_exact() -> None:
    # Depth: the root is level 1.
    deepest = "[" * (MAX_YAML_DEPTH - 1) + "1" + "]" * (MAX_YAML_DEPTH - 1)
    assert load_yaml(deepest) is not None
    with pytest.raises(YAMLLimitError, match=f"nested more than {MAX_YAML_DEPTH} levels"):
        load_yaml(f"[{deepest}]")

    # Values once expanded: "b" holds `count` aliases of "a", a list of 99 strings (100
    # values each time); the root, the two keys, "a" itself and "b"'s list come on top.
    def aliases_of_a(count: int) -> str:
        return f"a: &a [{', '.join(['x'] * 99)}]\nb: [{', '.join(['*a'] * count)}]\n"

    overhead = 1 + 2 + 100 + 1
    most = (MAX_YAML_NODES - overhead) // 100
    assert overhead + most * 100 <= MAX_YAML_NODES < overhead + (most + 1) * 100
    assert len(load_yaml(aliases_of_a(most))["b"]) == most
    with pytest.raises(YAMLLimitError, match=f"more than {MAX_YAML_NODES} values"):
        load_yaml(aliases_of_a(most + 1))


def test_anchors_aliases_and_merge_keys_in_a_real_config_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("""\
listen: 127.0.0.1:0
services:
  - name: shop
    versions:
      stable: {upstreams: &pool [127.0.0.1:9001, 127.0.0.1:9011]}
      canary: {upstreams: [127.0.0.1:9002]}
    weights: {stable: 95, canary: 5}
    drain: &drain {timeout: 10s}
    retries: &retries {attempts: 2, on_statuses: [502, 503]}
  - name: api
    match: {path_prefix: /api}
    versions: {stable: {upstreams: *pool}}
    drain: *drain
    retries: {<<: *retries, attempts: 3}
""", encoding="utf-8")
    shop, api = load_config(path).services
    assert api.versions["stable"].upstreams == ["127.0.0.1:9001", "127.0.0.1:9011"]
    assert api.drain.timeout == shop.drain.timeout == 10.0
    assert shop.retries is not None and api.retries is not None
    assert (shop.retries.attempts, api.retries.attempts) == (2, 3)
    assert api.retries.on_statuses == [502, 503]


# --- the bomb saved over the config of a running Weir, under load ----------------------------


@dataclass
class Timed:
    started: float  # time.time(), to compare with the reload's "at"
    seconds: float
    outcome: int | str  # the status, or the client error's name


async def steady_load(port: int, stop: asyncio.Event, results: list[Timed],
                      clients: int = 4, interval: float = 0.01) -> None:
    """`clients` keep-alive clients, each sending a request every `interval` (or at once
    after a slower answer), until `stop`."""

    async def client() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            next_at = time.perf_counter()
            while not stop.is_set():
                began, wall = time.perf_counter(), time.time()
                outcome: int | str
                try:
                    async with session.get(f"http://127.0.0.1:{port}/item") as response:
                        await response.read()
                        outcome = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = type(exc).__name__
                results.append(Timed(wall, time.perf_counter() - began, outcome))
                next_at = max(next_at + interval, time.perf_counter())
                await asyncio.sleep(next_at - time.perf_counter())

    await asyncio.gather(*(client() for _ in range(clients)))


async def test_an_alias_bomb_saved_over_the_config_leaves_proxying_alone(start_backend,
                                                                         weir_process):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await weir_process(shop_config(blue, green, watch=True), wrap=under_limit)
    results: list[Timed] = []
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(weir.port, stop, results))
    try:
        # Before: a second of steady load.
        began = time.time()
        await wait_for(lambda: len(results) >= 100 and results[-1].started > began + 1.0,
                       timeout=10)
        saved_at = time.time()
        weir.path.write_text(with_bomb(weir.data, 9), encoding="utf-8")
        # The watcher waits out its debounce and settle time, then reloads: failed.
        status = await weir.api.wait_status(
            lambda s: s["last_reload"]["trigger"] == "file", timeout=15)
        reported_at = time.time()
        # And on for half a second after it.
        await wait_for(lambda: results[-1].started > reported_at + 0.5, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(load, timeout=10)

    reload = status["last_reload"]
    assert reload["outcome"] == "failure", reload
    [error] = reload["errors"]
    assert f"more than {MAX_YAML_NODES} values once aliases (*name) are expanded" in error
    assert f"the limit is {MAX_YAML_NODES}" in error
    assert saved_at <= reload["at"] <= reported_at
    assert status["generation"] == 1

    before = [r for r in results if r.started < saved_at]
    during = [r for r in results if saved_at <= r.started <= reported_at + 0.5]
    around_reload = [r for r in during if abs(r.started - reload["at"]) < 0.25]
    assert Counter(r.outcome for r in results) == Counter({200: len(results)})
    assert len(around_reload) >= 20, "the data plane was not under load while it reloaded"
    p99_before = quantile([r.seconds for r in before], 0.99)
    p99_during = quantile([r.seconds for r in during], 0.99)
    slowest = max(r.seconds for r in during)
    # Answers take a few ms here (this process runs the clients and the backends too), so
    # the 2x of the issue gets 20 ms of scheduling slack; a frozen loop takes seconds.
    assert p99_during <= max(2 * p99_before, p99_before + 0.02), (p99_before, p99_during)
    assert slowest < 0.5, f"a request took {slowest:.3f}s during the reload"

    # Counted and logged as a failed reload; the serving config untouched.
    metrics = await weir.api.metrics()
    assert sample(metrics, "weir_config_reloads_total", outcome="failure") == 1
    assert sample(metrics, "weir_config_reloads_total", outcome="success") == 0
    assert f"the limit is {MAX_YAML_NODES}" in weir.output()
    assert await versions_served(weir.port, 10) == Counter(blue=10)
    # The API refuses it the same way, at once.
    started = time.perf_counter()
    code, answer = await weir.api.call("POST", "/api/reload")
    assert code == 422, answer
    assert f"the limit is {MAX_YAML_NODES}" in answer["errors"][0]
    assert time.perf_counter() - started < 1.0
    # The bomb never got to take memory (an expansion took about 1 GB).
    assert weir.peak_rss() < 200 * 2**20, weir.peak_rss()


async def test_a_large_valid_config_reloads_off_the_event_loop(start_backend, weir_process):
    """A file near the bounds (tens of thousands of values) takes a second or more to parse
    and validate; proxying goes on meanwhile."""
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await weir_process(shop_config(blue, green), wrap=under_limit)
    data = {**weir.data, "trusted_proxies": [f"10.{i // 256 % 256}.{i % 256}.0/24"
                                             for i in range(25_000)]}
    write_config(weir.path, data)
    results: list[Timed] = []
    stop = asyncio.Event()
    load = asyncio.create_task(steady_load(weir.port, stop, results))
    try:
        began = time.time()
        await wait_for(lambda: len(results) >= 100 and results[-1].started > began + 0.5,
                       timeout=10)
        reload_began = time.time()
        code, answer = await weir.api.call("POST", "/api/reload")
        reload_ended = time.time()
        await wait_for(lambda: results[-1].started > reload_ended + 0.2, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(load, timeout=10)
    assert code == 200, answer
    assert answer["generation"] == 2
    assert reload_ended - reload_began > 0.3, "too small a file to show anything"
    during = [r for r in results if reload_began <= r.started <= reload_ended]
    assert len(during) >= 20
    assert Counter(r.outcome for r in results) == Counter({200: len(results)})
    slowest = max(r.seconds for r in during)
    assert slowest < 0.5, (f"a request took {slowest:.3f}s during a reload of "
                           f"{reload_ended - reload_began:.2f}s")


# --- restart-only settings: reported against what runs, cleared by a revert -------------------


def cli_reload(admin_port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "reload", "--admin",
                           f"http://127.0.0.1:{admin_port}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "WEIR_ADMIN_TOKEN": TOKEN})


async def test_a_listen_change_and_its_revert_are_reported_against_the_bound_socket(
        start_backend, weir_process):
    blue, green = await start_backend("blue"), await start_backend("green")
    weir = await weir_process(shop_config(blue, green), wrap=under_limit)
    bound, other = f"127.0.0.1:{weir.port}", f"127.0.0.1:{free_port()}"
    status = await weir.api.status()
    assert status["restart_required"] == []

    # listen moves in the file, with a weight change that does apply.
    moved = {**weir.data, "listen": other}
    moved["services"] = [{**weir.data["services"][0], "weights": {"blue": 0, "green": 100}}]
    write_config(weir.path, moved)
    code, answer = await weir.api.call("POST", "/api/reload")
    assert code == 200, answer
    pending = [f"listen: {bound} -> {other}"]
    assert answer["restart_required"] == pending
    status = await weir.api.status()
    assert status["restart_required"] == pending
    assert status["last_reload"]["restart_required"] == pending
    assert await versions_served(weir.port, 5) == Counter(green=5)  # the weights applied
    assert not port_open(int(other.rsplit(":", 1)[1]))  # the socket did not move
    # `weir reload` says so too (a second reload of the same file: still pending).
    result = cli_reload(weir.admin_port)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["config reloaded: generation 3",
                                          f"restart required to apply: listen: {bound} -> "
                                          f"{other}"]

    # Reverted: nothing pending, and nothing claims the proxy listens where it never did.
    write_config(weir.path, weir.data)
    code, answer = await weir.api.call("POST", "/api/reload")
    assert code == 200, answer
    assert answer["restart_required"] == []
    assert (await weir.api.status())["restart_required"] == []
    assert await versions_served(weir.port, 5) == Counter(blue=5)
    result = cli_reload(weir.admin_port)
    assert result.stdout.splitlines() == ["config reloaded: generation 5"]
    log = weir.output()
    assert f"listen: {bound} -> {other}" in log
    assert f"listening on {other}" not in log
    assert "no restart needed" in log


async def test_every_restart_only_setting_is_reported_and_a_failed_reload_keeps_them(
        start_backend, weir, tmp_path):
    blue, green = await start_backend("blue"), await start_backend("green")
    data = shop_config(blue, green, state_file=str(tmp_path / "weir.state.json"))
    w = await weir(data)
    admin_before = f"127.0.0.1:{w.admin.port}"
    write_config(w.path, {
        **data, "watch": True, "log_level": "debug", "state_file": str(tmp_path / "b.json"),
        "state_store": {"type": "redis", "url": "redis://:s3cret@127.0.0.1:1/0",
                        "key_prefix": "other"},
        "admin": {**data["admin"], "listen": "127.0.0.1:1"},
        # Applied by a reload: not listed.
        "limits": {"max_connections": 50}, "upstream": {"idle_timeout": "5s"},
        "version_header": False,
    })
    code, answer = await w.api.call("POST", "/api/reload")
    assert code == 200, answer
    expected = [
        "admin.listen: 127.0.0.1:0 -> 127.0.0.1:1",
        f"state_file: {tmp_path / 'weir.state.json'} -> {tmp_path / 'b.json'}",
        "state_store.type: file -> redis",
        "state_store.url: null -> redis://:***@127.0.0.1:1/0",  # no password shown
        "state_store.key_prefix: weir -> other",
        "watch: false -> true",
        "log_level: info -> debug",
    ]
    assert answer["restart_required"] == expected
    assert (await w.api.status())["restart_required"] == expected
    assert f"127.0.0.1:{w.admin.port}" == admin_before  # still where it was

    # A failed reload changes nothing, and says what is still pending.
    w.path.write_text("services: [", encoding="utf-8")
    code, answer = await w.api.call("POST", "/api/reload")
    assert code == 422, answer
    assert answer["restart_required"] == expected
    assert (await w.api.status())["restart_required"] == expected

    write_config(w.path, data)
    code, answer = await w.api.call("POST", "/api/reload")
    assert code == 200, answer
    assert answer["restart_required"] == []
    assert (await w.api.status())["restart_required"] == []
