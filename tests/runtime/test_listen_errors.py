"""A listener that cannot bind says which one and which key sets it (issue 16, item 5).

`weir run -c FILE [--workers N]` as a real subprocess, with the data or the admin port taken
by a real listening socket: one line on stderr naming the address, the listener and its config
key; exit code 2 (as for a config that fails validation); no traceback; nothing left
listening; and promptly.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO_ROOT, free_port, port_open, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT semantics")

PROMPTLY = 15.0  # seconds; a start that fails takes about one (interpreter start-up)


@pytest.fixture
def occupied() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def write_config(tmp_path: Path, port: int, admin_port: int) -> Path:
    path = tmp_path / "weir.yaml"
    path.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "state_file": str(tmp_path / "weir.state.json"),
        "services": [{"name": "web", "versions": {"blue": {"upstreams": ["127.0.0.1:9"]}}}],
    }))
    return path


def weir_run(path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(path), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=PROMPTLY)
    return done, time.monotonic() - started


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
@pytest.mark.parametrize("listener", ["data", "admin"])
def test_a_port_in_use_is_named_with_its_key(tmp_path, occupied, listener, workers):
    other = free_port()
    if listener == "data":
        path = write_config(tmp_path, occupied, other)
        expected = (f"weir: cannot listen on 127.0.0.1:{occupied} for the data plane "
                    f"(listen: in {path}): address already in use")
    else:
        path = write_config(tmp_path, other, occupied)
        expected = (f"weir: cannot listen on 127.0.0.1:{occupied} for the admin API "
                    f"(admin.listen: in {path}): address already in use")

    done, took = weir_run(path, *workers)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr.splitlines(), done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert took < PROMPTLY
    # The listener that could bind is closed again (under --workers: the workers are gone).
    assert not port_open(other)


async def test_a_second_weir_with_workers_on_the_same_port_is_refused(tmp_path, weir_process):
    """Workers share their port with SO_REUSEPORT; a second `weir run --workers` on the same
    port must not join them and split the traffic in silence."""
    first = await weir_process([{"name": "web", "versions": {"blue": {"upstreams": [
        "127.0.0.1:9"]}}}], args=("--workers", "2"), wait=False)
    process = first.process
    port = first.port
    await wait_for(lambda: port_open(port) or process.poll() is not None, timeout=20,
                   interval=0.05)
    assert process.poll() is None, first.output()
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    path = write_config(second_dir, port, free_port())
    done, _ = await asyncio.to_thread(weir_run, path, "--workers", "2")
    assert done.returncode == 2, done.stderr
    assert (f"weir: cannot listen on 127.0.0.1:{port} for the data plane (listen: in "
            f"{path}): address already in use") in done.stderr.splitlines(), done.stderr
    assert process.poll() is None  # the first one serves on
