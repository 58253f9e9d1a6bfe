"""Notifications of rollout events, end to end: an aiohttp receiver started by the test on
127.0.0.1 records every delivery (headers and exact body bytes) while a real rollout runs in a
Weir in this event loop; the record's own events (GET /api/services/app/rollout) are what it
must have received, in order, each signed. A receiver that is down, or that never answers,
must not slow the rollout, and its failed deliveries are counted in /metrics.

Retries back off for a second or more in production; the tests that exercise them shorten
the backoff so that every delivery's fate is known within the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.config.model import ROLLOUT_EVENTS
from proxy.rollout import notify
from proxy.rollout.notify import Notifier, sign

from ..conftest import (
    Weir,
    free_port,
    make_config,
    one_service,
    poll,
    sample,
    serve_on_loopback,
    wait_for,
)
from ..rollout_harness import Load, canary_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses")

SECRET = "s3cret-for-tests"


# --- the receiver -----------------------------------------------------------------------------


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """POST /ok/... answers 200; /flaky/... 503 to the first try of each delivery, then 200;
    /hang/... never answers. Every try is recorded."""

    port: int = 0
    deliveries: list[Delivery] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, prefix: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path.startswith(prefix)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    seen: set[str] = set()
    never = asyncio.Event()

    async def record(request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        state.deliveries.append(Delivery(request.path, headers, await request.read()))
        if request.path.startswith("/hang/"):
            await never.wait()
        if request.path.startswith("/flaky/") and headers["x-weir-delivery"] not in seen:
            seen.add(headers["x-weir-delivery"])
            return web.Response(status=503)
        return web.Response(text="ok")

    app = web.Application()
    app.add_routes([web.post("/{tail:.*}", record)])
    runner, state.port = await serve_on_loopback(app, shutdown_timeout=0.5)
    yield state
    await runner.cleanup()


def verified(delivery: Delivery, secret: str = SECRET) -> bool:
    """What a receiver does: recompute the HMAC over the exact body, compare in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), delivery.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, delivery.headers.get("x-weir-signature", ""))


def shorten_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "BACKOFF", (0.02, 0.05))


ANALYSIS = {"interval": "500ms", "min_requests": 5, "failure_limit": 0, "inconclusive_limit": 3,
            "checks": {"max_error_rate": 0.05}}


# --- a whole rollout, delivered ---------------------------------------------------------------


async def test_every_transition_arrives_in_order_and_signed(backends, receiver, weir):
    stable, canary = await backends("stable"), await backends("canary")
    steps = [{"set_weight": 20}, {"pause": {}}, {"set_weight": 50}, {"pause": {}}]
    config = canary_config(stable, canary, steps, ANALYSIS)
    config["notifications"] = [
        {"url": receiver.url("/ok/all"), "secret": SECRET, "services": ["app"]},
        {"url": receiver.url("/ok/ends"), "events": ["completed"]},  # unsigned, filtered
    ]
    live = await weir(config)
    api = live.api
    async with Load(live.port, workers=2):
        await api.act("start")
        # Held at the first pause until an analysis has been announced too.
        await api.wait_rollout(lambda r: r["phase"] == "paused" and r["analyses"], timeout=10)
        await api.act("resume")  # past the first pause: "resumed"
        await api.wait_rollout(lambda r: r["phase"] == "paused" and r["step"] == 3, timeout=10)
        await api.act("promote")  # past the second: "promoted", then "completed"
        record = await api.wait_rollout(lambda r: r["phase"] == "completed", timeout=10)

    events = record["events"]
    await wait_for(lambda: len(receiver.at("/ok/all")) >= len(events), timeout=5)
    got = receiver.at("/ok/all")
    bodies = [d.json for d in got]
    # Every transition, in order, as the record has it (each body is the record's event).
    assert [(b["seq"], b["event"]) for b in bodies] == [(e["seq"], e["event"]) for e in events]
    for body, event in zip(bodies, events, strict=True):
        assert {k: v for k, v in body.items() if k != "dashboard"} == event
    kinds = {b["event"] for b in bodies}
    assert kinds >= {"started", "step", "analysis", "awaiting_promotion", "resumed",
                     "promoted", "completed"}, kinds
    assert bodies[0]["event"] == "started" and bodies[-1]["event"] == "completed"
    assert all(b["dashboard"].endswith("/dashboard") for b in bodies)
    for delivery in got:
        assert verified(delivery), delivery.headers
        assert not verified(Delivery(delivery.path, delivery.headers, delivery.body + b" "))
        assert delivery.headers["x-weir-event"] == delivery.json["event"]
        assert delivery.headers["content-type"] == "application/json"
    assert len({d.headers["x-weir-delivery"] for d in got}) == len(got)

    # The second receiver asked for the end only, without a secret: unsigned.
    await wait_for(lambda: len(receiver.at("/ok/ends")) == 1, timeout=5)
    (end,) = receiver.at("/ok/ends")
    assert end.json["event"] == "completed" and "x-weir-signature" not in end.headers

    # Counted once the receiver's answer is in, a moment after it recorded the body.
    metrics = await poll(api.metrics, lambda text: sample(
        text, "weir_notifications_total", outcome="sent") == len(events) + 1, timeout=5,
        what="every delivery counted as sent")
    for outcome in ("retried", "failed", "dropped"):
        assert sample(metrics, "weir_notifications_total", outcome=outcome) == 0


