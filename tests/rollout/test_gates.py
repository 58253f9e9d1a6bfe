"""Steps that wait on something outside the rollout: a pause with a timeout, a gate polled until
it answers 2xx (Flagger's confirm-rollout), and a webhook step whose answer is a check.

A real aiohttp receiver on 127.0.0.1 plays the outside system: the test sets what it answers
and how slowly, and reads what it was sent. The Weir is conftest's in-process one; conditions
are awaited through the admin API with deadlines.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from ..conftest import serve_on_loopback
from ..rollout_harness import canary_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="loopback servers")


@dataclass
class Outside:
    """The outside system: answers ``status`` after ``delay`` seconds, and keeps each body."""

    status: int = 503
    delay: float = 0.0
    port: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def outside() -> AsyncIterator[Outside]:
    system = Outside()

    async def answer(request: web.Request) -> web.Response:
        system.received.append(await request.json())
        if system.delay:
            await asyncio.sleep(system.delay)
        return web.json_response({}, status=system.status)

    app = web.Application()
    app.add_routes([web.post("/{tail:.*}", answer)])
    runner, system.port = await serve_on_loopback(app, shutdown_timeout=0.5)
    yield system
    await runner.cleanup()


async def test_a_gate_holds_the_rollout_until_it_answers_2xx(backends, weir, outside):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 10},
             {"gate": {"url": outside.url("/confirm"), "interval": "200ms"}},
             {"set_weight": 50}]
    live = await weir(canary_config(stable, canary, steps))
    api = live.api
    await api.act("start")
    held = await api.wait_rollout(
        lambda r: (r.get("step_state") or {}).get("checks", 0) >= 3, timeout=10,
        what="three checks of the closed gate")
    assert held["phase"] == "progressing" and held["step"] == 1, held
    assert held["step_state"]["last_status"] == 503
    assert held["step_state"]["url"] == outside.url("/confirm")
    assert await api.weights() == {"stable": 90, "canary": 10}  # not a step further
    body = outside.received[0]
    assert (body["event"], body["service"], body["step"]) == ("gate", "app", 2)
    assert body["canary_percent"] == 10
    assert body["rollout"]["number"] == 1 and "events" not in body["rollout"]

    outside.status = 200
    done = await api.wait_rollout(lambda r: r["phase"] == "completed", timeout=10,
                                  what="the rollout past the open gate")
    assert await api.weights() == {"stable": 0, "canary": 100}
    opened = [e for e in done["events"] if e["event"] == "analysis" and e.get("kind") == "gate"]
    assert len(opened) == 1 and opened[0]["outcome"] == "success", done["events"]
    assert "gate open" in opened[0]["message"]


async def test_a_gate_that_never_opens_aborts_at_its_timeout(backends, weir, outside):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 10},
             {"gate": {"url": outside.url("/confirm"), "interval": "200ms", "timeout": "1s"}},
             {"set_weight": 50}]
    live = await weir(canary_config(stable, canary, steps))
    await live.api.act("start")
    aborted = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=10,
                                          what="the gate's timeout")
    assert "did not open within 1s" in aborted["reason"], aborted["reason"]
    assert "the last answered 503" in aborted["reason"]
    await live.api.wait_weights({"stable": 100, "canary": 0})
    checks = len(outside.received)
    await asyncio.sleep(0.6)  # three gate intervals: an aborted rollout polls no more
    assert len(outside.received) == checks


async def test_promote_skips_a_closed_gate(backends, weir, outside):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 10},
             {"gate": {"url": outside.url("/confirm"), "interval": "200ms"}},
             {"set_weight": 50}, {"pause": {}}]
    live = await weir(canary_config(stable, canary, steps))
    await live.api.act("start")
    await live.api.wait_rollout(lambda r: (r.get("step_state") or {}).get("checks", 0) >= 1,
                                timeout=10, what="the gate's first check")
    await live.api.act("promote")
    past = await live.api.wait_rollout(lambda r: r["step"] == 3, timeout=10,
                                       what="the step after the gate")
    assert past["promoted_by"] == "admin"
    assert past["step_state"] is None
    assert await live.api.weights() == {"stable": 50, "canary": 50}


async def test_a_pause_with_a_timeout_aborts_when_nobody_promotes(backends, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 10}, {"pause": {"timeout": "1s"}}, {"set_weight": 50}]
    live = await weir(canary_config(stable, canary, steps))
    await live.api.act("start")
    paused = await live.api.wait_rollout(lambda r: r["phase"] == "paused", timeout=5,
                                         what="the pause step")
    assert paused["paused_by"] == "step"
    aborted = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=5,
                                          what="the pause's timeout")
    assert "not promoted within 1s of reaching step 2" in aborted["reason"], aborted
    waited = aborted["updated_at"] - paused["step_started_at"]
    assert 1.0 <= waited < 3.0, waited
    await live.api.wait_weights({"stable": 100, "canary": 0})


@pytest.mark.parametrize(("status", "delay", "outcome"), [
    (200, 0.0, "completed"),
    (500, 0.0, "aborted"),
    (200, 3.0, "aborted"),  # no answer within the step's timeout
])
async def test_a_webhook_steps_answer_is_its_check(backends, weir, outside, status, delay,
                                                    outcome):
    stable, canary = await backends("stable"), await backends("canary")
    outside.status, outside.delay = status, delay
    steps = [{"set_weight": 10},
             {"webhook": {"url": outside.url("/smoke"), "timeout": "1s"}},
             {"set_weight": 50}]
    live = await weir(canary_config(stable, canary, steps))
    await live.api.act("start")
    done = await live.api.wait_rollout(lambda r: r["phase"] in ("completed", "aborted"),
                                       timeout=10, what="the webhook step's decision")
    assert done["phase"] == outcome, done
    assert len(outside.received) == 1  # called once, not polled
    assert outside.received[0]["event"] == "webhook"
    checks = [e for e in done["events"] if e.get("kind") == "webhook"]
    assert [e["outcome"] for e in checks] == ["success" if outcome == "completed" else "failure"]
    if status == 500:
        assert "the webhook step 2 failed" in done["reason"] and "answered 500" in done["reason"]
    if delay:
        assert "gave no answer within 1s" in done["reason"], done["reason"]


def test_step_config_errors_name_the_field():
    from proxy.config.model import Step

    with pytest.raises(ValueError, match="timeout is for a pause until promoted"):
        Step.model_validate({"pause": {"duration": "1s", "timeout": "5s"}})
    with pytest.raises(ValueError, match="http:// or https:// URL"):
        Step.model_validate({"gate": {"url": "hooks.example/confirm"}})
    with pytest.raises(ValueError, match="exactly one of set_weight, pause, analysis, gate"):
        Step.model_validate({"set_weight": 5, "webhook": {"url": "http://x/y"}})
