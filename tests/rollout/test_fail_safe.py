"""Failing safe when the runtime state cannot be saved or does not fit the file any more: a
rollout's steps edited mid-way, the state folder unwritable during an abort or a start, a
hand-damaged rollout record, and a blue/green promotion that must drain the colour it leaves.

Real backends on 127.0.0.1, the control plane, data plane and admin API from a config file in
this event loop (conftest's ``weir``). An unwritable state folder is made by putting a
plain file where the folder was (the tests may run as root, for whom permission bits do not
stop a write); putting the folder back makes it writable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from ..conftest import REPO_ROOT, TOKEN, sample, write_config
from ..rollout_harness import blue_green_config, canary_config, versions_seen

EIGHT_STEPS = [{"set_weight": 10}, {"pause": {}}, {"set_weight": 20}, {"pause": {}},
               {"set_weight": 50}, {"pause": {}}, {"set_weight": 80}, {"pause": {}}]
THREE_STEPS = [{"set_weight": 10}, {"pause": {"duration": "1h"}}, {"set_weight": 20}]


class StateFolder:
    """The state file's folder, made unwritable (a file where the folder was) and back."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "state"
        self.path.mkdir()
        self.file = self.path / "weir.state.json"
        self.away = tmp_path / "state.away"

    def break_it(self) -> None:
        self.path.rename(self.away)
        self.path.write_text("not a folder\n")

    def mend(self) -> None:
        self.path.unlink()
        self.away.rename(self.path)

    @contextlib.contextmanager
    def broken(self) -> Iterator[None]:
        """Unwritable for the block, and writable again after it, however it ends."""
        self.break_it()
        try:
            yield
        finally:
            self.mend()

    def saved(self) -> dict:
        return json.loads(self.file.read_text())

    async def weir(self, start, data: dict):
        """Weir started (the harness's ``weir`` fixture) with its state file in this folder."""
        data["state_file"] = str(self.file)
        return await start(data)


