"""The embedded rollout controller: canary steps and blue/green promotion, judged from Weir's
own per-version counts, with automatic rollback.

One ``ServiceRollout`` per service with a ``rollout`` block. It is driven by a one-second tick
(or faster when an analysis interval is shorter), and everything it decides goes through the
control plane (weights with source "controller") and into the state file, so a restart resumes
at the same step without repeating it.

Phases, as Argo Rollouts names them: ``idle`` (nothing to do), ``progressing``, ``paused``
(by a step, a person, or inconclusive analysis), ``completed`` and ``aborted``.

Every transition is an event (see ``ServiceRollout.emit``, and ``ROLLOUT_EVENTS`` in
config/model.py): kept, numbered, in the record, where ``weir rollout wait`` and the dashboard
read them, and handed to the notifications.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from ..config.model import (
    Analysis,
    AnalysisChecks,
    Gate,
    Mirror,
    MirrorStep,
    Rollout,
    Service,
    Step,
    WebhookStep,
)
from ..dataplane.stats import VersionStats
from ..errors import StateWriteError
from .analysis import MeasurementWindow, judge
from .checks import CustomChecks
from .notify import Notifier
from .prometheus import PrometheusWindow

if TYPE_CHECKING:
    from .surface import ControlSurface, Prepare, Undo

log = logging.getLogger("weir.rollout")

T = TypeVar("T")


class Phase(StrEnum):
    """A rollout's phase, named as Argo Rollouts names them (stored and shown as the text)."""

    IDLE = "idle"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


IDLE, PROGRESSING, PAUSED, COMPLETED, ABORTED = Phase
PHASES = tuple(Phase)


ANALYSES_KEPT = 20
EVENTS_KEPT = 100  # a waiting client polls every second or so: it never falls this far behind

# Who acted when no person did: the controller's own decisions.
CONTROLLER = "controller"


class RolloutError(Exception):
    """An action that does not fit the rollout's phase (the admin API answers 409)."""


@dataclass
class RolloutRecord:
    """What survives a restart, for one service."""

    phase: Phase = IDLE
    step: int = 0
    step_started_at: float = 0.0
    paused_by: str | None = None        # "step", "user" or "inconclusive"
    revision: str = ""                  # fingerprint of the new version's upstreams/revision
    aborted_revision: str | None = None
    reason: str | None = None
    failures: int = 0
    inconclusives: int = 0
    active: str | None = None           # blue/green: the colour with the traffic
    promoted_at: float | None = None
    started_at: float | None = None
    updated_at: float = 0.0
    analyses: list[dict[str, Any]] = field(default_factory=list)
    # The steps this record's step number counts in (see steps_digest): a restart with other
    # steps in the file holds the rollout rather than reading the number against them.
    steps_digest: str = ""
    number: int = 0                     # rollouts of this service started so far
    release: str = ""                   # the new version's ``revision`` when this one started
    promoted_by: str | None = None      # who promoted it (a token's name), if a person did
    event_seq: int = 0                  # the last event's number
    events: list[dict[str, Any]] = field(default_factory=list)
    # Where the current step stands when it waits on something outside (a gate's checks so
    # far, a webhook step's call); None for the other steps.
    step_state: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutRecord:
        checked = check_rollout_record(data)
        record = cls(**{k: v for k, v in checked.items() if k in cls.__dataclass_fields__})
        record.phase = Phase(record.phase)
        return record


_COUNTS = ("step", "failures", "inconclusives", "number", "event_seq")


_TIMES = ("step_started_at", "updated_at")


_OPTIONAL_TIMES = ("promoted_at", "started_at")


_TEXTS = ("revision", "steps_digest", "release")


_OPTIONAL_TEXTS = ("paused_by", "aborted_revision", "reason", "active", "promoted_by")


def check_rollout_record(data: object) -> dict[str, Any]:
    """A rollout record as stored (state file or shared store), checked field by field;
    raises ValueError naming the first field that is not what the controller needs (a record
    damaged by hand must be set aside where it is read, not fail on every tick)."""
    if not isinstance(data, dict):
        raise ValueError(f"a rollout record must be an object, got {data!r:.80}")

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    for name, value in data.items():
        if name == "phase":
            ok = value in PHASES
        elif name in _COUNTS:
            ok = type(value) is int and value >= 0
        elif name in _TIMES:
            ok = number(value)
        elif name in _OPTIONAL_TIMES:
            ok = value is None or number(value)
        elif name in _TEXTS:
            ok = isinstance(value, str)
        elif name in _OPTIONAL_TEXTS:
            ok = value is None or isinstance(value, str)
        elif name in ("analyses", "events"):
            ok = isinstance(value, list) and all(isinstance(a, dict) for a in value)
        elif name == "step_state":
            ok = value is None or isinstance(value, dict)
        else:
            continue  # written by a newer Weir: ignored
        if not ok:
            raise ValueError(f"rollout record field {name!r} has the invalid value "
                             f"{value!r:.80}")
    return dict(data)


