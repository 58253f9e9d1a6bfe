"""Every example config in config/ is valid as shipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "config").glob("*.yaml"))
EXPECTED = {"weir.yaml", "canary.yaml", "blue-green.yaml", "shadow.yaml", "beta-header.yaml",
            "sticky.yaml"}


def test_expected_examples_exist() -> None:
    assert {path.name for path in EXAMPLES} >= EXPECTED


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_validates(path: Path) -> None:
    # Without WEIR_ADMIN_TOKEN: the examples must validate out of the box.
    env = {k: v for k, v in os.environ.items() if k != "WEIR_ADMIN_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "proxy", "validate", "-c", str(path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=20,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_has_comment_header(path: Path) -> None:
    """Each example opens with a comment explaining what it sets up."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = [line for line in lines[:3] if line.startswith("#")]
    assert len(header) >= 2, f"{path.name} needs a comment header"