async def test_abort_and_rollback_carry_the_reason_also_to_slack(backends, receiver, weir):
    stable = await backends("stable")
    canary = await backends("canary", fail_every=4)  # 25% errors
    config = canary_config(stable, canary, [{"set_weight": 30}, {"pause": {"duration": "1m"}}],
                           ANALYSIS)
    config["admin"] = {**config["admin"], "public_url": "https://weir.example.com/"}
    config["notifications"] = [
        {"url": receiver.url("/ok/json"), "secret": SECRET,
         "events": ["analysis", "aborted", "rolled_back"]},
        {"url": receiver.url("/ok/slack"), "format": "slack", "events": ["aborted"]},
    ]
    live = await weir(config)
    async with Load(live.port, workers=4):
        await live.api.act("start")
        record = await live.api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=10)
    await wait_for(lambda: any(d.json["event"] == "rolled_back"
                               for d in receiver.at("/ok/json")), timeout=5)
    bodies = {d.json["event"]: d.json for d in receiver.at("/ok/json")}
    reason = record["reason"]
    assert reason.startswith("analysis failed 1 time(s)") and "max_error_rate" in reason
    assert bodies["aborted"]["reason"] == reason
    assert bodies["rolled_back"]["reason"] == reason
    # The analysis that decided it: measured values against thresholds.
    failure = bodies["analysis"]
    assert failure["outcome"] == "failure" and failure["failed_checks"] == ["max_error_rate"]
    assert failure["values"]["canary_error_rate"] > failure["thresholds"]["max_error_rate"]
    assert bodies["aborted"]["dashboard"] == "https://weir.example.com/dashboard"
    assert all(verified(d) for d in receiver.at("/ok/json"))

    await wait_for(lambda: len(receiver.at("/ok/slack")) == 1, timeout=5)
    (slack,) = receiver.at("/ok/slack")
    payload = slack.json
    assert list(payload) == ["text"]
    # One line: service, event, the decision (Slack's markup characters escaped), the link.
    text = payload["text"]
    assert "\n" not in text
    assert text.startswith("*app*: aborted \u2014 analysis failed 1 time(s)"), text
    assert text.endswith("(<https://weir.example.com/dashboard|dashboard>)"), text
    assert "x-weir-signature" not in slack.headers


# --- receivers that fail --------------------------------------------------------------------


