"""The docker-compose stack file: valid, and shaped as the README says."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose(*args: str, token: str | None = "t") -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is missing: apt-get install docker-compose (make test does)")
    env = {k: v for k, v in os.environ.items() if k != "SEALSTREAM_ADMIN_TOKEN"}
    if token is not None:
        env["SEALSTREAM_ADMIN_TOKEN"] = token
    return subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_the_compose_file_is_valid() -> None:
    assert compose("config", "-q").returncode == 0


def test_the_stack_has_its_services() -> None:
    services = compose("config", "--services").stdout.split()
    assert sorted(services) == ["api", "beat", "create-bucket", "minio", "redis", "worker"]


def test_the_api_refuses_to_start_without_an_admin_token() -> None:
    result = compose("config", "-q", token=None)
    assert result.returncode != 0
    assert "SEALSTREAM_ADMIN_TOKEN" in result.stderr
