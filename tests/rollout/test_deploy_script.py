"""deploy/deploy.sh, the release script a pipeline runs, end to end: real bash and curl, the
real `weir` command, a Weir in this event loop and backends on 127.0.0.1 playing the old and
the new instances. START_CMD and STOP_CMD write to a file, so the test sees what the script
would have started and stopped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from ..conftest import TOKEN, free_port
from ..rollout_harness import Load, canary_config

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="bash"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
]

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "deploy.sh"
ANALYSIS = {"interval": "500ms", "min_requests": 5, "failure_limit": 1,
            "checks": {"max_error_rate": 0.01}}
STEPS = [{"set_weight": 20}, {"pause": {"duration": "1s"}}, {"set_weight": 50},
         {"pause": {"duration": "1s"}}]


async def deploy(admin_url: str, tmp: Path, *args: str, **env: str) -> tuple[int, str]:
    log = tmp / "instances.log"
    process = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT), *args,
        env={**os.environ, "WEIR": f"{sys.executable} -m proxy", "WEIR_ADMIN_URL": admin_url,
             "WEIR_ADMIN_TOKEN": TOKEN, "ROLLOUT_TIMEOUT": "30s",
             "START_CMD": f'echo "start $ADDRESS $REVISION" >> {log}',
             "STOP_CMD": f'echo "stop $ADDRESS $REVISION" >> {log}', **env},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    print(f"\n$ deploy.sh {' '.join(args)} -> {process.returncode}\n{out.decode()}")
    return process.returncode or 0, out.decode()


def instances(tmp: Path) -> list[str]:
    log = tmp / "instances.log"
    return log.read_text().splitlines() if log.exists() else []


async def test_a_healthy_release_is_promoted(backends, weir, tmp_path):
    stable, canary = await backends("stable"), await backends("canary")
    new = await backends("new")
    live = await weir(canary_config(stable, canary, STEPS, ANALYSIS))
    async with Load(live.port, workers=3) as load:
        code, out = await deploy(live.admin_url, tmp_path, "app", "v2", new.address)
    assert code == 0, out
    assert "promoted: v2 has all the traffic" in out
    record = await live.api.rollout()
    assert (record["phase"], record["release"]) == ("completed", "v2")
    assert load.count()["canary"] > 0
    assert new.served > 0 and canary.served == 0  # the canary's traffic went to the new one
    status = await live.api.service()
    assert status["versions"]["canary"]["upstreams"] == [new.address]
    assert instances(tmp_path) == [f"start {new.address} v2"]


async def test_a_failing_release_is_rolled_back_and_its_instances_stopped(backends, weir,
                                                                           tmp_path):
    stable, canary = await backends("stable"), await backends("canary")
    new = await backends("new", fail_every=10)
    live = await weir(canary_config(stable, canary, STEPS, ANALYSIS))
    async with Load(live.port, workers=3):
        code, out = await deploy(live.admin_url, tmp_path, "app", "v3", new.address)
    assert code == 1, out
    assert "rolled back" in out and "max_error_rate" in out
    assert instances(tmp_path) == [f"start {new.address} v3", f"stop {new.address} v3"]
    await live.api.wait_weights({"stable": 100, "canary": 0})


async def test_an_instance_that_never_answers_gets_no_traffic(backends, weir, tmp_path):
    stable, canary = await backends("stable"), await backends("canary")
    live = await weir(canary_config(stable, canary, STEPS, ANALYSIS))
    dead = f"127.0.0.1:{free_port()}"
    code, out = await deploy(live.admin_url, tmp_path, "app", "v4", dead, READY_TIMEOUT="2")
    assert code == 1, out
    assert "never answered /healthz" in out
    assert (await live.api.rollout())["phase"] == "idle"  # no rollout was started
    assert instances(tmp_path) == [f"start {dead} v4", f"stop {dead} v4"]
