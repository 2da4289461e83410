"""`sealstream serve` with no configuration: the embedded default that `make dev` runs."""

import os
import stat
from pathlib import Path

import httpx
import pytest

from tests.services import LOCALHOST, free_port, sealstream_serve
from tests.stream_helpers import encrypt, problem, read_object

SEED_KEY = {
    "kid": "mySymKey",
    "kty": "oct",
    "alg": "AES-256",
    "keyOps": ["encrypt", "decrypt"],
    "exportable": False,
}


def test_serve_starts_on_the_embedded_default(tmp_path: Path) -> None:
    with sealstream_serve(tmp_path) as served:
        assert any(str(tmp_path / ".sealstream") in line for line in served.banner)
        assert any(served.url in line for line in served.banner)
        headers = {"Authorization": f"Bearer {served.admin_token}"}
        with httpx.Client(base_url=served.url, headers=headers) as client:
            assert client.post("/api/key-management/keys", json=SEED_KEY).status_code == 201
            assert client.get("/api/key-management/keys/mySymKey").status_code == 200
            assert client.get("/readyz").json()["status"] == "ready"
    kek = tmp_path / ".sealstream" / ".kek"
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    assert len(kek.read_bytes()) == 32

    # A restart keeps the KEK and the keys; the generated admin token is a new one.
    with sealstream_serve(tmp_path) as again:
        headers = {"Authorization": f"Bearer {again.admin_token}"}
        with httpx.Client(base_url=again.url, headers=headers) as client:
            assert client.get("/api/key-management/keys/mySymKey").json()["status"] == "enabled"
        assert again.admin_token != served.admin_token


def test_settings_come_from_the_environment_and_options(tmp_path: Path) -> None:
    env = {"SEALSTREAM_ADMIN_TOKEN": "from-the-environment", "SEALSTREAM_STORAGE_URL": "ignored"}
    with sealstream_serve(tmp_path, env, "--storage-url", f"file://{tmp_path}/data") as served:
        headers = {"Authorization": "Bearer from-the-environment"}
        with httpx.Client(base_url=served.url, headers=headers) as client:
            assert client.post("/api/key-management/keys", json=SEED_KEY).status_code == 201
    assert (tmp_path / "data" / "sealstream" / "keys" / "default" / "mySymKey.json").exists()


SUPPLIED_TOKEN = "supplied-admin-token-" + "s" * 24
REDIS_PASSWORD = "redis-password-hunter2"
S3_PASSWORD = "s3-password-s3cret"


@pytest.mark.usefixtures("aws_environment")
def test_no_credential_is_printed_logged_or_answered(tmp_path: Path) -> None:
    """A supplied admin token is never printed, and the credentials in the Redis URL and
    the S3 endpoint never reach the output or an answer, whether the services they name
    answer or not (here: nothing listens)."""
    (tmp_path / "kek").write_bytes(os.urandom(32))
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
        assert client.post("/api/key-management/keys", json=SEED_KEY).status_code == 201
        stored = encrypt(client, b"x", destination={"key": "k"})
        seen.append(problem(stored, 503, "job-queue-unavailable")["detail"])
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
