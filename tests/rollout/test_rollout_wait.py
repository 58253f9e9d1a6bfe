"""`weir rollout wait` and `weir rollout start --wait` in a release pipeline: the real command
run as a subprocess against a Weir in this event loop, real backends and a bounded load; each
test asserts the exit code a pipeline branches on and the transitions the command printed.

Exit codes: 0 promoted (or --until reached), 1 aborted, 2 usage or admin API unreachable,
3 timed out, 4 paused for a person.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from ..conftest import free_port
from ..rollout_harness import Load, analyses, canary_config, weir_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses")

ANALYSIS = {"interval": "1s", "min_requests": 10, "failure_limit": 1,
            "checks": {"max_error_rate": 0.01}}


async def test_start_wait_exits_0_at_promotion_and_prints_each_transition(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 20}, {"pause": {"duration": "1s"}}, {"set_weight": 60},
             {"pause": {"duration": "1s"}}]
    live = await weir(canary_config(stable, canary, steps, {**ANALYSIS, "interval": "500ms",
                                                             "min_requests": 5}))
    async with Load(live.port, workers=4):
        ran = await weir_cli(live.admin_url, "rollout", "start", "app", "--wait")
    record = await live.api.rollout()
    assert ran.code == 0, ran
    assert record["phase"] == "completed"
    lines = ran.out.splitlines()
    # In order: the start, every step, analyses with their values, the end.
    events = [line.split(": ", 1)[0].split(" ", 1)[1] for line in lines[1:-1]]
    assert events[0] == "started", lines
    assert events[-1] == "completed", lines
    assert [e for e in events if e == "step"] == ["step"] * 3, lines
    assert "analysis" in events, lines
    analysis_line = next(line for line in lines if " analysis: " in line)
    assert "success: error rate 0 <= 0.01" in analysis_line, analysis_line
    assert lines[-1].startswith("app: promoted"), lines
    # The record has the same events, numbered, and says which rollout they belong to.
    assert record["number"] == 1
    seqs = [e["seq"] for e in record["events"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {e["rollout"] for e in record["events"]} == {1}
    assert record["events"][0]["by"] == "admin"  # the token that started it


async def test_wait_exits_1_within_two_intervals_of_the_first_failing_window(backends, weir):
    stable = await backends("stable")
    canary = await backends("canary", fail_every=20)  # 5% errors
    steps = [{"set_weight": 20}, {"pause": {"duration": "1m"}}]
    live = await weir(canary_config(stable, canary, steps, ANALYSIS))
    async with Load(live.port, workers=4) as load:
        await load.wait_hits(30, "stable")
        ran = await weir_cli(live.admin_url, "rollout", "start", "app", "--wait")
    record = await live.api.rollout()
    assert ran.code == 1, ran
    assert record["phase"] == "aborted"
    failures = analyses(record, "failure")
    assert len(failures) == 2, record["analyses"]  # failure_limit 1: the second one aborts
    # The first failing window ended one interval before the first failure was decided.
    first_failing_window_end = failures[0]["at"]
    assert ran.ended_at - first_failing_window_end <= 2 * 1.0 + 0.5 + 1.0, (ran.ended_at,
                                                                          failures)
    assert "max_error_rate" in ran.out
    assert "rollout aborted: analysis failed 2 time(s)" in ran.out, ran.out


async def test_wait_exits_4_at_a_pause_step_and_0_with_until_paused(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, [{"set_weight": 10}, {"pause": {}},
                                                     {"set_weight": 50}]))
    ran = await weir_cli(live.admin_url, "rollout", "start", "app", "--wait")
    assert ran.code == 4, ran
    assert "awaiting promotion: paused at step 2 of 3" in ran.out
    assert "paused for a person at step 2" in ran.out
    until = await weir_cli(live.admin_url, "rollout", "wait", "app", "--until", "paused")
    assert until.code == 0, until
    # Promoted by someone else meanwhile: the same wait now ends with 0 at promotion.
    await live.api.act("promote")
    done = await weir_cli(live.admin_url, "rollout", "wait", "app", "--timeout", "20s")
    assert done.code == 0, done
    assert "promoted past step 2 (by admin)" in done.out
    assert (await live.api.rollout())["promoted_by"] == "admin"


async def test_wait_exits_3_at_its_timeout(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, [{"set_weight": 10},
                                                     {"pause": {"duration": "1m"}}]))
    started = time.monotonic()
    ran = await weir_cli(live.admin_url, "rollout", "start", "app", "--wait", "--timeout", "1.5")
    took = time.monotonic() - started
    assert ran.code == 3, ran
    assert 1.5 <= took < 10, took
    assert "timed out after 1.5s waiting for rollout 1 (progressing, step 2/2)" in ran.err


async def test_a_newer_revision_never_reports_an_older_outcome(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    config = canary_config(stable, canary, [{"set_weight": 50}])
    live = await weir(config)
    first = await weir_cli(live.admin_url, "rollout", "start", "app", "--wait")
    assert first.code == 0, first
    assert (await live.api.rollout())["release"] == "c1"
    # Revision c2 has not started: c1's "completed" is not its outcome.
    early = await weir_cli(live.admin_url, "rollout", "wait", "app", "--revision", "c2",
                           "--timeout", "1")
    assert early.code == 3, early
    assert "waiting for the rollout of revision c2 to start (the latest is rollout 1 of " \
           "revision c1, completed)" in early.out
    assert "promoted" not in early.out
    # The pipeline deploys c2 (the file's canary revision) while a wait on c2 is running.
    waiting = asyncio.create_task(weir_cli(live.admin_url, "rollout", "wait", "app",
                                           "--revision", "c2", "--timeout", "20"))
    await asyncio.sleep(0.5)
    config["services"][0]["versions"]["canary"]["revision"] = "c2"
    live.rewrite(config)
    status, _ = await live.reload()
    assert status == 200
    ran = await waiting
    assert ran.code == 0, ran
    record = await live.api.rollout()
    assert (record["number"], record["release"], record["phase"]) == (2, "c2", "completed")
    assert "rollout 2 of revision c2" in ran.out
    assert "rollout 1 of revision c1 (api)" not in ran.out  # c1's events are not c2's


async def test_usage_errors_and_an_unreachable_admin_api_exit_2(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, [{"set_weight": 50}]))
    unknown = await weir_cli(live.admin_url, "rollout", "wait", "nosuch", "--timeout", "5")
    assert unknown.code == 2, unknown
    assert "nosuch" in unknown.err
    down = await weir_cli(f"http://127.0.0.1:{free_port()}", "rollout", "wait", "app")
    assert down.code == 2, down
    assert "cannot reach the admin API" in down.err
    bad = await weir_cli(live.admin_url, "rollout", "wait", "app", "--timeout", "soon")
    assert bad.code == 2, bad
    assert "--timeout" in bad.err
