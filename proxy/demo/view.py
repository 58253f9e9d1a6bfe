"""What ``weir demo`` shows in the terminal: once a second a small table per version (weight,
requests a second, error share, p99), and each of the controller's decisions as it happens.

Plain lines that scroll, in ASCII, so that they read the same in any terminal and in a log
file; colour only when stdout is a terminal (and ``NO_COLOR`` is not set).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from ..dataplane.stats import VersionStats
from ..tasks import cancel_and_wait

if TYPE_CHECKING:
    from ..control.plane import ControlPlane

RATE_WINDOW = 1.0     # seconds of traffic behind each row: short, so a new weight shows at once
TABLE_EVERY = 1.0     # seconds between tables
POLL_EVERY = 0.1      # seconds between looks for decisions, so they show as they happen

COLOURS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


class Printer:
    """Lines to stdout, flushed at once (a pipe would otherwise hold them back), with
    optional ANSI colour. A closed stdout (``weir demo | head``) calls ``on_closed`` once."""

    def __init__(self, stream: TextIO | None = None, colour: bool | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:
        self.stream = stream or sys.stdout
        if colour is None:
            colour = self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.colour = colour
        self.on_closed = on_closed
        self.closed = False
        self.started = time.monotonic()

    def style(self, text: str, *names: str) -> str:
        if not self.colour or not names:
            return text
        codes = ";".join(COLOURS[name] for name in names)
        return f"\033[{codes}m{text}\033[0m"

    def line(self, text: str = "") -> None:
        if self.closed:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()

    def stamp(self) -> str:
        return self.style(f"{time.monotonic() - self.started:6.1f}s", "dim")

    def event(self, text: str) -> None:
        """A decision or an action, marked so that it stands out of the tables."""
        self.line(f"{self.stamp()}  {self.style('>>', 'cyan', 'bold')} {text}")


# --- formatting -----------------------------------------------------------------------------


def seconds(value: float) -> str:
    return f"{value:g}s" if value >= 1 else f"{value * 1000:g}ms"


def ms(value: float) -> str:
    return f"{value * 1000:.0f}ms"


def percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def describe_step(step: dict[str, Any]) -> str:
    if "set_weight" in step:
        return f"set canary weight to {step['set_weight']}%"
    if "pause" in step:
        duration = (step["pause"] or {}).get("duration")
        return f"pause {seconds(duration)}" if duration else "pause until promoted"
    if "analysis" in step:
        return f"analysis over {seconds(step['analysis'].get('interval', 0))}"
    return "?"


def step_position(rollout: dict[str, Any]) -> str:
    steps = rollout.get("steps") or []
    step = rollout.get("step", 0)
    if step >= len(steps):
        return f"all {len(steps)} steps done"
    return f"step {step + 1}/{len(steps)}: {describe_step(steps[step])}"


# check name → (what it limits, the measured value's key, how to show both)
CHECKS: dict[str, tuple[str, str, Callable[[float], str]]] = {
    "max_error_rate": ("error rate", "canary_error_rate", percent),
    "max_error_rate_increase": ("error rate over stable's", "error_rate_increase", percent),
    "max_p99": ("p99", "canary_p99", ms),
    "max_p95": ("p95", "canary_p95", ms),
    "max_p50": ("p50", "canary_p50", ms),
    "max_p99_ratio": ("p99 / stable's", "p99_ratio", lambda v: f"{v:.2f}x"),
}

OUTCOME_COLOUR = {"success": "green", "failure": "red", "inconclusive": "yellow"}


def describe_analysis(result: dict[str, Any], printer: Printer,
                      failures: int | None = None, failure_limit: int | None = None) -> str:
    """'analysis (background): FAILURE  error rate 21.3% > 5.0%, p99 ...; 48 canary/402 stable
    req': the measured values against the thresholds behind the decision."""
    outcome = str(result.get("outcome", "?"))
    head = (f"analysis ({result.get('kind', '?')}): "
            + printer.style(outcome.upper(), OUTCOME_COLOUR.get(outcome, "bold"), "bold"))
    values = result.get("values") or {}
    if outcome == "inconclusive":
        return f"{head}  {result.get('why', '')}"
    parts = []
    failed = set(result.get("failed_checks") or [])
    for check, limit in (result.get("thresholds") or {}).items():
        if check not in CHECKS or CHECKS[check][1] not in values:
            continue
        what, key, show = CHECKS[check]
        if check in failed:
            parts.append(printer.style(f"{what} {show(values[key])} > {show(limit)}", "red"))
        else:
            parts.append(f"{what} {show(values[key])} <= {show(limit)}")
    counts = f"{values.get('canary_requests', 0)} canary"
    if "stable_requests" in values:
        counts += f"/{values['stable_requests']} stable"
    text = f"{head}  {', '.join(parts)}; {counts} req"
    if outcome == "failure" and failures is not None and failure_limit is not None:
        text += (f"; failure {failures} of {failure_limit} allowed" if failures <= failure_limit
                 else f"; failure {failures}, over the limit of {failure_limit}")
    return text


# --- the live view --------------------------------------------------------------------------


