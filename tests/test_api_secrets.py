"""Key material stays inside: not in responses (but export), logs, errors, or at rest.

Keys of every type are created and driven through every key route; then every response
body, every log record and every stored byte is searched for the material in each of
the encodings it could leak in.
"""

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keystore.material import material_aad
from keystore.persistence import record_key
from sealstream.server import create_app
from sealstream.settings import Settings
from sealstream.wiring import open_kek
from tests.conftest import ADMIN_TOKEN, Api
from tests.support.services import api_server

KEYS = "/api/key-management/keys"
SPECS: list[dict[str, Any]] = [
    {"kid": "aes", "kty": "oct", "alg": "AES-256"},
    {"kid": "rsa", "kty": "RSA", "alg": "RSA-OAEP-256", "keySize": 2048},
    {"kid": "pq768", "kty": "ML-KEM", "alg": "ML-KEM-768"},
    {"kid": "pq1024", "kty": "ML-KEM", "alg": "ML-KEM-1024"},
]


def encodings(secret: bytes) -> Iterator[str]:
    """Text forms a secret could leak in, as 16-character windows from start, middle, end."""
    for text in (
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        secret.hex(),
        secret.hex().upper(),
    ):
        middle = len(text) // 2
        yield from {text[:16], text[middle - 8 : middle + 8], text[-17:-1]}


def secrets_of(material: bytes, kty: str) -> list[bytes]:
    """The secret values inside stored material: raw, and for RSA its private numbers."""
    if kty != "RSA":
        return [material]
    key = serialization.load_der_private_key(material, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    numbers = key.private_numbers()
    ints = [numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp]
    return [material] + [n.to_bytes((n.bit_length() + 7) // 8, "big") for n in ints]


def stored_material(api: Api, kid: str, version: int) -> tuple[bytes, str]:
    record = json.loads(api.objects.get(record_key("default", kid)))["record"]
    wrapped = next(v for v in record["versions"] if v["version"] == version)["wrappedMaterial"]
    kek = open_kek(api.settings)
    return kek.unwrap(base64.b64decode(wrapped), material_aad("default", kid, version)), record[
        "kty"
    ]


def exercise_every_route(client: httpx.Client) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Drive every key route for every key, then scrape the metrics; return (ordinary
    responses, export responses)."""
    seen: list[httpx.Response] = []
    exported: list[httpx.Response] = []
    seen.append(client.get("/api/key-management/supported-algorithms"))
    for spec in SPECS:
        for exportable in (False, True):
            kid = f"{spec['kid']}-{'x' if exportable else 'n'}"
            url = f"{KEYS}/{kid}"
            seen.append(client.post(KEYS, json={**spec, "kid": kid, "exportable": exportable}))
            seen.append(client.post(KEYS, json={**spec, "kid": kid}))  # 409
            for route in ("rotate", "disable", "enable"):
                seen.append(client.post(f"{url}/{route}"))
            seen.append(client.get(url))
            for version in (None, 1, 2, 3):
                query = {"version": version} if version else {}
                response = client.get(f"{url}/export", params=query)
                (exported if response.status_code == 200 else seen).append(response)
            if exportable:
                jwk = exported[-1].json()
                broken = {**jwk, "kty": "oct" if jwk["kty"] != "oct" else "RSA"}
                for suffix, body in (("bad", broken), ("imp", jwk)):
                    imported = {"kid": f"{kid}-{suffix}", "jwk": body}
                    seen.append(client.post(f"{KEYS}/import", json=imported))
            seen.append(client.patch(url, json={"exportable": False}))
            seen.append(client.get(f"{url}/export"))
            seen.append(client.delete(url))
            seen.append(client.post(f"{url}/cancel-deletion"))
    seen.append(client.get(KEYS, params={"limit": 1000}))
    seen.append(client.get("/metrics"))
    return seen, exported


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def test_no_material_in_responses_logs_or_storage(
    api: Api, captured_logs: pytest.LogCaptureFixture
) -> None:
    with api.client() as client:
        seen, exported = exercise_every_route(client)
    assert {r.status_code for r in exported} == {200}
    assert any(r.status_code >= 400 for r in seen)

    secrets: list[str] = []
    for spec in SPECS:
        for suffix in ("x", "n"):
            for version in (1, 2):
                material, kty = stored_material(api, f"{spec['kid']}-{suffix}", version)
                for secret in secrets_of(material, kty):
                    secrets.extend(encodings(secret))

    responses = "\n".join(r.text for r in seen)
    logs = "\n".join(
        f"{record.getMessage()} {record.exc_text or ''}" for record in captured_logs.records
    )
    stored = b"\n".join(api.objects.get(info.key) for info in api.objects.list("")).decode(
        "latin-1"
    )
    exports = "\n".join(r.text for r in exported)
    assert any(window in exports for window in secrets)  # the search finds material at all
    for window in secrets:
        assert window not in responses
        assert window not in logs
        assert window not in stored


def test_kms_wraps_material_at_rest(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, captured_logs: pytest.LogCaptureFixture
) -> None:
    kms = boto3.client("kms", endpoint_url=moto_endpoint)
    key_id = kms.create_key(Description="sealstream test KEK")["KeyMetadata"]["KeyId"]
    settings = Settings(
        storage_url=f"s3://{s3_bucket}",
        s3_endpoint_url=moto_endpoint,
        kms_key_id=key_id,
        kms_endpoint_url=moto_endpoint,
        admin_token=ADMIN_TOKEN,
    )
    app = create_app(settings)
    with api_server(app) as url:
        api = Api.of(url, settings, app)
        with api.client() as client:
            for spec in SPECS:
                assert client.post(KEYS, json={**spec, "exportable": True}).status_code == 201
            exports: dict[str, Any] = {
                spec["kid"]: client.get(f"{KEYS}/{spec['kid']}/export").json() for spec in SPECS
            }
        stored = b"".join(api.objects.get(info.key) for info in api.objects.list("")).decode()
        logs = "\n".join(record.getMessage() for record in captured_logs.records)
        for spec in SPECS:
            material, _ = stored_material(api, str(spec["kid"]), 1)  # unwraps through KMS
            for window in encodings(material):
                assert window not in stored
                assert window not in logs
            private = exports[str(spec["kid"])]
            for field in ("k", "d", "priv"):
                if field in private:
                    assert private[field] not in stored