async def test_a_dead_receiver_slows_nothing_and_its_failures_are_counted(
        backends, receiver, monkeypatch, caplog, weir):  # weir last: stopped while patched
    shorten_backoff(monkeypatch)
    monkeypatch.setattr(notify, "STOP_GRACE", 0.5)  # the stop at the end gives up on it
    caplog.set_level(logging.WARNING, logger="weir.notify")
    stable, canary = await backends("stable"), await backends("canary")
    pauses = [1.0, 1.0]
    steps = [{"set_weight": 20}, {"pause": {"duration": f"{pauses[0]}s"}},
             {"set_weight": 50}, {"pause": {"duration": f"{pauses[1]}s"}}]
    down = free_port()  # nothing listens there: every try is refused
    config = canary_config(stable, canary, steps)
    config["notifications"] = [
        {"url": f"http://127.0.0.1:{down}/hook", "secret": SECRET},
        # Accepts and never answers: each try waits out its timeout.
        {"url": receiver.url("/hang/hook"), "timeout": "1s"},
    ]
    live = await weir(config)
    tick = live.control.rollouts.tick_interval()
    async with Load(live.port, workers=2) as load:
        await live.api.act("start")
        record = await live.api.wait_rollout(lambda r: r["phase"] == "completed", timeout=10)
    events = record["events"]
    took = events[-1]["at"] - events[0]["at"]
    # The steps' own time, plus at most a tick for each of the four steps and the completion,
    # plus slack for a busy machine. Were a delivery on the controller's path, the receiver
    # that never answers alone would add three 1s tries per event.
    print(f"\nrollout with a dead and a hanging receiver: {took:.2f}s for {sum(pauses)}s of "
          f"pauses (tick {tick}s)")
    assert sum(pauses) <= took <= sum(pauses) + 5 * tick + 1.0, (took, tick)
    assert all(hit.status == 200 for hit in load.hits)

    # Each event to the dead receiver: three tries, then given up, once each, in one log line.
    def failed() -> float:
        return sum(1 for r in caplog.records if f":{down}" in r.getMessage())

    await wait_for(lambda: failed() >= len(events), timeout=5)
    metrics = await live.api.metrics()
    assert sample(metrics, "weir_notifications_total", outcome="failed") >= len(events)
    assert sample(metrics, "weir_notifications_total", outcome="retried") >= 2 * len(events)
    assert sample(metrics, "weir_notifications_total", outcome="sent") == 0
    assert failed() == len(events)
    line = next(r.getMessage() for r in caplog.records if f":{down}" in r.getMessage())
    assert "not delivered after 3 tries" in line and "/hook" not in line, line


async def test_a_5xx_is_retried_with_the_same_delivery_id_and_order_kept(receiver, monkeypatch):
    shorten_backoff(monkeypatch)
    config = make_config(one_service("127.0.0.1:9"), notifications=[
        {"url": receiver.url("/flaky/hook"), "secret": SECRET},
        {"url": receiver.url("/ok/beside")}])  # not held up by the other's retries
    async with aiohttp.ClientSession() as session:
        notifier = Notifier(lambda: _session(session), config)
        notifier.start()
        for seq in range(1, 4):
            notifier.announce({"seq": seq, "event": "started", "service": "app"})
        await wait_for(lambda: notifier.outcomes["sent"] == 6, timeout=5)
        await notifier.stop()
    tries = receiver.at("/flaky/")
    assert [d.json["seq"] for d in tries] == [1, 1, 2, 2, 3, 3]
    assert [d.headers["x-weir-delivery"] for d in tries[::2]] == [
        d.headers["x-weir-delivery"] for d in tries[1::2]]
    assert all(verified(d) for d in tries)
    assert [d.json["seq"] for d in receiver.at("/ok/beside")] == [1, 2, 3]
    assert notifier.outcomes == {"sent": 6, "retried": 3, "failed": 0, "dropped": 0}


