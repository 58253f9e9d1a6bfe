"""The embedded rollout controller, end to end: canary steps and blue/green promotion judged from
Weir's own per-version counts, automatic rollback, the admin API that drives it, webhooks, and
a restart in the middle of a rollout.

Everything is real: aiohttp backends on 127.0.0.1 (healthy, failing every Nth request, slow,
or failing their health check), the control plane, data plane and admin API started from a
config file in this event loop (a Weir subprocess for the restart), and a bounded load of a few
client workers that the test stops. Conditions are awaited by polling the admin API with a
deadline; analysis intervals and pauses are a second or less so each scenario stays short.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import WeirProcess, free_port, poll, sample, wait_for, write_config
from ..rollout_harness import (
    App,
    Load,
    analyses,
    blue_green_config,
    canary_config,
    versions_seen,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses and signals")


# === canary: the healthy path ===================================================================


async def test_healthy_canary_walks_every_step_to_full_traffic(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [
        {"set_weight": 20},
        {"pause": {"duration": "1s"}},
        {"set_weight": 50},
        {"analysis": {"interval": "1s", "min_requests": 10, "inconclusive_limit": 2,
                      "checks": {"max_error_rate": 0.01, "max_p99": "1s"}}},
        {"set_weight": 80},
        {"pause": {"duration": "500ms"}},
    ]
    analysis = {"interval": "500ms", "min_requests": 5, "failure_limit": 0,
                "inconclusive_limit": 2, "start_step": 0,
                "checks": {"max_error_rate": 0.01, "max_error_rate_increase": 0.01,
                           "max_p99": "1s"}}
    live = await weir(canary_config(stable, canary, steps, analysis))
    api = live.api
    assert (await api.rollout())["phase"] == "idle"

    # The weight before the start, read before the watcher races the start request.
    canary_weights: list[int] = [(await api.weights())["canary"]]

    async def watch_weights() -> None:
        while True:
            weight = (await api.weights())["canary"]
            if not canary_weights or canary_weights[-1] != weight:
                canary_weights.append(weight)
            await asyncio.sleep(0.02)

    async with Load(live.port, workers=4) as load:
        watcher = asyncio.create_task(watch_weights())
        started = time.monotonic()
        await api.act("start")
        done = await api.wait_rollout(lambda r: r["phase"] not in ("progressing",), timeout=15,
                                      what="the rollout to finish")
        took = time.monotonic() - started
        watcher.cancel()
        final = (await api.weights())["canary"]
        if canary_weights[-1] != final:
            canary_weights.append(final)  # the watcher's last look may predate the end
    print(f"\nhealthy canary: {len(steps)} steps to 100% in {took:.2f}s, canary weights seen "
          f"{canary_weights}, load {load.count()}")

    assert done["phase"] == "completed", done
    assert done["step"] == len(steps)
    assert await api.weights() == {"stable": 0, "canary": 100}
    assert (await api.service())["weights_source"] == "controller"
    assert canary_weights[0] == 0
    assert [w for w in canary_weights if w] == [20, 50, 80, 100], canary_weights

    # Each analysis is shown with what was measured, the thresholds and the sample counts.
    successes = analyses(done, "success")
    assert not analyses(done, "failure")
    assert analyses(done, "success", "step"), done["analyses"]
    assert len(analyses(done, "success", "background")) >= 3, done["analyses"]
    for result in successes:
        values = result["values"]
        assert values["canary_requests"] >= result["min_requests"]
        assert values["canary_error_rate"] == 0
        assert 0 < values["canary_p99"] < 1
        assert result["thresholds"]["max_error_rate"] == 0.01
        assert result["thresholds"]["max_p99"] == 1.0
        if result["kind"] == "background":
            assert values["stable_requests"] > 0
            assert values["error_rate_increase"] == 0
            assert result["thresholds"]["max_error_rate_increase"] == 0.01

    # No user saw an error, and both versions served.
    counts = load.count()
    assert set(counts) == {"stable", "canary"}, counts
    assert all(h.status == 200 for h in load.hits)

    metrics = await api.metrics()
    assert sample(metrics, "weir_rollout_phase", service="app", phase="completed") == 1
    for phase in ("idle", "progressing", "paused", "aborted"):
        assert sample(metrics, "weir_rollout_phase", service="app", phase=phase) == 0
    assert sample(metrics, "weir_rollout_step", service="app") == len(steps)
    runs = sample(metrics, "weir_analysis_runs_total", service="app", outcome="success")
    assert runs is not None and runs >= len(successes)
    assert sample(metrics, "weir_analysis_runs_total", service="app", outcome="failure") == 0
    assert sample(metrics, "weir_traffic_weight", service="app", version="canary") == 100

    # The state file has it all, for a restart. The controller writes a phase change at the end
    # of its tick, so the API can show "completed" a moment before the file does.
    state_path = Path(live.control.state.path)  # type: ignore[arg-type]

    def saved_phase() -> str:
        return json.loads(state_path.read_text())["services"]["app"]["rollout"]["phase"]

    await wait_for(lambda: saved_phase() == "completed", timeout=5)
    state = json.loads(state_path.read_text())
    assert state["services"]["app"]["weights"]["weights"] == {"stable": 0, "canary": 100}


# === canary: automatic rollback ================================================================


async def test_canary_with_5_percent_errors_is_rolled_back_within_two_intervals(backends, weir):
    interval = 1.0
    stable = await backends("stable")
    canary = await backends("canary", fail_every=20)  # 5% of its answers are 500s
    steps = [{"set_weight": 10}, {"pause": {"duration": "1s"}}, {"set_weight": 20},
             {"pause": {}}]
    analysis = {"interval": f"{interval}s", "min_requests": 10, "failure_limit": 1,
                "checks": {"max_error_rate": 0.01}}
    live = await weir(canary_config(stable, canary, steps, analysis))
    api = live.api

    async with Load(live.port, workers=4) as load:
        await load.wait_hits(50, "stable")
        started_at = time.time()
        await api.act("start")
        aborted = await api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=10,
                                         what="the rollback")
        await api.wait_weights({"stable": 100, "canary": 0})
        moved_at = time.time()
        await load.wait_hits(100, since=moved_at + 0.05)
    # The decision is the second failed measurement; the rollback follows it at once.
    failures = analyses(aborted, "failure", "background")
    assert len(failures) == 2, aborted["analyses"]
    decided_at = failures[-1]["at"]
    first_canary = load.first("canary")
    detection = decided_at - first_canary
    during = load.count(since=started_at, until=decided_at)
    share = during["canary"] / sum(during.values())
    print(f"\n5% errors: rolled back {detection:.2f}s after the canary's first request "
          f"(analysis interval {interval}s, failure_limit 1); {during['canary']} of "
          f"{sum(during.values())} user requests during the rollout hit the canary "
          f"({share:.1%}); canary answered {canary.failed} 500s of {canary.served}")

    assert aborted["reason"] and "max_error_rate" in aborted["reason"], aborted
    assert aborted["aborted_revision"] == aborted["revision"]
    # Two windows of one interval each, measured on the controller's tick (interval / 4).
    assert detection <= 2 * interval + 2 * (interval / 4) + 0.3, detection
    for failure in failures:
        assert failure["failed_checks"] == ["max_error_rate"]
        assert failure["values"]["canary_error_rate"] > 0.01
        assert failure["values"]["canary_requests"] >= 10
        assert failure["thresholds"] == {"max_error_rate": 0.01}
    assert 0 < share < 0.20, share  # the canary never took more than its step's weight
    assert aborted["step"] <= 3

    # Everything sent after the weights moved back went to stable.
    after = load.count(since=moved_at + 0.05)
    assert set(after) == {"stable"}, after
    metrics = await api.metrics()
    assert sample(metrics, "weir_rollout_phase", service="app", phase="aborted") == 1
    assert sample(metrics, "weir_analysis_runs_total", service="app", outcome="failure") == 2
    assert sample(metrics, "weir_traffic_weight", service="app", version="canary") == 0


async def test_canary_with_3x_latency_is_rolled_back(backends, weir):
    stable = await backends("stable", delay=0.03)
    canary = await backends("canary", delay=0.09)  # three times as slow
    steps = [{"set_weight": 25}, {"pause": {}}]
    analysis = {"interval": "1s", "min_requests": 10, "failure_limit": 0,
                "checks": {"max_p99_ratio": 1.5}}
    live = await weir(canary_config(stable, canary, steps, analysis))
    api = live.api

    async with Load(live.port, workers=6):
        await api.act("start")
        aborted = await api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=8,
                                         what="the rollback")
        await api.wait_weights({"stable": 100, "canary": 0})
    [failure] = analyses(aborted, "failure")
    values = failure["values"]
    print(f"\n3x latency: p99 canary {values['canary_p99'] * 1000:.1f} ms, stable "
          f"{values['stable_p99'] * 1000:.1f} ms, ratio {values['p99_ratio']} "
          f"(limit 1.5); reason: {aborted['reason']}")
    assert "max_p99_ratio" in aborted["reason"], aborted
    assert failure["failed_checks"] == ["max_p99_ratio"]
    assert values["p99_ratio"] > 1.5
    assert values["canary_p99"] >= 0.09
    assert failure["thresholds"] == {"max_p99_ratio": 1.5}
    assert values["canary_requests"] >= 10 and values["stable_requests"] >= 10
    # A 1 s window holds about a hundred stable requests, so one slow one on a busy machine
    # can lift stable's p99 enough for a window to pass; the rollback must follow regardless.
    assert len(analyses(aborted, "success")) <= 1
    assert await versions_seen(live.port, 10) == Counter(stable=10)


async def test_too_little_traffic_pauses_as_inconclusive_and_resume_goes_on(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 20}, {"pause": {"duration": "2s"}}, {"set_weight": 50},
             {"pause": {"duration": "2s"}}, {"set_weight": 80}]
    analysis = {"interval": "1s", "min_requests": 1000, "failure_limit": 0,
                "inconclusive_limit": 0, "checks": {"max_error_rate": 0.01}}
    live = await weir(canary_config(stable, canary, steps, analysis))
    api = live.api

    async with Load(live.port, workers=2, gap=0.02) as load:  # ~100 requests a second
        await api.act("start")
        paused = await api.wait_rollout(lambda r: r["phase"] != "progressing", timeout=5,
                                        what="the inconclusive pause")
        print(f"\ntoo little traffic: {paused['reason']}")
        assert paused["phase"] == "paused", paused
        assert paused["paused_by"] == "inconclusive"
        assert paused["step"] == 1
        assert "inconclusive" in paused["reason"] and "1000" in paused["reason"]
        [result] = paused["analyses"]
        assert result["outcome"] == "inconclusive"
        assert 0 < result["values"]["canary_requests"] < 1000
        assert result["min_requests"] == 1000
        assert not analyses(paused, "failure")
        # Not rolled back: the canary keeps its weight; the pause step does not run out while
        # the rollout is held.
        assert await api.weights() == {"stable": 80, "canary": 20}
        hold_until = paused["step_started_at"] + 2.0 + 0.5 - time.time()
        await api.holds(lambda r: r["phase"] == "paused" and r["step"] == 1,
                        max(hold_until, 0.5), "held while paused as inconclusive")
        assert await api.weights() == {"stable": 80, "canary": 20}

        resumed = await api.act("resume")
        assert resumed["phase"] == "progressing" and resumed["paused_by"] is None
        on = await api.wait_rollout(lambda r: r["step"] >= 3, timeout=5, what="step 3")
        assert on["phase"] in ("progressing", "paused")
        await api.wait_weights({"stable": 50, "canary": 50})
    assert load.count()["canary"] > 0

    metrics = await api.metrics()
    inconclusive = sample(metrics, "weir_analysis_runs_total", service="app",
                          outcome="inconclusive")
    assert inconclusive is not None and inconclusive >= 1
    assert sample(metrics, "weir_analysis_runs_total", service="app", outcome="failure") == 0
    assert sample(metrics, "weir_rollout_phase", service="app", phase="aborted") == 0


# === blue/green ===============================================================================


SMOKE = [{"path": "/healthz", "status": 200, "count": 3}]


async def test_blue_green_failing_smoke_check_never_switches(backends, weir):
    blue = await backends("blue")
    green = await backends("green", health_status=500)
    live = await weir(blue_green_config(blue, green, checks=SMOKE,
                                        promotion={"auto": True, "delay": 0}))
    api = live.api

    async with Load(live.port, workers=2) as load:
        await api.act("start")
        aborted = await api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=5,
                                         what="the smoke check to fail")
        # A failed rollout stays failed: auto promotion never gets to switch.
        await api.holds(lambda r: r["phase"] == "aborted", 1.0, "aborted")
    assert "pre-promotion checks failed" in aborted["reason"], aborted
    assert "/healthz" in aborted["reason"] and "500" in aborted["reason"]
    [smoke] = aborted["analyses"]
    assert smoke["kind"] == "smoke" and smoke["outcome"] == "failure"
    assert green.health_checks >= 1
    assert aborted["active"] == "blue"
    assert aborted["promoted_at"] is None
    assert await api.weights() == {"blue": 100, "green": 0}
    assert set(load.count()) == {"blue"}, load.count()
    assert green.served == 0  # no user request ever reached green


async def test_blue_green_manual_promotion_with_preview_route(backends, weir):
    blue, green = await backends("blue"), await backends("green")
    analysis = {"interval": "500ms", "min_requests": 5, "inconclusive_limit": 3,
                "checks": {"max_error_rate": 0.01}}
    live = await weir(blue_green_config(blue, green, checks=SMOKE, analysis=analysis,
                                        post_promotion_window="1500ms"))
    api = live.api
    preview = {"x-weir-preview": "1"}

    await api.act("start")
    waiting = await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5,
                                     what="the smoke checks to pass")
    assert waiting["paused_by"] == "step" and waiting["step"] == 1
    assert analyses(waiting, "success", "smoke")
    assert green.health_checks == 3
    # Before promotion, only requests with the preview header reach the idle colour.
    assert await versions_seen(live.port, 10, preview) == Counter(green=10)
    assert await versions_seen(live.port, 10) == Counter(blue=10)
    # Manual promotion: it waits for a person.
    await api.holds(lambda r: r["phase"] == "paused" and r["promoted_at"] is None, 1.0,
                    "waiting for promotion")
    assert await api.weights() == {"blue": 100, "green": 0}

    async with Load(live.port, workers=3) as load:
        await load.wait_hits(20, "blue")
        promoted = await api.act("promote")
        switched_at = time.time()
        assert promoted["active"] == "green" and promoted["promoted_at"] is not None
        assert await api.weights() == {"blue": 0, "green": 100}
        done = await api.wait_rollout(lambda r: r["phase"] != "progressing", timeout=8,
                                      what="the post-promotion window")
    assert done["phase"] == "completed", done
    post = analyses(done, "success", "background")
    assert post, done["analyses"]
    assert all(a["values"]["canary_requests"] >= 5 for a in post)
    assert set(load.count(since=switched_at + 0.05)) == {"green"}
    assert green.served > 0 and green.failed == 0
    # Now blue is idle: it is the preview (and the rollback target), kept warm.
    assert await versions_seen(live.port, 5, preview) == Counter(blue=5)
    assert await versions_seen(live.port, 5) == Counter(green=5)

    # A reload that changes nothing about the colours starts no new rollout.
    data = yaml.safe_load(live.path.read_text())
    data["services"][0]["drain"] = {"timeout": "5s"}
    write_config(live.path, data)
    await api.reload()
    await api.holds(lambda r: r["phase"] == "completed", 1.0, "completed after reload")
    assert await api.weights() == {"blue": 0, "green": 100}


async def test_blue_green_post_promotion_failure_switches_back(backends, weir):
    blue = await backends("blue")
    green = await backends("green", fail_all=True)  # healthy check, broken for users
    analysis = {"interval": "500ms", "min_requests": 5, "failure_limit": 0,
                "checks": {"max_error_rate": 0.05}}
    live = await weir(blue_green_config(blue, green, checks=SMOKE, analysis=analysis,
                                        promotion={"auto": True, "delay": "300ms"},
                                        post_promotion_window="5s"))
    api = live.api

    async with Load(live.port, workers=3) as load:
        await api.act("start")
        switched = await api.wait_rollout(lambda r: r["promoted_at"] is not None, timeout=5,
                                          what="the automatic promotion")
        assert switched["active"] == "green"
        aborted = await api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=5,
                                         what="the switch back")
        await api.wait_weights({"blue": 100, "green": 0})
        back_at = time.time()
        await load.wait_hits(30, since=back_at + 0.05)
    print(f"\npost-promotion failure: {aborted['reason']}; green answered {green.failed} "
          f"500s before the switch back")
    assert "max_error_rate" in aborted["reason"], aborted
    assert aborted["active"] == "blue"
    [failure] = analyses(aborted, "failure")
    assert failure["values"]["canary_error_rate"] == 1.0
    assert set(load.count(since=back_at + 0.05)) == {"blue"}
    # Green is the idle colour again, still reachable for a look through the preview route.
    assert await versions_seen(live.port, 3, {"x-weir-preview": "1"}) == Counter(green=3)
    metrics = await api.metrics()
    assert sample(metrics, "weir_traffic_weight", service="app", version="blue") == 100
    assert sample(metrics, "weir_rollout_phase", service="app", phase="aborted") == 1


# === restart mid-rollout =======================================================================


async def restart(proc: WeirProcess) -> None:
    """SIGTERM, a clean exit, and the same command on the same files again."""
    assert await proc.stop() == 0, proc.output()
    await proc.start()


async def saved_rollout(proc: WeirProcess) -> dict[str, Any]:
    text = await asyncio.to_thread(Path(proc.data["state_file"]).read_text)
    return json.loads(text)["services"]["app"]["rollout"]


async def test_restart_mid_rollout_resumes_at_the_same_step(backends, weir_process):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 30}, {"pause": {"duration": "30s"}}, {"set_weight": 60},
             {"pause": {}}]
    proc = await weir_process(canary_config(stable, canary, steps))
    api = proc.api
    config_text = proc.path.read_text()

    await api.act("start")
    before = await api.wait_rollout(lambda r: r["step"] == 1, timeout=5,
                                    what="the 30s pause step")
    assert before["phase"] == "progressing"
    await api.wait_weights({"stable": 70, "canary": 30})
    await poll(lambda: saved_rollout(proc), lambda r: r["step"] == 1, timeout=5,
               what="the step in the state file")

    await restart(proc)
    assert proc.path.read_text() == config_text  # the very same config file
    after = await api.rollout()
    print(f"\nrestart: step {before['step']} before, {after['step']} after; "
          f"step started {time.time() - after['step_started_at']:.1f}s ago")
    assert after["phase"] == "progressing", after
    assert after["step"] == 1
    assert after["step_started_at"] == before["step_started_at"]  # not repeated
    assert after["started_at"] == before["started_at"]
    service = await api.service()
    assert service["weights"] == {"stable": 70, "canary": 30}
    assert service["weights_source"] == "controller"
    # Several controller ticks later, still in the 30s pause at the same weights.
    await api.holds(lambda r: r["step"] == 1 and r["phase"] == "progressing", 2.5,
                    "the pause step after the restart")
    assert await api.weights() == {"stable": 70, "canary": 30}
    seen = await versions_seen(proc.port, 60)
    assert set(seen) == {"stable", "canary"}, seen
    metrics = await api.metrics()
    assert sample(metrics, "weir_rollout_step", service="app") == 1
    assert sample(metrics, "weir_rollout_phase", service="app", phase="progressing") == 1

    # And it carries on from there.
    promoted = await api.act("promote")
    assert promoted["step"] == 2
    await api.wait_weights({"stable": 40, "canary": 60})


# === the admin API ==============================================================================


STEPPED = [{"set_weight": 20}, {"pause": {}}, {"set_weight": 50}, {"pause": {}},
           {"set_weight": 80}]


async def test_promote_skips_a_pause_and_full_promote_goes_to_100(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, STEPPED))
    api = live.api

    started = await api.act("start")
    assert started["phase"] == "progressing" and started["step"] == 0
    first = await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5,
                                   what="the first pause {}")
    assert (first["step"], first["paused_by"]) == (1, "step")
    assert await api.weights() == {"stable": 80, "canary": 20}
    await api.holds(lambda r: r["phase"] == "paused" and r["step"] == 1, 1.0,
                    "a pause {} waits for promotion")

    promoted = await api.act("promote")
    assert promoted["step"] == 2
    second = await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 3,
                                    timeout=5, what="the second pause {}")
    assert second["paused_by"] == "step"
    assert await api.weights() == {"stable": 50, "canary": 50}
    seen = await versions_seen(live.port, 60)
    assert set(seen) == {"stable", "canary"}, seen

    full = await api.act("promote", {"full": True})
    assert full["phase"] == "completed"
    assert full["step"] == len(STEPPED)
    assert await api.weights() == {"stable": 0, "canary": 100}
    assert await versions_seen(live.port, 10) == Counter(canary=10)
    # A completed rollout has nothing to promote, pause or abort.
    for action in ("promote", "pause", "resume", "abort", "retry"):
        reply = await api.act(action, expect=409)
        assert reply["error"], reply
    metrics = await api.metrics()
    assert sample(metrics, "weir_rollout_phase", service="app", phase="completed") == 1


async def test_pause_and_resume_hold_a_rollout(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 20}, {"pause": {"duration": "1s"}}, {"set_weight": 50},
             {"pause": {"duration": "1s"}}]
    live = await weir(canary_config(stable, canary, steps))
    api = live.api

    await api.act("start")
    at_pause = await api.wait_rollout(lambda r: r["step"] == 1, timeout=5, what="step 1")
    paused = await api.act("pause")
    assert paused["phase"] == "paused" and paused["paused_by"] == "user"
    await api.act("pause", expect=409)  # already paused
    # Held past the end of the 1s pause step.
    hold = at_pause["step_started_at"] + 1.0 + 0.6 - time.time()
    await api.holds(lambda r: r["phase"] == "paused" and r["step"] == 1, max(hold, 0.6),
                    "paused by a person")
    assert await api.weights() == {"stable": 80, "canary": 20}
    metrics = await api.metrics()
    assert sample(metrics, "weir_rollout_phase", service="app", phase="paused") == 1

    resumed = await api.act("resume")
    assert resumed["phase"] == "progressing"
    await api.act("resume", expect=409)  # not paused any more
    done = await api.wait_rollout(lambda r: r["phase"] == "completed", timeout=5,
                                  what="the rest of the steps")
    assert done["step"] == len(steps)
    assert await api.weights() == {"stable": 0, "canary": 100}


async def test_abort_retry_and_no_automatic_restart_of_the_aborted_revision(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, STEPPED))
    api = live.api

    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1, timeout=5,
                           what="step 1")
    assert await api.weights() == {"stable": 80, "canary": 20}
    aborted = await api.act("abort")
    assert aborted["phase"] == "aborted"
    assert aborted["reason"]
    assert aborted["aborted_revision"] == aborted["revision"]
    await api.wait_weights({"stable": 100, "canary": 0})
    assert await versions_seen(live.port, 20) == Counter(stable=20)
    await api.act("abort", expect=409)
    await api.act("promote", expect=409)

    # A reload that does not touch the canary starts nothing: the aborted revision stays out.
    data = yaml.safe_load(live.path.read_text())
    data["services"][0]["drain"] = {"timeout": "5s"}
    write_config(live.path, data)
    reloaded = await api.reload()
    assert reloaded["generation"] == 2
    await api.holds(lambda r: r["phase"] == "aborted", 1.2, "aborted after a reload")
    assert await api.weights() == {"stable": 100, "canary": 0}

    retried = await api.act("retry")
    assert retried["phase"] == "progressing" and retried["step"] == 0
    assert retried["reason"] is None
    again = await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1,
                                   timeout=5, what="step 1 again")
    assert again["started_at"] > aborted["started_at"]
    assert await api.weights() == {"stable": 80, "canary": 20}
    await api.act("retry", expect=409)  # only an aborted rollout can be retried
    await api.act("start", expect=409)  # one is in progress already


async def test_rollout_starts_when_the_canary_revision_or_upstreams_change(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    canary2 = await backends("canary2")
    live = await weir(canary_config(stable, canary, STEPPED))
    api = live.api
    assert (await api.rollout())["phase"] == "idle"

    # An unrelated change: nothing starts.
    data = yaml.safe_load(live.path.read_text())
    data["services"][0]["versions"]["stable"]["revision"] = "s2"
    write_config(live.path, data)
    await api.reload()
    await api.holds(lambda r: r["phase"] == "idle", 1.0, "idle after an unrelated change")

    # A new canary revision: a rollout starts by itself.
    data["services"][0]["versions"]["canary"]["revision"] = "c2"
    write_config(live.path, data)
    await api.reload()
    first = await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1,
                                   timeout=5, what="a rollout of revision c2")
    assert await api.weights() == {"stable": 80, "canary": 20}
    await api.act("abort")

    # New upstreams for the canary: another rollout.
    data["services"][0]["versions"]["canary"]["upstreams"] = [canary2.address]
    write_config(live.path, data)
    await api.reload()
    second = await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1,
                                    timeout=5, what="a rollout of the new upstreams")
    assert second["revision"] != first["revision"]
    assert second["started_at"] > first["started_at"]
    seen = await versions_seen(live.port, 60)
    assert seen["canary"] > 0
    assert canary2.served == seen["canary"]


async def test_api_errors(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    data = canary_config(stable, canary, STEPPED)
    data["services"].append({"name": "plain", "match": {"hosts": ["plain.test"]},
                             "versions": {"v1": {"upstreams": [stable.address]}}})
    live = await weir(data)
    api = live.api

    for method, path in (("GET", "/api/services/nope/rollout"),
                         ("POST", "/api/services/nope/rollout/start"),
                         ("GET", "/api/services/plain/rollout"),
                         ("POST", "/api/services/plain/rollout/promote"),
                         ("POST", "/api/services/app/rollout/launch")):
        code, reply = await api.call(method, path)
        assert code == 404, (path, reply)
        assert reply["error"], reply

    for action in ("start", "promote", "abort", "pause", "resume", "retry"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            code, reply = await api.call("POST", f"/api/services/app/rollout/{action}",
                                         auth=False, headers=headers)
            assert code == 401, (action, reply)
            assert reply["error"]
    assert (await api.rollout())["phase"] == "idle"

    # Idle: nothing to promote, abort, pause, resume or retry.
    for action in ("promote", "abort", "pause", "resume", "retry"):
        reply = await api.act(action, expect=409)
        assert reply["error"], reply
    code, reply = await api.call("POST", "/api/services/app/rollout/promote", {"full": "yes"})
    assert code == 400, reply

    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5, what="step 1")
    for action, expect in (("start", 409), ("retry", 409), ("pause", 409)):
        await api.act(action, expect=expect)
    assert (await api.rollout())["phase"] == "paused"


# === webhooks ====================================================================================


async def test_webhooks_carry_the_rollout_and_a_failing_pre_rollout_aborts(backends, weir,
                                                                         hooks):
    stable, canary = await backends("stable"), await backends("canary")
    webhooks = {"pre_rollout": hooks.url("/ok/pre_rollout"),
                "promoted": hooks.url("/ok/promoted"),
                "rollback": hooks.url("/ok/rollback"), "timeout": "2s"}
    data = canary_config(stable, canary, STEPPED, webhooks=webhooks)
    live = await weir(data)
    api = live.api

    await api.act("start")
    [pre] = hooks.events("/ok/pre_rollout")
    assert pre["event"] == "pre_rollout" and pre["service"] == "app"
    assert pre["rollout"]["phase"] == "progressing" and pre["rollout"]["step"] == 0
    assert pre["rollout"]["revision"]

    await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5, what="step 1")
    await api.act("promote", {"full": True})
    await wait_for(lambda: len(hooks.events("/ok/promoted")) == 1, timeout=5)
    [promoted] = hooks.events("/ok/promoted")
    assert promoted["event"] == "promoted" and promoted["service"] == "app"
    assert promoted["rollout"]["phase"] == "completed"

    await api.act("start")
    await api.act("abort")
    await wait_for(lambda: len(hooks.events("/ok/rollback")) == 1, timeout=5)
    [rollback] = hooks.events("/ok/rollback")
    assert rollback["event"] == "rollback" and rollback["service"] == "app"
    assert rollback["rollout"]["phase"] == "aborted"
    assert rollback["rollout"]["reason"]
    assert len(hooks.events("/ok/pre_rollout")) == 2

    # A pre_rollout hook that answers 500 stops the rollout before any traffic moves.
    data["services"][0]["rollout"]["webhooks"]["pre_rollout"] = hooks.url("/fail/pre_rollout")
    write_config(live.path, data)
    await api.reload()
    reply = await api.act("retry")
    assert reply["phase"] == "aborted", reply
    assert "pre_rollout" in reply["reason"]
    assert len(hooks.events("/fail/pre_rollout")) == 1
    await api.holds(lambda r: r["phase"] == "aborted", 0.5, "aborted by the webhook")
    assert await api.weights() == {"stable": 100, "canary": 0}
    await wait_for(lambda: len(hooks.events("/ok/rollback")) == 2, timeout=5)
    assert hooks.events("/ok/rollback")[-1]["rollout"]["reason"] == reply["reason"]


# === more failure modes ==========================================================================


async def test_canary_whose_upstream_is_down_is_rolled_back(backends, weir):
    stable = await backends("stable")
    canary = App("canary", port=free_port())  # nothing listens there: Weir answers 502
    steps = [{"set_weight": 20}, {"pause": {}}]
    analysis = {"interval": "500ms", "min_requests": 5, "checks": {"max_error_rate": 0.01}}
    live = await weir(canary_config(stable, canary, steps, analysis))
    api = live.api

    async with Load(live.port, workers=4) as load:
        await api.act("start")
        aborted = await api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=5,
                                         what="the rollback")
        await api.wait_weights({"stable": 100, "canary": 0})
    [failure] = analyses(aborted, "failure")
    assert failure["values"]["canary_error_rate"] == 1.0
    assert "max_error_rate" in aborted["reason"]
    assert {h.status for h in load.hits if h.version == "canary"} == {502}


async def test_rollback_ramp_steps_the_canary_down(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 40}, {"pause": {}}]
    live = await weir(canary_config(stable, canary, steps, rollback_ramp=[20, 10],
                                    rollback_ramp_interval="300ms"))
    api = live.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5, what="step 1")
    assert await api.weights() == {"stable": 60, "canary": 40}

    seen: list[int] = []

    async def watch() -> None:
        while True:
            weight = (await api.weights())["canary"]
            if not seen or seen[-1] != weight:
                seen.append(weight)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    await wait_for(lambda: seen == [40], timeout=2)
    aborted = await api.act("abort")
    assert aborted["phase"] == "aborted"
    await api.wait_weights({"stable": 100, "canary": 0}, timeout=5)
    await wait_for(lambda: seen[-1] == 0, timeout=1)
    watcher.cancel()
    assert seen == [40, 20, 10, 0], seen


@pytest.mark.parametrize("action", ["promote", "pause"])
async def test_an_api_action_survives_an_immediate_restart(backends, weir_process, action):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 20}, {"pause": {"duration": "20s"}}, {"set_weight": 50},
             {"pause": {}}]
    proc = await weir_process(canary_config(stable, canary, steps))
    api = proc.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["step"] == 1, timeout=5, what="the 20s pause")
    await poll(lambda: saved_rollout(proc), lambda r: r["step"] == 1, timeout=5,
               what="the step in the state file")

    reply = await api.act(action)  # acknowledged...
    await restart(proc)           # ...and then Weir is restarted at once
    after = await api.rollout()
    if action == "promote":
        assert reply["step"] == 2
        assert after["step"] >= 2, after  # not back in the pause it was promoted out of
    else:
        assert (reply["phase"], reply["paused_by"]) == ("paused", "user")
        assert (after["phase"], after["paused_by"]) == ("paused", "user"), after


async def test_restart_during_a_rollback_ramp_finishes_the_rollback(backends, weir_process):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 40}, {"pause": {}}]
    proc = await weir_process(canary_config(stable, canary, steps, rollback_ramp=[20],
                                         rollback_ramp_interval="2s"))
    api = proc.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5, what="step 1")
    await api.act("abort")
    await api.wait_weights({"stable": 80, "canary": 20})
    await restart(proc)
    assert (await api.rollout())["phase"] == "aborted"
    # The ramp had 2s to go; after the restart the canary must still end at 0.
    await api.wait_weights({"stable": 100, "canary": 0}, timeout=4)


async def test_canary_revision_changed_while_weir_was_down_starts_a_rollout(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    data = canary_config(stable, canary, STEPPED)
    live = await weir(data)
    await live.api.act("start")
    done = await live.api.act("promote", {"full": True})
    assert done["phase"] == "completed"
    await poll(lambda: asyncio.to_thread(
        lambda: json.loads(Path(live.control.state.path).read_text())),  # type: ignore[arg-type]
        lambda state: state["services"]["app"]["rollout"]["phase"] == "completed",
        timeout=5, what="the completed rollout in the state file")
    await live.close()

    data["services"][0]["versions"]["canary"]["revision"] = "c2"  # deployed while down
    live = await weir(data)
    api = live.api
    started = await api.wait_rollout(lambda r: r["phase"] != "completed", timeout=3,
                                     what="a rollout of the revision that changed")
    assert started["phase"] in ("progressing", "paused")
    assert started["started_at"] > done["started_at"]


async def test_canary_revision_changed_while_down_before_any_rollout_starts_one(backends, weir,
                                                                               tmp_path):
    stable, canary = await backends("stable"), await backends("canary")
    data = canary_config(stable, canary, STEPPED)
    live = await weir(data)
    assert (await live.api.rollout())["phase"] == "idle"
    state_path = tmp_path / "weir.state.json"

    def saved_revision() -> str | None:
        if not state_path.exists():
            return None
        services = json.loads(state_path.read_text())["services"]
        return services.get("app", {}).get("rollout", {}).get("revision")

    # The revision in force is remembered, so that the next start can tell it changed.
    await poll(lambda: asyncio.to_thread(saved_revision), lambda revision: bool(revision),
               timeout=2.5, what="the canary revision in the state file")
    await live.close()

    data["services"][0]["versions"]["canary"]["revision"] = "c2"  # deployed while down
    live = await weir(data)
    started = await live.api.wait_rollout(lambda r: r["phase"] != "idle", timeout=3,
                                          what="a rollout of the revision that changed")
    assert started["phase"] in ("progressing", "paused")


async def test_a_new_canary_revision_mid_rollout_starts_from_the_first_step_weight(backends,
                                                                                  weir):
    stable, canary = await backends("stable"), await backends("canary")
    canary2 = await backends("canary2")
    data = canary_config(stable, canary, STEPPED)
    live = await weir(data)
    api = live.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 1, timeout=5,
                           what="step 1")
    await api.act("promote")
    old = await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 3,
                                 timeout=5, what="step 3")
    assert await api.weights() == {"stable": 50, "canary": 50}

    # Every route table the data plane is handed from here on, as it is handed over.
    proxy = live.control.proxy
    applied: list[tuple[tuple[str, ...], int]] = []
    apply_config = proxy.apply_config

    def spy(*args: Any, **kwargs: Any) -> Any:
        table = apply_config(*args, **kwargs)
        route = next(r for r in table.routes if r.name == "app")
        applied.append((route.versions["canary"].upstreams, route.weights.get("canary", 0)))
        return table

    proxy.apply_config = spy  # type: ignore[method-assign]

    # New, unvetted upstreams for the canary while it has 50%: the rollout starts over...
    data["services"][0]["versions"]["canary"]["upstreams"] = [canary2.address]
    write_config(live.path, data)
    await api.reload()
    await api.wait_rollout(lambda r: r["started_at"] > old["started_at"], timeout=2,
                           what="the new rollout")
    await api.wait_weights({"stable": 80, "canary": 20}, timeout=3)
    print(f"\ntables applied after the reload (canary upstreams, canary weight): {applied}")
    # ...and no table ever gave the new upstreams more than the first step's weight.
    new = [weight for upstreams, weight in applied if upstreams == (canary2.address,)]
    assert new, applied
    assert max(new) <= 20, applied


async def test_blue_green_promote_during_the_post_promotion_window_keeps_the_new_colour(
        backends, weir):
    blue, green = await backends("blue"), await backends("green")
    live = await weir(blue_green_config(blue, green, checks=SMOKE,
                                        post_promotion_window="10s"))
    api = live.api
    await api.act("start")
    await api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5, what="the checks")
    first = await api.act("promote")
    assert first["active"] == "green"
    assert await api.weights() == {"blue": 0, "green": 100}

    # Promoting again (to end the window early, or a retried click) must not go back to blue.
    code, reply = await api.call("POST", "/api/services/app/rollout/promote")
    assert code in (200, 409), reply
    assert await api.weights() == {"blue": 0, "green": 100}
    assert (await api.rollout())["active"] == "green"
