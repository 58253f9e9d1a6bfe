"""Notifications: each rollout event, delivered to the receivers of the config's
``notifications`` list, off the controller's path.

The controller hands every event to ``Notifier.announce`` (one of its ``listeners``), which
only filters it and puts it on each matching receiver's queue; a sender task per receiver
delivers its queue in order. So a receiver that is slow, failing or gone never delays a step,
a weight change or a request: its queue fills up instead, and past ``QUEUE_LIMIT`` the oldest
waiting event is dropped (the newest say most about where the rollout is now).

A delivery is tried up to ``TRIES`` times, with ``BACKOFF`` between tries, while the failure
may pass (no connection, a timeout, a 5xx, 408 or 429); any other answer ends it. Every try
of one delivery carries the same ``X-Weir-Delivery``, so a receiver can drop a repeat. The
outcomes are counted in ``outcomes`` (``weir_notifications_total{outcome}``): sent, retried
(a try that failed and was tried again), failed (gave up; logged once per delivery) and
dropped (queue full).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from ..config.model import Admin, Config, Notification, split_address
from ..tasks import cancel_and_wait

log = logging.getLogger("weir.notify")

QUEUE_LIMIT = 1000               # events waiting per receiver
TRIES = 3                        # per delivery, the first one included
BACKOFF = (1.0, 3.0)             # seconds before the second try, and before each one after
STOP_GRACE = 2.0                 # what a stop (or a reload that drops a receiver) waits for
OUTCOMES = ("sent", "retried", "failed", "dropped")
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx

SIGNATURE_HEADER = "X-Weir-Signature"

# How the notifier reaches the network: the controller's shared aiohttp session.
SessionGetter = Callable[[], Awaitable[Any]]


def sign(secret: str, body: bytes) -> str:
    """The ``X-Weir-Signature`` value: as GitHub signs its webhooks, over the exact bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def dashboard_url(admin: Admin) -> str:
    """Where a notification's link points: ``admin.public_url``, else the admin listener.
    A wildcard listen address names no host a reader can use: this machine's name stands in
    for it, as Prometheus does for its external URL."""
    if admin.public_url:
        return admin.public_url.rstrip("/") + "/dashboard"
    host, port = split_address(admin.listen)
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/dashboard"


def json_body(event: dict[str, Any], dashboard: str) -> bytes:
    return json.dumps({**event, "dashboard": dashboard}, separators=(",", ":"),
                      default=str).encode()


def slack_escape(text: str) -> str:
    """Slack's mrkdwn reads <, > and & as markup ("error rate 0.05 > 0.01" would break)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(event: dict[str, Any], dashboard: str) -> bytes:
    """A Slack incoming-webhook message: the one line a person needs, and the link."""
    service = slack_escape(str(event.get("service", "")))
    name = str(event.get("event", "")).replace("_", " ")
    message = slack_escape(str(event.get("message", "")))
    text = f"*{service}*: {name} \u2014 {message} (<{dashboard}|dashboard>)"
    return json.dumps({"text": text}).encode()


def where(url: str) -> str:
    """A receiver as logs name it: scheme, host and port only, since the path of a Slack
    webhook (and of many others) is itself the secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class Receiver:
    """One entry of ``notifications``: its queue and the task that delivers it."""

    def __init__(self, spec: Notification) -> None:
        self.spec = spec
        self.events = frozenset(spec.events)
        self.services = frozenset(spec.services) if spec.services is not None else None
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_LIMIT)
        self.task: asyncio.Task[None] | None = None
        self.sending = False   # an event is out of the queue, being tried
        self.dropping = False  # logged once when drops begin, not once per drop

    def wants(self, event: dict[str, Any]) -> bool:
        return event.get("event") in self.events and (
            self.services is None or event.get("service") in self.services)


