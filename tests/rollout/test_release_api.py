"""Starting a release from a pipeline: `weir rollout start SERVICE --revision R --upstreams A,B`
sets the new version's revision and upstreams through the admin API and starts its rollout, in
one saved change. The release is kept like every runtime change (the state file, or Redis for a
fleet), survives a restart without starting again, and gives way, field by field, to a later
edit of the same field in the config file.

Real backends answer with their name, so each test sees which one a request reached.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config.loader import parse_config
from proxy.config.model import Config, ConfigError
from proxy.control.redisstore import document_fields, parse_fields
from proxy.control.state import RuntimeState, VersionOverride, effective_config, merged_override

from ..conftest import StartWeir, StartWeirProcess, WeirProcess, make_config, poll
from ..rollout_harness import blue_green_config, canary_config, weir_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses")

START = "/api/services/app/rollout/start"


async def answered_by(port: int, count: int) -> Counter[str]:
    """Which backend answered each of ``count`` requests (the harness's apps answer with
    their name)."""
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for _ in range(count):
            async with session.get(f"http://127.0.0.1:{port}/item") as response:
                seen[await response.text()] += 1
    return seen


def saved(path: Path) -> dict[str, Any]:
    """The app service's entry in a state file."""
    return dict(json.loads(path.read_text())["services"].get("app", {}))


def canary_of(status: dict[str, Any]) -> dict[str, Any]:
    return dict(status["services"][0]["versions"]["canary"])


