"""The admin commands of the command line (status, set-weight, switch, reload, rollout verbs),
run as real subprocesses against a real Weir process and real backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from ..conftest import REPO_ROOT, TOKEN, WeirProcess, free_port

TIMEOUT = 20  # for each subprocess; the calls themselves take well under a second


# --- backends: aiohttp apps on a loop in a thread, each answering with its own name --------


class Backends:
    def __init__(self, names: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.ports = {name: self._call(self._start(name)) for name in names}

    def _call(self, coro: object) -> int:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)  # type: ignore[arg-type]

    async def _start(self, name: str) -> int:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text=name, headers={"x-backend": name})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def close(self) -> None:
        async def cleanup() -> int:
            for runner in self.runners:
                await runner.cleanup()
            return 0

        self._call(cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


# --- Weir as a real process, one for the module (conftest's WeirProcess) ---------------------


@dataclass
class Shop:
    """The module's Weir: one service, ``shop``, with versions blue and green; ``good_config``
    is its config file's text as first written (tests edit it as text)."""

    run: WeirProcess
    good_config: str

    @property
    def config(self) -> Path:
        return self.run.path

    @property
    def port(self) -> int:
        return self.run.port

    @property
    def admin_port(self) -> int:
        return self.run.admin_port

    @property
    def admin_url(self) -> str:
        return self.run.admin_url

    def get(self, path: str = "/") -> tuple[str | None, str]:
        """One request through the data plane on a fresh connection: (x-weir-version, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path, headers={"Host": "shop.test"})
            response = conn.getresponse()
            body = response.read().decode()
            assert response.status == 200, (response.status, body)
            return response.getheader("x-weir-version"), body
        finally:
            conn.close()

    def api(self, method: str, path: str, body: object = None) -> Any:
        """The admin API without the command line, for setting up and checking."""
        request = urllib.request.Request(
            f"{self.admin_url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def status(self) -> Any:
        return self.api("GET", "/api/status")


def config_text(port: int, admin_port: int, state_file: Path, backends: Backends) -> str:
    return f"""\
listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin_port}
  token: {TOKEN}
state_file: {state_file}
watch: false
log_level: warning
services:
  - name: shop
    versions:
      blue: {{upstreams: [127.0.0.1:{backends.ports["blue"]}]}}
      green: {{upstreams: [127.0.0.1:{backends.ports["green"]}]}}
    weights: {{blue: 100, green: 0}}
    drain: {{timeout: 1s}}
"""


@pytest.fixture(scope="module")
def backends() -> Iterator[Backends]:
    started = Backends(["blue", "green"])
    yield started
    started.close()


@pytest.fixture(scope="module")
def shop(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """`weir run` on the shop config, for every test of the module (the CLI tests only talk to
    it); the function-scoped ``weir_process`` fixture cannot be shared so, so this builds the
    same `WeirProcess` itself."""
    tmp = tmp_path_factory.mktemp("weir-cli-admin")
    text = config_text(free_port(), free_port(), tmp / "weir.state.json", backends)
    path = tmp / "weir.yaml"
    path.write_text(text, encoding="utf-8")
    run = WeirProcess(path, yaml.safe_load(text), tmp / "weir.log")
    try:
        run.start_sync()
        yield Shop(run, text)
    finally:
        run.stop_sync()


@pytest.fixture
def shop_on_blue(shop: Shop) -> Shop:
    """Each test starts from the same place: the file's config, all traffic on blue."""
    shop.config.write_text(shop.good_config, encoding="utf-8")
    assert shop.api("POST", "/api/reload", {})["outcome"] == "success"
    shop.api("PUT", "/api/services/shop/weights", {"weights": {"blue": 100, "green": 0}})
    return shop


def cli(*args: str, admin: str | None = None, token: str | None = TOKEN,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("WEIR_ADMIN_TOKEN", "WEIR_ADMIN_URL")}
    if token is not None:
        full_env["WEIR_ADMIN_TOKEN"] = token
    full_env.update(env or {})
    argv = [sys.executable, "-m", "proxy", *args]
    if admin is not None:
        argv += ["--admin", admin]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=full_env, stdin=subprocess.DEVNULL)


def assert_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


# --- status -------------------------------------------------------------------------------


