"""Retries under a budget: a service's retry policy, compiled once per config, and the retry
budget that keeps retries from multiplying an outage.

The budget follows Finagle's and Linkerd's: over a sliding window, retries may add at most
``ratio`` of the requests seen plus a reserve of ``min_per_second`` per second. Every client
request deposits (one integer increment on the request path); a retry withdraws, and is refused
when the window holds no more room: the failure is then returned as it is.
"""

from __future__ import annotations

from ..config.model import Retries, RetryBudgetConfig

# Why an attempt was retried: the label of weir_retries_total.
RETRY_CONNECT_FAILURE = "connect_failure"  # refused, unreachable, or the connect timed out
RETRY_RESET = "reset"                      # closed before sending a byte of a response
RETRY_TIMEOUT = "timeout"                  # no response byte within the read timeout
RETRY_STATUS = "status"                    # a status listed in on_statuses

# The window is kept as this many slots; it slides one slot (a tenth of it) at a time.
BUDGET_SLOTS = 10


class RetryBudget:
    """Per service. Counters are cumulative; the ring holds their values at the start of each
    of the last ``BUDGET_SLOTS`` slots, so a window's counts are two subtractions. The ring is
    moved on only when a slot has ended, which on the request path costs one comparison."""

    __slots__ = ("_requests_at", "_retries_at", "_slot", "_tick_at", "_width", "ratio",
                 "requests", "reserve", "retries", "window")

    def __init__(self, ratio: float, min_per_second: float, window: float) -> None:
        self.ratio = ratio
        self.reserve = min_per_second * window
        self.requests = 0  # deposits, ever
        self.retries = 0   # withdrawals, ever
        self._start_window(window)

    def _start_window(self, window: float) -> None:
        self.window = window
        self._width = window / BUDGET_SLOTS
        self._slot = 0
        self._tick_at = 0.0  # the end of the current slot
        self._requests_at = [self.requests] * BUDGET_SLOTS
        self._retries_at = [self.retries] * BUDGET_SLOTS

    def configure(self, ratio: float, min_per_second: float, window: float) -> None:
        """A reload: new limits apply to the counts already in the window (a new window
        length starts counting afresh)."""
        self.ratio = ratio
        self.reserve = min_per_second * window
        if window != self.window:
            self._start_window(window)

    def deposit(self, now: float) -> None:
        """One client request (``now`` from a monotonic clock, in seconds)."""
        if now >= self._tick_at:
            self._roll(now)
        self.requests += 1

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget if the window has room for it."""
        if now >= self._tick_at:
            self._roll(now)
        oldest = (self._slot + 1) % BUDGET_SLOTS  # the slot that opened the window
        requests = self.requests - self._requests_at[oldest]
        retries = self.retries - self._retries_at[oldest]
        if retries + 1 > self.ratio * requests + self.reserve:
            return False
        self.retries += 1
        return True

    def _roll(self, now: float) -> None:
        # Slots that began since the last roll (at most a whole ring's worth) start with the
        # counts as they are now: nothing happened between then and now.
        slot = int(now // self._width)
        first = max(self._slot + 1, slot - BUDGET_SLOTS + 1)
        for index in range(first, slot + 1):
            self._requests_at[index % BUDGET_SLOTS] = self.requests
            self._retries_at[index % BUDGET_SLOTS] = self.retries
        self._slot = slot
        self._tick_at = (slot + 1) * self._width


class RetryPolicy:
    """A service's ``retries`` block as the data plane reads it."""

    __slots__ = ("attempts", "budget", "reasons", "statuses")

    def __init__(self, config: Retries, budget: RetryBudget) -> None:
        self.attempts = config.attempts
        self.statuses = frozenset(config.on_statuses)
        reasons = {RETRY_STATUS}
        if config.on_connect_failure:
            reasons.add(RETRY_CONNECT_FAILURE)
        if config.on_reset:
            reasons.add(RETRY_RESET)
        if config.on_timeout:
            reasons.add(RETRY_TIMEOUT)
        self.reasons = frozenset(reasons)
        self.budget = budget


def budget_for(budgets: dict[str, RetryBudget], service: str,
               config: RetryBudgetConfig) -> RetryBudget:
    """The service's budget, kept across config reloads and weight changes (each builds a new
    route table) so that rebuilding one does not refill the budget in the middle of an
    outage."""
    budget = budgets.get(service)
    if budget is None:
        budget = budgets[service] = RetryBudget(config.ratio, config.min_per_second,
                                                config.window)
    else:
        budget.configure(config.ratio, config.min_per_second, config.window)
    return budget