class Notifier:
    """The receivers of the config in force, fed by the controller's events."""

    def __init__(self, client: SessionGetter, config: Config) -> None:
        self.client = client
        self.receivers: list[Receiver] = []
        self.dashboard = ""
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.running = False
        self._retiring: set[asyncio.Task[None]] = set()
        self.configure(config)

    # --- the controller's side -------------------------------------------------------------

    def announce(self, event: dict[str, Any]) -> None:
        """A listener of the controller: never blocks, never raises for a receiver."""
        for receiver in self.receivers:
            if not receiver.wants(event):
                continue
            if receiver.queue.full():
                receiver.queue.get_nowait()
                receiver.queue.task_done()
                self.outcomes["dropped"] += 1
                if not receiver.dropping:
                    receiver.dropping = True
                    log.warning("notifications to %s: %d events wait already; dropping the "
                                "oldest until it catches up", where(receiver.spec.url),
                                QUEUE_LIMIT)
            receiver.queue.put_nowait(event)

    def configure(self, config: Config) -> None:
        """The config's receivers (at start and on each reload). An unchanged entry keeps its
        queue and task; a dropped one gets what is queued out within STOP_GRACE."""
        self.dashboard = dashboard_url(config.admin)
        unchanged: dict[str, list[Receiver]] = {}
        for receiver in self.receivers:
            unchanged.setdefault(receiver.spec.model_dump_json(), []).append(receiver)
        receivers = []
        for spec in config.notifications:
            same = unchanged.get(spec.model_dump_json())
            receiver = same.pop(0) if same else Receiver(spec)
            if self.running and receiver.task is None:
                receiver.task = self.spawn(receiver)
            receivers.append(receiver)
        self.receivers = receivers
        for left in unchanged.values():
            for receiver in left:
                self.retire(receiver)

    def start(self) -> None:
        self.running = True
        for receiver in self.receivers:
            if receiver.task is None:
                receiver.task = self.spawn(receiver)

    async def stop(self) -> None:
        """What is queued gets STOP_GRACE to go out (a dead receiver cannot hold a stop up);
        then every sender is cancelled and waited for."""
        self.running = False
        receivers, self.receivers = self.receivers, []
        for receiver in receivers:
            self.retire(receiver)
        if self._retiring:  # each bounded by STOP_GRACE, all at once
            await asyncio.wait(set(self._retiring))

    # --- delivery -------------------------------------------------------------------------

    def spawn(self, receiver: Receiver) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            self.deliver_queue(receiver), name=f"notify {where(receiver.spec.url)}")

    def retire(self, receiver: Receiver) -> None:
        if receiver.task is None:
            return  # never started: nothing was sent, nothing is sending
        task = asyncio.get_running_loop().create_task(self.finish(receiver))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def finish(self, receiver: Receiver) -> None:
        try:
            await asyncio.wait_for(receiver.queue.join(), STOP_GRACE)
        except TimeoutError:
            log.warning("notifications to %s: %d event(s) not delivered: given up after "
                        "%.1fs at a stop or reload", where(receiver.spec.url),
                        receiver.queue.qsize() + receiver.sending, STOP_GRACE)
        await cancel_and_wait(receiver.task)

    async def deliver_queue(self, receiver: Receiver) -> None:
        while True:
            event = await receiver.queue.get()
            receiver.sending = True
            try:
                await self.deliver(receiver, event)
            except Exception:  # a bug in one delivery must not end the receiver's others
                self.outcomes["failed"] += 1
                log.exception("notifications to %s: %s event not delivered",
                              where(receiver.spec.url), event.get("event"))
            finally:
                receiver.sending = False
                receiver.queue.task_done()
            if receiver.queue.empty():
                receiver.dropping = False

    async def deliver(self, receiver: Receiver, event: dict[str, Any]) -> None:
        spec = receiver.spec
        body = (slack_body if spec.format == "slack" else json_body)(event, self.dashboard)
        headers = {"Content-Type": "application/json", "User-Agent": "Weir",
                   "X-Weir-Event": str(event.get("event")),
                   "X-Weir-Delivery": str(uuid.uuid4())}
        if spec.secret is not None:
            headers[SIGNATURE_HEADER] = sign(spec.secret, body)
        started = time.monotonic()
        for attempt in range(1, TRIES + 1):
            status, problem = await self.post(spec, body, headers)
            if 200 <= status < 300:
                self.outcomes["sent"] += 1
                return
            retryable = status == 0 or status >= 500 or status in RETRY_STATUSES
            if not retryable or attempt == TRIES:
                break
            self.outcomes["retried"] += 1
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF)) - 1])
        self.outcomes["failed"] += 1
        log.warning("notifications to %s: %s event of %s (seq %s) not delivered after %d "
                    "tr%s in %.1fs: %s", where(spec.url), event.get("event"),
                    event.get("service"), event.get("seq"), attempt,
                    "y" if attempt == 1 else "ies", time.monotonic() - started, problem)

    async def post(self, spec: Notification, body: bytes, headers: dict[str, str]
                   ) -> tuple[int, str]:
        """One try: the status (0 for none) and, when it is no success, why."""
        import aiohttp

        session = await self.client()
        try:
            async with session.post(spec.url, data=body, headers=headers,
                                    allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=spec.timeout)) as resp:
                return int(resp.status), f"answered {resp.status}"
        except TimeoutError:
            return 0, f"no answer within {spec.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"
