"""``weir rollout wait``: follow a service's rollout to its outcome, printing each transition as
it happens, and exit with a code a release pipeline can branch on (``kubectl rollout status``
and Argo's ``status --watch`` for Weir).

Exit codes: 0 promoted (or the ``--until`` point reached), 1 aborted or rolled back, 2 bad
usage or the admin API unreachable, 3 timed out, 4 paused for a person (a ``pause: {}`` step,
inconclusive analysis, someone's ``weir pause``).

Which rollout counts: with ``--revision R``, the latest rollout of that revision (the
``revision`` of the new version when it started): an earlier rollout's outcome is never
reported, however it ended. With ``rollout start --wait``, the rollout that start began.
Otherwise the service's latest rollout, or the next to start if it never had one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from .adminclient import AdminClient, AdminError

PROMOTED, FAILED, USAGE, TIMED_OUT, PAUSED = 0, 1, 2, 3, 4
POLL_SECONDS = 0.5
# How long Weir's admin API may stay unreachable once the wait has begun (a restart of Weir
# takes a moment, and the rollout resumes where it was) before the wait gives up with 2.
UNREACHABLE_GRACE = 30.0


@dataclass
class Target:
    """Which rollout the wait is about."""

    revision: str | None = None  # the latest rollout of this revision
    number: int | None = None    # exactly this rollout (rollout start --wait)

    def describe(self) -> str:
        if self.number is not None:
            return f"rollout {self.number}"
        if self.revision is not None:
            return f"the rollout of revision {self.revision}"
        return "the rollout"


def wait(admin: AdminClient, service: str, target: Target, timeout: float | None,
         until: str = "promoted", out: TextIO = sys.stdout) -> int:
    """Follow ``target`` until it ends; the exit code (see the module doc)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    record = admin.rollout_status(service)  # unreachable here: 2, from the caller
    if target.number is None and target.revision is None:
        # The latest rollout, or the next if none ever ran (a record kept by a Weir that did
        # not number them yet has 0).
        idle = record.get("phase") in ("idle", None)
        target = Target(number=number_of(record) + (1 if idle else 0))
    last_seq = 0
    shown_waiting = False
    reachable_at = time.monotonic()
    while True:
        for event in record.get("events") or []:
            if not isinstance(event, dict):
                continue
            last_seq = max(last_seq, int(event.get("seq", 0) or 0))
            if matches(event, target, record):
                print(format_event(event), file=out, flush=True)
        if is_target(record, target):
            code = outcome(record, until)
            if code is not None:
                print(conclusion(service, record, code, until), file=out, flush=True)
                return code
        else:
            superseded = superseded_by(record, target)
            if superseded:
                print(f"{service}: {target.describe()} was replaced by {superseded} before it "
                      f"finished", file=out, flush=True)
                return FAILED
            if not shown_waiting:
                shown_waiting = True
                print(f"{service}: waiting for {target.describe()} to start "
                      f"({latest(record)})", file=out, flush=True)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            where = latest(record) if not is_target(record, target) else describe_phase(record)
            print(f"weir: {service}: timed out after {timeout:g}s waiting for "
                  f"{target.describe()} ({where})", file=sys.stderr, flush=True)
            return TIMED_OUT
        time.sleep(POLL_SECONDS if left is None else min(POLL_SECONDS, left))
        try:
            record = admin.rollout_status(service, events_after=last_seq)
            reachable_at = time.monotonic()
        except AdminError as exc:
            if not exc.unreachable:
                raise
            if time.monotonic() - reachable_at > UNREACHABLE_GRACE:
                raise
            # Weir restarting: the rollout carries on where it was; so does the wait.


def number_of(record: dict[str, Any]) -> int:
    number = record.get("number")
    return number if isinstance(number, int) and not isinstance(number, bool) else 0


def is_target(record: dict[str, Any], target: Target) -> bool:
    """Whether the record's latest rollout is the one waited for."""
    if record.get("phase") in ("idle", None):
        return False
    if target.number is not None:
        return number_of(record) == target.number
    return number_of(record) > 0 and record.get("release") == target.revision


def matches(event: dict[str, Any], target: Target, record: dict[str, Any]) -> bool:
    """Whether an event is of the rollout waited for (with --revision: of that revision's
    latest rollout, not of an earlier attempt)."""
    if target.number is not None:
        return event.get("rollout") == target.number
    return is_target(record, target) and event.get("rollout") == number_of(record)


def superseded_by(record: dict[str, Any], target: Target) -> str:
    """A newer rollout than the one waited for started: it will never end on its own."""
    if target.number is not None and number_of(record) > target.number:
        return f"rollout {number_of(record)}"
    return ""


def outcome(record: dict[str, Any], until: str) -> int | None:
    phase = record.get("phase")
    if phase == "completed":
        return PROMOTED
    if phase == "aborted":
        return FAILED
    if phase == "paused":
        return PROMOTED if until == "paused" else PAUSED
    return None


def conclusion(service: str, record: dict[str, Any], code: int, until: str) -> str:
    reason = record.get("reason") or ""
    tail = f": {reason}" if reason else ""
    if code == PROMOTED and record.get("phase") == "completed":
        by = record.get("promoted_by")
        return f"{service}: promoted{f' by {by}' if by else ''}{tail}"
    if code == PROMOTED:
        return f"{service}: paused at step {record.get('step', 0) + 1} (--until {until})"
    if code == FAILED:
        return f"{service}: rollout aborted{tail}"
    return (f"{service}: paused for a person at step {record.get('step', 0) + 1}"
            f" ({paused_why(record)}){tail}")


def paused_why(record: dict[str, Any]) -> str:
    return {"step": "a pause step: weir promote goes on",
            "inconclusive": "analysis inconclusive: weir resume or promote goes on",
            "user": "paused by a person: weir resume goes on",
            "config": "the steps changed in the config: weir resume goes on",
            }.get(str(record.get("paused_by")), "weir resume goes on")


def describe_phase(record: dict[str, Any]) -> str:
    steps = record.get("steps")
    total = f"/{len(steps)}" if isinstance(steps, list) else ""
    return f"{record.get('phase')}, step {int(record.get('step', 0) or 0) + 1}{total}"


def latest(record: dict[str, Any]) -> str:
    """The rollout the service is at, for "waiting for ..." lines."""
    number = number_of(record)
    if not number:
        return "none has run yet"
    release = record.get("release")
    of = f" of revision {release}" if release else ""
    return f"the latest is rollout {number}{of}, {record.get('phase')}"


def format_event(event: dict[str, Any]) -> str:
    at = event.get("at")
    clock = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, int | float) else ""
    by = event.get("by")
    who = f" (by {by})" if by and by != "controller" else ""
    name = str(event.get("event", "?")).replace("_", " ")
    return f"{clock} {name}: {event.get('message', '')}{who}"