async def test_start_with_a_revision_from_the_cli_rolls_out_the_new_upstreams(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    canary2 = await backends("canary2")
    live = await weir(canary_config(stable, canary, [{"set_weight": 50}]))

    ran = await weir_cli(live.admin_url, "rollout", "start", "app", "--revision", "v2.4.0",
                         "--upstreams", canary2.address, "--wait", "--timeout", "20")
    assert ran.code == 0, ran
    assert "app: rollout 1 of revision v2.4.0 started" in ran.out
    assert "started: rollout 1 of revision v2.4.0 (api)" in ran.out
    record = await live.api.rollout()
    assert (record["number"], record["release"], record["phase"]) == (1, "v2.4.0", "completed")

    # The canary has all the traffic now, on the upstreams the pipeline gave.
    assert await answered_by(live.port, 20) == Counter(canary2=20)
    assert canary.served == 0
    entry = saved(live.path.with_name("weir.state.json"))["versions"]["canary"]
    assert entry.pop("changed_at") > 0
    assert entry == {"revision": "v2.4.0", "upstreams": [canary2.address],
                     "file_revision": "c1", "file_upstreams": [canary.address],
                     "source": "api"}
    status = await live.api.status()
    version = canary_of(status)
    assert (version["upstreams"], version["upstreams_source"]) == ([canary2.address], "api")
    assert (version["revision"], version["revision_source"]) == ("v2.4.0", "api")
    stable_version = status["services"][0]["versions"]["stable"]
    assert (stable_version["upstreams_source"], stable_version["revision_source"]) == (
        "file", "file")

    # A pipeline step that waits on the revision finds it done.
    waited = await weir_cli(live.admin_url, "rollout", "wait", "app", "--revision", "v2.4.0",
                            "--timeout", "5")
    assert waited.code == 0, waited
    shown = await weir_cli(live.admin_url, "status")
    assert "v2.4.0 (api)" in shown.out and f"{canary2.address} (api)" in shown.out, shown.out


async def test_a_release_survives_a_restart_and_yields_to_a_file_edit_of_the_same_field(
        backends, weir_process: StartWeirProcess):
    stable, canary = await backends("stable"), await backends("canary")
    canary2, canary3 = await backends("canary2"), await backends("canary3")
    steps = [{"set_weight": 30}, {"pause": {"duration": "60s"}}]
    proc = await weir_process(canary_config(stable, canary, steps))
    api = proc.api
    assert api is not None

    started = await api.act("start", {"revision": "v2", "upstreams": [canary2.address]})
    assert (started["number"], started["release"], started["saved"]) == (1, "v2", True)
    before = await api.wait_rollout(lambda r: r["step"] == 1, timeout=5, what="the pause step")
    await api.wait_weights({"stable": 70, "canary": 30})
    await poll(lambda: asyncio.to_thread(saved, Path(proc.data["state_file"])),
               lambda entry: entry["rollout"]["step"] == 1, 5, "the step in the state file")

    await restart(proc)
    after = await api.rollout()
    # The same rollout at the same step: the release is what the record already counts.
    assert (after["number"], after["step"], after["phase"]) == (1, 1, "progressing"), after
    assert after["started_at"] == before["started_at"]
    assert canary_of(await api.status())["upstreams"] == [canary2.address]
    await api.holds(lambda r: r["number"] == 1 and r["step"] == 1, 1.5, "no second rollout")
    seen = await answered_by(proc.port, 40)
    assert set(seen) == {"stable", "canary2"}, seen
    assert canary.served == 0

    # An edit of something else in the file keeps the release.
    data = copy.deepcopy(proc.data)
    data["services"][0]["drain"] = {"timeout": "5s"}
    await rewrite_and_reload(proc, data)
    version = canary_of(await api.status())
    assert (version["upstreams"], version["upstreams_source"]) == ([canary2.address], "api")
    assert (await api.rollout())["number"] == 1

    # An edit of the canary's upstreams in the file wins for the upstreams; the revision set
    # through the API stays. The file's new upstreams are a new version: a new rollout.
    data["services"][0]["versions"]["canary"]["upstreams"] = [canary3.address]
    await rewrite_and_reload(proc, data)
    version = canary_of(await api.status())
    assert (version["upstreams"], version["upstreams_source"]) == ([canary3.address], "file")
    assert (version["revision"], version["revision_source"]) == ("v2", "api")
    record = await api.wait_rollout(lambda r: r["number"] == 2, timeout=5, what="rollout 2")
    assert record["release"] == "v2"
    entry = saved(Path(proc.data["state_file"]))["versions"]["canary"]
    assert (entry["revision"], entry["upstreams"]) == ("v2", None)
    assert "dropping the api upstreams" in proc.output()
    assert set(await answered_by(proc.port, 40)) <= {"stable", "canary3"}


async def test_a_bad_address_or_body_is_refused_and_changes_nothing(backends, weir: StartWeir,
                                                                    tmp_path):
    stable, canary = await backends("stable"), await backends("canary")
    canary2 = await backends("canary2")
    folder = tmp_path / "state"
    folder.mkdir()
    state_file = folder / "weir.state.json"
    data = canary_config(stable, canary, [{"set_weight": 10}, {"pause": {}}])
    live = await weir(data, state_file=str(state_file))
    api = live.api

    code, reply = await api.call("POST", START, {"upstreams": [canary2.address, "nope"]})
    assert code == 400, reply
    # The message the config file gets for the same address.
    bad = copy.deepcopy(data)
    bad["services"][0]["versions"]["canary"]["upstreams"] = [canary2.address, "nope"]
    with pytest.raises(ConfigError) as invalid:
        parse_config(bad)
    [line] = [e for e in invalid.value.errors if "upstreams" in e]
    assert line.startswith("services[0].versions.canary.upstreams[1]: "), line
    assert reply["error"] == ("service 'app' version 'canary': "
                              + line.removeprefix("services[0].versions.canary."))

    for body, why in [({"revision": 5}, '"revision" must be'),
                      ({"upstreams": []}, '"upstreams" must be'),
                      ({"upstreams": "127.0.0.1:1"}, '"upstreams" must be'),
                      ({"colour": "green"}, "unknown field 'colour'")]:
        code, reply = await api.call("POST", START, body)
        assert (code, why in reply.get("error", "")) == (400, True), (body, code, reply)
    code, reply = await api.call("POST", "/api/services/nosuch/rollout/start",
                                 {"revision": "v2"})
    assert code == 404, reply

    # A release that cannot be saved is not made either (and nothing starts later).
    away = tmp_path / "state.away"
    folder.rename(away)
    folder.write_text("not a folder\n")
    try:
        code, reply = await api.call("POST", START, {"revision": "v2",
                                                     "upstreams": [canary2.address]})
        assert code == 500 and "nothing changed" in reply["error"], (code, reply)
    finally:
        folder.unlink()
        away.rename(folder)
    record = await api.holds(lambda r: r["phase"] == "idle", 1.0, "no rollout")
    assert record["number"] == 0
    version = canary_of(await api.status())
    assert (version["upstreams"], version["upstreams_source"]) == ([canary.address], "file")
    assert (version["revision"], version["revision_source"]) == ("c1", "file")
    assert "versions" not in saved(state_file)
    assert await answered_by(live.port, 10) == Counter(stable=10)


async def test_a_new_release_mid_rollout_starts_over_and_the_same_one_is_refused(backends,
                                                                                 weir):
    stable, canary = await backends("stable"), await backends("canary")
    canary2 = await backends("canary2")
    steps = [{"set_weight": 20}, {"pause": {}}, {"set_weight": 60}, {"pause": {}}]
    live = await weir(canary_config(stable, canary, steps))
    api = live.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1, timeout=5,
                           what="step 2")
    await api.act("promote")
    await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 3, timeout=5,
                           what="step 4")
    assert await api.weights() == {"stable": 40, "canary": 60}

    # A new release while rollout 1 has the canary at 60%: rollout 2, from the first step.
    release = {"revision": "v3", "upstreams": [canary2.address]}
    started = await api.act("start", release)
    assert (started["number"], started["release"], started["step"]) == (2, "v3", 0)
    assert "replaces rollout 1, which was at step 4" in started["events"][-1]["message"]
    assert await api.weights() == {"stable": 80, "canary": 20}
    seen = await answered_by(live.port, 40)
    assert set(seen) <= {"stable", "canary2"} and seen["canary2"], seen

    # The same release again, or a plain start, while rollout 2 runs: refused, as always.
    for body in (release, {"revision": "v3"}, {}):
        reply = await api.act("start", body, expect=409)
        assert "already" in reply["error"], reply
    record = await api.rollout()
    assert (record["number"], record["release"]) == (2, "v3")
    assert [e["event"] for e in record["events"]].count("started") == 2


