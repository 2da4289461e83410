"""Key management over real HTTP, on the local-directory backend and on S3 (moto server)."""

import shutil
import subprocess
import threading
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, Api
from tests.support.http import DOCUMENTED_KEY

KEYS = "/api/key-management/keys"


def problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert `response` is a problem document with this status and code; return it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["type"] == f"urn:sealstream:problem:{code}"
    return body


def create(client: httpx.Client, **fields: Any) -> httpx.Response:
    return client.post(KEYS, json={**DOCUMENTED_KEY, **fields})


@pytest.mark.skipif(shutil.which("curl") is None, reason="the documented requests use curl")
def test_the_documented_key_requests_as_curl_sends_them(api: Api) -> None:
    def curl(*args: str) -> tuple[int, str]:
        command = ["curl", "-s", "-w", "\n%{http_code}", *args]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body

    token = f"Authorization: Bearer {ADMIN_TOKEN}"
    status, _ = curl("-X", "GET", f"{api.url}{KEYS}/mySymKey", "-H", token)
    assert status == 404  # "If the key isn't found, generate it."
    body = (
        '{"kid":"mySymKey","kty":"oct","alg":"AES-256",'
        '"keyOps":["encrypt","decrypt"],"exportable":false}'
    )
    json_type = "Content-Type: application/json"
    url = f"{api.url}{KEYS}"
    status, created = curl("-X", "POST", url, "-H", token, "-H", json_type, "-d", body)
    assert status == 201, created
    status, fetched = curl("-X", "GET", f"{api.url}{KEYS}/mySymKey", "-H", token)
    assert status == 200
    assert '"kid":"mySymKey"' in fetched and '"status":"enabled"' in fetched


def test_key_metadata_and_public_keys(api: Api) -> None:
    with api.client() as client:
        created = create(client).json()
        assert created["kty"] == "oct" and created["primaryVersion"] == 1
        assert created["publicJwk"] is None
        rsa = create(client, kid="rsa", kty="RSA", alg="RSA-OAEP-256", keySize=2048).json()
        assert rsa["publicJwk"]["kty"] == "RSA" and rsa["publicJwk"]["kid"] == "rsa#1"
        assert set(rsa["publicJwk"]) == {"kty", "kid", "alg", "n", "e"}
        pq = create(client, kid="pq", kty="ML-KEM", alg="ML-KEM-1024").json()
        assert pq["publicJwk"]["kty"] == "AKP" and pq["publicJwk"]["alg"] == "ML-KEM-1024"
        assert set(pq["publicJwk"]) == {"kty", "kid", "alg", "pub"}
        akp = create(client, kid="akp", kty="AKP", alg=None).json()
        assert (akp["kty"], akp["alg"]) == ("ML-KEM", "ML-KEM-768")
        listed = client.get(KEYS, params={"limit": 2}).json()
        assert [k["kid"] for k in listed["keys"]] == ["akp", "mySymKey"]
        rest = client.get(KEYS, params={"limit": 2, "after": listed["next"]}).json()
        assert [k["kid"] for k in rest["keys"]] == ["pq", "rsa"] and rest["next"] is None
        algorithms = client.get("/api/key-management/supported-algorithms").json()["algorithms"]
        assert {a["kty"] for a in algorithms} == {"oct", "RSA", "ML-KEM", "EC", "OKP", "ML-DSA"}


def test_life_cycle(api: Api) -> None:
    with api.client() as client:
        create(client, exportable=True)
        url = f"{KEYS}/mySymKey"
        rotated = client.post(f"{url}/rotate").json()
        assert rotated["primaryVersion"] == 2 and len(rotated["versions"]) == 2
        assert client.get(f"{url}/export").json()["kid"] == "mySymKey#2"
        assert client.get(f"{url}/export", params={"version": 1}).json()["kid"] == "mySymKey#1"
        assert client.post(f"{url}/disable").json()["status"] == "disabled"
        problem(client.post(f"{url}/rotate"), 409, "key-disabled")
        assert client.post(f"{url}/enable").json()["status"] == "enabled"
        problem(client.delete(url, params={"pendingWindowDays": 0}), 422, "invalid-pending-window")
        problem(client.delete(url, params={"pendingWindowDays": 31}), 422, "invalid-pending-window")
        pending = client.delete(url).json()
        assert pending["status"] == "pending-deletion" and pending["deletionDate"]
        for blocked in (client.post(f"{url}/rotate"), client.post(f"{url}/enable")):
            problem(blocked, 409, "key-pending-deletion")
        problem(client.get(f"{url}/export"), 409, "key-pending-deletion")
        assert client.post(f"{url}/cancel-deletion").json()["status"] == "disabled"
        problem(client.post(f"{url}/cancel-deletion"), 409, "invalid-key-state")
        assert client.patch(url, json={"exportable": False}).json()["exportable"] is False
        problem(client.patch(url, json={"exportable": True}), 409, "exportability-is-one-way")
        problem(client.get(f"{url}/export"), 403, "key-not-exportable")