def steps_digest(steps: list[Step]) -> str:
    text = json.dumps([s.model_dump(mode="json") for s in steps], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(service: Service, version: str) -> str:
    config = service.versions[version]
    text = "\n".join([*sorted(config.upstreams), config.revision or ""])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# What each check compares, and how to say it: (the measured value's key, its name).
CHECK_VALUES = {
    "max_error_rate": ("canary_error_rate", "error rate"),
    "max_error_rate_increase": ("error_rate_increase", "error rate over stable's"),
    "max_p99": ("canary_p99", "p99"),
    "max_p95": ("canary_p95", "p95"),
    "max_p50": ("canary_p50", "p50"),
    "max_p99_ratio": ("p99_ratio", "p99 over stable's"),
    "max_mismatch_rate": ("mismatch_rate", "answers unlike the users'"),
}
LATENCY_CHECKS = ("max_p99", "max_p95", "max_p50")


def describe_step(step: Step) -> str:
    if step.set_weight is not None:
        return f"set_weight {step.set_weight}"
    if step.pause is not None:
        if step.pause.duration is not None:
            return f"pause {step.pause.duration:g}s"
        timeout = step.pause.timeout
        return "pause until promoted" + (f" (at most {timeout:g}s)" if timeout else "")
    if step.gate is not None:
        return f"gate {step.gate.url}"
    if step.webhook is not None:
        return f"webhook {step.webhook.url}"
    if step.mirror is not None:
        return (f"mirror {step.mirror.percent:g}% of requests to the canary for "
                f"{step.mirror.duration:g}s")
    return "analysis"


def describe_analysis(result: dict[str, Any]) -> str:
    """One line: the outcome, then each check's measured value against its threshold
    ("failure: error rate 0.052 > 0.01 (max_error_rate); p99 0.012s <= 0.5s; 312 requests")."""
    outcome = str(result.get("outcome", "?"))
    values = result.get("values") or {}
    thresholds = result.get("thresholds") or {}
    failed = set(result.get("failed_checks") or [])
    dry = set(result.get("dry_run_failed") or [])
    parts = []
    for check, limit in thresholds.items():
        key, label = CHECK_VALUES.get(check, (check, check))
        value = values.get(key)
        if not isinstance(value, int | float) or not isinstance(limit, int | float):
            continue
        unit = "s" if check in LATENCY_CHECKS else ""
        if check in failed:
            parts.append(f"{label} {value:g}{unit} > {limit:g}{unit} ({check})")
        elif check in dry:
            parts.append(f"{label} {value:g}{unit} > {limit:g}{unit} (dry run, {check})")
        else:
            parts.append(f"{label} {value:g}{unit} <= {limit:g}{unit}")
    for name, entry in (result.get("custom") or {}).items():
        dry_run = entry.get("dry_run")
        if entry.get("outcome") == "failure":
            parts.append(f"{name} {entry.get('why')} ({name}{', dry run' if dry_run else ''})")
        elif entry.get("outcome") == "success":
            parts.append(f"{name} {entry.get('canary'):g} ok{' [dry run]' if dry_run else ''}")
    parts.sort(key=lambda part: not part.endswith(")"))  # the failed checks first
    if isinstance(values.get("canary_requests"), int):
        parts.append(f"{values['canary_requests']} canary requests")
    if result.get("why"):
        parts.append(str(result["why"]))
    return f"{outcome}: " + "; ".join(parts) if parts else outcome


class ServiceRollout:
    """The controller for one service."""

    def __init__(self, controller: RolloutController, service: Service) -> None:
        self.controller = controller
        self.control = controller.control
        self.name = service.name
        self.service = service
        self.record = RolloutRecord()
        self.step_window: MeasurementWindow | PrometheusWindow | None = None
        self.background: MeasurementWindow | PrometheusWindow | None = None
        self.ramp: asyncio.Task[None] | None = None
        # The call a gate or webhook step has out (its HTTP status, 0 for no answer).
        self.hook: asyncio.Task[int] | None = None
        # A mirror step's window: where the canary's answers to copies, stable's requests
        # and the field comparisons stood when it began (None: no mirror step running here).
        self.mirror_window: tuple[Any, Any, int, float] | None = None
        self.pending_start = False
        self.pending_why = "the new version changed while Weir was stopped"
        self.tick_error = ""  # the last failure of this rollout's tick, logged once
        # The start a config change set off (see config_changed): an operator's action waits
        # for it, so that it applies to the rollout the edit began.
        self.starting: asyncio.Task[None] | None = None

    @property
    def spec(self) -> Rollout:
        assert self.service.rollout is not None
        return self.service.rollout

    # --- persistence and config -----------------------------------------------------------

    def restore(self, data: dict[str, Any] | None) -> None:
        if data:
            try:
                self.record = RolloutRecord.from_dict(data)
            except (TypeError, ValueError) as exc:
                log.error("service %s: ignoring unreadable rollout state (%s)", self.name, exc)
        if self.spec.strategy == "blue_green":
            self.record.active = self.record.active or self.spec.active
            self.update_preview()
        current = fingerprint(self.service, self.new_version)
        if self.record.revision and self.record.revision != current:
            # The new version changed while Weir was down: as if the file had been edited.
            self.pending_start = self.spec.auto_start and current != self.record.aborted_revision
        self.record.revision = current
        if not self.record.steps_digest:  # a record from before steps were recorded
            self.record.steps_digest = steps_digest(self.spec.steps)
        if self.controller.leading:
            self.check_steps("while Weir was stopped")

    def check_steps(self, when: str) -> None:
        """On taking up a record (a start, a new leader): if its step number counts in steps
        that are no longer the file's, hold the rollout (see steps_changed)."""
        record = self.record
        if (record.steps_digest != steps_digest(self.spec.steps) and not self.pending_start
                and self.spec.strategy == "canary" and record.phase in (PROGRESSING, PAUSED)):
            self.hold_for_changed_steps(f"{when} (the rollout was at step {record.step + 1})")

    def adopt(self, data: dict[str, Any]) -> None:
        """The record as another instance wrote it (a shared state store)."""
        try:
            record = RolloutRecord.from_dict(data)
        except (TypeError, ValueError) as exc:
            log.error("service %s: ignoring an unreadable rollout record (%s)", self.name, exc)
            return
        if record == self.record:
            return
        old = self.record
        self.record = record
        if (record.phase, record.step, record.started_at) != (old.phase, old.step,
                                                              old.started_at):
            self.step_window = self.background = None  # judged afresh from here
            self.cancel_hook()
            if record.phase not in (PROGRESSING, PAUSED):
                self.cancel_ramp()
        self.update_preview()

    def save(self) -> None:
        """The record, in force at once and saved in the background (retried until saved)."""
        self.stage()
        self.control.changed()

    def stage(self) -> None:
        """The record into the runtime state, to go with the next save."""
        self.record.updated_at = time.time()
        self.control.state.rollouts[self.name] = asdict(self.record)

    def emit(self, event: str, message: str, by: str = CONTROLLER, **details: Any) -> None:
        """A transition (one of ROLLOUT_EVENTS): numbered into the record, which the caller
        saves next, logged, and handed to the notifications. ``message`` is the one line a
        person reads."""
        record = self.record
        record.event_seq += 1
        entry: dict[str, Any] = {
            "seq": record.event_seq, "at": time.time(), "event": event, "service": self.name,
            "rollout": record.number, "revision": record.release, "step": record.step,
            "steps": len(self.spec.steps), "phase": str(record.phase), "by": by,
            "message": message, **details}
        record.events = [*record.events, entry][-EVENTS_KEPT:]
        log.log(logging.WARNING if event in ("paused", "aborted") else logging.INFO,
                "service %s: rollout %s: %s%s", self.name, event.replace("_", " "), message,
                "" if by == CONTROLLER else f" (by {by})")
        self.controller.announce(entry)

    @property
    def current_step(self) -> Step | None:
        """The canary step the rollout is at; None past the last one."""
        steps, step = self.spec.steps, self.record.step
        return steps[step] if step < len(steps) else None

    @property
    def new_version(self) -> str:
        """The version a rollout brings in: the canary, or the idle blue/green colour."""
        if self.spec.strategy == "canary":
            return self.spec.canary
        return self.idle_colour

    @property
    def old_version(self) -> str:
        return self.spec.stable if self.spec.strategy == "canary" else self.active_colour

    @property
    def active_colour(self) -> str:
        return self.record.active or self.spec.active

    @property
    def idle_colour(self) -> str:
        spec = self.spec
        return spec.preview if self.active_colour == spec.active else spec.active

    def config_changed(self, service: Service) -> None:
        """A reload: start a rollout if the new version's upstreams or revision changed."""
        old_steps = self.spec.steps
        self.service = service
        revision = fingerprint(service, self.new_version)
        if not self.controller.leading:
            return  # a follower leaves its rollouts to the controller's instance
        if revision == self.record.revision:
            self.steps_changed(old_steps)
            return
        self.record.revision = revision
        if self.spec.auto_start and revision != self.record.aborted_revision:
            log.info("service %s: %s changed; starting a rollout", self.name, self.new_version)
            self.preset_first_weight()
            self.starting = self.controller.spawn(self.start_or_retry("config change"))
        else:
            self.save()

    def steps_changed(self, old_steps: list[Step]) -> None:
        """The file's steps may differ from those the rollout is counting in. A rollout in
        progress carries on when only steps it has not reached changed; otherwise its step
        number means something else now (fewer steps could even read as "all done" and send
        the canary to 100%): it is held, paused, at a step that raises no weight."""
        record = self.record
        digest = steps_digest(self.spec.steps)
        if digest == (record.steps_digest or steps_digest(old_steps)):
            return
        if self.spec.strategy != "canary" or record.phase not in (PROGRESSING, PAUSED):
            record.steps_digest = digest
            self.save()
            return
        new_steps, done = self.spec.steps, record.step
        if done < len(new_steps) and ([s.model_dump() for s in old_steps[:done]]
                                      == [s.model_dump() for s in new_steps[:done]]):
            record.steps_digest = digest
            self.save()
            log.info("service %s: the rollout's later steps changed; carrying on at step "
                     "%d of %d", self.name, done + 1, len(new_steps))
            return
        self.hold_for_changed_steps(f"at step {done + 1} of {len(old_steps)}")

    def canary_percent(self) -> float:
        """The canary's share of the traffic now, in percent."""
        route = next((r for r in self.control.proxy.table.routes if r.name == self.name), None)
        if route is None:
            return 0.0
        total = sum(route.weights.values())
        return 100.0 * route.weights.get(self.spec.canary, 0) / total if total else 0.0

    def hold_for_changed_steps(self, was: str) -> None:
        """Pause at the furthest step that the steps before it do not take above the
        canary's share now, and say so."""
        record, steps = self.record, self.spec.steps
        share = self.canary_percent()
        held, highest = 0, 0
        for index, step in enumerate(steps[:-1]):
            if step.set_weight is not None:
                highest = max(highest, step.set_weight)
            if highest > share:
                break
            held = index + 1
        record.step = held
        record.step_started_at = time.time()
        record.step_state = None
        self.cancel_hook()
        record.phase, record.paused_by = PAUSED, "config"
        record.steps_digest = steps_digest(steps)
        record.reason = (f"the rollout's steps changed in the config file {was}, with the "
                         f"canary at {share:g}%: held at step {held + 1} of {len(steps)} "
                         f"without changing any weight; resume or promote to go on")
        self.step_window = self.background = None
        self.cancel_ramp()
        self.emit("paused", record.reason, paused_by="config")
        self.save()

    def first_weights(self) -> dict[str, int]:
        steps = self.spec.steps
        first = steps[0].set_weight if steps and steps[0].set_weight is not None else 0
        return {self.spec.stable: 100 - first, self.spec.canary: first}

    def preset_first_weight(self) -> None:
        """Before a reload's table is applied: new canary upstreams start at the first step's
        weight in that very table, not at the share the previous canary had reached."""
        if self.spec.strategy == "canary":
            self.control.state.set_weights(self.control.config, self.name,
                                           self.first_weights(), "controller")

    def update_preview(self) -> None:
        if self.spec.strategy == "blue_green":
            self.control.previews[self.name] = (self.spec.preview_header, self.idle_colour)

    # --- actions --------------------------------------------------------------------------

    async def start(self, why: str = "api", by: str = CONTROLLER,
                    prepare: Prepare | None = None) -> None:
        """Saved before it counts: the new record (and for a canary, the first step's weight)
        goes into the runtime state, and the data plane, only once the state is saved; if it
        cannot be, the rollout is as it was (a rollback ramp cut short goes on) and
        StateWriteError says nothing changed. Then the pre_rollout webhook and, for blue/green,
        the pre-promotion checks."""
        await self.begin(why, by, prepare)
        await self.after_begin()

    async def begin(self, why: str = "api", by: str = CONTROLLER,
                    prepare: Prepare | None = None) -> None:
        """The start itself (see start), announced once saved.

        ``prepare``: another change to the runtime state that this start brings in and is
        saved with it, in the same write (a release's revision and upstreams, see
        ControlPlane.start_release). Called first, under the state lock; it returns what undoes
        it, or None when it changed nothing. A change is a new version to roll out: it starts
        a new rollout from the first step even while one is in progress, as an edit of the file
        does; without one, a start through the API while a rollout is in progress is refused."""
        replaced: tuple[int, int] | None = None

        def change() -> Undo:
            nonlocal replaced
            undo_prepared = prepare() if prepare is not None else None
            try:
                if undo_prepared is not None and self.record.phase in (PROGRESSING, PAUSED):
                    replaced = (self.record.number, self.record.step)
                undo_start = self.stage_start(why, replace=undo_prepared is not None)
            except BaseException:
                if undo_prepared is not None:
                    undo_prepared()
                raise

            def undo() -> None:
                undo_start()
                if undo_prepared is not None:
                    undo_prepared()

            return undo

        await self.control.commit(change)
        record = self.record
        release = f" of revision {record.release}" if record.release else ""
        was = (f"; replaces rollout {replaced[0]}, which was at step {replaced[1] + 1}"
               if replaced else "")
        self.emit("started", f"rollout {record.number}{release} ({why}): {self.new_version} "
                             f"replaces {self.old_version}{was}", by=by, why=why)
        self.save()

    async def after_begin(self) -> None:
        """What a start goes on with: the pre_rollout webhook (an abort if it fails), and for
        blue/green the pre-promotion checks."""
        if not await self.webhook("pre_rollout", required=True):
            await self.abort("the pre_rollout webhook failed")
            return
        if self.spec.strategy == "blue_green":
            self.controller.spawn(self.run_smoke_checks())

    def stage_start(self, why: str, replace: bool = False) -> Undo:
        """A new rollout in the record, and for a canary the first step's weight, in the
        runtime state (not saved, not applied: see start). Returns what puts them back.
        ``replace``: a new version replaces a rollout in progress (otherwise refused through
        the API)."""
        record = self.record
        if record.phase in (PROGRESSING, PAUSED) and why == "api" and not replace:
            raise RolloutError(f"a rollout of {self.name} is already {record.phase}")
        state = self.control.state
        before = copy.deepcopy(record)
        before_entry = state.rollouts.get(self.name)
        before_weights = state.weights.get(self.name)
        ramp_cut = self.ramp is not None and not self.ramp.done()
        self.cancel_ramp()
        record.phase = PROGRESSING
        record.step = 0
        record.step_started_at = time.time()
        record.paused_by = None
        record.reason = None
        record.failures = record.inconclusives = 0
        record.started_at = time.time()
        record.promoted_at = None
        record.aborted_revision = None
        record.promoted_by = None
        record.step_state = None
        self.cancel_hook()
        record.steps_digest = steps_digest(self.spec.steps)
        record.number += 1
        # What this rollout brings in: a restart with the same version does not start it again.
        record.revision = fingerprint(self.service, self.new_version)
        record.release = self.service.versions[self.new_version].revision or ""
        self.step_window = self.background = None
        self.stage()
        if self.spec.strategy == "canary":
            # From the first step's weight at once: a new canary revision must not inherit
            # the traffic share the previous one had reached. Saved with the record.
            state.set_weights(self.control.config, self.name, self.first_weights(),
                              CONTROLLER)

        def undo() -> None:
            self.record = before
            self.step_window = self.background = None
            if before_entry is None:
                state.rollouts.pop(self.name, None)
            else:
                state.rollouts[self.name] = before_entry
            if before_weights is None:
                state.weights.pop(self.name, None)
            else:
                state.weights[self.name] = before_weights
            if ramp_cut:
                self.ramp = self.controller.spawn(self.roll_back())

        return undo

    async def start_or_retry(self, why: str) -> None:
        """A start the operator did not ask for through the API (a config change, a restart):
        when the state cannot be saved, the clock tries it again."""
        try:
            await self.start(why)
        except StateWriteError as exc:
            self.pending_start, self.pending_why = True, why
            self.control.changed()  # what start left in force (the preset first weight)
            log.error("service %s: rollout not started yet (%s): %s; trying again",
                      self.name, why, exc)

    async def promote(self, full: bool = False, by: str = CONTROLLER) -> None:
        record = self.record
        if record.phase not in (PROGRESSING, PAUSED):
            raise RolloutError(f"no rollout of {self.name} in progress (phase {record.phase})")
        if self.spec.strategy == "blue_green":
            if record.promoted_at is not None:
                record.promoted_by = by
                await self.complete("promoted past the post-promotion window", by=by)
            else:
                await self.switch_colours(by=by)
            return
        if full:
            record.promoted_by = by
            self.emit("promoted", "promoted in full: the canary goes to 100%", by=by,
                      full=True)
            await self.complete("promoted in full", by=by)
            return
        step = self.current_step
        # A person's go skips what the rollout waits on: a pause, a gate, a webhook step.
        at_pause = step is not None and (step.pause or step.gate or step.webhook
                                         or step.mirror) is not None
        if not at_pause and record.phase != PAUSED:
            return  # progressing through a step that waits on nothing: nothing to skip
        record.promoted_by = by
        self.emit("promoted", f"promoted past step {record.step + 1}", by=by, full=False)
        if at_pause:
            await self.next_step()
        else:
            record.phase, record.paused_by = PROGRESSING, None
            record.inconclusives = 0
            self.save()

    async def abort(self, reason: str = "aborted by a person", by: str = CONTROLLER) -> None:
        record = self.record
        if record.phase not in (PROGRESSING, PAUSED):
            raise RolloutError(f"no rollout of {self.name} in progress (phase {record.phase})")
        record.phase = ABORTED
        record.reason = reason
        record.aborted_revision = record.revision
        self.step_window = self.background = None
        self.cancel_hook()
        self.emit("aborted", reason, by=by, reason=reason)
        self.save()
        await self.roll_back()
        await self.webhook("rollback")

    async def roll_back(self) -> None:
        """All traffic back to the old version: at once, or along rollback_ramp."""
        old, new = self.old_version, self.new_version
        if self.spec.strategy == "blue_green" and self.record.promoted_at is not None:
            # Promoted already: the previous colour is the rollback target.
            old, new = new, old
            self.record.active = old
            self.record.revision = fingerprint(self.service, self.idle_colour)
            self.record.aborted_revision = self.record.revision
            self.update_preview()
            self.save()
        # Back to safety: in force at once, saved in the background (see control/plane.py).
        ramp = [w for w in self.spec.rollback_ramp if w > 0]
        if not ramp:
            await self.set_weights({old: 100, new: 0}, fail_safe=True)
            self.rolled_back(old, new)
            return

        async def walk() -> None:
            for weight in ramp:
                await self.set_weights({old: 100 - weight, new: weight}, fail_safe=True)
                await asyncio.sleep(self.spec.rollback_ramp_interval)
            await self.set_weights({old: 100, new: 0}, fail_safe=True)
            self.rolled_back(old, new)

        self.ramp = self.controller.spawn(walk())

    def rolled_back(self, old: str, new: str) -> None:
        self.emit("rolled_back", f"all traffic back on {old}; {new} has none",
                  reason=self.record.reason)
        self.save()

    def rollback_unfinished(self) -> bool:
        """An aborted canary that still has traffic: a restart cut its rollback ramp short."""
        if self.spec.strategy != "canary" or self.record.phase != ABORTED:
            return False
        route = next((r for r in self.control.proxy.table.routes if r.name == self.name), None)
        return route is not None and route.weights.get(self.spec.canary, 0) > 0

    def cancel_ramp(self) -> None:
        if self.ramp is not None:
            self.ramp.cancel()
            self.ramp = None

    async def pause(self, by: str = CONTROLLER) -> None:
        record = self.record
        if record.phase != PROGRESSING:
            raise RolloutError(f"no progressing rollout of {self.name} (phase {record.phase})")
        record.phase, record.paused_by = PAUSED, "user"
        self.emit("paused", f"paused at step {record.step + 1} by a person; resume or promote "
                            f"to go on", by=by, paused_by="user")
        self.save()

    async def resume(self, by: str = CONTROLLER) -> None:
        record = self.record
        if record.phase != PAUSED:
            raise RolloutError(f"the rollout of {self.name} is not paused (phase {record.phase})")
        self.emit("resumed", f"resumed at step {record.step + 1}", by=by)
        step = self.current_step
        if record.paused_by == "step" and step is not None and step.pause is not None:
            await self.next_step()
            return
        record.phase, record.paused_by = PROGRESSING, None
        record.inconclusives = 0
        self.save()

    async def retry(self, by: str = CONTROLLER) -> None:
        if self.record.phase != ABORTED:
            raise RolloutError(f"only an aborted rollout can be retried "
                               f"(phase {self.record.phase})")
        await self.start("retry", by=by)

    # --- the engine -----------------------------------------------------------------------

    async def tick(self) -> None:
        if self.pending_start:
            self.pending_start = False
            await self.start_or_retry(self.pending_why)
        record = self.record
        if record.phase not in (PROGRESSING, PAUSED):
            return
        await self.run_background_analysis()
        if record.phase == PAUSED:
            await self.check_pause_timeout()
        if record.phase != PROGRESSING:
            return
        if self.spec.strategy == "blue_green":
            await self.tick_blue_green()
            return
        step = self.current_step
        if step is None:
            await self.complete("all steps done")
            return
        if step.set_weight is not None:
            new = step.set_weight
            await self.set_weights({self.spec.stable: 100 - new, self.spec.canary: new})
            await self.next_step()
        elif step.pause is not None:
            duration = step.pause.duration
            if duration is None:
                record.phase, record.paused_by = PAUSED, "step"
                self.emit("awaiting_promotion", f"paused at step {record.step + 1} of "
                          f"{len(self.spec.steps)} until promoted (weir promote {self.name})")
                self.save()
            elif time.time() - record.step_started_at >= duration:
                await self.next_step()
        elif step.analysis is not None:
            await self.run_step_analysis(step.analysis)
        elif step.gate is not None:
            await self.run_gate(step.gate)
        elif step.webhook is not None:
            await self.run_webhook_step(step.webhook)
        elif step.mirror is not None:
            await self.run_mirror_step(step.mirror)

    async def check_pause_timeout(self) -> None:
        """A ``pause: {timeout}`` step nobody promoted in time aborts the rollout."""
        record, step = self.record, self.current_step
        if self.spec.strategy != "canary" or record.paused_by != "step" or step is None:
            return
        pause = step.pause
        if pause is None or pause.timeout is None:
            return
        if time.time() - record.step_started_at >= pause.timeout:
            await self.abort(f"not promoted within {pause.timeout:g}s of reaching step "
                             f"{record.step + 1} (its pause timeout)")

    def hook_payload(self, kind: str) -> dict[str, Any]:
        """What a gate or a webhook step is sent: the step, and the record without its long
        lists (a receiver that wants them reads GET /api/services/{name}/rollout)."""
        record = {k: v for k, v in asdict(self.record).items()
                  if k not in ("events", "analyses")}
        return {"event": kind, "service": self.name, "step": self.record.step + 1,
                "canary_percent": self.canary_percent(), "rollout": record}

    def call_hook(self, url: str, kind: str, timeout: float) -> None:
        self.hook = self.controller.spawn(
            self.controller.post_for_status(url, self.hook_payload(kind), timeout))

    def hook_answer(self) -> int | None:
        """The status the step's call got (0: none), once it has one."""
        hook = self.hook
        if hook is None or not hook.done():
            return None
        self.hook = None
        return 0 if hook.cancelled() or hook.exception() is not None else hook.result()

    def cancel_hook(self) -> None:
        """End what the current step has out: a gate's or webhook's call, a mirror."""
        if self.hook is not None:
            self.hook.cancel()
            self.hook = None
        if self.mirror_window is not None:
            self.mirror_window = None
            self.control.set_rollout_mirror(self.name, None)

    async def run_mirror_step(self, step: MirrorStep) -> None:
        """Copies of the service's requests go to the canary for ``duration`` while users are
        answered by stable; then the canary's answers are judged against stable's requests
        of the same window (error rate, p99 ratio) and against the users' answers
        (mismatch rate). A failure aborts the rollout before any user reached the canary."""
        record = self.record
        stats = self.control.proxy.stats
        copies = stats.for_mirror(self.name, self.spec.canary)
        stable = stats.for_version(self.name, self.spec.stable)
        now = time.time()
        if self.mirror_window is None:
            self.mirror_window = (copies.answers.snapshot(), stable.snapshot(),
                                  copies.diff.compared, now)
            record.step_state = {"kind": "mirror", "percent": step.percent, "since": now,
                                 "duration": step.duration}
            # With a mismatch check, copies to stable too: what differs between two of its
            # answers (a timestamp, an id) is noise, not the canary's (see dataplane/diff.py).
            judged = step.max_mismatch_rate is not None
            self.control.set_rollout_mirror(self.name, Mirror(
                version=self.spec.canary, percent=step.percent, methods=step.methods,
                compare=judged, baseline=self.spec.stable if judged else None))
            self.save()
            return
        canary_start, stable_start, compared, since = self.mirror_window
        if now - since < step.duration:
            return
        analysis = Analysis(interval=step.duration, min_requests=step.min_requests,
                            checks=AnalysisChecks(max_error_rate=step.max_error_rate,
                                                  max_p99_ratio=step.max_p99_ratio))
        result = judge(analysis, copies.answers.since(canary_start), stable.since(stable_start))
        if step.max_mismatch_rate is not None:
            mismatched, count = copies.diff.mismatches_since(compared)
            rate = mismatched / count if count else 0.0
            result["values"].update(mismatch_rate=round(rate, 5), compared=count,
                                    noise=sorted(copies.diff.noise_fields())[:10])
            if count < step.min_requests and result["outcome"] != "failure":
                result["outcome"] = "inconclusive"  # too few answers compared to tell
                result["why"] = (f"{count} answers compared with the users', fewer than "
                                 f"{step.min_requests}")
            result["thresholds"]["max_mismatch_rate"] = step.max_mismatch_rate
            if rate > step.max_mismatch_rate and result["outcome"] != "inconclusive":
                result["failed_checks"].append("max_mismatch_rate")
                result["outcome"] = "failure"
        self.cancel_hook()  # the copies stop with the step's judgement
        limits = Analysis(interval=step.duration, min_requests=step.min_requests)
        if await self.decide(limits, result, "mirror") and result["outcome"] == "success":
            await self.next_step()

    async def run_gate(self, gate: Gate) -> None:
        """Poll the gate every interval; its first 2xx opens it. Each check is counted in
        the step's state, which the status and the dashboard show."""
        record = self.record
        now = time.time()
        state = record.step_state or {"kind": "gate", "url": gate.url, "checks": 0}
        answer = self.hook_answer()
        if answer is not None:
            state = {**state, "checks": state["checks"] + 1, "last_status": answer,
                     "last_at": now}
            record.step_state = state
            if 200 <= answer < 300:
                self.emit("analysis", f"gate open: {gate.url} answered {answer} after "
                          f"{state['checks']} check(s)", outcome="success", kind="gate")
                await self.next_step()
                return
            self.save()
        if gate.timeout is not None and now - record.step_started_at >= gate.timeout:
            last = state.get("last_status")
            await self.abort(f"the gate at step {record.step + 1} did not open within "
                             f"{gate.timeout:g}s ({state['checks']} check(s), the last "
                             f"answered {last if last else 'nothing'})")
            return
        if self.hook is None and now - state.get("last_at", 0.0) >= gate.interval:
            record.step_state = state
            self.call_hook(gate.url, "gate", gate.request_timeout)

    async def run_webhook_step(self, webhook: WebhookStep) -> None:
        """One call; its answer is the check. A restart while it is out calls it again (the
        receiver should take a repeat as the same request)."""
        record = self.record
        answer = self.hook_answer()
        if answer is None:
            if self.hook is None:
                record.step_state = {"kind": "webhook", "url": webhook.url,
                                     "sent_at": time.time()}
                self.call_hook(webhook.url, "webhook", webhook.timeout)
                self.save()
            return
        record.step_state = {**(record.step_state or {}), "status": answer,
                             "answered_at": time.time()}
        if 200 <= answer < 300:
            self.emit("analysis", f"webhook step: {webhook.url} answered {answer}",
                      outcome="success", kind="webhook")
            await self.next_step()
            return
        why = f"answered {answer}" if answer else f"gave no answer within {webhook.timeout:g}s"
        self.emit("analysis", f"webhook step: {webhook.url} {why}", outcome="failure",
                  kind="webhook")
        await self.abort(f"the webhook step {record.step + 1} failed: {webhook.url} {why}")

    async def next_step(self) -> None:
        record = self.record
        record.step += 1
        record.step_started_at = time.time()
        record.phase, record.paused_by = PROGRESSING, None
        record.step_state = None
        self.cancel_hook()
        self.step_window = None
        step = self.current_step
        if self.spec.strategy == "canary" and step is not None:
            self.emit("step", f"step {record.step + 1} of {len(self.spec.steps)}: "
                              f"{describe_step(step)} (canary at {self.canary_percent():g}%)",
                      detail=step.model_dump(mode="json", exclude_none=True))
        self.save()

    async def complete(self, why: str, by: str = CONTROLLER) -> None:
        record = self.record
        if self.spec.strategy == "canary":
            await self.set_weights({self.spec.stable: 0, self.spec.canary: 100})
            record.step = len(self.spec.steps)
        record.phase, record.paused_by, record.reason = COMPLETED, None, why
        record.promoted_at = record.promoted_at or time.time()
        self.step_window = self.background = None
        winner = self.spec.canary if self.spec.strategy == "canary" else self.active_colour
        self.emit("completed", f"{winner} has all the traffic ({why})", by=by, reason=why)
        self.save()
        await self.webhook("promoted")

    def judged_versions(self) -> tuple[str, str | None]:
        """The version the analysis judges, and the one it compares it with (if any)."""
        if self.spec.strategy == "blue_green" and self.record.promoted_at is not None:
            # After a switch the old colour has no traffic to compare with.
            return self.active_colour, None
        return self.new_version, self.old_version

    async def measure(self, window: MeasurementWindow | PrometheusWindow,
                      analysis: Analysis) -> dict[str, Any]:
        """A window's result, with the custom checks measured over the same window."""
        result = await window.measure(analysis)
        await self.controller.custom_checks.apply(analysis, result, self.name,
                                                  *self.judged_versions())
        return result

    def windows(self, analysis: Analysis) -> MeasurementWindow | PrometheusWindow:
        canary_version, baseline_version = self.judged_versions()
        if analysis.source.type == "prometheus":
            return PrometheusWindow(self.controller, analysis.source, self.name,
                                    canary_version, baseline_version, analysis.interval,
                                    list(self.service.grpc.error_codes))
        stats = self.control.proxy.stats
        baseline: VersionStats | None = (stats.for_version(self.name, baseline_version)
                                         if baseline_version is not None else None)
        return MeasurementWindow(stats.for_version(self.name, canary_version), baseline,
                                 analysis.interval)

    async def run_step_analysis(self, analysis: Analysis) -> None:
        if self.step_window is None:
            self.step_window = self.windows(analysis)
            return
        if not self.step_window.due():
            return
        result = await self.measure(self.step_window, analysis)
        self.step_window = None
        if await self.decide(analysis, result, "step") and result["outcome"] == "success":
            await self.next_step()

    async def run_background_analysis(self) -> None:
        analysis = self.spec.analysis
        record = self.record
        if analysis is None or record.step < analysis.start_step:
            return
        if self.spec.strategy == "blue_green" and record.promoted_at is None:
            return  # judged after the switch, on real traffic
        if record.phase == PAUSED and record.paused_by != "step":
            self.background = None  # held by a person or for inconclusive: not judging
            return
        step = self.current_step
        if step is not None and step.mirror is not None:
            self.background = None  # no user reaches the canary yet: its step judges it
            return
        if self.background is None:
            self.background = self.windows(analysis)
            return
        if not self.background.due():
            return
        window = self.background
        self.background = self.windows(analysis)  # the next window starts now, not after
        result = await self.measure(window, analysis)  # a query to Prometheus returns
        await self.decide(analysis, result, "background")

    async def decide(self, analysis: Analysis, result: dict[str, Any], kind: str) -> bool:
        """Count a measurement; abort or pause past the limits. False if the rollout stopped."""
        if not self.controller.leading:
            return False  # lost the controller lock while measuring: the new leader judges
        record = self.record
        result["kind"] = kind
        result["step"] = record.step
        record.analyses = [*record.analyses, result][-ANALYSES_KEPT:]
        self.controller.count_analysis(self.name, result["outcome"])
        self.emit("analysis", describe_analysis(result), outcome=result["outcome"], kind=kind,
                  values=result.get("values", {}), thresholds=result.get("thresholds", {}),
                  failed_checks=result.get("failed_checks", []))
        if result["outcome"] == "failure":
            record.failures += 1
            if record.failures > analysis.failure_limit:
                failed = ", ".join(result["failed_checks"])
                await self.abort(f"analysis failed {record.failures} time(s) "
                                 f"(failure_limit {analysis.failure_limit}): {failed}")
                return False
        elif result["outcome"] == "inconclusive":
            record.inconclusives += 1
            if record.inconclusives > analysis.inconclusive_limit:
                record.phase, record.paused_by = PAUSED, "inconclusive"
                record.reason = (f"analysis inconclusive {record.inconclusives} time(s): "
                                 f"{result.get('why')}; resume or promote to go on")
                self.emit("paused", record.reason, paused_by="inconclusive")
                self.save()
                return False
        self.save()
        return True

    # --- blue/green -----------------------------------------------------------------------

    async def run_smoke_checks(self) -> None:
        """Pre-promotion checks against every upstream of the preview colour."""
        preview = self.idle_colour
        version = self.service.versions[preview]
        scheme, tls = "http", dict[str, Any]()
        if version.tls is not None:
            # Checked as the proxy would connect: the same CA, verification and name.
            scheme = "https"
            tls = {"ssl": self.controller.control.proxy.pools.context_for(version.tls),
                   "server_hostname": version.tls.server_name}
        failures = []
        for check in self.spec.checks:
            for upstream in version.upstreams:
                url = f"{scheme}://{upstream}{check.path}"
                for _ in range(check.count):
                    status = await self.controller.probe(check.method, url, check.timeout,
                                                         **tls)
                    if status != check.status:
                        failures.append(f"{check.method} {url} gave {status or 'no answer'}, "
                                        f"expected {check.status}")
                        break
        outcome = "failure" if failures else "success"
        self.record.analyses = [*self.record.analyses, {
            "at": time.time(), "kind": "smoke", "outcome": outcome,
            "failures": failures[:10]}][-ANALYSES_KEPT:]
        checked = sum(c.count for c in self.spec.checks) * len(version.upstreams)
        self.emit("analysis", f"pre-promotion checks of {preview}: {outcome}"
                  + (f": {'; '.join(failures[:3])}" if failures
                     else f" ({checked} request(s) answered as expected)"),
                  outcome=outcome, kind="smoke", failures=failures[:10])
        if failures:
            await self.abort("pre-promotion checks failed: " + "; ".join(failures[:3]))
            return
        self.record.step = 1  # checks passed; waiting for promotion
        self.record.step_started_at = time.time()
        if not self.spec.promotion.auto:
            self.record.phase, self.record.paused_by = PAUSED, "step"
            self.emit("awaiting_promotion", f"{preview} passed its checks; waiting to be "
                      f"promoted (weir promote {self.name})")
        self.save()

    async def tick_blue_green(self) -> None:
        record = self.record
        if record.promoted_at is None:
            promotion = self.spec.promotion
            if (record.step >= 1 and promotion.auto
                    and time.time() - record.step_started_at >= promotion.delay):
                await self.switch_colours()
            return
        if time.time() - record.promoted_at >= self.spec.post_promotion_window:
            await self.complete("post-promotion analysis passed")

    async def switch_colours(self, by: str = CONTROLLER) -> None:
        record = self.record
        if record.step < 1 and self.spec.checks:
            raise RolloutError("the pre-promotion checks have not passed yet")
        new = self.idle_colour
        await self.set_weights({new: 100, self.active_colour: 0})
        record.promoted_by = by if by != CONTROLLER else None
        record.active = new
        # The colour just vacated is the next rollout's; a change to it starts one.
        record.revision = fingerprint(self.service, self.idle_colour)
        record.promoted_at = time.time()
        record.step = 2
        record.phase, record.paused_by = PROGRESSING, None
        self.background = None
        self.update_preview()
        self.control.apply()
        self.emit("promoted", f"switched: {new} has all the traffic", by=by, full=False)
        self.save()

    # --- plumbing -------------------------------------------------------------------------

    async def set_weights(self, weights: dict[str, int], fail_safe: bool = False) -> None:
        await self.control.set_weights(self.name, weights, source="controller",
                                       fail_safe=fail_safe)

    async def webhook(self, event: str, required: bool = False) -> bool:
        url = getattr(self.spec.webhooks, event)
        if not url:
            return True
        payload = {"event": event, "service": self.name, "rollout": asdict(self.record)}
        ok = await self.controller.post_json(url, payload, self.spec.webhooks.timeout)
        if not ok:
            log.warning("service %s: %s webhook to %s failed", self.name, event, url)
        return ok or not required

    def status(self, events_after: int | None = None, last_events: int = EVENTS_KEPT
               ) -> dict[str, Any]:
        """The record for the API: with the events numbered above ``events_after`` when
        given (what a waiting client has not seen yet), else the last ``last_events``."""
        spec = self.spec
        data = asdict(self.record)
        events = data["events"]
        data["events"] = ([e for e in events if e.get("seq", 0) > events_after]
                          if events_after is not None else events[-last_events:] if last_events
                          else [])
        data["strategy"] = spec.strategy
        data["steps"] = [s.model_dump(exclude_none=True) for s in spec.steps]
        data["versions"] = {"old": self.old_version, "new": self.new_version}
        return data


class RolloutController:
    """All the services' rollouts, their clock, and the off-path HTTP client they share."""

    def __init__(self, control: ControlSurface) -> None:
        self.control = control
        self.rollouts: dict[str, ServiceRollout] = {}
        self.analysis_outcomes: dict[tuple[str, str], int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._clock: asyncio.Task[None] | None = None
        self._session: Any = None
        self._leading = False  # whether the clock acted as the controller last round
        # Called with each transition of any rollout (see ServiceRollout.emit); a listener
        # must not block: it queues what it needs to do.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.custom_checks = CustomChecks(self)
        self.notifier = Notifier(self.client, control.config)
        self.listeners.append(self.notifier.announce)
        self.sync(initial=True)

    def sync(self, initial: bool = False) -> None:
        """Match the set of rollouts, and the notifications' receivers, to the config (at
        start and after each reload)."""
        self.notifier.configure(self.control.config)
        services = {s.name: s for s in self.control.config.services if s.rollout is not None}
        for name in list(self.rollouts):
            if name not in services:
                del self.rollouts[name]
                self.control.previews.pop(name, None)
        for name, service in services.items():
            rollout = self.rollouts.get(name)
            if rollout is None or rollout.spec.strategy != service.rollout.strategy:  # type: ignore[union-attr]
                rollout = self.rollouts[name] = ServiceRollout(self, service)
                saved = self.control.state.rollouts.get(name)
                rollout.restore(saved)
                if (not initial or saved is None) and self.leading:
                    rollout.save()  # the revision is on record from now on
            else:
                rollout.config_changed(service)
            rollout.update_preview()

    @property
    def leading(self) -> bool:
        """Whether this instance runs the controller: always with a state file; with a shared
        store, while it holds the store's lock. Followers only mirror the records."""
        return self.control.store.leading

    def adopt(self, services: set[str]) -> None:
        """Records another instance changed (a shared state store)."""
        for name in services:
            rollout = self.rollouts.get(name)
            data = self.control.state.rollouts.get(name)
            if rollout is not None and data is not None:
                rollout.adopt(data)

    def get(self, name: str) -> ServiceRollout:
        from ..errors import UnknownName

        self.control.service(name)
        rollout = self.rollouts.get(name)
        if rollout is None:
            raise UnknownName(f"service {name!r} has no rollout configured")
        return rollout

    async def for_operator(self, name: str) -> ServiceRollout:
        """A service's rollout for an action through the API, once a rollout that the
        operator's earlier config edit started (taken in by the admin API first) has begun."""
        rollout = self.get(name)
        starting = rollout.starting
        if starting is not None and not starting.done():
            await asyncio.wait({starting})  # not cancelled if the API call is
        return self.get(name)

    def start(self) -> None:
        """Start the clock, and pick up what a restart interrupted."""
        self._clock = asyncio.get_running_loop().create_task(self._run())
        self.notifier.start()
        if self.leading:
            self._leading = True
            self.resume_interrupted()

    def resume_interrupted(self) -> None:
        for rollout in self.rollouts.values():
            if rollout.pending_start:
                rollout.pending_start = False
                self.spawn(rollout.start_or_retry(rollout.pending_why))
            elif rollout.rollback_unfinished():
                log.info("service %s: finishing an interrupted rollback", rollout.name)
                self.spawn(rollout.roll_back())

    async def stop(self) -> None:
        for task in [self._clock, *self._tasks]:
            if task is not None:
                task.cancel()
        # The events already announced get a short, bounded moment to go out, on the session
        # closed below.
        await self.notifier.stop()
        # The last records, and whatever else is unsaved (a failure is logged: the stop goes on).
        await self.control.stop_saving()
        if self._session is not None:
            await self._session.close()

    def tick_interval(self) -> float:
        intervals = [1.0]
        for rollout in self.rollouts.values():
            spec = rollout.spec
            analyses = [spec.analysis] + [s.analysis for s in spec.steps]
            intervals += [a.interval / 4 for a in analyses if a is not None]
            intervals += [s.pause.duration / 4 for s in spec.steps
                          if s.pause is not None and s.pause.duration]
            intervals += [s.pause.timeout / 4 for s in spec.steps
                          if s.pause is not None and s.pause.timeout]
            intervals += [s.gate.interval / 4 for s in spec.steps if s.gate is not None]
            intervals += [s.mirror.duration / 4 for s in spec.steps if s.mirror is not None]
        return max(0.05, min(intervals))

    async def take_over(self) -> None:
        """This instance just became the controller: from the latest shared records, at the
        step they are at."""
        await self.control.store.refresh()
        for rollout in self.rollouts.values():
            rollout.step_window = rollout.background = None
            if rollout.name not in self.control.state.rollouts:
                rollout.save()
            rollout.check_steps("since the previous leader acted")
        log.info("rollout controller: acting on this instance from now on")
        self.resume_interrupted()

    def step_down(self) -> None:
        log.warning("rollout controller: no longer the leader; following the shared state")
        for rollout in self.rollouts.values():
            rollout.cancel_ramp()
            rollout.cancel_hook()
            rollout.step_window = rollout.background = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval())
            leading = self.leading
            if leading != self._leading:
                try:
                    if leading:
                        await self.take_over()
                    else:
                        self.step_down()
                    self._leading = leading
                except Exception:  # e.g. the store went away while taking over: next round
                    log.exception("rollout controller: change of leadership failed")
                    continue
            for rollout in list(self.rollouts.values()) if leading else []:
                try:
                    await rollout.tick()
                except Exception as exc:  # one service's rollout must not stop the others
                    self.tick_failed(rollout, exc)
                else:
                    rollout.tick_error = ""

    @staticmethod
    def tick_failed(rollout: ServiceRollout, exc: Exception) -> None:
        """Said once per distinct failure, not on every tick: a step that cannot be saved
        (the rollout waits there; it moves on once the state can be saved again) in one line,
        anything else with its traceback."""
        error = f"{type(exc).__name__}: {exc}"
        if error == rollout.tick_error:
            return
        rollout.tick_error = error
        if isinstance(exc, StateWriteError):
            log.error("service %s: the rollout waits at step %d: %s; trying again each "
                      "tick", rollout.name, rollout.record.step + 1, exc)
        else:
            log.exception("service %s: rollout tick failed (repeats are not logged)",
                          rollout.name)

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def announce(self, event: dict[str, Any]) -> None:
        """A rollout's transition, to whoever listens (the notifier, see notify.py)."""
        for listener in self.listeners:
            listener(event)

    def count_analysis(self, service: str, outcome: str) -> None:
        key = (service, outcome)
        self.analysis_outcomes[key] = self.analysis_outcomes.get(key, 0) + 1

    async def client(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def probe(self, method: str, url: str, timeout: float, ssl: Any = True,
                    server_hostname: str | None = None) -> int:
        import aiohttp

        session = await self.client()
        try:
            async with session.request(method, url, allow_redirects=False, ssl=ssl,
                                       server_hostname=server_hostname,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return int(resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 0

    async def post_json(self, url: str, payload: dict[str, Any], timeout: float) -> bool:
        return 200 <= await self.post_for_status(url, payload, timeout) < 300

    async def post_for_status(self, url: str, payload: dict[str, Any], timeout: float) -> int:
        """POST the payload as JSON; the answer's status, 0 when none came in time."""
        import aiohttp

        session = await self.client()
        try:
            async with session.post(url, json=payload,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return int(resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 0
