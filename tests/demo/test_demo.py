"""``weir demo``: run as a real subprocess (``python -m proxy demo --fast``) and judged from what
it prints, as a user would; plus its parts in-process (the generated config, the port choice,
the dialable demo app).

The subprocess's output is read line by line on a thread, and every wait is for a line or an
exit with a deadline. Ports are always 0 here (any free port): other Weirs may be running.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from proxy.config.loader import parse_config
from proxy.demo.app import DemoApp
from proxy.demo.options import DemoOptions, choose_port, demo_config

from ..conftest import REPO_ROOT

RUN_DEADLINE = 40.0   # the whole --fast demo, on a busy machine
EXIT_DEADLINE = 5.0   # from a signal to the process gone ("a second or two", with slack)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="subprocesses and signals")


class Demo:
    """``python -m proxy demo`` with its stdout read incrementally."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", "0", "--admin-port", "0", *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr.extend(self.process.stderr)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_for_line(self, text: str, timeout: float = RUN_DEADLINE) -> str:
        """The first line (from now on) containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s:\n"
                                     f"{self.output}\n{self.stderr}") from None
            if line is None:
                raise AssertionError(f"the demo ended before printing {text!r} "
                                     f"(exit {self.process.wait()}):\n{self.output}\n"
                                     f"{self.stderr}")
            self.lines.append(line)
            if text in line:
                return line

    def wait_for_exit(self, timeout: float) -> int:
        """The exit code, once the process is gone and its output is all read."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output}") from None
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    def ports(self) -> list[int]:
        """Every loopback port the demo announced (proxy, dashboard, the apps)."""
        return sorted({int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", self.output)})

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def demo() -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        process = Demo(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- the whole demo -------------------------------------------------------------------------


def test_fast_demo_promotes_then_rolls_back(demo: Callable[..., Demo]) -> None:
    run = demo("--fast")
    started = time.monotonic()
    run.wait_for_line("Summary")
    assert run.wait_for_exit(RUN_DEADLINE) == 0, run.output + run.stderr
    elapsed = time.monotonic() - started
    output = run.output
    assert "Traceback" not in run.stderr, run.stderr

    # What the user is told: where things are, and how to reach them.
    assert re.search(r"dashboard +http://127\.0\.0\.1:\d+/", output), output
    token = re.search(r"token +(\S+)", output)
    assert token and f"export WEIR_ADMIN_TOKEN={token.group(1)}" in output
    assert "weir status --admin http://127.0.0.1:" in output

    # Phase 1: the steps walked to 100%, each analysis with its numbers against its limits.
    phase_two = output.index("Phase 2")
    phase_one = output[output.index("Phase 1"):phase_two]
    for weights in ("stable=90 canary=10", "stable=70 canary=30", "stable=40 canary=60",
                    "stable=0 canary=100"):
        assert f"weights now {weights}" in phase_one, phase_one
    assert re.search(r"analysis \(step\): SUCCESS +error rate 0\.0% <= 5\.0%, p99 \d+ms "
                     r"<= 250ms", phase_one), phase_one
    assert "PROMOTED" in phase_one
    # The live table, once a second: weight, rate, errors and p99 of each version.
    assert re.search(r"canary +weight +\d+% +\d+\.\d req/s +errors +\d+\.\d% +p99 +\d+ms",
                     phase_one), phase_one

    # Phase 2: dialled bad, judged, rolled back by the controller, with the reason.
    second = output[phase_two:]
    # Which checks a window fails is up to chance (20% errors in a few dozen requests), but
    # each failure shows the measured value against its limit.
    assert re.search(r"analysis \(\w+\): FAILURE +error rate \d+\.\d% [<>]=? 5\.0%, "
                     r"p99 \d+ms [<>]=? 250ms", second), second
    assert re.search(r"(error rate \d+\.\d% > 5\.0%|p99 \d+ms > 250ms)", second), second
    assert re.search(r"ROLLED BACK: analysis failed \d time\(s\) \(failure_limit 1\): "
                     r"max_(error_rate|p99)", second), second
    assert "weights now stable=100 canary=0" in second

    summary = output[output.index("Summary"):]
    assert "phase 1: rollout completed, canary at 100%" in summary, summary
    assert re.search(r"phase 2: rollout rolled back automatically: analysis failed .*"
                     r"max_(error_rate|p99)", summary), summary
    assert elapsed < RUN_DEADLINE
    assert not [port for port in run.ports() if listening(port)]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_signal_mid_rollout_stops_cleanly(demo: Callable[..., Demo], sig: signal.Signals,
                                          code: int) -> None:
    run = demo("--fast")
    run.wait_for_line("weights now stable=90 canary=10")  # the rollout is under way
    ports = run.ports()
    assert len(ports) == 4, run.output  # proxy, dashboard, stable app, canary app
    assert all(listening(port) for port in ports)

    sent = time.monotonic()
    run.process.send_signal(sig)
    assert run.wait_for_exit(EXIT_DEADLINE) == code, run.output + run.stderr
    took = time.monotonic() - sent
    assert took < EXIT_DEADLINE
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == "", run.stderr
    assert "Stopped:" in run.lines[-1]
    assert "Summary" not in run.output  # interrupted, not finished
    assert not [port for port in ports if listening(port)]


def test_keep_running_serves_until_ctrl_c(demo: Callable[..., Demo]) -> None:
    run = demo("--fast", "--keep-running")
    run.wait_for_line("Still running")
    dashboard = run.wait_for_line("dashboard")
    admin = re.search(r"http://127\.0\.0\.1:\d+", dashboard)
    assert admin, dashboard
    # Still answering after the script: the API shows the rolled-back rollout, and the
    # example command works with the printed token.
    with urllib.request.urlopen(f"{admin.group(0)}/api/services/shop/rollout",
                                timeout=5) as response:
        rollout = json.load(response)
    assert rollout["phase"] == "aborted"
    assert rollout["reason"].startswith("analysis failed")
    token = re.search(r"token +(\S+)", run.output)
    assert token
    changed = subprocess.run(
        [sys.executable, "-m", "proxy", "set-weight", "shop", "stable=50", "canary=50",
         "--admin", admin.group(0)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20,
        env={**os.environ, "WEIR_ADMIN_TOKEN": token.group(1)})
    assert changed.returncode == 0, changed.stderr
    run.wait_for_line("weights now stable=50 canary=50", timeout=10)  # shown live

    ports = run.ports()
    run.process.send_signal(signal.SIGINT)
    assert run.wait_for_exit(EXIT_DEADLINE) == 0, run.output + run.stderr  # as scripted
    assert "Traceback" not in run.stderr, run.stderr
    assert not [port for port in ports if listening(port)]


def test_explicit_busy_port_is_an_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = Demo("--fast", "--port", str(port))  # the last --port wins
        try:
            assert run.wait_for_exit(RUN_DEADLINE) == 1
        finally:
            run.kill()
    assert f"port {port} for the proxy" in run.stderr and "address in use" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "Stopped:" in run.lines[-1]


@pytest.mark.parametrize("args", [["--speed", "0"], ["--speed", "11"], ["--speed", "x"],
                                  ["--fast", "--speed", "2"], ["--port", "70000"]])
def test_bad_options_are_usage_errors(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "demo", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


# --- the parts ------------------------------------------------------------------------------


def test_default_port_falls_back_when_busy() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert choose_port(None, busy) == (0, True)
        assert choose_port(busy, 9901) == (busy, False)  # asked for: used as is
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert choose_port(None, free) == (free, False)


@pytest.mark.parametrize("speed", [1.0, 4.0, 10.0])
def test_generated_config_is_valid_and_scaled(speed: float) -> None:
    stable, canary = DemoApp("stable", "v1", port=9001), DemoApp("canary", "v2", port=9002)
    config = parse_config(demo_config(stable, canary, 0, 0, "t0ken", DemoOptions(speed=speed)))
    (service,) = config.services
    rollout = service.rollout
    assert rollout is not None and rollout.analysis is not None
    assert config.admin.listen.startswith("127.0.0.1:") and config.listen.startswith("127.")
    assert [s.set_weight for s in rollout.steps if s.set_weight is not None] == [10, 30, 60]
    assert rollout.analysis.interval == pytest.approx(max(1.0, 4.0 / speed))
    assert rollout.steps[1].pause is not None
    assert rollout.steps[1].pause.duration == pytest.approx(8.0 / speed)
    # A window at the first step's weight brings well over the requests it asks for.
    assert 5 <= rollout.analysis.min_requests <= 200 * 0.10 * rollout.analysis.interval * 0.5
    assert service.sticky is not None and service.sticky.header == "x-user-id"


async def test_demo_app_is_dialled_at_run_time() -> None:
    app = DemoApp("canary", "v2")
    await app.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{app.url}/x") as response:
                assert response.status == 200
                assert (await response.json())["revision"] == "v2"
            async with session.post(f"{app.url}/demo/dial?error_rate=1&latency_ms=50") as r:
                assert r.status == 200
                assert await r.json() == {"version": "canary", "revision": "v2",
                                          "error_rate": 1.0, "latency_ms": 50}
            started = time.monotonic()
            async with session.get(f"{app.url}/x") as response:
                assert response.status == 500
            assert time.monotonic() - started >= 0.05
            async with session.post(f"{app.url}/demo/dial?error_rate=2") as r:
                assert r.status == 400
            app.dial(error_rate=0.0, latency=0.0)  # the in-process setter
            async with session.get(f"{app.url}/x") as response:
                assert response.status == 200
    finally:
        await app.stop()
