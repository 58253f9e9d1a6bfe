"""Who may do what through the admin API, and who did (issue 20, part 5): ``admin.tokens``
with the roles viewer, promoter and operator beside ``admin.token`` (an operator named
"admin"); 401 for a token that is not configured, 403 naming the role a mutation needs; each
change recorded under its token's name in the rollout record, the log and /api/status.

A real Weir in this event loop (conftest's ``weir``), real backends, an aiohttp client, and
the `weir` command as a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.admin.api import ADMIN_TOKEN_NAME, ROLLOUT_ACTIONS, AdminServer
from proxy.config.loader import parse_config
from proxy.config.model import ConfigError

from ..conftest import TOKEN, Backend, Weir, poll

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses, /proc")

VIEWER, PROMOTER, OPERATOR = "viewer-3f9a1c", "promoter-77b2e0", "operator-c41d5e"
TOKENS = [
    {"name": "dashboard", "token": VIEWER, "role": "viewer"},
    {"name": "ci", "token": PROMOTER, "role": "promoter"},
    {"name": "oncall", "token": OPERATOR, "role": "operator"},
]
# A timed pause first (the rollout stays "progressing" there, so a person may pause it, and
# promote past it), then one that waits for a person.
STEPS = [{"set_weight": 20}, {"pause": {"duration": "10m"}}, {"set_weight": 50}, {"pause": {}}]


def at_timed_pause(rollout: dict[str, Any]) -> bool:
    return rollout["phase"] == "progressing" and rollout["step"] == 1


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def services(stable: Backend, canary: Backend) -> list[dict[str, Any]]:
    return [{
        "name": "app",
        "versions": {"stable": {"upstreams": [stable.address]},
                     "canary": {"upstreams": [canary.address]}},
        "weights": {"stable": 100, "canary": 0},
        "rollout": {"strategy": "canary", "steps": STEPS},
    }]


async def start(weir: Any, start_backend: Any) -> tuple[Weir, Backend, Backend]:
    stable, canary = await start_backend("stable"), await start_backend("canary")
    live = await weir(services(stable, canary),
                      admin={"listen": "127.0.0.1:0", "token": TOKEN, "tokens": TOKENS})
    return live, stable, canary


async def call(live: Weir, method: str, path: str, token: str | None,
               body: Any = None) -> tuple[int, Any]:
    headers = bearer(token) if token is not None else {}
    return await live.api.call(method, path, {} if body is None else body, headers=headers,
                               auth=False)


# What each mutation route is sent: a body it would accept, so that a refusal is the role's.
def mutations(live: Weir, stable: Backend) -> list[tuple[str, str, dict[str, Any]]]:
    """Every route of the admin app that is not a read, its path parameters filled in (each
    rollout action for ``{action}``). Read from the router: a mutation route added later is
    in this list without anyone adding it here."""
    bodies = {"/api/services/{name}/weights": {"weights": {"stable": 50, "canary": 50}},
              "/api/services/{name}/switch": {"to": "canary"},
              "/api/upstreams/drain": {"upstream": stable.address},
              "/api/upstreams/undrain": {"upstream": stable.address}}
    found = []
    for route in live.admin.app.router.routes():
        if route.method in ("GET", "HEAD", "OPTIONS"):
            continue
        template = route.resource.canonical if route.resource is not None else ""
        paths = [template]
        if "{action}" in template:
            paths = [template.replace("{action}", action) for action in ROLLOUT_ACTIONS]
        for path in paths:
            filled = path.replace("{name}", "app")
            assert "{" not in filled, f"{route.method} {template}: a path parameter this " \
                                      f"test does not know how to fill in"
            found.append((route.method, filled, bodies.get(template, {})))
    return found


async def test_a_viewer_gets_403_on_every_mutation_route_and_nothing_changes(
        start_backend, weir):
    live, stable, _ = await start(weir, start_backend)
    routes = mutations(live, stable)
    # The ones known today, as a floor: the enumeration itself must not come up short.
    assert len(routes) >= 5 + len(ROLLOUT_ACTIONS), routes
    before = await live.api.status()
    for method, path, body in routes:
        code, data = await call(live, method, path, VIEWER, body)
        assert code == 403, (method, path, code, data)
        assert "role; token dashboard is a viewer" in data["error"], (path, data)
        assert data["role"] == "viewer" and data["needs"] in ("promoter", "operator")
        # No token, or one that is not configured: 401, whatever the route.
        for token in (None, "not-a-token"):
            code, data = await call(live, method, path, token, body)
            assert code == 401, (method, path, token, code, data)
    after = await live.api.status()
    assert after["services"][0]["weights"] == before["services"][0]["weights"]
    assert after["services"][0]["rollout"]["phase"] == before["services"][0]["rollout"]["phase"]
    assert after["drained"] == [] and after["generation"] == before["generation"]
    assert after["services"][0]["actions"] == [] and after["actions"] == []
    # Reads stay open, with or without a token.
    assert (await call(live, "GET", "/api/status", VIEWER))[0] == 200
    assert (await call(live, "GET", "/api/services/app/rollout", None))[0] == 200


async def test_a_mutation_route_that_declares_no_role_needs_an_operator(start_backend, weir):
    """A new route someone forgets to declare a role for is not open to a promoter."""
    live, _, _ = await start(weir, start_backend)

    async def new_thing(request: web.Request) -> web.Response:
        return web.json_response({"done": True})

    extra = AdminServer(live.control)
    extra.app.router.add_post("/api/new-thing", new_thing)
    await extra.start()
    try:
        base = f"http://127.0.0.1:{extra.port}/api/new-thing"
        for token, expected in ((PROMOTER, 403), (VIEWER, 403), (OPERATOR, 200), (TOKEN, 200)):
            async with live.session.post(base, headers=bearer(token)) as response:
                data = await response.json()
            assert response.status == expected, (token, data)
            if expected == 403:
                assert "needs the operator role" in data["error"], data
    finally:
        await extra.stop()


async def test_a_promoter_promotes_pauses_and_aborts_but_sets_no_weights(
        start_backend, weir, caplog):
    caplog.set_level(logging.INFO)
    live, stable, _ = await start(weir, start_backend)
    api = live.api
    code, data = await call(live, "POST", "/api/services/app/rollout/start", PROMOTER)
    assert code == 403, data
    assert data["error"] == "rollout start needs the operator role; token ci is a promoter"

    code, data = await call(live, "POST", "/api/services/app/rollout/start", OPERATOR)
    assert code == 200, data
    await api.wait_rollout(at_timed_pause, what="at the timed pause")

    for action in ("pause", "resume"):
        code, data = await call(live, "POST", f"/api/services/app/rollout/{action}", PROMOTER)
        assert code == 200, (action, data)
    code, data = await call(live, "POST", "/api/services/app/rollout/promote", PROMOTER)
    assert code == 200, data
    rollout = await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 3,
                                     what="past the timed pause, at the next")
    assert rollout["promoted_by"] == "ci"
    promoted = [e for e in rollout["events"] if e["event"] == "promoted"]
    assert [e["by"] for e in promoted] == ["ci"]
    started = [e for e in rollout["events"] if e["event"] == "started"]
    assert [e["by"] for e in started] == ["oncall"]

    # What needs an operator: 403 naming the role, and nothing changes.
    weights = await api.weights()
    refused = [
        ("PUT", "/api/services/app/weights", {"weights": {"stable": 0, "canary": 100}},
         "setting weights"),
        ("POST", "/api/services/app/switch", {"to": "canary"}, "a switch"),
        ("POST", "/api/reload", {}, "a reload"),
        ("POST", "/api/upstreams/drain", {"upstream": stable.address}, "draining an upstream"),
        ("POST", "/api/upstreams/undrain", {"upstream": stable.address},
         "undraining an upstream"),
        ("POST", "/api/services/app/rollout/retry", {}, "rollout retry"),
    ]
    for method, path, body, what in refused:
        code, data = await call(live, method, path, PROMOTER, body)
        assert code == 403, (path, data)
        assert data["error"] == f"{what} needs the operator role; token ci is a promoter"
        assert data["needs"] == "operator" and data["role"] == "promoter"
    assert await api.weights() == weights
    assert "refused setting weights to token ci (a promoter): it needs the operator role" \
        in caplog.text

    code, data = await call(live, "POST", "/api/services/app/rollout/abort", PROMOTER)
    assert code == 200, data
    rollout = await api.wait_rollout(lambda r: r["phase"] == "aborted", what="aborted")
    assert rollout["reason"] == "aborted by ci"
    assert [e["by"] for e in rollout["events"] if e["event"] == "aborted"] == ["ci"]
    await api.wait_weights({"stable": 100, "canary": 0})

    # /api/status: the actions with who made them, oldest first.
    actions = (await api.service())["actions"]
    assert [(a["by"], a["action"]) for a in actions] == [
        ("oncall", "rollout_start"), ("ci", "rollout_pause"), ("ci", "rollout_resume"),
        ("ci", "rollout_promote"), ("ci", "rollout_abort")]
    assert actions[0]["detail"] == "rollout 1 (api): canary replaces stable"
    assert actions[3]["detail"] == "rollout 1: promoted past step 2"
    assert actions[4]["detail"].startswith("rollout 1: aborted by ci")
    assert all(set(a) == {"at", "by", "action", "detail"} for a in actions)
    # The log names who acted.
    assert "rollout promoted: promoted past step 2 (by ci)" in caplog.text


async def test_an_operator_does_everything_and_admin_token_acts_as_admin(
        start_backend, weir, caplog):
    caplog.set_level(logging.INFO)
    live, stable, _ = await start(weir, start_backend)
    api = live.api
    steps = [
        ("PUT", "/api/services/app/weights", {"weights": {"stable": 70, "canary": 30}}),
        ("POST", "/api/services/app/switch", {"to": "stable"}),
        ("POST", "/api/upstreams/drain", {"upstream": stable.address, "force": True}),
        ("POST", "/api/upstreams/undrain", {"upstream": stable.address}),
        ("POST", "/api/reload", {}),
        ("POST", "/api/services/app/rollout/start", {}),
        ("POST", "/api/services/app/rollout/pause", {}),
        ("POST", "/api/services/app/rollout/resume", {}),
        ("POST", "/api/services/app/rollout/promote", {}),
        ("POST", "/api/services/app/rollout/abort", {}),
        ("POST", "/api/services/app/rollout/retry", {}),
    ]
    for method, path, body in steps:
        if path.endswith(("/pause", "/abort")):
            await api.wait_rollout(at_timed_pause if path.endswith("/pause")
                                   else lambda r: r["phase"] == "paused", what=path)
        code, data = await call(live, method, path, OPERATOR, body)
        assert code == 200, (path, data)
        if path.endswith("/weights"):
            # The weights' source stays what dashboards read; who set them is beside it.
            assert (await api.service())["weights_source"] == "api"
    status = await api.status()
    [app] = status["services"]
    assert [a["action"] for a in app["actions"]] == [
        "set_weights", "switch", "rollout_start", "rollout_pause", "rollout_resume",
        "rollout_promote", "rollout_abort", "rollout_retry"]
    assert {a["by"] for a in app["actions"]} == {"oncall"}
    assert app["actions"][0]["detail"] == "stable=70 canary=30"
    assert app["actions"][1]["detail"] == "to stable (stable=100 canary=0)"
    assert [(a["by"], a["action"]) for a in status["actions"]] == [
        ("oncall", "drain"), ("oncall", "undrain"), ("oncall", "reload")]
    assert status["actions"][0]["detail"].startswith(f"{stable.address} (used by app/stable)")
    assert status["actions"][2]["detail"] == f"generation {status['generation']}"
    assert "weights set to {'stable': 70, 'canary': 30} by oncall (api)" in caplog.text
    assert f"upstream {stable.address} drained by oncall" in caplog.text
    assert "config reloaded (api, by oncall)" in caplog.text

    # admin.token: an operator named "admin".
    await api.wait_rollout(at_timed_pause, what="the retried rollout's timed pause")
    code, data = await call(live, "POST", "/api/services/app/rollout/promote", TOKEN)
    assert code == 200, data
    rollout = await api.wait_rollout(lambda r: r["promoted_by"] == ADMIN_TOKEN_NAME,
                                     what="promoted by admin")
    assert rollout["number"] == 2
    assert [e["by"] for e in rollout["events"]
            if e["event"] == "promoted" and e["rollout"] == 2] == ["admin"]
    code, data = await call(live, "PUT", "/api/services/app/weights", TOKEN,
                            {"weights": {"stable": 100, "canary": 0}})
    assert code == 200, data
    actions = (await api.service())["actions"]
    assert [(a["by"], a["action"]) for a in actions[-2:]] == [
        ("admin", "rollout_promote"), ("admin", "set_weights")]


async def test_the_actions_kept_per_service_are_bounded(start_backend, weir):
    live, _, _ = await start(weir, start_backend)
    for canary in range(25):
        code, data = await call(live, "PUT", "/api/services/app/weights", OPERATOR,
                                {"weights": {"stable": 100, "canary": canary}})
        assert code == 200, data
    actions = (await live.api.service())["actions"]
    assert len(actions) == 20
    assert actions[0]["detail"] == "stable=100 canary=5"
    assert actions[-1]["detail"] == "stable=100 canary=24"


async def test_tokens_follow_a_reload(start_backend, weir):
    """Tokens are read from the config in force: a reload adds, removes and re-roles them."""
    live, _, _ = await start(weir, start_backend)
    data = yaml.safe_load(live.path.read_text(encoding="utf-8"))
    data["admin"]["tokens"] = [{"name": "ci", "token": PROMOTER, "role": "operator"},
                               {"name": "deploy", "token": "deploy-5e1f", "role": "promoter"}]
    live.rewrite(data)
    code, result = await call(live, "POST", "/api/reload", OPERATOR)
    assert code == 200, result  # still oncall's until the reload is done
    assert (await call(live, "POST", "/api/reload", OPERATOR))[0] == 401  # oncall is gone
    assert (await call(live, "POST", "/api/reload", PROMOTER))[0] == 200  # ci: an operator
    code, result = await call(live, "POST", "/api/reload", "deploy-5e1f")
    assert code == 403 and result["error"].endswith("token deploy is a promoter"), result
    assert [(a["by"], a["action"]) for a in (await live.api.status())["actions"]] == [
        ("oncall", "reload"), ("ci", "reload")]


async def test_mutations_are_disabled_without_any_token(start_backend, weir):
    stable, canary = await start_backend("stable"), await start_backend("canary")
    live = await weir(services(stable, canary), admin={"listen": "127.0.0.1:0"})
    code, data = await call(live, "POST", "/api/reload", TOKEN)
    assert code == 401 and "set admin.token or admin.tokens" in data["error"], data


async def weir_cli(admin_url: str, token: str, *args: str) -> tuple[int, str, str]:
    """`weir ARGS --admin URL` with WEIR_ADMIN_TOKEN set, without blocking this loop (the
    Weir it talks to runs on it)."""
    env = {**os.environ, "WEIR_ADMIN_TOKEN": token}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, "--admin", admin_url, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, out.decode(), err.decode()


async def test_the_cli_with_a_promoter_token(start_backend, weir):
    live, _, _ = await start(weir, start_backend)
    code, data = await call(live, "POST", "/api/services/app/rollout/start", OPERATOR)
    assert code == 200, data
    await live.api.wait_rollout(at_timed_pause, what="the timed pause")

    code, out, err = await weir_cli(live.admin_url, PROMOTER, "promote", "app")
    assert code == 0, (out, err)
    await poll(live.api.rollout, lambda r: r["promoted_by"] == "ci", 5, "promoted by ci")

    code, out, err = await weir_cli(live.admin_url, PROMOTER, "set-weight", "app",
                                    "stable=50", "canary=50")
    assert code == 1, (out, err)
    assert "setting weights needs the operator role; token ci is a promoter" in err
    assert "HTTP 403" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    code, out, err = await weir_cli(live.admin_url, VIEWER, "status")
    assert code == 0, err
    assert "last actions:" in out
    lines = [line for line in out.splitlines() if "rollout_" in line]
    assert [line.split()[2:4] for line in lines] == [["oncall", "rollout_start:"],
                                                      ["ci", "rollout_promote:"]], out


@pytest.mark.parametrize(("tokens", "top_token", "message"), [
    ([{"name": "ci", "token": "a-1", "role": "promoter"},
      {"name": "ci", "token": "b-2", "role": "viewer"}], None,
     "admin.tokens[1].name: duplicate token name 'ci' (admin.tokens[0] has it too)"),
    ([{"name": "ci", "token": "same-1", "role": "promoter"},
      {"name": "deploy", "token": "same-1", "role": "viewer"}], None,
     "admin.tokens[1].token: the same token as admin.tokens[0]"),
    ([{"name": "ci", "token": "top-1", "role": "promoter"}], "top-1",
     "admin.tokens[0].token: the same token as admin.token"),
    ([{"name": "admin", "token": "a-1", "role": "viewer"}], "top-1",
     "admin.tokens[0].name: 'admin' is the name admin.token acts under"),
    ([{"name": "ci", "token": "a-1", "role": "admin"}], None,
     "admin.tokens[0].role: Input should be 'viewer', 'promoter' or 'operator'"),
    ([{"name": "ci", "token": "a-1"}], None, "admin.tokens[0].role: Field required"),
    ([{"name": "ci", "token": "", "role": "viewer"}], None,
     "admin.tokens[0].token: a token must not be empty"),
    ([{"name": "ci", "token": " a-1", "role": "viewer"}], None,
     "admin.tokens[0].token: a token must not start or end with whitespace"),
    ([{"name": "c i", "token": "a-1", "role": "viewer"}], None, "admin.tokens[0].name:"),
])
def test_config_checks_the_tokens(tokens: list[dict[str, Any]], top_token: str | None,
                                  message: str) -> None:
    admin: dict[str, Any] = {"tokens": tokens}
    if top_token is not None:
        admin["token"] = top_token
    data = {"admin": admin,
            "services": [{"name": "app", "versions": {"v1": {"upstreams": ["127.0.0.1:9"]}}}]}
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    errors = raised.value.errors
    assert any(e.startswith(message) for e in errors), errors
    # No error shows a token's value.
    for entry in tokens:
        if entry.get("token", "").strip():
            assert all(entry["token"] not in e for e in errors), errors


def test_admin_token_is_an_operator_named_admin_first() -> None:
    config = parse_config({"admin": {"token": "top-1", "tokens": TOKENS},
                           "services": [{"name": "app",
                                         "versions": {"v1": {"upstreams": ["127.0.0.1:9"]}}}]})
    assert [(t.name, t.role) for t in config.admin.credentials()] == [
        ("admin", "operator"), ("dashboard", "viewer"), ("ci", "promoter"),
        ("oncall", "operator")]
