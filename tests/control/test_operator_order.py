"""Operator actions apply in the order they were made (issue 16, item 4).

A config file edit, then an admin API change a moment later: the file watcher waits out its
debounce and settle time before it reloads, so without care it applies the edit *after* the
API change, and the file counts as the newer writer. An API change therefore first takes in a
file that changed on disk since it was last read; the watcher's later pass finds nothing new.

Everything here is real: Weir as a subprocess (`python -m proxy run`) with `watch: true` and its
watchfiles watcher on the real file system, aiohttp backends on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..conftest import TOKEN, Backend, WeirProcess, sample, write_config
from .test_ops_control import versions_served

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and inotify")

# The measured case: the API call comes this long after the edit, well inside the watcher's
# debounce (up to 400 ms) and settle time (300 ms).
GAP = 0.15
REQUESTS = 40


def web_config(blue: Backend, green: Backend, weights: dict[str, int],
               tmp_path: Path) -> dict[str, Any]:
    return {
        "admin": {"token": TOKEN},
        "watch": True,
        "state_file": str(tmp_path / "weir.state.json"),
        "services": [{
            "name": "web",
            "versions": {"blue": {"upstreams": [blue.address]},
                         "green": {"upstreams": [green.address]}},
            "weights": weights,
        }],
    }


MARKER = {"name": "marker", "match": {"hosts": ["marker.invalid"]},
          "versions": {"only": {"upstreams": ["127.0.0.1:9"]}}}


def edit(weir: WeirProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the config as the operator does: in the file the process watches."""
    change(weir.data)
    write_config(weir.path, weir.data)


async def web_service(weir: WeirProcess) -> dict[str, Any]:
    return next(s for s in (await weir.api.status())["services"] if s["name"] == "web")


async def stopped_cleanly(weir: WeirProcess) -> None:
    """Each process must exit 0 when stopped at the end."""
    assert await weir.stop() == 0, weir.output()[-4000:]


async def served(weir: WeirProcess, count: int = REQUESTS) -> Counter[str]:
    return await versions_served(weir.port, count, {"Host": "web.test"})


async def after(started: float, delay: float) -> None:
    """Wait until ``delay`` seconds after ``started`` (the scenario's timing, not a check)."""
    await asyncio.sleep(max(0.0, started + delay - time.monotonic()))


async def wait_for_marker(weir: WeirProcess) -> dict[str, Any]:
    """A later edit adds a service, touching no weight: once /api/status lists it, the watcher
    has handled every change to the file before it."""
    edit(weir, lambda d: d["services"].append(MARKER))
    return await weir.api.wait_status(
        lambda s: any(x["name"] == "marker" for x in s["services"]), timeout=10)


async def test_edit_then_switch_serves_only_the_switched_version(start_backend, weir_process,
                                                                 tmp_path):
    """The measured case: weights edited in the file to 50/50, then 0.15 s later a switch to
    green. The operator's last word is the switch: only green serves, now and after the
    watcher's pass."""
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir_process(web_config(blue, green, {"blue": 100, "green": 0}, tmp_path))
    assert await served(w, 10) == Counter(blue=10)

    edited = time.monotonic()
    edit(w, lambda d: d["services"][0].update(weights={"blue": 50, "green": 50}))
    await after(edited, GAP)
    code, reply = await w.api.call("POST", "/api/services/web/switch", {"to": "green"})
    assert code == 200, reply
    assert reply["weights"] == {"blue": 0, "green": 100}

    # The switch took the edit in first: the file's generation is in force already.
    status = await w.api.status()
    assert status["generation"] == 2, status["last_reload"]
    assert status["last_reload"]["trigger"] == "file"
    assert status["last_reload"]["outcome"] == "success"

    # The watcher's pass over the edit (and the marker) changes no weight.
    status = await wait_for_marker(w)
    assert status["generation"] == 3, status["last_reload"]
    assert await served(w) == Counter(green=REQUESTS)
    web = await web_service(w)
    assert web["weights"] == {"blue": 0, "green": 100}
    assert web["weights_source"] == "api"
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_config_reloads_total", outcome="failure") == 0
    await stopped_cleanly(w)


