"""The command line, run as a real subprocess: ``python -m proxy ...`` from the repo root."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from ..conftest import REPO_ROOT, free_port

TIMEOUT = 20


def weir(*args: str, env: dict[str, str] | None = None,
         timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


GOOD = """\
listen: 127.0.0.1:8080
services:
  - name: shop
    versions:
      stable: {upstreams: [127.0.0.1:9001]}
      canary: {upstreams: [127.0.0.1:9002]}
    weights: {stable: 90, canary: 10}
"""

# A cross-field error: a weight for a version the service doesn't have.
BAD = """\
listen: 127.0.0.1:8080
services:
  - name: shop
    versions:
      stable: {upstreams: [127.0.0.1:9001]}
    weights: {stable: 90, canary: 10}
"""

# Two field errors in one file.
BAD_FIELDS = """\
listen: 127.0.0.1:8080
services:
  - name: shop
    versions:
      stable: {upstreams: [127.0.0.1:9001, "localhost"]}
    drain: {timeout: soon}
"""


def write(tmp_path: Path, text: str | bytes, name: str = "weir.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_validate_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = weir("validate", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    assert "Traceback" not in result.stderr


def test_validate_long_option(tmp_path: Path) -> None:
    result = weir("validate", "--config", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr


def test_validate_bad_file(tmp_path: Path) -> None:
    result = weir("validate", "-c", str(write(tmp_path, BAD)))
    assert result.returncode == 2
    assert "services[0].weights.canary" in result.stderr
    assert "no such version" in result.stderr
    assert "Traceback" not in result.stderr
    assert "valid (" not in result.stdout


def test_validate_bad_file_lists_every_error(tmp_path: Path) -> None:
    result = weir("validate", "-c", str(write(tmp_path, BAD_FIELDS)))
    assert result.returncode == 2
    assert "services[0].versions.stable.upstreams[1]" in result.stderr
    assert "'localhost'" in result.stderr
    assert "services[0].drain.timeout" in result.stderr
    assert "'soon'" in result.stderr
    assert "2 error(s)" in result.stderr


def test_validate_unset_env_variable(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "admin: {token: '${WEIR_TEST_CLI_TOKEN}'}\n")
    env = {k: v for k, v in os.environ.items() if k != "WEIR_TEST_CLI_TOKEN"}
    result = weir("validate", "-c", str(path), env=env)
    assert result.returncode == 2
    assert "admin.token" in result.stderr
    assert "WEIR_TEST_CLI_TOKEN" in result.stderr
    ok = weir("validate", "-c", str(path), env={**env, "WEIR_TEST_CLI_TOKEN": "t"})
    assert ok.returncode == 0, ok.stderr


def test_validate_yaml_syntax_error(tmp_path: Path) -> None:
    result = weir("validate", "-c", str(write(tmp_path, "services: [\n")))
    assert result.returncode == 2
    assert "YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = weir("validate", "-c", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_non_utf8_file(tmp_path: Path) -> None:
    result = weir("validate", "-c", str(write(tmp_path, b"services:\n  - name: caf\xe9\n")))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_validate_requires_config_option() -> None:
    result = weir("validate")
    assert result.returncode == 2
    assert "-c" in result.stderr


def test_schema_prints_json_schema() -> None:
    result = weir("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "services" in schema["properties"]
    assert "listen" in schema["properties"]
    assert schema.get("title")


def test_run_bad_config_exits_2_without_listening(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    bad = BAD.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    bad += f"admin: {{listen: 127.0.0.1:{admin_port}}}\n"
    path = write(tmp_path, bad)
    result = weir("run", "-c", str(path), timeout=10)
    assert result.returncode == 2
    assert "services[0].weights.canary" in result.stderr
    assert "Traceback" not in result.stderr
    assert not is_listening(port)
    assert not is_listening(admin_port)


def test_run_missing_config_exits_2(tmp_path: Path) -> None:
    result = weir("run", "-c", str(tmp_path / "absent.yaml"), timeout=10)
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr
