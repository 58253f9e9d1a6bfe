"""Stopping background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("weir")


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks, all at once, then wait for each to unwind, so that nothing it holds
    outlives the call. ``None`` stands for a task that was never started."""
    for task in tasks:
        if task is not None:
            task.cancel()
    for task in tasks:
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def finish_within(seconds: float, step: Awaitable[Any], what: str) -> bool:
    """Await one step of a shutdown for at most ``seconds``. A stop must not hang on a peer
    that stopped answering (a Redis that is paused or behind a dead link, say); what the step
    would have done lapses by itself (a lock's TTL) or is redone at the next start. Logs
    every other task still pending when it runs out, where each one waits, and returns
    False; True when the step finished in time."""
    try:
        await asyncio.wait_for(step, seconds)
        return True
    except TimeoutError:
        waiting = []
        for task in asyncio.all_tasks():
            if task is asyncio.current_task() or task.done():
                continue
            frames = task.get_stack(limit=1)
            where = (f"{frames[0].f_code.co_filename}:{frames[0].f_lineno}"
                     if frames else "not started")
            waiting.append(f"{task.get_name()} at {where}")
        log.warning("%s took over %.1fs: going on without it (tasks waiting: %s)", what,
                    seconds, "; ".join(waiting) or "none")
        return False
