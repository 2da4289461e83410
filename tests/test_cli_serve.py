"""`sealstream serve`: with no configuration, the embedded default that `make dev` runs;
over HTTPS; and its warning when plain HTTP is served off loopback."""

import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from keystore import LocalKek
from sealstream.commands import warn_if_exposed
from sealstream.settings import Settings
from sealstream.wiring import open_records
from sealstream_client import SealstreamClient
from storage import LocalStore
from tests.support.http import DOCUMENTED_KEY, assert_round_trip, encrypt, problem, read_object
from tests.support.jobs import finished_job, store_object
from tests.support.ports import LOCALHOST, free_port
from tests.support.services import sealstream_serve, self_signed_certificate


def test_serve_starts_on_the_embedded_default(tmp_path: Path) -> None:
    with sealstream_serve(tmp_path) as served:
        assert any(str(tmp_path / ".sealstream") in line for line in served.banner)
        assert any(served.url in line for line in served.banner)
        headers = {"Authorization": f"Bearer {served.admin_token}"}
        with httpx.Client(base_url=served.url, headers=headers) as client:
            assert client.post("/api/key-management/keys", json=DOCUMENTED_KEY).status_code == 201
            assert client.get("/api/key-management/keys/mySymKey").status_code == 200
            assert client.get("/readyz").json()["status"] == "ready"
            verify_job = store_object(client, "kept.bin", b"kept")["verifyJob"]
            assert finished_job(client, verify_job)["status"] == "succeeded"
    kek = tmp_path / ".sealstream" / ".kek"
    assert len(kek.read_bytes()) == 32
    store = [tmp_path / ".sealstream", *(tmp_path / ".sealstream").rglob("*")]
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in store}
    assert {mode for path, mode in modes.items() if path.is_dir()} == {0o700}
    assert {mode for path, mode in modes.items() if path.is_file()} == {0o600}
    assert kek in modes and (tmp_path / ".sealstream" / ".meta" / "sealstream") in modes

    # A restart keeps the KEK, the keys and the generated admin token (kept owner-only
    # in the store, where the `sealstream` client finds it).
    dev_token = tmp_path / ".sealstream" / "dev-token"
    assert dev_token.read_text().strip() == served.admin_token
    assert not served.admin_token.startswith("-")
    with sealstream_serve(tmp_path) as again:
        headers = {"Authorization": f"Bearer {again.admin_token}"}
        with httpx.Client(base_url=again.url, headers=headers) as client:
            assert client.get("/api/key-management/keys/mySymKey").json()["status"] == "enabled"
            # Jobs run in the server's process: finished ones are listed from their reports.
            listed = client.get("/api/jobs").json()
            assert [job["id"] for job in listed["jobs"]] == [verify_job]
        assert again.admin_token == served.admin_token

    # The server derives the token from the KEK and never trusts the file: one put there
    # by someone who can write the store is replaced, not adopted.
    dev_token.write_text("ssa_planted-by-whoever-writes-the-store\n")
    with sealstream_serve(tmp_path) as third:
        assert third.admin_token == served.admin_token
    assert dev_token.read_text().strip() == served.admin_token


def test_settings_come_from_the_environment_and_options(tmp_path: Path) -> None:
    env = {"SEALSTREAM_ADMIN_TOKEN": "from-the-environment", "SEALSTREAM_STORAGE_URL": "ignored"}
    with sealstream_serve(tmp_path, env, "--storage-url", f"file://{tmp_path}/data") as served:
        headers = {"Authorization": "Bearer from-the-environment"}
        with httpx.Client(base_url=served.url, headers=headers) as client:
            assert client.post("/api/key-management/keys", json=DOCUMENTED_KEY).status_code == 201
    assert (tmp_path / "data" / "sealstream" / "keys" / "default" / "mySymKey.json").exists()
    # A supplied admin token is never written anywhere.
    assert not any(
        "from-the-environment" in path.read_bytes().decode("latin-1")
        for path in (tmp_path / "data").rglob("*")
        if path.is_file()
    )
    assert not (tmp_path / "data" / "dev-token").exists()


SUPPLIED_TOKEN = "supplied-admin-token-" + "s" * 24
REDIS_PASSWORD = "redis-password-hunter2"
S3_PASSWORD = "s3-password-s3cret"


