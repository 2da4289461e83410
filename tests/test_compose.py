"""The docker-compose stack file: valid, and shaped as docs/production.md says: no default
password, MinIO reachable only inside the stack, and the API on TLS with a health check
that works over it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sealstream.server import create_app
from tests.conftest import local_settings
from tests.support.services import api_server, self_signed_certificate

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "a-password-from-the-environment"


def compose(
    *args: str,
    token: str | None = "t",
    password: str | None = PASSWORD,
    store_id: str | None = "test-stack",
) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is missing: apt-get install docker-compose (make test does)")
    required = {
        "SEALSTREAM_ADMIN_TOKEN": token,
        "MINIO_ROOT_PASSWORD": password,
        "SEALSTREAM_STORE_ID": store_id,
    }
    env = {k: v for k, v in os.environ.items() if k not in required and k != "MINIO_ROOT_USER"}
    env.update({name: value for name, value in required.items() if value is not None})
    return subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    """The stack as docker-compose resolves it, variables filled in."""
    result = compose("config")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_compose_file_is_valid() -> None:
    assert compose("config", "-q").returncode == 0


def test_the_stack_has_its_services(stack: dict[str, Any]) -> None:
    assert sorted(stack["services"]) == [
        "api",
        "create-bucket",
        "lb",
        "minio",
        "redis",
        "worker",
    ]


def test_the_api_refuses_to_start_without_an_admin_token() -> None:
    result = compose("config", "-q", token=None)
    assert result.returncode != 0
    assert "SEALSTREAM_ADMIN_TOKEN" in result.stderr


def test_the_stack_refuses_to_start_without_a_minio_password() -> None:
    result = compose("config", "-q", password=None)
    assert result.returncode != 0
    assert "MINIO_ROOT_PASSWORD" in result.stderr


def test_the_stack_refuses_to_start_without_a_store_id(stack: dict[str, Any]) -> None:
    result = compose("config", "-q", store_id=None)
    assert result.returncode != 0
    assert "SEALSTREAM_STORE_ID" in result.stderr
    for name in ("api", "worker"):
        assert stack["services"][name]["environment"]["SEALSTREAM_STORE_ID"] == "test-stack"


def test_every_minio_password_is_the_one_given(stack: dict[str, Any]) -> None:
    services = stack["services"]
    given = [
        services["minio"]["environment"]["MINIO_ROOT_PASSWORD"],
        services["create-bucket"]["environment"]["MINIO_ROOT_PASSWORD"],
        *(services[name]["environment"]["AWS_SECRET_ACCESS_KEY"] for name in ("api", "worker")),
    ]
    assert given == [PASSWORD] * len(given)


def test_every_worker_runs_beat_with_a_schedule_file_it_can_write(stack: dict[str, Any]) -> None:
    """So `--scale worker=N` runs N beats, of which the one holding the lock schedules
    (tests/test_beat.py runs two such workers)."""
    command = stack["services"]["worker"]["command"]
    assert command[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert "-B" in command
    assert command[command.index("--schedule") + 1].startswith("/tmp/")


def test_only_the_load_balancer_publishes_a_port(stack: dict[str, Any]) -> None:
    """So `--scale api=N` works: no replica claims a host port."""
    published = {name: service.get("ports", []) for name, service in stack["services"].items()}
    assert {name for name, ports in published.items() if ports} == {"lb"}
    assert [str(port["target"]) for port in published["lb"]] == ["8443"]
    assert [str(port) for port in stack["services"]["api"]["expose"]] == ["8443"]
    assert stack["services"]["minio"]["environment"]["MINIO_BROWSER"] == "off"


def test_the_load_balancer_runs_the_configuration_the_tests_run(stack: dict[str, Any]) -> None:
    (volume,) = stack["services"]["lb"]["volumes"]
    source, target, mode = volume.split(":")  # docker-compose 1.x writes the short form
    assert Path(source) == ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    assert (target, mode) == ("/usr/local/etc/haproxy/haproxy.cfg", "ro")


def test_the_api_serves_tls_with_the_mounted_certificate(stack: dict[str, Any]) -> None:
    api = stack["services"]["api"]
    mounted = {secret["source"] for secret in api["secrets"]}
    environment = api["environment"]
    for variable, secret in (
        ("SEALSTREAM_TLS_CERT", "sealstream_tls_cert"),
        ("SEALSTREAM_TLS_KEY", "sealstream_tls_key"),
    ):
        assert environment[variable] == f"/run/secrets/{secret}"
        assert secret in mounted
        assert "file" in stack["secrets"][secret]


def test_the_api_health_check_works_over_tls(stack: dict[str, Any], tmp_path: Path) -> None:
    """The check's own code, run against an HTTPS server: passes while the server is
    ready, fails once it is not."""
    kind, program, flag, code = stack["services"]["api"]["healthcheck"]["test"]
    assert (kind, program, flag) == ("CMD", "python", "-c")
    settings = local_settings(tmp_path)
    with api_server(create_app(settings), tls=self_signed_certificate(tmp_path)) as url:
        env = {**os.environ, "SEALSTREAM_PORT": url.rsplit(":", 1)[1]}
        run = [sys.executable, "-c", code]
        ready = subprocess.run(run, env=env, capture_output=True, text=True, check=False)
        assert ready.returncode == 0, ready.stderr
        shutil.rmtree(tmp_path / "storage")  # /readyz: 503, the store is gone
        gone = subprocess.run(run, env=env, capture_output=True, text=True, check=False)
        assert gone.returncode != 0
        assert "503" in gone.stderr
