"""Streaming sign, verify and resign over real HTTP: signing keys made and rotated through
the API, signatures checked here and by independent implementations (joserfc, plain
ML-DSA), theirs checked here, a public JWK for a key the service does not hold, keys'
operations and states enforced, and every hostile JWS answered with its own 4xx."""

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from joserfc import jws
from joserfc.jwk import import_key

from tests.conftest import Api, live_api, local_settings
from tests.support.data import MiB, random_chunks
from tests.support.http import KEYS, create_key, exchange, form, post_form, problem
from tests.support.memory import PeakRss
from tests.support.waiting import wait_until

SIGN = "/api/crypto/stream/sign"
VERIFY = "/api/crypto/stream/verify"
RESIGN = "/api/crypto/stream/resign"
PAYLOAD = b"sealstream signs streams \x00\xff" * 4000
SIGNING_KEYS: dict[str, dict[str, Any]] = {
    "es256": {"kty": "EC", "alg": "ES256"},
    "es384": {"kty": "EC", "alg": "ES384"},
    "ps256": {"kty": "RSA", "alg": "PS256", "keySize": 2048},
    "ps384": {"kty": "RSA", "alg": "PS384", "keySize": 2048},
    "mldsa44": {"kty": "AKP", "alg": "ML-DSA-44"},
    "mldsa65": {"kty": "AKP", "alg": "ML-DSA-65"},
    "mldsa87": {"kty": "AKP", "alg": "ML-DSA-87"},
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One live server for the module (local directory), holding every signing key, an
    Ed25519 key and the documented AES key, each exportable."""
    with live_api(local_settings(tmp_path_factory.mktemp("signing"))) as api:
        with api.client() as client:
            for kid, fields in SIGNING_KEYS.items():
                create_key(client, kid=kid, keyOps=["sign", "verify"], exportable=True, **fields)
            create_key(client, kid="ed", kty="OKP", alg="Ed25519", keyOps=["sign", "verify"])
            create_key(client)
        yield api


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


def signed(client: httpx.Client, kid: str, data: bytes = PAYLOAD) -> httpx.Response:
    return post_form(client, SIGN, {"kid": kid}, data)


def sign(client: httpx.Client, kid: str, data: bytes = PAYLOAD) -> str:
    response = signed(client, kid, data)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/jose"
    return response.text


def verify(client: httpx.Client, data: bytes = PAYLOAD, **metadata: Any) -> httpx.Response:
    return post_form(client, VERIFY, metadata, data)


def public_jwk(client: httpx.Client, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = client.get(f"{KEYS}/{kid}").json()["publicJwk"]
    return jwk


def partner_jwk(curve: ec.EllipticCurve, alg: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A key pair the service does not hold, as a private and a public JWK."""
    pem = ec.generate_private_key(curve).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_jwk = dict(import_key(pem, "EC", parameters={"alg": alg}).as_dict(private=True))
    public = {name: private_jwk[name] for name in ("kty", "crv", "x", "y")} | {"alg": alg}
    return private_jwk, public


def b64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


@pytest.mark.parametrize("kid", SIGNING_KEYS)
def test_sign_then_verify_by_the_key_the_header_names(client: httpx.Client, kid: str) -> None:
    response = signed(client, kid)
    assert response.status_code == 200, response.text
    alg = SIGNING_KEYS[kid]["alg"]
    assert response.headers["X-Key-Requested"] == kid
    assert response.headers["X-Key-Used"] == f"{kid}#1"
    assert response.headers["X-Algorithm-Used"] == alg
    header, payload, _ = response.text.split(".")
    assert payload == ""
    assert json.loads(b64(header)) == {
        "alg": alg,
        "b64": False,
        "crit": ["b64"],
        "kid": f"{kid}#1",
    }
    verdict = verify(client, signature=response.text)
    assert verdict.status_code == 200, verdict.text
    assert verdict.json() == {"valid": True, "kid": f"{kid}#1", "alg": alg}
    assert verdict.headers["X-Key-Used"] == f"{kid}#1"
    assert verdict.headers["X-Algorithm-Used"] == alg
    problem(verify(client, PAYLOAD + b"!", signature=response.text), 422, "signature-invalid")
    problem(verify(client, PAYLOAD[1:], signature=response.text), 422, "signature-invalid")


@pytest.mark.parametrize("kid", ["es256", "ps384"])
def test_es_and_ps_interoperate_with_joserfc_both_ways(client: httpx.Client, kid: str) -> None:
    alg = SIGNING_KEYS[kid]["alg"]
    ours = sign(client, kid)
    jws.deserialize_compact(ours, import_key(public_jwk(client, kid)), [alg], payload=PAYLOAD)
    exported = client.get(f"{KEYS}/{kid}/export").json()
    text = "a partner's document, signed elsewhere: ünïcode and spaces".encode()
    header = {"alg": alg, "b64": False, "crit": ["b64"], "kid": f"{kid}#1"}
    theirs = jws.serialize_compact(header, text, import_key(exported), [alg])
    verdict = verify(client, text, signature=theirs)
    assert verdict.status_code == 200 and verdict.json()["valid"] is True, verdict.text


@pytest.mark.parametrize("kid", ["mldsa44", "mldsa65", "mldsa87"])
def test_ml_dsa_signatures_pass_plain_ml_dsa_verify_over_the_signing_input(
    client: httpx.Client, kid: str
) -> None:
    ours = sign(client, kid)
    header, _, signature = ours.split(".")
    classes: dict[str, Any] = {
        "mldsa44": (mldsa.MLDSA44PublicKey, mldsa.MLDSA44PrivateKey),
        "mldsa65": (mldsa.MLDSA65PublicKey, mldsa.MLDSA65PrivateKey),
        "mldsa87": (mldsa.MLDSA87PublicKey, mldsa.MLDSA87PrivateKey),
    }
    public_class, private_class = classes[kid]
    public = public_class.from_public_bytes(b64(public_jwk(client, kid)["pub"]))
    public.verify(b64(signature), f"{header}.".encode() + PAYLOAD)
    seed = b64(client.get(f"{KEYS}/{kid}/export").json()["priv"])
    theirs = private_class.from_seed_bytes(seed).sign(f"{header}.".encode() + PAYLOAD)
    verdict = verify(
        client, signature=f"{header}..{base64.urlsafe_b64encode(theirs).rstrip(b'=').decode()}"
    )
    assert verdict.status_code == 200, verdict.text


def test_verify_with_a_public_jwk_for_a_key_the_service_does_not_hold(
    client: httpx.Client,
) -> None:
    private_jwk, public = partner_jwk(ec.SECP256R1(), "ES256")
    header = {"alg": "ES256", "b64": False, "crit": ["b64"], "kid": "partner-1"}
    theirs = jws.serialize_compact(header, "partner text", import_key(private_jwk), ["ES256"])
    verdict = verify(client, b"partner text", signature=theirs, publicKey=public)
    assert verdict.status_code == 200, verdict.text
    name = f"jwk#{thumbprint(public)}"
    assert verdict.json() == {"valid": True, "kid": name, "alg": "ES256"}
    assert verdict.headers["X-Key-Used"] == name
    problem(
        verify(client, b"other text", signature=theirs, publicKey=public), 422, "signature-invalid"
    )
    with_private = verify(
        client, b"partner text", signature=theirs, publicKey=private_jwk | {"alg": "ES256"}
    )
    problem(with_private, 422, "invalid-jwk")
    both = verify(client, signature=theirs, publicKey=public, kid="es256")
    problem(both, 422, "conflicting-keys")


def thumbprint(public: dict[str, Any]) -> str:
    """An EC public JWK's RFC 7638 thumbprint, computed apart (by joserfc)."""
    return str(import_key({k: public[k] for k in ("kty", "crv", "x", "y")}).thumbprint())


@pytest.mark.parametrize("route", ["verify", "resign"])
def test_a_public_jwk_is_named_by_its_thumbprint_never_the_name_a_signer_claims(
    client: httpx.Client, route: str
) -> None:
    """A signer signs with a key of its own under a header naming this tenant's key, and
    gives its public JWK (naming that key too) to a relying party that verifies: the
    answer names the JWK by its thumbprint, never by the tenant's key."""
    kid = f"claimed-by-{route}"
    create_key(client, kid=kid, kty="EC", alg="ES256", keyOps=["sign", "verify"])
    private_jwk, public = partner_jwk(ec.SECP256R1(), "ES256")
    header = {"alg": "ES256", "b64": False, "crit": ["b64"], "kid": f"{kid}#1"}
    theirs = jws.serialize_compact(header, "their text", import_key(private_jwk), ["ES256"])
    claimed = public | {"kid": f"{kid}#1"}
    if route == "verify":
        answer = verify(client, b"their text", signature=theirs, publicKey=claimed)
        assert answer.status_code == 200, answer.text
        used, named = answer.headers["X-Key-Used"], answer.json()["kid"]
    else:
        metadata = {"signature": theirs, "sourcePublicKey": claimed, "kid": "es256"}
        answer = post_form(client, RESIGN, metadata, b"their text")
        assert answer.status_code == 200, answer.text
        used = named = answer.headers["X-Source-Key-Used"]
    assert used == named == f"jwk#{thumbprint(public)}"


def test_every_version_verifies_after_rotation_and_the_kid_decides(client: httpx.Client) -> None:
    create_key(client, kid="rotating", kty="EC", alg="ES384", keyOps=["sign", "verify"])
    first = sign(client, "rotating")
    client.post(f"{KEYS}/rotating/rotate").raise_for_status()
    second = signed(client, "rotating")
    assert second.headers["X-Key-Used"] == "rotating#2"
    for signature, version in ((first, 1), (second.text, 2)):
        verdict = verify(client, signature=signature, kid="rotating")
        assert verdict.json()["kid"] == f"rotating#{version}", verdict.text
    problem(verify(client, signature=first, kid="es384"), 422, "key-mismatch")
    problem(verify(client, signature=sign(client, "es256"), kid="es384"), 422, "key-mismatch")


def test_the_keys_algorithm_decides_never_the_jws_header(client: httpx.Client) -> None:
    signature = sign(client, "es256")
    header, _, sig = signature.split(".")
    claims = json.loads(b64(header)) | {"alg": "ES384"}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    problem(verify(client, signature=f"{forged}..{sig}"), 422, "jws-algorithm-mismatch")
    claims_none = json.loads(b64(header)) | {"alg": "none"}
    none = base64.urlsafe_b64encode(json.dumps(claims_none).encode()).rstrip(b"=").decode()
    problem(verify(client, signature=f"{none}..{sig}"), 422, "jws-algorithm-mismatch")


def _segment(header: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()


HEADER = {"alg": "ES256", "b64": False, "crit": ["b64"], "kid": "es256#1"}
SIG = base64.urlsafe_b64encode(bytes(64)).rstrip(b"=").decode()
HOSTILE: list[tuple[str, str, int]] = [
    (f"{_segment(HEADER)}..{SIG}.e30.e30", "jws-extra-segments", 400),
    (f"{_segment(HEADER)}.{SIG}", "malformed-jws", 400),
    (f"{_segment(HEADER)}.cGF5bG9hZA.{SIG}", "jws-payload-attached", 400),
    (f"e30..{SIG}", "malformed-jws", 400),
    (f"{_segment(HEADER)}..{SIG[:-4]}", "signature-length-invalid", 400),
    (f"{_segment(HEADER)}..{SIG}AAAA", "signature-length-invalid", 400),
    (f"{_segment(HEADER | {'b64': True})}..{SIG}", "jws-payload-encoded", 400),
    (
        f"{_segment({k: v for k, v in HEADER.items() if k != 'crit'})}..{SIG}",
        "jws-crit-missing",
        400,
    ),
    (
        f"{_segment(HEADER | {'crit': ['b64', 'exp'], 'exp': 1})}..{SIG}",
        "jws-crit-unsupported",
        400,
    ),
    (f"{_segment(HEADER)}..{SIG}", "signature-invalid", 422),
]


@pytest.mark.parametrize(("signature", "code", "status"), HOSTILE, ids=[c[1] for c in HOSTILE])
def test_hostile_signatures_get_their_own_4xx(
    client: httpx.Client, signature: str, code: str, status: int
) -> None:
    problem(verify(client, signature=signature), status, code)


def test_keys_sign_only_if_their_algorithm_and_keyops_allow(client: httpx.Client) -> None:
    problem(signed(client, "mySymKey"), 403, "operation-not-permitted")
    problem(signed(client, "ed"), 403, "not-for-streams")
    problem(
        post_form(client, "/api/crypto/stream/encrypt", {"kid": "es256"}, b"x"),
        403,
        "operation-not-permitted",
    )
    problem(signed(client, "nope"), 404, "key-not-found")
    problem(post_form(client, SIGN, {}, b"x"), 422, "missing-kid")
    header, _, sig = sign(client, "es256").split(".")
    aes_named = _segment(json.loads(b64(header)) | {"kid": "mySymKey#1"})
    problem(verify(client, signature=f"{aes_named}..{sig}"), 403, "operation-not-permitted")
    mixed = client.post(KEYS, json={"kid": "mixed", "kty": "RSA", "keyOps": ["encrypt", "sign"]})
    problem(mixed, 422, "mixed-key-ops")
    create_key(client, kid="signOnly", kty="EC", alg="ES256", keyOps=["sign"])
    problem(
        verify(client, signature=sign(client, "signOnly"), kid="signOnly"),
        403,
        "operation-not-permitted",
    )


def test_a_disabled_key_neither_signs_nor_verifies(client: httpx.Client) -> None:
    create_key(client, kid="soonOff", kty="EC", alg="ES256", keyOps=["sign", "verify"])
    signature = sign(client, "soonOff")
    client.post(f"{KEYS}/soonOff/disable").raise_for_status()
    problem(signed(client, "soonOff"), 409, "key-disabled")
    problem(verify(client, signature=signature), 409, "key-disabled")


def test_the_scopes_sign_and_verify_are_needed(api: Api, client: httpx.Client) -> None:
    token = client.post(
        "/api/admin/tokens", json={"tenant": "default", "scopes": ["crypto:verify"]}
    ).json()["token"]
    with api.client(token) as verifier:
        problem(signed(verifier, "es256"), 403, "insufficient-scope")
        signature = sign(client, "es256")
        assert verify(verifier, signature=signature).status_code == 200
        resigned = post_form(verifier, RESIGN, {"signature": signature, "kid": "es384"}, PAYLOAD)
        problem(resigned, 403, "insufficient-scope")


def test_resign_checks_the_old_signature_and_signs_in_the_same_pass(client: httpx.Client) -> None:
    old = sign(client, "ps256")
    response = post_form(client, RESIGN, {"signature": old, "kid": "mldsa65"}, PAYLOAD)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/jose"
    assert response.headers["X-Source-Key-Used"] == "ps256#1"
    assert response.headers["X-Source-Algorithm-Used"] == "PS256"
    assert response.headers["X-Key-Used"] == "mldsa65#1"
    assert response.headers["X-Algorithm-Used"] == "ML-DSA-65"
    assert verify(client, signature=response.text).json()["kid"] == "mldsa65#1"
    tampered = post_form(client, RESIGN, {"signature": old, "kid": "mldsa65"}, PAYLOAD + b"!")
    problem(tampered, 422, "signature-invalid")
    wrong_source = post_form(
        client, RESIGN, {"signature": old, "sourceKid": "ps384", "kid": "es256"}, PAYLOAD
    )
    problem(wrong_source, 422, "key-mismatch")


def test_resign_from_a_partners_public_jwk(client: httpx.Client) -> None:
    private_jwk, public = partner_jwk(ec.SECP384R1(), "ES384")
    header = {"alg": "ES384", "b64": False, "crit": ["b64"]}
    theirs = jws.serialize_compact(header, "their text", import_key(private_jwk), ["ES384"])
    metadata = {"signature": theirs, "sourcePublicKey": public, "kid": "es256"}
    response = post_form(client, RESIGN, metadata, b"their text")
    assert response.status_code == 200, response.text
    assert response.headers["X-Source-Key-Used"] == f"jwk#{thumbprint(public)}"
    assert response.headers["X-Source-Algorithm-Used"] == "ES384"
    assert verify(client, b"their text", signature=response.text).status_code == 200


def test_a_large_stream_is_signed_in_constant_memory(api: Api) -> None:
    size = 96 * MiB
    peak = PeakRss()
    peak.reset()
    answer = exchange(api.url, SIGN, form({"kid": "mldsa44"}, random_chunks(size, seed=3)))
    assert answer.status == 200 and answer.complete, answer.body[:300]
    assert peak.growth() < 32 * MiB
    signature = answer.body.decode()
    verdict = exchange(api.url, VERIFY, form({"signature": signature}, random_chunks(size, seed=3)))
    assert verdict.status == 200 and json.loads(verdict.body)["valid"] is True


def test_the_signing_keys_public_jwks_are_readable(client: httpx.Client, tmp_path: Path) -> None:
    shapes = {
        "es256": {"kty", "kid", "alg", "crv", "x", "y"},
        "ps256": {"kty", "kid", "alg", "n", "e"},
        "mldsa44": {"kty", "kid", "alg", "pub"},
        "ed": {"kty", "kid", "alg", "crv", "x"},
    }
    for kid, members in shapes.items():
        key = client.get(f"{KEYS}/{kid}").json()
        assert set(key["publicJwk"]) == members, kid
        assert key["keyOps"] == ["sign", "verify"]
    assert client.get(f"{KEYS}/mldsa44").json()["kty"] == "ML-DSA"


def test_signatures_count_as_uses_and_stop_at_the_max_usage_limit(client: httpx.Client) -> None:
    create_key(
        client,
        kid="counted",
        kty="EC",
        alg="ES256",
        keyOps=["sign", "verify"],
        softUsageLimit=2,
        maxUsageLimit=3,
    )
    warning = "X-Key-Usage-Limit-Warning"
    first = signed(client, "counted")
    assert first.status_code == 200 and warning not in first.headers
    second = signed(client, "counted")
    assert second.headers[warning] == "usageCount=2; softUsageLimit=2; maxUsageLimit=3"
    checked = verify(client, signature=first.text)
    assert checked.status_code == 200
    assert checked.headers[warning] == "usageCount=3; softUsageLimit=2; maxUsageLimit=3"
    # At the limit it signs no more, as a key encrypts no more; it still verifies.
    problem(signed(client, "counted"), 403, "key-usage-exhausted")
    resigning = {"signature": first.text, "kid": "counted"}
    problem(post_form(client, RESIGN, resigning, PAYLOAD), 403, "key-usage-exhausted")
    failed = verify(client, b"other bytes", signature=second.text)
    problem(failed, 422, "signature-invalid")
    assert warning not in failed.headers  # a check that failed counts for nothing
    resigned = post_form(client, RESIGN, {"signature": second.text, "kid": "es256"}, PAYLOAD)
    assert resigned.status_code == 200, resigned.text
    assert resigned.headers["X-Source-Key-Usage-Limit-Warning"].startswith("usageCount=4;")
    # Each signature made, and each one that verified, counted once.
    version = client.get(f"{KEYS}/counted").json()["versions"][0]
    assert (version["usageCount"], version["encryptCount"]) == (4, 0)


def test_bad_signatures_never_use_a_key_up(client: httpx.Client) -> None:
    """Whoever may verify sends signatures that fail, as many as the key's
    maxUsageLimit: none counts, so the key still signs, and each is audited as refused."""
    create_key(
        client, kid="guarded", kty="EC", alg="ES256", keyOps=["sign", "verify"], maxUsageLimit=3
    )
    genuine = sign(client, "guarded")
    for _ in range(3):
        refused = verify(client, b"not what was signed", signature=genuine, kid="guarded")
        problem(refused, 422, "signature-invalid")
    assert signed(client, "guarded").status_code == 200
    version = client.get(f"{KEYS}/guarded").json()["versions"][0]
    assert version["usageCount"] == 2  # the two signatures made
    wait_until(lambda: refusals(client, "signature-invalid") >= 3, "the refused checks' events")


def refusals(client: httpx.Client, code: str) -> int:
    """How many audit events, once written, record a request refused with `code`."""
    events = client.get("/api/audit", params={"limit": 1000}).json()["events"]
    return sum(event.get("code") == code for event in events)