async def test_a_full_queue_drops_the_oldest_and_counts_it(receiver, monkeypatch):
    monkeypatch.setattr(notify, "QUEUE_LIMIT", 3)
    config = make_config(one_service("127.0.0.1:9"),
                         notifications=[{"url": receiver.url("/ok/hook")}])
    async with aiohttp.ClientSession() as session:
        notifier = Notifier(lambda: _session(session), config)
        for seq in range(1, 9):  # before the sender runs: it cannot keep up
            notifier.announce({"seq": seq, "event": "step", "service": "app"})
        assert notifier.outcomes["dropped"] == 5
        notifier.start()
        await wait_for(lambda: notifier.outcomes["sent"] == 3, timeout=5)
        await notifier.stop()
    assert [d.json["seq"] for d in receiver.at("/ok/")] == [6, 7, 8]


async def test_a_stop_waits_for_a_dead_receiver_only_briefly(receiver, monkeypatch):
    monkeypatch.setattr(notify, "STOP_GRACE", 0.3)
    config = make_config(one_service("127.0.0.1:9"),
                         notifications=[{"url": receiver.url("/hang/hook"), "timeout": "30s"}])
    async with aiohttp.ClientSession() as session:
        notifier = Notifier(lambda: _session(session), config)
        notifier.start()
        notifier.announce({"seq": 1, "event": "started", "service": "app"})
        await wait_for(lambda: len(receiver.deliveries) == 1, timeout=5)
        senders = [r.task for r in notifier.receivers]
        async with asyncio.timeout(2):  # not the delivery's 30s
            await notifier.stop()
    assert senders and all(task is not None and task.cancelled() for task in senders)
    assert notifier.outcomes["sent"] == 0


async def _session(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return session


# --- config ----------------------------------------------------------------------------------


async def test_notifications_follow_reloads(backends, receiver, weir):
    stable, canary = await backends("stable"), await backends("canary")
    # The short pause makes the controller tick fast.
    live = await weir(canary_config(stable, canary, [{"set_weight": 50},
                                                     {"pause": {"duration": "200ms"}}]))
    await reload_with(live, [{"url": receiver.url("/ok/hook"), "events": ["completed"]}])
    await rollout_once(live)
    await wait_for(lambda: len(receiver.at("/ok/")) == 1, timeout=5)

    await reload_with(live, [])
    assert live.control.rollouts.notifier.receivers == []
    await rollout_once(live)
    assert len(receiver.at("/ok/")) == 1


async def reload_with(live: Weir, notifications: list[dict[str, Any]]) -> None:
    data = yaml.safe_load(live.path.read_text())
    data["notifications"] = notifications
    live.rewrite(data)
    code, result = await live.reload()
    assert code == 200 and result["outcome"] == "success", result


async def rollout_once(live: Weir) -> None:
    await live.api.act("start")
    await live.api.wait_rollout(lambda r: r["phase"] == "completed", timeout=10)


def test_validate_names_the_field_of_an_unknown_event(tmp_path: Path) -> None:
    path = tmp_path / "weir.yaml"
    path.write_text(yaml.safe_dump({
        "services": [{"name": "app", "versions": {"v1": {"upstreams": ["127.0.0.1:9001"]}}}],
        "notifications": [
            {"url": "https://hooks.example.com/weir", "events": ["started", "finished"]},
            {"url": "hooks.example.com", "format": "teams", "services": ["shop"]},
        ]}))
    result = subprocess.run([sys.executable, "-m", "proxy", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=20,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 2, result
    errors = result.stderr
    assert ("notifications[0].events[1]: unknown event 'finished'; the events are "
            + ", ".join(ROLLOUT_EVENTS)) in errors, errors
    assert "notifications[1].url: expected an http:// or https:// URL" in errors, errors
    assert "notifications[1].format: Input should be 'json' or 'slack'" in errors, errors
    assert "notifications[1].services[0]: no such service 'shop' (services: app)" in errors


def test_signature_is_githubs_hmac_sha256_of_the_body() -> None:
    body = b'{"event":"started"}'
    assert sign("key", body) == "sha256=" + hmac.new(b"key", body, "sha256").hexdigest()