@pytest.mark.usefixtures("aws_environment")
def test_no_credential_is_printed_logged_or_answered(tmp_path: Path) -> None:
    """A supplied admin token is never printed, and the credentials in the Redis URL and
    the S3 endpoint never reach the output or an answer, whether the services they name
    answer or not (here: nothing listens)."""
    LocalKek.load_or_create(tmp_path / "kek")
    redis_url = f"redis://:{REDIS_PASSWORD}@{LOCALHOST}:{free_port()}/0"
    with_redis = {"SEALSTREAM_ADMIN_TOKEN": SUPPLIED_TOKEN, "SEALSTREAM_REDIS_URL": redis_url}
    with_s3 = {
        **with_redis,
        "SEALSTREAM_STORAGE_URL": "s3://bucket",
        "SEALSTREAM_S3_ENDPOINT_URL": f"http://user:{S3_PASSWORD}@{LOCALHOST}:{free_port()}",
        "SEALSTREAM_KEK_FILE": str(tmp_path / "kek"),
    }
    seen: list[str] = []
    headers = {"Authorization": f"Bearer {SUPPLIED_TOKEN}"}
    with (
        sealstream_serve(tmp_path, with_redis) as served,
        httpx.Client(base_url=served.url, headers=headers, timeout=60) as client,
    ):
        seen.append(problem(client.get("/readyz"), 503, "not-ready")["detail"])
        assert client.post("/api/key-management/keys", json=DOCUMENTED_KEY).status_code == 201
        stored = encrypt(client, b"x", destination={"key": "k"})
        assert stored.status_code == 201 and stored.json()["verifyQueued"] is False
        verify = client.post("/api/jobs/verify", json={"key": "k"})
        seen.append(problem(verify, 503, "job-queue-unavailable")["detail"])
    # Nor does an answer name where Redis is: that is for the log.
    redis_address = redis_url.split("@")[1].split("/")[0]
    assert [detail for detail in seen if redis_address in detail] == []
    seen += served.output
    banners = served.banner
    with (
        sealstream_serve(tmp_path, with_s3) as served,
        httpx.Client(base_url=served.url, headers=headers, timeout=60) as client,
    ):
        seen.append(problem(client.get("/readyz"), 503, "not-ready")["detail"])
        seen.append(problem(read_object(client, "k"), 503, "storage-unavailable")["detail"])
    seen += served.output
    banners += served.banner

    for secret in (SUPPLIED_TOKEN, REDIS_PASSWORD, S3_PASSWORD):
        assert [line for line in seen if secret in line] == []
    assert "  admin token:  the one configured (SEALSTREAM_ADMIN_TOKEN)" in banners
    assert "  jobs:         Redis at redis://***@" + redis_url.split("@")[1] in banners
    assert any(line.startswith("  storage:      s3://bucket at http://***@") for line in banners)


def test_serve_over_https(tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    tls = ("--tls-cert", str(certificate), "--tls-key", str(key))
    with sealstream_serve(tmp_path, None, *tls, scheme="https") as served:
        assert served.url.startswith("https://")
        assert any(served.url in line for line in served.banner)
        assert not any("WARNING" in line for line in served.banner)
        trusted = ssl.create_default_context(cafile=str(certificate))
        client = SealstreamClient(served.url, served.admin_token, timeout=30, ssl_context=trusted)
        client.create_key(**DOCUMENTED_KEY)
        assert_round_trip(client, "mySymKey", 3 * 1024 * 1024 + 5)

        plain = served.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP beside HTTPS
            httpx.get(f"{plain}/healthz", timeout=10)


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    certificate, _ = self_signed_certificate(tmp_path)
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert=certificate)


