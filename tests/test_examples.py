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


def test_kubernetes_manifest_is_well_formed_and_its_config_validates(tmp_path: Path) -> None:
    """deploy/kubernetes.yaml: every document has the fields kubectl needs, the ConfigMap's
    weir.yaml passes `weir validate`, and the probes and ports match that config."""
    import yaml

    documents = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"ConfigMap", "Secret", "Deployment", "Service"}
    for doc in documents:
        assert doc["apiVersion"]
        assert doc["metadata"]["name"] == ("weir-admin" if doc["kind"] == "Secret" else "weir")

    config_text = kinds["ConfigMap"]["data"]["weir.yaml"]
    config_file = tmp_path / "weir.yaml"
    config_file.write_text(config_text)
    env = {**os.environ, "WEIR_ADMIN_TOKEN": "test-token"}
    result = subprocess.run([sys.executable, "-m", "proxy", "validate", "-c", str(config_file)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=20,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr

    config = yaml.safe_load(config_text)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config["listen"].endswith(f":{ports['http']}")
    assert config["admin"]["listen"].endswith(f":{ports['admin']}")
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    grace = kinds["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 5 + 30  # shutdown.delay + shutdown.timeout
