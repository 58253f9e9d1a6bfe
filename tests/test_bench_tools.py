"""Smoke tests for the bench scripts: they start, measure something and clean up.

Each runs a script as a subprocess, the way a person would, with the smallest settings that
still go through every step. They are not benchmarks: no number is checked against a target.
Locust is an optional dependency (the `bench` extra); without it its tests are skipped, and
say so in pytest's summary.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"

# find_spec does not import locust, which would monkey-patch this process (gevent).
needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                  reason="locust not installed (pip install -e '.[bench]')")


def run_script(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def processes_with(*markers: str) -> list[str]:
    """Command lines of live processes whose argv contains any of ``markers``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            found.append(cmdline)
    return found


def test_idle_memory_measures_weir_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "idle.json"
    done = run_script(str(BENCH / "idle_memory.py"), "--connections", "200", "--steps", "2",
                      "--no-nginx", "--settle", "0.1", "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "per idle connection" in done.stdout
    (weir,) = json.loads(out.read_text())["results"]
    assert weir["name"] == "weir"
    assert weir["held"] == 200 and weir["failures"] == 0
    assert weir["per_conn_rss"] is not None
    # Weir's fd count rose by one per held connection: it really kept them open.
    assert weir["points"][-1]["fds"] - weir["before"]["fds"] >= 200
    left = processes_with("/weir-idle-", "idle_memory.py --serve-backend")
    assert not left, f"still running: {left}"


@needs_locust
def test_locust_run_counts_agree(tmp_path: Path) -> None:
    out = tmp_path / "locust.json"
    done = run_script(str(BENCH / "locust_run.py"), "--duration", "1", "--users", "8",
                      "--spawn-rate", "8", "--csv", str(tmp_path / "csv" / "weir"),
                      "--json", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "(agree)" in done.stdout, done.stdout
    doc = json.loads(out.read_text())
    total = next(r for r in doc["locust"] if r["name"] == "Aggregated")
    assert total["requests"] > 0 and total["failures"] == 0, doc["failures"]
    # The header rule sent every beta tester's request to `beta`, and nothing else went there.
    split = doc["split"]["requests"]
    assert split["beta"]["stable"] == split["beta"]["canary"] == 0
    assert all(split[kind]["beta"] == 0 for kind in ("sticky", "anon", "upload"))
    assert doc["split"]["users_on_stable_and_canary"] == 0
    assert (tmp_path / "csv" / "weir_stats.csv").exists()
    left = processes_with("/weir-locust-", "locust_run.py --serve-backends", str(tmp_path))
    assert not left, f"still running: {left}"
