"""Shutdown steps are bounded: proxy/tasks.py's finish_within."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from proxy.tasks import finish_within

pytestmark = pytest.mark.timeout(10)


async def test_a_step_that_never_ends_is_left_after_its_bound_and_says_what_waits(caplog):
    never = asyncio.Event()

    async def stuck_store_close() -> None:
        await never.wait()  # a peer that never answers

    bystander = asyncio.create_task(never.wait(), name="pubsub-listener")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="weir"):
        finished = await finish_within(0.2, stuck_store_close(), "closing the state store")
    took = time.monotonic() - started
    bystander.cancel()
    assert finished is False
    assert 0.2 <= took < 2.0
    [record] = [r for r in caplog.records if "closing the state store" in r.getMessage()]
    assert "took over 0.2s" in record.getMessage()
    assert "pubsub-listener at " in record.getMessage()  # where the other tasks wait


async def test_a_step_that_ends_in_time_is_awaited_whole():
    done: list[str] = []

    async def quick_close() -> None:
        await asyncio.sleep(0.01)
        done.append("closed")

    assert await finish_within(5.0, quick_close(), "closing") is True
    assert done == ["closed"]