class Meter:
    """Per-version rates over the last few seconds, from the proxy's own counters (the same
    ones the analysis reads), sampled once a second."""

    def __init__(self, stats: dict[str, VersionStats], window: float = RATE_WINDOW) -> None:
        self.stats = stats
        self.window = window
        self.samples: deque[tuple[float, dict[str, tuple[int, int, list[int]]]]] = deque()
        self.samples.append((time.monotonic(), self.snapshot()))  # the first rates' base

    def snapshot(self) -> dict[str, tuple[int, int, list[int]]]:
        return {version: stats.snapshot() for version, stats in self.stats.items()}

    def sample(self) -> dict[str, dict[str, float | None]]:
        now = time.monotonic()
        self.samples.append((now, self.snapshot()))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        then, base = self.samples[0]
        elapsed = now - then
        rows: dict[str, dict[str, float | None]] = {}
        for version, stats in self.stats.items():
            window = stats.since(base[version])
            rows[version] = {
                "rate": window.requests / elapsed if elapsed > 0 else None,
                "error_rate": window.error_rate if window.requests else None,
                "p99": window.quantile(0.99) if window.requests else None,
            }
        return rows


class LiveView:
    """Watches one service's rollout in this process and prints what changes."""

    def __init__(self, control: ControlPlane, service: str, printer: Printer) -> None:
        self.control = control
        self.service = service
        self.printer = printer
        versions = list(control.service(service).versions)
        self.meter = Meter({v: control.proxy.stats.for_version(service, v) for v in versions})
        self.rollout = control.rollouts.get(service)
        status = self.rollout.status()
        self.last_phase = status["phase"]
        self.last_step = status["step"]
        self.last_started = status.get("started_at")
        self.last_weights = self.weights()
        self.seen_analysis = max((a.get("at", 0) for a in status.get("analyses") or []),
                                 default=0)
        self._task: asyncio.Task[None] | None = None

    def weights(self) -> dict[str, int]:
        for route in self.control.proxy.table.routes:
            if route.name == self.service:
                return dict(route.weights)
        return {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        next_table = time.monotonic() + TABLE_EVERY  # a first table would have no rates
        while True:
            self.check()
            if time.monotonic() >= next_table:
                self.table()
                next_table += TABLE_EVERY
            await asyncio.sleep(POLL_EVERY)

    def check(self) -> None:
        """Print every decision made since the last look: analyses first, since an abort
        follows from one, then phase, step and weight changes."""
        style = self.printer.style
        status = self.rollout.status()
        spec = self.rollout.spec
        for result in status.get("analyses") or []:
            if result.get("at", 0) <= self.seen_analysis:
                continue
            self.seen_analysis = result["at"]
            limit = spec.analysis.failure_limit if spec.analysis is not None else None
            if result.get("kind") == "step":
                steps = spec.steps
                index = result.get("step", 0)
                if index < len(steps) and steps[index].analysis is not None:
                    limit = steps[index].analysis.failure_limit
            self.printer.event(describe_analysis(result, self.printer, status.get("failures"),
                                                 limit))
        phase = status["phase"]
        if status.get("started_at") != self.last_started:
            self.last_started = status.get("started_at")
            self.printer.event(style("rollout started", "bold"))
        if phase != self.last_phase:
            self.last_phase = phase
            if phase == "completed":
                self.printer.event(style(f"PROMOTED: {status.get('reason')}; the canary "
                                         "takes all traffic", "green", "bold"))
            elif phase == "aborted":
                self.printer.event(style(f"ROLLED BACK: {status.get('reason')}",
                                         "red", "bold"))
            elif phase == "paused":
                self.printer.event(style(f"paused ({status.get('paused_by')})", "yellow"))
        if (status["step"] != self.last_step and phase in ("progressing", "paused")
                and status["step"] < len(status.get("steps") or [])):
            self.printer.event(step_position(status))
        self.last_step = status["step"]
        weights = self.weights()
        if weights != self.last_weights:
            self.last_weights = weights
            self.printer.event("weights now " + " ".join(f"{v}={w}"
                                                           for v, w in weights.items()))

    def table(self) -> None:
        status = self.rollout.status()
        phase = status["phase"]
        where = step_position(status) if phase in ("progressing", "paused") else ""
        colour = {"completed": "green", "aborted": "red", "paused": "yellow"}.get(phase, "bold")
        self.printer.line(f"{self.printer.stamp()}  rollout {self.printer.style(phase, colour)}"
                          + (f", {where}" if where else ""))
        weights = self.last_weights
        total = sum(weights.values()) or 1
        for version, row in self.meter.sample().items():
            rate, errors, p99 = row["rate"], row["error_rate"], row["p99"]
            error_text = f"{percent(errors):>6}" if errors is not None else "     -"
            if errors:
                error_text = self.printer.style(error_text, "red")
            self.printer.line(
                f"{'':9}{version:<8} weight {100 * weights.get(version, 0) / total:3.0f}%"
                f"  {rate or 0:6.1f} req/s  errors {error_text}"
                f"  p99 {ms(p99) if p99 is not None else '-':>6}")
