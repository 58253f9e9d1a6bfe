"""gRPC canaries judged by grpc-status (issue 19): a gRPC error is an HTTP 200 whose trailers
say ``grpc-status: 14``, so the analysis must read the status from the trailers, not the HTTP
status, to roll a failing gRPC canary back.

Real grpcio servers (tests/dataplane/grpc_harness.py) behind a Weir whose versions speak h2c
to them; the load is one grpcio channel with a few workers making unary calls back to back.
The default error set (counted as errors by the analysis): UNKNOWN (2), DEADLINE_EXCEEDED (4),
UNIMPLEMENTED (12), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15). Other non-OK statuses
(NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's mistakes, not the canary's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ..conftest import StartWeir, sample
from ..dataplane.grpc_harness import GrpcFleet, GrpcLoad, GrpcServer, grpc_service
from ..rollout_harness import analyses, base_config

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="as the other rollout tests"),
              pytest.mark.timeout(30)]

INTERVAL = 1.0


@pytest.fixture
async def fleet() -> AsyncIterator[GrpcFleet]:
    async with GrpcFleet() as servers:
        yield servers


def grpc_canary_config(stable: GrpcServer, canary: GrpcServer, steps: list[dict[str, Any]],
                       analysis: dict[str, Any]) -> dict[str, Any]:
    """rollout_harness.canary_config's shape (service ``app``, stable at 100), with h2c
    versions on grpcio servers."""
    service = grpc_service({"stable": stable.address, "canary": canary.address},
                           weights={"stable": 100, "canary": 0}, name="app",
                           rollout={"strategy": "canary", "stable": "stable",
                                    "canary": "canary", "steps": steps,
                                    "analysis": analysis})
    service["versions"]["stable"]["revision"] = "s1"
    service["versions"]["canary"]["revision"] = "c1"
    return base_config(service)


ROLLBACK_STEPS = [{"set_weight": 20}, {"pause": {"duration": "1s"}}, {"set_weight": 40},
                  {"pause": {}}]
ROLLBACK_ANALYSIS = {"interval": f"{INTERVAL}s", "min_requests": 10, "failure_limit": 1,
                     "checks": {"max_error_rate": 0.01}}


async def rolled_back(weir: StartWeir, fleet: GrpcFleet, code: grpc.StatusCode,
                      ) -> tuple[dict[str, Any], GrpcLoad, GrpcServer, Any]:
    """A canary answering 20% of its calls with ``code`` (HTTP 200 all the same), started
    under load: returns the aborted rollout, the load, the canary and the Weir."""
    stable = await fleet.start("stable")
    canary = await fleet.start("canary", fail_rate=0.2, fail_code=code)
    live = await weir(grpc_canary_config(stable, canary, ROLLBACK_STEPS, ROLLBACK_ANALYSIS))
    api = live.api
    async with GrpcLoad(live.port, workers=4) as load:
        await load.wait_hits(30, "stable")
        await api.act("start")
        aborted = await api.wait_rollout(lambda r: r["phase"] == "aborted", timeout=8,
                                         what=f"the rollback of a canary failing with {code}")
        await api.wait_weights({"stable": 100, "canary": 0})
        moved_at = time.time()
        await load.wait_hits(50, since=moved_at + 0.05)
    after = load.count(since=moved_at + 0.05)
    assert set(after) == {"stable"}, after  # every call after the rollback went to stable
    answered_exactly(load, stable, canary)
    return aborted, load, canary, live


def answered_exactly(load: GrpcLoad, *servers: GrpcServer) -> None:
    """The client saw what the servers answered, call for call: no call was broken on the
    way (a reset, or Weir's own UNAVAILABLE), not even those in flight when the weights
    moved."""
    by_weir = [h for h in load.hits if h.server == "weir"]
    assert not by_weir, f"{len(by_weir)} call(s) answered by Weir itself: {by_weir[:3]}"
    assert set(load.count()) <= {s.name for s in servers}, load.count()
    for server in servers:
        assert load.codes(server.name) == server.answered, (server.name, [
            h for h in load.hits if h.server == server.name and h.code not in server.answered])


async def test_a_grpc_canary_answering_20_percent_unavailable_is_rolled_back_in_two_intervals(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    aborted, load, canary, live = await rolled_back(weir, fleet, grpc.StatusCode.UNAVAILABLE)

    # The decision is the second failed measurement (failure_limit 1), each over one interval.
    failures = analyses(aborted, "failure", "background")
    assert len(failures) == 2, aborted["analyses"]
    detection = failures[-1]["at"] - load.first("canary")
    print(f"\ngRPC canary at 20% UNAVAILABLE: rolled back {detection:.2f}s after its first "
          f"call; it answered {dict(canary.answered)}; client saw {dict(load.codes('canary'))}")
    # Two windows of one interval, measured on the controller's tick (interval / 4).
    assert detection <= 2 * INTERVAL + 2 * (INTERVAL / 4) + 0.3, detection
    assert "max_error_rate" in (aborted["reason"] or ""), aborted
    for failure in failures:
        assert failure["failed_checks"] == ["max_error_rate"]
        assert failure["values"]["canary_error_rate"] > 0.1  # about 0.2: the 14s count
        assert failure["values"]["canary_requests"] >= 10
    assert aborted["step"] <= 3

    # The client saw the canary's UNAVAILABLEs, and every one of them was an HTTP 200.
    assert load.codes("canary")[14] > 0
    assert canary.answered[14] > 0
    scrape = await live.scrape()
    assert set(scrape.requests_by("app", "canary")) == {("POST", 200)}
    assert scrape.value("weir_grpc_responses_total", service="app", version="canary",
                        grpc_status="14") == canary.answered[14]
    metrics = await live.api.metrics()
    assert sample(metrics, "weir_rollout_phase", service="app", phase="aborted") == 1
    assert sample(metrics, "weir_traffic_weight", service="app", version="canary") == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.DATA_LOSS],
                         ids=lambda c: c.name)
async def test_every_status_of_the_default_error_set_counts_as_an_error(
        weir: StartWeir, fleet: GrpcFleet, code: grpc.StatusCode) -> None:
    aborted, _, canary, _ = await rolled_back(weir, fleet, code)
    failures = analyses(aborted, "failure", "background")
    assert failures and all(f["failed_checks"] == ["max_error_rate"] for f in failures)
    assert all(f["values"]["canary_error_rate"] > 0.1 for f in failures), failures
    assert canary.answered[code.value[0]] > 0


HEALTHY_STEPS = [{"set_weight": 20}, {"pause": {"duration": "1s"}}, {"set_weight": 50},
                 {"pause": {"duration": "1s"}}, {"set_weight": 80},
                 {"pause": {"duration": "500ms"}}]
HEALTHY_ANALYSIS = {"interval": "500ms", "min_requests": 5, "failure_limit": 0,
                    "inconclusive_limit": 2, "checks": {"max_error_rate": 0.01}}


async def progressed(weir: StartWeir, fleet: GrpcFleet, **canary_behaviour: Any,
                     ) -> tuple[dict[str, Any], GrpcLoad, GrpcServer]:
    stable = await fleet.start("stable")
    canary = await fleet.start("canary", **canary_behaviour)
    live = await weir(grpc_canary_config(stable, canary, HEALTHY_STEPS, HEALTHY_ANALYSIS))
    api = live.api
    async with GrpcLoad(live.port, workers=4) as load:
        await load.wait_hits(20, "stable")
        await api.act("start")
        done = await api.wait_rollout(lambda r: r["phase"] != "progressing", timeout=12,
                                      what="the rollout to finish")
    assert done["phase"] == "completed", done
    assert done["step"] == len(HEALTHY_STEPS)
    assert await api.weights() == {"stable": 0, "canary": 100}
    assert not analyses(done, "failure"), done["analyses"]
    successes = analyses(done, "success", "background")
    assert len(successes) >= 3, done["analyses"]
    for result in successes:
        assert result["values"]["canary_error_rate"] == 0, result
        assert result["values"]["canary_requests"] >= 5
    assert load.count()["canary"] > 0
    answered_exactly(load, stable, canary)
    return done, load, canary


async def test_a_healthy_grpc_canary_progresses_to_full_traffic(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    _, load, canary = await progressed(weir, fleet)
    assert set(load.codes()) == {0}  # every call OK
    assert set(canary.answered) == {0}


async def test_statuses_outside_the_error_set_do_not_fail_a_grpc_canary(
        weir: StartWeir, fleet: GrpcFleet) -> None:
    """NOT_FOUND is an answer about the request, not a fault of the canary: 30% of them and
    the canary still progresses, its error rate 0."""
    _, load, canary = await progressed(weir, fleet, fail_rate=0.3,
                                       fail_code=grpc.StatusCode.NOT_FOUND)
    assert load.codes("canary")[grpc.StatusCode.NOT_FOUND.value[0]] > 0
    assert canary.answered[grpc.StatusCode.NOT_FOUND.value[0]] > 0