async def weir_command(*args: str) -> str:
    """`weir ARGS` (the CLI, a client of the admin API) run as a process; its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=REPO_ROOT,
        env={**os.environ, "WEIR_ADMIN_TOKEN": TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    return output.decode()


async def at_step(api, step: int, phase: str = "paused") -> dict:
    return await api.wait_rollout(lambda r: r["phase"] == phase and r["step"] == step,
                                  timeout=5, what=f"{phase} at step {step}")


async def test_shortening_the_steps_mid_rollout_holds_it_instead_of_completing_it(
        backends, weir, caplog):
    caplog.set_level(logging.INFO, logger="weir")
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, EIGHT_STEPS))
    api = live.api
    await api.act("start")
    await at_step(api, 1)
    await api.act("promote")
    await at_step(api, 3)
    await api.act("promote")
    await at_step(api, 5)
    assert await api.weights() == {"stable": 50, "canary": 50}

    data = yaml.safe_load(live.path.read_text())
    data["services"][0]["rollout"]["steps"] = THREE_STEPS
    write_config(live.path, data)
    await api.reload()
    held = await api.wait_rollout(lambda r: r["paused_by"] == "config", timeout=5,
                                  what="the rollout held after the steps changed")
    # Held within the new steps, at the last one whose steps before it stay at or below
    # the canary's 50%, with no weight changed and nothing completed.
    assert held["phase"] == "paused" and held["step"] == 2, held
    assert "steps changed" in held["reason"] and "50%" in held["reason"], held["reason"]
    await api.holds(lambda r: r["phase"] == "paused" and r["paused_by"] == "config", 1.5,
                    "held, not completed")
    assert await api.weights() == {"stable": 50, "canary": 50}
    assert "rollout completed" not in caplog.text
    assert "rollout paused: the rollout's steps changed" in caplog.text

    # Going on is the operator's call, and goes through the new steps from there.
    await api.act("resume")
    done = await api.wait_rollout(lambda r: r["phase"] == "completed", timeout=5,
                                  what="the last step, then completion")
    assert done["step"] == 3


async def test_editing_only_steps_not_reached_yet_carries_on(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, EIGHT_STEPS))
    api = live.api
    await api.act("start")
    await at_step(api, 1)

    data = yaml.safe_load(live.path.read_text())
    data["services"][0]["rollout"]["steps"] = [*EIGHT_STEPS[:2], {"set_weight": 30},
                                               {"pause": {}}]
    write_config(live.path, data)
    await api.reload()
    rollout = await api.holds(lambda r: r["phase"] == "paused" and r["step"] == 1
                              and r["paused_by"] == "step", 0.5, "still at its pause step")
    assert rollout["steps"][2] == {"set_weight": 30}
    await api.act("promote")
    await at_step(api, 3)
    assert await api.weights() == {"stable": 70, "canary": 30}


async def test_steps_changed_while_weir_was_stopped_hold_the_rollout(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, EIGHT_STEPS))
    await live.api.act("start")
    await at_step(live.api, 1)
    await live.api.act("promote")
    await at_step(live.api, 3)
    await live.close()

    again = await weir(canary_config(stable, canary, THREE_STEPS))
    rollout = await again.api.rollout()
    assert rollout["phase"] == "paused" and rollout["paused_by"] == "config", rollout
    assert rollout["step"] < 3
    assert "while Weir was stopped" in rollout["reason"]
    await again.api.holds(lambda r: r["phase"] == "paused", 1.0, "held after the restart")
    assert await again.api.weights() == {"stable": 80, "canary": 20}


async def test_an_abort_with_the_state_folder_unwritable_is_applied_and_saved_later(
        backends, weir, tmp_path):
    stable, canary = await backends("stable"), await backends("canary")
    folder = StateFolder(tmp_path)
    data = canary_config(stable, canary, EIGHT_STEPS)
    live = await folder.weir(weir, data)
    api = live.api
    await api.act("start")
    await at_step(api, 1)
    await api.act("promote")
    await at_step(api, 3)
    assert await api.weights() == {"stable": 80, "canary": 20}

    folder.break_it()
    asked = time.monotonic()
    aborted = await api.act("abort")
    # Answered within a second: the traffic moved first, and the failed save was quick.
    assert time.monotonic() - asked < 1.0
    assert aborted["phase"] == "aborted"
    assert aborted["saved"] is False
    assert aborted["warning"].startswith("applied, not saved"), aborted
    # In force at once, whatever the disk does.
    assert await api.weights() == {"stable": 100, "canary": 0}
    assert await versions_seen(live.port, 20) == Counter(stable=20)
    status = (await api.call("GET", "/api/status", auth=False))[1]
    assert status["state_unsaved"]["attempts"] >= 1, status["state_unsaved"]
    metrics = await api.metrics()
    assert sample(metrics, "weir_state_unsaved") == 1
    assert sample(metrics, "weir_state_save_failures_total") >= 1
    # An abort said once is not refused as "no rollout in progress" and then undone.
    await api.act("abort", expect=409)
    assert await api.weights() == {"stable": 100, "canary": 0}

    folder.mend()
    deadline = time.monotonic() + 8
    while (await api.call("GET", "/api/status", auth=False))[1]["state_unsaved"] is not None:
        assert time.monotonic() < deadline, "the state was not saved after the folder came back"
        await asyncio.sleep(0.05)
    saved = folder.saved()["services"]["app"]
    assert saved["rollout"]["phase"] == "aborted"
    assert saved["weights"]["weights"] == {"stable": 100, "canary": 0}
    assert sample(await api.metrics(), "weir_state_unsaved") == 0

    await live.close()
    again = await weir(data)
    assert (await again.api.rollout())["phase"] == "aborted"
    assert await again.api.weights() == {"stable": 100, "canary": 0}


async def test_a_rollback_after_failed_analysis_does_not_wait_for_the_disk(backends, weir,
                                                                           tmp_path):
    stable = await backends("stable")
    canary = await backends("canary", fail_all=True)
    folder = StateFolder(tmp_path)
    # Windows with no traffic yet (before the load below) are inconclusive: never enough of
    # them to pause the rollout, on however slow a machine.
    analysis = {"interval": "300ms", "min_requests": 3, "failure_limit": 0,
                "inconclusive_limit": 1000, "checks": {"max_error_rate": 0.1}}
    data = canary_config(stable, canary, [{"set_weight": 50}, {"pause": {}}],
                         analysis=analysis)
    live = await folder.weir(weir, data)
    api = live.api
    await api.act("start")
    await at_step(api, 1)
    with folder.broken():
        deadline = time.monotonic() + 10
        while (await api.rollout())["phase"] != "aborted":
            assert time.monotonic() < deadline, "the failing canary was not rolled back"
            await versions_seen(live.port, 10)
        await api.wait_weights({"stable": 100, "canary": 0}, timeout=1)
        assert await versions_seen(live.port, 10) == Counter(stable=10)
        status = (await api.call("GET", "/api/status", auth=False))[1]
        assert status["state_unsaved"] is not None
        shown = await weir_command("status", "--admin", f"http://127.0.0.1:{live.admin.port}")
        assert "runtime state NOT SAVED" in shown and "retrying" in shown, shown


async def test_a_start_that_cannot_be_saved_changes_nothing_and_stays_undone(
        backends, weir, tmp_path, caplog):
    stable, canary = await backends("stable"), await backends("canary")
    folder = StateFolder(tmp_path)
    data = canary_config(stable, canary, EIGHT_STEPS)
    live = await folder.weir(weir, data)
    api = live.api
    await api.wait_rollout(lambda r: r["phase"] == "idle", timeout=2)
    folder.break_it()
    code, reply = await api.call("POST", "/api/services/app/rollout/start")
    assert code == 500 and "nothing changed" in reply["error"], (code, reply)
    # True: nothing did change, and nothing does once the disk is back.
    assert (await api.rollout())["phase"] == "idle"
    assert await api.weights() == {"stable": 100, "canary": 0}
    folder.mend()
    await api.holds(lambda r: r["phase"] == "idle", 1.5, "no rollout starts on its own")
    assert await api.weights() == {"stable": 100, "canary": 0}
    assert "Traceback" not in caplog.text
    # And once writable, a start goes through.
    assert (await api.act("start"))["phase"] == "progressing"
    await api.wait_weights({"stable": 90, "canary": 10})


async def test_a_step_that_cannot_be_saved_waits_there_and_says_so_once(backends, weir,
                                                                        tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="weir")
    stable, canary = await backends("stable"), await backends("canary")
    folder = StateFolder(tmp_path)
    steps = [{"set_weight": 10}, {"pause": {}}, {"set_weight": 40}, {"pause": {}}]
    data = canary_config(stable, canary, steps)
    live = await folder.weir(weir, data)
    api = live.api
    await api.act("start")
    await at_step(api, 1)
    with folder.broken():
        # To step 2 (set_weight 40), not saved: done, and the CLI says so.
        said = await weir_command("promote", "app", "--admin",
                                  f"http://127.0.0.1:{live.admin.port}")
        assert "rollout promoted" in said and "warning: applied, not saved" in said, said
        # The canary's weight is not raised while it cannot be saved...
        await api.holds(lambda r: r["step"] == 2, 1.5, "waiting at the set_weight step")
        assert await api.weights() == {"stable": 90, "canary": 10}
        assert caplog.text.count("the rollout waits at step 3") == 1, caplog.text
        assert "Traceback" not in caplog.text
    # ... and is once it can.
    await api.wait_weights({"stable": 60, "canary": 40})
    await at_step(api, 3)


async def test_a_damaged_rollout_record_is_set_aside_like_a_damaged_weights_entry(
        backends, weir, tmp_path, caplog):
    stable, canary = await backends("stable"), await backends("canary")
    state = tmp_path / "weir.state.json"
    state.write_text(json.dumps({"format": 1, "services": {"app": {"rollout": {
        "phase": "progressing", "step": "x", "revision": "r"}}}}))
    data = canary_config(stable, canary, EIGHT_STEPS)
    live = await weir(data)
    api = live.api
    assert (tmp_path / "weir.state.json.corrupt").exists()
    assert "step" in caplog.text and "moved it to" in caplog.text
    await api.holds(lambda r: r["phase"] == "idle", 1.5, "a clean start")
    assert "rollout tick failed" not in caplog.text and "Traceback" not in caplog.text
    assert (await api.act("start"))["phase"] == "progressing"


async def test_blue_green_promote_drains_the_colour_it_leaves(backends, weir):
    blue = await backends("blue", delay=6.0)
    green = await backends("green")
    data = blue_green_config(blue, green, promotion={"auto": False})
    data["services"][0]["drain"] = {"timeout": "1s"}
    live = await weir(data)
    api = live.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1, timeout=5,
                           what="waiting for promotion")

    async with aiohttp.ClientSession() as session:
        async def slow_request() -> str:
            try:
                async with session.get(f"http://127.0.0.1:{live.port}/slow") as response:
                    return f"{response.status} {await response.text()}"
            except aiohttp.ClientError as exc:
                return f"cut: {type(exc).__name__}"

        request = asyncio.ensure_future(slow_request())
        deadline = time.monotonic() + 3
        while blue.served == 0:
            assert time.monotonic() < deadline, "the slow request did not reach blue"
            await asyncio.sleep(0.01)
        await api.act("promote")
        promoted_at = time.monotonic()
        status = (await api.call("GET", "/api/status", auth=False))[1]
        assert [d["version"] for d in status["draining"]] == ["blue"], status["draining"]
        outcome = await asyncio.wait_for(request, 5)
        # Closed when the drain timeout ran out, not when blue finally answered.
        assert time.monotonic() - promoted_at < 1.0 + 2.0, outcome
        # (A GET with no byte of its answer sent yet is tried again on the new colour.)
        assert outcome != "200 blue", outcome
    # Blue stays reachable as the preview (and the rollback target).
    assert await versions_seen(live.port, 3) == Counter(green=3)


@pytest.fixture(autouse=True)
def _quiet_backends(caplog):
    caplog.set_level(logging.INFO, logger="weir")