async def test_switch_then_edit_of_weights_the_file_wins(start_backend, weir_process,
                                                         tmp_path):
    """The other order: a switch, then a later edit of the weights in the file. The file is
    the newer writer, as before."""
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir_process(web_config(blue, green, {"blue": 50, "green": 50}, tmp_path))

    switched = time.monotonic()
    code, reply = await w.api.call("POST", "/api/services/web/switch", {"to": "green"})
    assert code == 200, reply
    assert (await w.api.status())["generation"] == 1  # nothing on disk to take in
    assert await served(w, 10) == Counter(green=10)

    await after(switched, GAP)
    edit(w, lambda d: d["services"][0].update(weights={"blue": 100, "green": 0}))
    status = await w.api.wait_status(lambda s: s["generation"] >= 2, timeout=10)
    assert status["last_reload"]["trigger"] == "file"
    assert status["last_reload"]["outcome"] == "success"
    assert await served(w) == Counter(blue=REQUESTS)
    web = await web_service(w)
    assert web["weights"] == {"blue": 100, "green": 0}
    assert web["weights_source"] == "file"
    await stopped_cleanly(w)


async def test_an_invalid_file_does_not_block_the_api_change(start_backend, weir_process,
                                                             tmp_path):
    """An edit that breaks the file, then a switch: the reload fails and is recorded (once),
    the old config keeps serving, and the switch applies."""
    blue, green = await start_backend("blue"), await start_backend("green")
    w = await weir_process(web_config(blue, green, {"blue": 100, "green": 0}, tmp_path))
    good = {**w.data, "services": [dict(s) for s in w.data["services"]]}

    edited = time.monotonic()
    edit(w, lambda d: d["services"][0].update(drain={"timeout": "soonish"}))
    await after(edited, GAP)
    code, reply = await w.api.call("POST", "/api/services/web/switch", {"to": "green"})
    assert code == 200, reply
    status = await w.api.status()
    assert status["generation"] == 1
    assert status["last_reload"]["outcome"] == "failure"
    assert status["last_reload"]["trigger"] == "file"
    assert any(e.startswith("services[0].drain.timeout")
               for e in status["last_reload"]["errors"]), status["last_reload"]
    assert await served(w, 10) == Counter(green=10)

    # Repaired (weights as they were), plus the marker: the switch stands, and the broken
    # file was reported exactly once (the watcher's pass over it found nothing new).
    w.data = good
    status = await wait_for_marker(w)
    assert status["generation"] == 2
    assert await served(w) == Counter(green=REQUESTS)
    assert (await web_service(w))["weights_source"] == "api"
    metrics = await w.api.metrics()
    assert sample(metrics, "weir_config_reloads_total", outcome="failure") == 1
    await stopped_cleanly(w)


async def test_edit_that_starts_a_rollout_then_abort(start_backend, weir_process,
                                                     tmp_path):
    """A new canary revision in the file starts a rollout; an abort 0.15 s later aborts that
    rollout (rather than answering "no rollout in progress" and letting the watcher start it
    afterwards)."""
    stable, canary = await start_backend("stable"), await start_backend("canary")
    data = {
        "admin": {"token": TOKEN},
        "watch": True,
        "state_file": str(tmp_path / "weir.state.json"),
        "services": [{
            "name": "web",
            "versions": {"stable": {"upstreams": [stable.address]},
                         "canary": {"upstreams": [canary.address], "revision": "1"}},
            "weights": {"stable": 100, "canary": 0},
            "rollout": {"steps": [{"set_weight": 20}, {"pause": {}}]},
        }],
    }
    w = await weir_process(data)
    code, rollout = await w.api.call("GET", "/api/services/web/rollout", auth=False)
    assert code == 200 and rollout["phase"] == "idle", rollout

    edited = time.monotonic()
    edit(w, lambda d: d["services"][0]["versions"]["canary"].update(revision="2"))
    await after(edited, GAP)
    code, reply = await w.api.call("POST", "/api/services/web/rollout/abort")
    assert code == 200, reply
    assert reply["phase"] == "aborted"

    status = await wait_for_marker(w)
    web = next(s for s in status["services"] if s["name"] == "web")
    assert web["rollout"]["phase"] == "aborted"
    assert web["weights"] == {"stable": 100, "canary": 0}
    assert await served(w) == Counter(stable=REQUESTS)
    await stopped_cleanly(w)