async def test_a_blue_green_release_is_the_idle_colour_and_is_checked_before_promotion(
        backends, weir: StartWeir):
    blue, green = await backends("blue"), await backends("green")
    green2 = await backends("green2")
    live = await weir(blue_green_config(blue, green, promotion={"auto": False},
                                        checks=[{"path": "/healthz", "status": 200}]))
    started = await live.api.act("start", {"revision": "g2", "upstreams": [green2.address]})
    assert (started["release"], started["versions"]["new"]) == ("g2", "green")
    await live.api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1,
                                timeout=5, what="the checks passed")
    # The pre-promotion checks went to the new upstreams, and so do preview requests.
    assert (green2.health_checks, green.health_checks) == (1, 0)
    preview = await live.request("/item", headers={"x-weir-preview": "1"})
    assert preview.body == b"green2"
    assert await answered_by(live.port, 5) == Counter(blue=5)
    green_status = (await live.api.service())["versions"]["green"]
    assert (green_status["upstreams_source"], green_status["revision"]) == ("api", "g2")


# --- the state document -----------------------------------------------------------------------


def release_config(canary_upstreams: list[str], revision: str = "c1",
                   stable_revision: str = "s1") -> Config:
    return make_config([{
        "name": "app",
        "versions": {"stable": {"upstreams": ["127.0.0.1:9001"], "revision": stable_revision},
                     "canary": {"upstreams": canary_upstreams, "revision": revision}},
        "weights": {"stable": 100, "canary": 0}}])


def test_an_older_state_file_loads_and_a_damaged_release_sets_the_file_aside(tmp_path, caplog):
    path = tmp_path / "weir.state.json"
    weights = {"weights": {"stable": 50, "canary": 50}, "source": "api",
               "file_weights": {"stable": 100, "canary": 0}, "changed_at": 1.0}
    path.write_text(json.dumps({"format": 1, "services": {"app": {"weights": weights}}}))
    state = RuntimeState(path)
    state.load()  # a file from before releases were kept: no "versions" anywhere
    assert state.weights["app"].weights == {"stable": 50, "canary": 50}
    assert state.versions == {}

    release = {"revision": "v2", "upstreams": ["127.0.0.1:9003"], "file_revision": "c1",
               "file_upstreams": ["127.0.0.1:9002"], "source": "api", "changed_at": 2.0}
    path.write_text(json.dumps({"format": 1, "services": {"app": {
        "weights": weights, "versions": {"canary": release}}}}))
    state = RuntimeState(path)
    state.load()
    assert state.versions["app"]["canary"].upstreams == ["127.0.0.1:9003"]
    # And written back as it was read.
    assert state.document()["services"]["app"]["versions"] == {"canary": release}

    for damage in ({"upstreams": ["nope"]}, {"revision": 7}, {"upstreams": []},
                   {"revision": None, "upstreams": None}):
        path.write_text(json.dumps({"format": 1, "services": {"app": {
            "versions": {"canary": {**release, **damage}}}}}))
        state = RuntimeState(path)
        state.load()
        assert state.versions == {} and not path.exists(), damage
        assert path.with_suffix(".json.corrupt").exists()
    assert "is unreadable" in caplog.text