def test_status_shows_services_and_weights(shop_on_blue: Shop) -> None:
    result = cli("status", admin=shop_on_blue.admin_url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "generation" in out
    assert "last reload: success" in out
    assert "service shop" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["blue"][1:3] == ["100", "100%"], out
    assert lines["green"][1:3] == ["0", "0%"], out
    assert "IN-FLIGHT" in out and "DRAINING" in out
    assert "weights from api" in out


def test_status_json_is_the_api_answer(shop_on_blue: Shop) -> None:
    result = cli("status", "--json", admin=shop_on_blue.admin_url)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["generation"] == shop_on_blue.status()["generation"]
    assert data["last_reload"]["outcome"] == "success"
    [shop] = data["services"]
    assert shop["name"] == "shop"
    assert shop["weights"] == {"blue": 100, "green": 0}
    assert set(shop["versions"]) == {"blue", "green"}


def test_status_reads_need_no_token(shop_on_blue: Shop) -> None:
    result = cli("status", admin=shop_on_blue.admin_url, token=None)
    assert result.returncode == 0, result.stderr
    assert "service shop" in result.stdout


def test_admin_url_from_environment(shop_on_blue: Shop) -> None:
    result = cli("status", "--json", env={"WEIR_ADMIN_URL": shop_on_blue.admin_url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["services"][0]["name"] == "shop"


# --- mutations ----------------------------------------------------------------------------


def test_switch_moves_real_traffic(shop_on_blue: Shop) -> None:
    assert shop_on_blue.get() == ("blue", "blue")
    result = cli("switch", "shop", "green", admin=shop_on_blue.admin_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "shop: switched to green (weights blue=0 green=100)"
    for _ in range(5):
        assert shop_on_blue.get() == ("green", "green")
    back = cli("switch", "shop", "blue", admin=shop_on_blue.admin_url)
    assert back.returncode == 0, back.stderr
    assert shop_on_blue.get() == ("blue", "blue")


def test_set_weight_applies(shop_on_blue: Shop) -> None:
    result = cli("set-weight", "shop", "blue=30", "green=70", admin=shop_on_blue.admin_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "shop: weights blue=30 green=70"
    status = cli("status", admin=shop_on_blue.admin_url)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines() if line.strip()}
    assert rows["blue"][1:3] == ["30", "30%"], status.stdout
    assert rows["green"][1:3] == ["70", "70%"], status.stdout
    data = json.loads(cli("status", "--json", admin=shop_on_blue.admin_url).stdout)
    shop = data["services"][0]
    assert shop["weights"] == {"blue": 30, "green": 70}
    assert shop["weights_source"] == "api"
    seen = {shop_on_blue.get()[0] for _ in range(40)}
    assert seen == {"blue", "green"}  # 0.3**40 + 0.7**40: never one-sided by chance


def test_set_weight_left_out_versions_get_zero(shop_on_blue: Shop) -> None:
    result = cli("set-weight", "shop", "green=5", "--json", admin=shop_on_blue.admin_url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"service": "shop", "weights": {"blue": 0, "green": 5}}
    assert shop_on_blue.get() == ("green", "green")


@pytest.mark.parametrize("token", [None, "wrong"])
def test_mutation_without_the_right_token(shop_on_blue: Shop, token: str | None) -> None:
    result = cli("switch", "shop", "green", admin=shop_on_blue.admin_url, token=token)
    assert result.returncode == 1
    assert "missing or wrong bearer token" in result.stderr
    assert "401" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if token is None:
        assert "WEIR_ADMIN_TOKEN" in result.stderr
    assert_clean(result)
    assert shop_on_blue.get() == ("blue", "blue")  # nothing changed


@pytest.mark.parametrize(("args", "message"), [
    (("switch", "nope", "green"), "no service named 'nope'"),
    (("switch", "shop", "purple"), "no version 'purple'"),
    (("set-weight", "nope", "blue=1"), "no service named 'nope'"),
    (("set-weight", "shop", "purple=1"), "no version 'purple'"),
])
def test_unknown_service_or_version(shop_on_blue: Shop, args: tuple[str, ...],
                                    message: str) -> None:
    result = cli(*args, admin=shop_on_blue.admin_url)
    assert result.returncode == 1
    assert message in result.stderr
    assert "404" in result.stderr
    assert_clean(result)


def test_all_zero_weights_are_refused_by_the_api(shop_on_blue: Shop) -> None:
    result = cli("set-weight", "shop", "blue=0", "green=0", admin=shop_on_blue.admin_url)
    assert result.returncode == 1
    assert "400" in result.stderr
    assert "above 0" in result.stderr


@pytest.mark.parametrize("assignments", [
    ("blue",), ("blue=",), ("=5",), ("blue=x",), ("blue=-1",), ("blue=1.5",), ("blue=²",),
    ("blue=1", "blue=2"), (),
])
def test_bad_weight_syntax_is_a_usage_error(assignments: tuple[str, ...]) -> None:
    # A closed port: the command must fail before it tries the network.
    result = cli("set-weight", "shop", *assignments, admin=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert "usage: weir set-weight" in result.stderr
    assert "cannot reach" not in result.stderr
    assert_clean(result)


# --- reload -------------------------------------------------------------------------------


def test_reload(shop_on_blue: Shop) -> None:
    before = shop_on_blue.status()["generation"]
    result = cli("reload", admin=shop_on_blue.admin_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"config reloaded: generation {before + 1}"


def test_reload_of_an_invalid_file_shows_its_errors(shop_on_blue: Shop) -> None:
    generation = shop_on_blue.status()["generation"]
    bad = shop_on_blue.good_config.replace("weights: {blue: 100, green: 0}",
                                           "weights: {blue: 100, purple: 5}")
    bad = bad.replace("timeout: 1s", "timeout: soon")
    shop_on_blue.config.write_text(bad, encoding="utf-8")
    result = cli("reload", admin=shop_on_blue.admin_url)
    assert result.returncode == 1
    assert "422" in result.stderr
    assert "services[0].weights.purple" in result.stderr
    assert "services[0].drain.timeout" in result.stderr
    assert_clean(result)
    # Nothing changed, and status tells why.
    status = cli("status", admin=shop_on_blue.admin_url)
    assert status.returncode == 0, status.stderr
    assert "last reload: FAILURE (api)" in status.stdout
    assert f"still serving generation {generation}" in status.stdout
    assert "services[0].weights.purple" in status.stdout
    assert shop_on_blue.get() == ("blue", "blue")


def test_reload_of_a_file_that_is_not_yaml(shop_on_blue: Shop) -> None:
    shop_on_blue.config.write_text(shop_on_blue.good_config + "  - [\n", encoding="utf-8")
    result = cli("reload", admin=shop_on_blue.admin_url)
    assert result.returncode == 1
    assert "422" in result.stderr
    assert "YAML" in result.stderr
    assert_clean(result)


def test_reload_needs_the_token(shop_on_blue: Shop) -> None:
    result = cli("reload", admin=shop_on_blue.admin_url, token="wrong")
    assert result.returncode == 1
    assert "401" in result.stderr


# --- reaching the admin API ---------------------------------------------------------------


@pytest.mark.parametrize("args", [("status",), ("switch", "shop", "green"), ("reload",)])
def test_unreachable_admin_api(args: tuple[str, ...]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(*args, admin=url)
    assert result.returncode == 1
    assert f"cannot reach the admin API at {url}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert_clean(result)


def test_admin_api_that_never_answers() -> None:
    with socket.socket() as sock:  # accepts connections (the backlog) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = cli("status", "--timeout", "0.5", admin=url)
    assert result.returncode == 1
    assert f"cannot reach the admin API at {url}: no answer within 0.5s" in result.stderr
    assert_clean(result)


def test_admin_url_without_scheme(shop_on_blue: Shop) -> None:
    result = cli("status", admin=f"127.0.0.1:{shop_on_blue.admin_port}")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:9901", "http://", "http://127.0.0.1:x"])
def test_bad_admin_url_is_a_usage_error(url: str) -> None:
    result = cli("status", admin=url)
    assert result.returncode == 2
    assert "--admin" in result.stderr
    assert_clean(result)


def test_data_port_is_not_the_admin_api(shop_on_blue: Shop) -> None:
    result = cli("status", admin=f"http://127.0.0.1:{shop_on_blue.port}")
    assert result.returncode == 1
    assert "not a JSON object" in result.stderr
    assert_clean(result)


# --- rollout verbs: thin clients of endpoints that arrive with the controller -------------


@pytest.mark.parametrize("args", [
    ("promote", "shop"), ("promote", "--full", "shop"), ("abort", "shop"),
    ("rollout", "start", "shop"), ("pause", "shop"), ("resume", "shop"),
])
def test_rollout_verbs(shop_on_blue: Shop, args: tuple[str, ...]) -> None:
    result = cli(*args, admin=shop_on_blue.admin_url)
    assert result.returncode == 1, result.stdout
    assert result.stderr.strip()
    assert_clean(result)


def test_rollout_verbs_need_a_service() -> None:
    result = cli("promote", admin=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "SERVICE" in result.stderr