BAD_SPECS = [
    ({"kty": "DSA"}, "unsupported-key-type"),
    ({"keyOps": ["encrypt", "sign"]}, "mixed-key-ops"),
    ({"alg": "AES-128"}, "unsupported-algorithm"),
    ({"alg": "RSA-OAEP-256"}, "algorithm-mismatch"),
    ({"kty": "RSA", "alg": "RSA-OAEP-256", "keySize": 1024}, "invalid-key-size"),
    ({"keyOps": []}, "invalid-key-ops"),
    ({"keyOps": ["sign"]}, "invalid-key-ops"),
    ({"keyOps": ["encrypt", "encrypt"]}, "invalid-key-ops"),
    ({"kid": "has space"}, "invalid-kid"),
    ({"kid": "slash/kid"}, "invalid-kid"),
    ({"kid": "k" * 129}, "invalid-kid"),
    ({"kid": ""}, "invalid-kid"),
    ({"rotationPeriod": "PT1M"}, "invalid-rotation-period"),
    ({"expiresAt": "2001-01-01T00:00:00Z"}, "invalid-expiry"),
    ({"exportable": "sometimes"}, "invalid-request"),
    ({"color": "blue"}, "invalid-request"),
]


@pytest.mark.parametrize(("fields", "code"), BAD_SPECS)
def test_bad_key_specs_get_their_own_code(api: Api, fields: dict[str, Any], code: str) -> None:
    with api.client() as client:
        body = problem(create(client, **fields), 422, code)
        assert "detail" in body


def test_bad_bodies(api: Api) -> None:
    limit = api.settings.max_json_body
    with api.client() as client:
        json_header = {"Content-Type": "application/json"}
        problem(client.post(KEYS, content=b"[1, 2]", headers=json_header), 400, "body-not-object")
        problem(client.post(KEYS, content=b'{"kid": ', headers=json_header), 400, "invalid-json")
        problem(client.post(KEYS, content=b"\xff\xfe", headers=json_header), 400, "invalid-json")
        huge = b'{"kid": "' + b"a" * limit + b'"}'
        problem(client.post(KEYS, content=huge, headers=json_header), 413, "body-too-large")
        chunked = client.post(KEYS, content=iter([huge[:1000], huge[1000:]]), headers=json_header)
        problem(chunked, 413, "body-too-large")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        problem(client.post(KEYS, content=b"kid=x", headers=form), 415, "unsupported-media-type")
        assert create(client).status_code == 201
        problem(create(client), 409, "key-exists")
        problem(client.get(KEYS, params={"limit": 0}), 422, "invalid-request")
        problem(client.get("/api/nowhere"), 404, "not-found")
        problem(client.put(KEYS), 405, "method-not-allowed")


def test_tokens_scopes_and_tenants(api: Api) -> None:
    with api.client() as admin:
        create(admin)
        issued = admin.post(
            "/api/admin/tokens",
            json={"tenant": "acme", "scopes": ["keys:read", "keys:write"], "name": "ci"},
        )
        assert issued.status_code == 201
        token, token_id = issued.json()["token"], issued.json()["id"]
        assert "hash" not in issued.json()
        problem(
            admin.post("/api/admin/tokens", json={"tenant": "acme", "scopes": ["root"]}),
            422,
            "unknown-scope",
        )
        listed = admin.get("/api/admin/tokens", params={"tenant": "acme"}).json()["tokens"]
        assert [t["id"] for t in listed] == [token_id]
        assert all("hash" not in t and "token" not in t for t in listed)
    with api.client(token) as acme:
        # Another tenant's kid: not found, whatever the route, and not listed.
        problem(acme.get(f"{KEYS}/mySymKey"), 404, "key-not-found")
        problem(acme.post(f"{KEYS}/mySymKey/disable"), 404, "key-not-found")
        assert acme.get(KEYS).json()["keys"] == []
        # The same kid is free in this tenant.
        assert create(acme).status_code == 201
        problem(acme.get(f"{KEYS}/mySymKey/export"), 403, "insufficient-scope")
        problem(acme.get("/api/admin/tokens"), 403, "insufficient-scope")
    with api.client() as admin:
        assert admin.get(f"{KEYS}/mySymKey").json()["tenant"] == "default"
        assert admin.delete(f"/api/admin/tokens/{token_id}").json()["revokedAt"]
        problem(admin.delete("/api/admin/tokens/nosuchtoken0000"), 404, "token-not-found")
    with api.client(token) as revoked:
        problem(revoked.get(KEYS), 401, "token-revoked")


def test_requests_without_a_valid_token(api: Api) -> None:
    with api.client(token=None) as anonymous:
        response = anonymous.get(KEYS)
        problem(response, 401, "missing-token")
        assert response.headers["www-authenticate"] == "Bearer"
        problem(anonymous.get(KEYS, headers={"Authorization": "Basic abc"}), 401, "missing-token")
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json()["status"] == "ready"
    for token in ("wrong", "sst_aaaaaaaaaaaaaaaa_" + "b" * 43, ADMIN_TOKEN + "x"):
        with api.client(token) as stranger:
            problem(stranger.get(KEYS), 401, "invalid-token")


def test_concurrent_creates_of_one_kid(api: Api) -> None:
    barrier = threading.Barrier(2)
    statuses: list[int] = []

    def attempt() -> None:
        with api.client() as client:
            barrier.wait()
            statuses.append(create(client, kid="race", kty="ML-KEM", alg="ML-KEM-768").status_code)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409]
