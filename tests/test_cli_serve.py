"""`sealstream serve` with no configuration: the embedded default that `make dev` runs."""

import stat
from pathlib import Path

import httpx

from tests.services import sealstream_serve

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
        assert served.admin_token == "from-the-environment"
        headers = {"Authorization": "Bearer from-the-environment"}
        with httpx.Client(base_url=served.url, headers=headers) as client:
            assert client.post("/api/key-management/keys", json=SEED_KEY).status_code == 201
    assert (tmp_path / "data" / "sealstream" / "keys" / "default" / "mySymKey.json").exists()
