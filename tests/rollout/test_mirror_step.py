"""Shadow as a rollout step (issue 21, argo-rollouts#563): a first step `mirror` sends copies of
stable's requests to the canary while every user is answered by stable, then judges the
canary's answers to them against stable's requests of the same window. Real backends, a real
Weir in this loop, and a bounded load whose answers say which version served them.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from ..rollout_harness import Load, analyses, canary_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="loopback servers")


def mirror_step(**checks: object) -> dict[str, object]:
    return {"mirror": {"percent": 100, "duration": "1500ms", "min_requests": 10, **checks}}


async def test_a_failing_canary_is_aborted_by_its_mirror_step_before_any_user_reaches_it(
        backends, weir):
    stable = await backends("stable")
    canary = await backends("canary", fail_every=5)  # 20% of its answers are 500s
    steps = [mirror_step(max_error_rate=0.05), {"set_weight": 20}]
    live = await weir(canary_config(stable, canary, steps))
    weights_seen: list[int] = []

    async def watch() -> None:
        while True:
            weights_seen.append((await live.api.weights())["canary"])
            await asyncio.sleep(0.05)

    async with Load(live.port, workers=3, gap=0.01) as load:
        watcher = asyncio.create_task(watch())
        await live.api.act("start")
        mirroring = await live.api.wait_rollout(
            lambda r: (r.get("step_state") or {}).get("kind") == "mirror", timeout=5,
            what="the mirror step")
        assert mirroring["phase"] == "progressing" and mirroring["step"] == 0
        aborted = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=10,
                                              what="the mirror step's verdict")
        watcher.cancel()
    judged = analyses(aborted, "failure", "mirror")
    assert len(judged) == 1, aborted["analyses"]
    values = judged[0]["values"]
    print(f"\nmirror step: {values}; canary served {canary.served} copies")
    assert judged[0]["failed_checks"] == ["max_error_rate"]
    assert 0.1 < values["canary_error_rate"] < 0.3 and values["canary_requests"] >= 10
    assert values["stable_requests"] > 0
    assert "max_error_rate" in aborted["reason"]
    # The canary saw copies; no user did, and its weight never left 0.
    assert canary.served >= 10
    assert set(load.count()) == {"stable"}, load.count()
    assert set(weights_seen) == {0}
    # The copies stop with the step.
    service = await live.api.service()
    assert [m["version"] for m in service["mirror"]] == []
    served = canary.served
    async with Load(live.port, workers=2, gap=0.01) as more:
        await more.wait_hits(30, "stable")
    assert canary.served == served


async def test_a_healthy_canary_passes_its_mirror_step_and_goes_on_to_its_first_weight(
        backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [mirror_step(max_error_rate=0.05, max_p99_ratio=5), {"set_weight": 20},
             {"pause": {}}]
    live = await weir(canary_config(stable, canary, steps))
    async with Load(live.port, workers=3, gap=0.01) as load:
        await live.api.act("start")
        paused = await live.api.wait_rollout(lambda r: r["phase"] == "paused", timeout=10,
                                             what="the step after the mirror")
        await load.wait_hits(20, "canary")  # users reach it only now
    passed = analyses(paused, "success", "mirror")
    assert len(passed) == 1, paused["analyses"]
    assert passed[0]["values"]["canary_error_rate"] == 0
    assert "p99_ratio" in passed[0]["values"]
    assert paused["step"] == 2 and await live.api.weights() == {"stable": 80, "canary": 20}
    events = [e["event"] for e in paused["events"]]
    assert events[:4] == ["started", "analysis", "step", "step"], events


async def test_answers_unlike_the_users_fail_the_mismatch_check(backends, weir):
    # Each backend answers with its own name: every copy's body differs from the user's.
    stable, canary = await backends("stable"), await backends("canary")
    steps = [mirror_step(max_mismatch_rate=0.1), {"set_weight": 20}]
    live = await weir(canary_config(stable, canary, steps))
    async with Load(live.port, workers=3, gap=0.01):
        await live.api.act("start")
        aborted = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=10,
                                              what="the mismatch verdict")
    judged = analyses(aborted, "failure", "mirror")[0]
    assert judged["failed_checks"] == ["max_mismatch_rate"]
    assert judged["values"]["mismatch_rate"] == 1.0 and judged["values"]["compared"] >= 10
    assert judged["thresholds"]["max_mismatch_rate"] == 0.1