def test_a_file_edit_drops_the_release_field_it_changed_and_keeps_the_other():
    file_upstreams = ["127.0.0.1:9002"]
    config = release_config(file_upstreams)
    state = RuntimeState(None)
    canary = config.services[0].versions["canary"]
    override = merged_override(None, canary, "v2", ["127.0.0.1:9003"])
    assert override is not None
    state.versions = {"app": {"canary": override}}
    served = effective_config(config, state.versions).services[0].versions["canary"]
    assert (served.upstreams, served.revision) == (["127.0.0.1:9003"], "v2")

    # Something else changes in the file: both fields stand.
    assert state.reconcile(release_config(file_upstreams, stable_revision="s2")) == []
    # The file's canary upstreams change: that field is the file's again, the revision stays.
    assert state.reconcile(release_config(["127.0.0.1:9004"])) == ["app"]
    kept = state.versions["app"]["canary"]
    assert (kept.revision, kept.upstreams, kept.file_upstreams) == ("v2", None, None)
    assert state.version_sources("app", "canary") == {"upstreams_source": "file",
                                                      "revision_source": "api"}
    # Then its revision: nothing is left to override.
    assert state.reconcile(release_config(["127.0.0.1:9004"], revision="c9")) == ["app"]
    assert state.versions == {}
    # A value the file says already is no override.
    assert merged_override(None, canary, "c1", file_upstreams) is None


def test_the_redis_fields_of_a_release_are_read_as_strictly_as_the_file(caplog):
    state = RuntimeState(None)
    state.versions = {"app": {"canary": VersionOverride(
        "v2", ["127.0.0.1:9003"], "c1", ["127.0.0.1:9002"], "api", 2.0)}}
    fields = document_fields(state)
    assert set(fields) == {"version:app/canary"}
    *_, versions = parse_fields(fields)
    assert versions == state.versions
    damaged = {"version:app/canary": json.dumps({**json.loads(fields["version:app/canary"]),
                                                 "upstreams": ["nope"]}),
               "version:app": fields["version:app/canary"],
               "version:app/stable": "{not json"}
    *_, versions = parse_fields(damaged)
    assert versions == {}
    assert caplog.text.count("ignoring the unreadable field") == 3, caplog.text


# --- a fleet sharing Redis --------------------------------------------------------------------

@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[Any]:
    """A redis-server of this test's own (as tests/control/test_store.py starts one). Asked
    for before ``weir_process``, it stops after the Weir processes do."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    pytest.importorskip("redis")
    from ..control.test_store import RedisServer

    server = RedisServer(tmp_path)
    await server.start()
    yield server
    server.kill()


async def test_another_instance_adopts_the_release_without_starting_it_again(
        redis_server, backends, weir_process: StartWeirProcess):
    import redis.asyncio as aioredis

    stable, canary = await backends("stable"), await backends("canary")
    canary2 = await backends("canary2")
    services = canary_config(stable, canary, [{"set_weight": 50}, {"pause": {}}])["services"]
    store = {"type": "redis", "url": redis_server.url,
             "key_prefix": f"weir-test-{uuid.uuid4().hex[:8]}", "leader_ttl": "2s"}
    a = await weir_process(services, state_store=store)
    b = await weir_process(services, state_store=store)
    apis = {a.path.name: a.api, b.path.name: b.api}

    async def leading() -> list[str]:
        return [name for name, api in apis.items()
                if api is not None and (await api.status())["state_store"]["leader"]]

    [leader] = await poll(leading, lambda found: len(found) == 1, 5, "one leader")
    [follower] = [name for name in apis if name != leader]
    follower_api = apis[follower]
    assert follower_api is not None

    # Through the instance that does not run the controller: the leader takes the release
    # and its rollout from the store, in one write, and starts nothing itself.
    started = await follower_api.act("start", {"revision": "v2",
                                               "upstreams": [canary2.address]})
    assert (started["number"], started["release"]) == (1, "v2")
    for name, api in apis.items():
        assert api is not None
        await poll(api.status, lambda s: canary_of(s)["upstreams"] == [canary2.address]
                   and canary_of(s)["upstreams_source"] == "api"
                   and s["services"][0]["weights"] == {"stable": 50, "canary": 50}, 5,
                   f"the release on {name}")
    for api in apis.values():
        assert api is not None
        record = await api.holds(lambda r: r["number"] == 1, 1.0, "one rollout")
        assert [e["event"] for e in record["events"]].count("started") == 1
    for proc in (a, b):
        seen = await answered_by(proc.port, 30)
        assert set(seen) == {"stable", "canary2"}, seen
    assert canary.served == 0

    client = aioredis.from_url(redis_server.url)
    try:
        field = await client.hget(f"{store['key_prefix']}:state", "version:app/canary")
    finally:
        await client.aclose()
    assert json.loads(field)["upstreams"] == [canary2.address]


async def restart(proc: WeirProcess) -> None:
    """SIGTERM, a clean exit, and the same command on the same files again."""
    assert await proc.stop() == 0, proc.output()
    await proc.start()


async def rewrite_and_reload(proc: WeirProcess, data: dict[str, Any]) -> None:
    assert proc.api is not None
    proc.write_config(data)
    await proc.api.reload()