@pytest.mark.parametrize(
    ("host", "warned"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("", True),
        ("192.0.2.10", True),
        ("api.example", True),
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("localhost", False),
    ],
)
def test_plain_http_off_loopback_is_warned_about(
    host: str, warned: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warn_if_exposed(Settings(host=host))
    assert ("WARNING: serving plain HTTP" in capsys.readouterr().err) is warned

    certificate, key = self_signed_certificate(tmp_path)
    warn_if_exposed(Settings(host=host, tls_cert=certificate, tls_key=key))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("endpoint", "warned"),
    [
        ("http://kms.internal:4566", True),
        ("http://10.0.0.7", True),
        ("https://kms.internal", False),
        ("http://127.0.0.1:4566", False),
        (None, False),
    ],
)
def test_kms_over_plain_http_off_loopback_is_warned_about(
    endpoint: str | None, warned: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    warn_if_exposed(Settings(kms_key_id="alias/kek", kms_endpoint_url=endpoint))
    assert ("WARNING: KMS at" in capsys.readouterr().err) is warned


@pytest.mark.parametrize(
    ("settings", "culprit"),
    [
        ({"SEALSTREAM_KEK_FILE": "{tmp}/missing"}, "SEALSTREAM_KEK_FILE"),
        ({"SEALSTREAM_KEK_FILE": "{tmp}/short"}, "SEALSTREAM_KEK_FILE"),
        ({"SEALSTREAM_KEK_FILE": "{tmp}/open-kek"}, "SEALSTREAM_KEK_FILE"),
        ({"SEALSTREAM_STORAGE_URL": "s3://bucket"}, "SEALSTREAM_KEK_FILE"),
        ({"SEALSTREAM_STORAGE_URL": "ftp://host/store"}, "SEALSTREAM_STORAGE_URL"),
        ({"SEALSTREAM_STORAGE_URL": "file://{tmp}/short/store"}, "SEALSTREAM_STORAGE_URL"),
        (
            {
                "SEALSTREAM_STORAGE_URL": "s3://bucket",
                "SEALSTREAM_KEK_FILE": "{tmp}/kek",
                "SEALSTREAM_S3_ENDPOINT_URL": "user:password@host",
            },
            "SEALSTREAM_S3_ENDPOINT_URL",
        ),
        ({"SEALSTREAM_REDIS_URL": "user:password@host"}, "SEALSTREAM_REDIS_URL"),
    ],
)
def test_a_configuration_error_is_one_line_naming_the_setting(
    tmp_path: Path, settings: dict[str, str], culprit: str
) -> None:
    (tmp_path / "short").write_bytes(b"not 32 bytes")
    (tmp_path / "short").chmod(0o600)
    LocalKek.load_or_create(tmp_path / "kek")
    (tmp_path / "open-kek").write_bytes(os.urandom(32))
    (tmp_path / "open-kek").chmod(0o644)
    env = {name: value.format(tmp=tmp_path) for name, value in settings.items()}
    assert_cannot_start(tmp_path, env, culprit)


def assert_cannot_start(tmp_path: Path, env: dict[str, str], culprit: str) -> str:
    """`sealstream serve` with `env` stops at once with one line naming `culprit`."""
    sealstream = Path(sys.executable).with_name("sealstream")
    run = subprocess.run(
        [str(sealstream), "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout) == (2, ""), run.stderr
    assert run.stderr.startswith(f"sealstream: cannot start: {culprit}: "), run.stderr
    assert run.stderr.count("\n") == 1 and "password" not in run.stderr
    return run.stderr


def test_a_kek_that_is_not_the_stores_own_is_one_line_at_start(tmp_path: Path) -> None:
    open_records(LocalStore(tmp_path / "store"), LocalKek(os.urandom(32)))  # set up, another KEK
    LocalKek.load_or_create(tmp_path / "kek")
    env = {
        "SEALSTREAM_STORAGE_URL": f"file://{tmp_path / 'store'}",
        "SEALSTREAM_KEK_FILE": str(tmp_path / "kek"),
    }
    assert "the KEK is not the one" in assert_cannot_start(tmp_path, env, "SEALSTREAM_KEK_FILE")


def test_a_store_from_before_sealing_is_one_line_at_start(tmp_path: Path) -> None:
    legacy = LocalStore(tmp_path / "store")
    legacy.put("sealstream/tokens/legacy0000000000.json", b'{"id": "legacy0000000000"}')
    env = {"SEALSTREAM_STORAGE_URL": f"file://{tmp_path / 'store'}"}
    stderr = assert_cannot_start(tmp_path, env, "SEALSTREAM_STORAGE_URL")
    assert "sealstream upgrade-records" in stderr


@pytest.mark.parametrize("wrong", ["missing", "not-a-certificate"])
def test_a_certificate_that_does_not_load_is_one_line_at_start(tmp_path: Path, wrong: str) -> None:
    _, key = self_signed_certificate(tmp_path)
    (tmp_path / "not-a-certificate").write_text("not PEM")
    sealstream = Path(sys.executable).with_name("sealstream")
    tls = ["--tls-cert", str(tmp_path / wrong), "--tls-key", str(key)]
    run = subprocess.run(
        [str(sealstream), "serve", "--port", str(free_port()), *tls],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "SEALSTREAM_TLS_CERT" in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr
