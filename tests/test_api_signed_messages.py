"""Signed messages and provenance over real HTTP: a signed message (suite 0x0578) written
on request, read back whole with its footer checked before the stream ends, and in ranges
that say their footer was not checked; and the service's proof that it wrote a message,
checked on every read: valid, absent (reported, or refused when set to), or forged; and
messages for several keys, the service's and public keys it does not hold."""

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, rsa

from envelope import (
    AesKeyring,
    Encryptor,
    Keyring,
    MlKemKeyring,
    RsaKeyring,
    key_names,
    parse_header,
)
from envelope.message import Endorse
from keystore.store import MESSAGE_PROOF_PURPOSE
from services.provenance import Provenance
from tests.conftest import Api, live_api, local_settings
from tests.support.data import KiB, flip_bit, pieces, random_bytes
from tests.support.envelope import decrypt_all
from tests.support.http import (
    DECRYPT,
    ENCRYPT,
    KEYS,
    create_key,
    decrypt,
    encrypt,
    exchange,
    form,
    post_form,
    problem,
    read_object,
)
from tests.support.waiting import wait_until

FRAME = 4096
DATA = random_bytes(200 * KiB + 9, seed=23)
REENCRYPT = "/api/crypto/stream/reencrypt"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with live_api(local_settings(tmp_path_factory.mktemp("signed"))) as api:
        with api.client() as client:
            create_key(client)
            create_key(client, kid="rsaKey", kty="RSA", alg="RSA-OAEP-256", keySize=2048)
            create_key(client, kid="pqKey", kty="ML-KEM", alg="ML-KEM-768")
        yield api


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


def sealed(client: httpx.Client, data: bytes = DATA, **metadata: Any) -> bytes:
    response = encrypt(client, data, frameLength=FRAME, **metadata)
    assert response.status_code == 200, response.text
    return response.content


def test_a_signed_message_is_written_on_request_and_read_back(client: httpx.Client) -> None:
    message = sealed(client, signed=True)
    header = parse_header(message)
    assert header.suite_id == 0x0578 and "aws-crypto-public-key" in header.context
    assert parse_header(sealed(client)).suite_id == 0x0478  # unsigned unless asked
    opened = decrypt(client, message)
    assert opened.status_code == 200 and opened.content == DATA
    assert opened.headers["X-Message-Proven"] == "true"


@pytest.mark.parametrize(
    "spoil",
    [
        lambda m: flip_bit(m, len(m) - 3),  # the signature
        lambda m: m[:-1],  # cut inside the footer
        lambda m: m[:-105],  # no footer at all
        lambda m: m + b"\x00",  # a byte after it
    ],
    ids=["signature-flipped", "footer-cut", "footer-dropped", "trailing"],
)
def test_a_bad_footer_aborts_the_stream(api: Api, client: httpx.Client, spoil: Any) -> None:
    """Every frame authenticates, so the plaintext streams; the stream must not end cleanly."""
    message = spoil(sealed(client, signed=True))
    answer = exchange(api.url, DECRYPT, form({}, pieces(message, 16 * KiB)))
    assert answer.status == 200 and not answer.complete


def test_a_footer_claiming_an_impossible_length_is_refused(client: httpx.Client) -> None:
    message = sealed(client, b"tiny", signed=True)
    spoiled = message[:-105] + b"\xff\xff"  # the whole message fits in the first read
    problem(decrypt(client, spoiled), 400, "malformed-footer")


def test_a_suite_not_read_here_or_a_relabelled_one_is_refused(client: httpx.Client) -> None:
    message = sealed(client, b"tiny", signed=True)
    unknown = message[:1] + b"\x03\x78" + message[3:]
    problem(decrypt(client, unknown), 400, "unsupported-message")
    relabelled = message[:1] + b"\x04\x78" + message[3:]  # unsigned, with a public key
    problem(decrypt(client, relabelled), 400, "malformed-message")


def test_a_stored_signed_object_reads_whole_and_in_ranges(client: httpx.Client) -> None:
    stored = post_form(
        client,
        ENCRYPT,
        {"kid": "mySymKey", "frameLength": FRAME, "signed": True, "destination": {"key": "s"}},
        DATA,
    )
    assert stored.status_code == 201, stored.text
    whole = read_object(client, "s")
    assert whole.content == DATA and "X-Signature-Checked" not in whole.headers
    assert whole.headers["X-Message-Proven"] == "true"
    ranged = read_object(client, "s", "bytes=5000-9999")
    assert ranged.status_code == 206 and ranged.content == DATA[5000:10000]
    assert ranged.headers["X-Signature-Checked"] == "false"
    unsigned = post_form(client, ENCRYPT, {"kid": "mySymKey", "destination": {"key": "u"}}, DATA)
    assert unsigned.status_code == 201
    assert "X-Signature-Checked" not in read_object(client, "u", "bytes=0-9").headers


def test_a_signed_message_stays_signed_when_reencrypted(api: Api, client: httpx.Client) -> None:
    answer = exchange(api.url, REENCRYPT, form({"kid": "rsaKey"}, [sealed(client, signed=True)]))
    assert answer.status == 200 and answer.complete
    assert answer.headers["X-Source-Message-Proven"] == "true"
    assert parse_header(answer.body).suite_id == 0x0578
    assert decrypt(client, answer.body).content == DATA


def public_rsa_key(client: httpx.Client, jwk: dict[str, str] | None = None) -> rsa.RSAPublicKey:
    """The public half of the RSA key `rsaKey`, or of the public JWK `jwk`."""
    jwk = jwk or client.get("/api/key-management/keys/rsaKey").json()["publicJwk"]
    n, e = (int.from_bytes(base64.urlsafe_b64decode(jwk[f] + "=="), "big") for f in "ne")
    return rsa.RSAPublicNumbers(e, n).public_key()


def service_pairs(kid: str = "rsaKey") -> dict[str, str]:
    """The pairs the service writes into a message for version 1 of `kid`."""
    return {"sealstream:tenant": "default", "sealstream:kid": kid, "sealstream:key-version": "1"}


def outside_message(client: httpx.Client, **extra: str) -> bytes:
    """A message written outside the service with the RSA key's public half, with the
    pairs the service writes (and `extra`): anyone holding that public key can."""
    context = {**service_pairs(), **extra}
    encryptor = Encryptor([RsaKeyring("rsaKey#1", public_rsa_key(client))], context=context)
    return b"".join(bytes(p) for p in encryptor.update(DATA) + encryptor.finish())


def test_a_message_written_outside_the_service_is_reported_unproven(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = outside_message(client)
    opened = decrypt(client, message)
    assert opened.status_code == 200 and opened.content == DATA
    assert opened.headers["X-Message-Proven"] == "false"

    monkeypatch.setattr(api.settings, "refuse_unproven_messages", True)
    problem(decrypt(client, message), 422, "message-unproven")
    refused = exchange(api.url, REENCRYPT, form({"kid": "mySymKey"}, [message]))
    problem(refused, 422, "message-unproven")
    assert decrypt(client, sealed(client)).status_code == 200  # the service's own: proven


def test_a_forged_or_borrowed_proof_is_refused(client: httpx.Client) -> None:
    genuine = parse_header(sealed(client, kid="rsaKey")).context["sealstream:proof"]
    for proof in (genuine, base64.b64encode(bytes(32)).decode(), "not base64!"):
        message = outside_message(client, **{"sealstream:proof": proof})
        problem(decrypt(client, message), 400, "message-proof-invalid")


# Several recipients, and recipients the service does not hold


def usage(client: httpx.Client, kid: str) -> int:
    count: int = client.get(f"/api/key-management/keys/{kid}").json()["usageCount"]
    return count


def test_a_message_for_several_keys_opens_with_any_and_is_signed(client: httpx.Client) -> None:
    kids = ["mySymKey", "rsaKey", "pqKey"]
    before = {kid: usage(client, kid) for kid in kids}
    response = encrypt(client, DATA, kid=kids, frameLength=FRAME)
    assert response.status_code == 200, response.text
    assert response.headers["X-Key-Used"] == "mySymKey#1, rsaKey#1, pqKey#1"
    assert response.headers["X-Algorithm-Used"] == "AES-256, RSA-OAEP-256, ML-KEM-768"
    header = parse_header(response.content)
    assert header.suite_id == 0x0578  # several recipients: signed unless told otherwise
    assert key_names(header) == ["mySymKey#1", "rsaKey#1", "pqKey#1"]
    for kid in kids:
        opened = decrypt(client, response.content, kid=kid)
        assert opened.status_code == 200 and opened.content == DATA, kid
        assert opened.headers["X-Key-Used"] == f"{kid}#1"
    assert {kid: usage(client, kid) - before[kid] for kid in kids} == {k: 2 for k in kids}
    unsigned = encrypt(client, b"x", kid=kids[:2], signed=False)
    assert parse_header(unsigned.content).suite_id == 0x0478


def partner_jwks() -> dict[str, tuple[dict[str, str], Keyring]]:
    """Public JWKs of keys the service does not hold, and the keyrings that open what is
    sealed for them (named as the service names them: `jwk#` and the RFC 7638 thumbprint)."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = rsa_key.public_key().public_numbers()
    rsa_jwk = {"kty": "RSA", "alg": "RSA-OAEP-256", "n": b64(numbers.n), "e": b64(numbers.e)}
    kem_key = mlkem.MLKEM1024PrivateKey.generate()
    kem_jwk = {
        "kty": "AKP",
        "alg": "ML-KEM-1024",
        "pub": b64(kem_key.public_key().public_bytes_raw()),
    }
    return {
        "rsa": (rsa_jwk, RsaKeyring(f"jwk#{thumbprint(rsa_jwk, 'e', 'kty', 'n')}", rsa_key)),
        "mlkem": (
            kem_jwk,
            MlKemKeyring(f"jwk#{thumbprint(kem_jwk, 'alg', 'kty', 'pub')}", kem_key),
        ),
    }


def b64(value: int | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.to_bytes((value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def thumbprint(jwk: dict[str, str], *members: str) -> str:
    """RFC 7638, computed apart: the required members, sorted, no whitespace, SHA-256."""
    canonical = "{" + ",".join(f'"{m}":"{jwk[m]}"' for m in sorted(members)) + "}"
    return b64(hashlib.sha256(canonical.encode()).digest())


@pytest.mark.parametrize("kind", ["rsa", "mlkem"])
def test_a_message_for_a_partner_key_opens_with_the_partners_private_key(
    client: httpx.Client, kind: str
) -> None:
    jwk, partner = partner_jwks()[kind]
    response = encrypt(client, DATA, recipientPublicKey=jwk, frameLength=FRAME)
    assert response.status_code == 200, response.text
    assert response.headers["X-Key-Used"] == f"mySymKey#1, {partner.key_name}"
    assert parse_header(response.content).suite_id == 0x0578
    assert decrypt_all([partner], response.content) == DATA  # offline, the partner's key
    assert decrypt(client, response.content).content == DATA  # and the service's own
    wait_until(lambda: audited(client, partner.key_name), "the audit event naming the key")


@pytest.mark.parametrize(
    ("kind", "spelling"),
    [("rsa", {"e": b64(b"\x00\x01\x00\x01")}), ("mlkem", {"kty": "ML-KEM"})],
    ids=["rsa-exponent-with-a-leading-zero", "mlkem-kty-alias"],
)
def test_a_partner_key_has_one_name_however_its_jwk_spells_it(
    api: Api, client: httpx.Client, kind: str, spelling: dict[str, str]
) -> None:
    """The same key, its JWK spelt otherwise, is named by the same RFC 7638 thumbprint,
    computed from the key (minimal exponent, `kty` `AKP`), as the partner computes it: the
    audit trail cannot be split between names for one key. A message an older build
    wrote naming the key by the other spelling's thumbprint still opens and proves as
    before: the proof binds the names in the header, whatever they are."""
    jwk, partner = partner_jwks()[kind]
    for sent in (jwk, {**jwk, **spelling}):
        response = encrypt(client, DATA, recipientPublicKey=sent, frameLength=FRAME)
        assert response.status_code == 200, response.text
        assert response.headers["X-Key-Used"] == f"mySymKey#1, {partner.key_name}"
        assert decrypt_all([partner], response.content) == DATA
        assert decrypt(client, response.content).headers["X-Message-Proven"] == "true"
    members = ("e", "kty", "n") if kind == "rsa" else ("alg", "kty", "pub")
    older_name = f"jwk#{thumbprint({**jwk, **spelling}, *members)}"
    older: Keyring
    if kind == "rsa":
        older = RsaKeyring(older_name, public_rsa_key(client, jwk))
    else:
        older = MlKemKeyring(
            older_name,
            mlkem.MLKEM1024PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["pub"] + "==")),
        )
    ours = RsaKeyring("rsaKey#1", public_rsa_key(client))
    proof = service_proof(api).endorse
    message = written([ours, older], service_pairs(), endorse=proof, signed=True)
    assert key_names(parse_header(message)) == ["rsaKey#1", older_name]
    opened = decrypt(client, message)
    assert opened.status_code == 200 and opened.content == DATA
    assert opened.headers["X-Message-Proven"] == "true"


def audited(client: httpx.Client, key_name: str) -> bool:
    """Whether an audit event, once written, names `key_name` among its keys."""
    events = client.get("/api/audit", params={"limit": 1000}).json()["events"]
    return any(key_name in (event.get("key") or "").split(", ") for event in events)


def test_hostile_recipients_are_refused_clearly(client: httpx.Client) -> None:
    jwk, _ = partner_jwks()["rsa"]
    private = {**jwk, "d": b64(12345)}
    problem(encrypt(client, b"x", recipientPublicKey=private), 422, "invalid-jwk")
    problem(encrypt(client, b"x", recipientPublicKey={"kty": "oct", "k": "AA"}), 422, "invalid-jwk")
    signing = {"kty": "EC", "alg": "ES256", "crv": "P-256", "x": "AA", "y": "AA"}
    problem(encrypt(client, b"x", recipientPublicKey=signing), 403, "operation-not-permitted")
    problem(encrypt(client, b"x", recipientPublicKey={**jwk, "n": "AA"}), 422, "invalid-jwk")
    # Members OpenSSL loads and only fails on when it encrypts.
    modulus = int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="))
    for members in ({"e": b64(2**64 + 1)}, {"e": b64(65538)}, {"n": b64(modulus ^ 1)}):
        problem(encrypt(client, b"x", recipientPublicKey={**jwk, **members}), 422, "invalid-jwk")
    problem(encrypt(client, b"x", kid=["mySymKey", "mySymKey"]), 422, "duplicate-recipient")
    problem(encrypt(client, b"x", kid=[]), 422, "invalid-request")
    problem(encrypt(client, b"x", kid=["mySymKey", "nope"]), 404, "key-not-found")
    many = [f"many-{n}" for n in range(16)]
    for kid in many:
        create_key(client, kid=kid)
    refused = encrypt(client, b"x", kid=many, recipientPublicKey=jwk)
    problem(refused, 422, "too-many-recipients")
    assert {usage(client, kid) for kid in many} == {0}  # refused before any use counted
    create_key(client, kid="signer", kty="EC", alg="ES256", keyOps=["sign", "verify"])
    problem(encrypt(client, b"x", kid=["mySymKey", "signer"]), 403, "operation-not-permitted")


# What a proof proves: the header the service wrote, and content only it could write


def written(
    keyrings: Sequence[Keyring],
    context: dict[str, str],
    data: bytes = DATA,
    *,
    endorse: Endorse | None = None,
    signed: bool = False,
    drawn: tuple[bytes, bytes] | None = None,
) -> bytes:
    """A message written with the envelope module, as an older build of the service (with
    `endorse`, its proof) or someone else would; `drawn`: the data key and message ID to
    take (anyone who knows a message's data key can write another under its header)."""
    with pytest.MonkeyPatch.context() as patch:
        if drawn is not None:
            draws, urandom = list(drawn), os.urandom
            patch.setattr(os, "urandom", lambda n: draws.pop(0) if draws else urandom(n))
        encryptor = Encryptor(
            keyrings, context=context, frame_length=FRAME, signed=signed, endorse=endorse
        )
    return b"".join(bytes(p) for p in encryptor.update(data) + encryptor.finish())


def service_proof(api: Api) -> Provenance:
    """The proofs the service under test makes (its store's key for them)."""
    return Provenance(api.records.key.derive(MESSAGE_PROOF_PURPOSE))


def test_a_message_for_a_key_that_may_be_known_outside_is_signed_unasked(
    api: Api, client: httpx.Client
) -> None:
    create_key(client, kid="exported", exportable=True)
    aes_jwk = client.get(f"{KEYS}/exported/export").json()
    imported = {**aes_jwk, "kid": "imported"}
    assert client.post(f"{KEYS}/import", json={"kid": "imported", "jwk": imported}).is_success
    partner, _ = partner_jwks()["rsa"]
    for metadata in (
        {"kid": "exported"},
        {"kid": "imported", "signed": False},
        {"kid": "mySymKey", "recipientPublicKey": partner, "signed": False},
        {"kid": ["mySymKey", "exported"], "signed": False},
    ):
        message = sealed(client, **metadata)
        assert parse_header(message).suite_id == 0x0578, metadata
        assert decrypt(client, message).headers["X-Message-Proven"] == "true"
    assert parse_header(sealed(client, signed=False)).suite_id == 0x0478  # held only here
    reencrypted = exchange(api.url, REENCRYPT, form({"kid": "exported"}, [sealed(client)]))
    assert reencrypted.status == 200 and parse_header(reencrypted.body).suite_id == 0x0578
    stored = encrypt(client, DATA, kid="exported", destination={"key": "exported-object"})
    assert stored.status_code == 201, stored.text
    assert parse_header(api.objects.get(stored.json()["storageKey"])).suite_id == 0x0578


def test_content_written_by_whoever_knows_the_data_key_is_not_proven(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unsigned message an older build wrote for a key created exportable: its
    holder unwraps the data key and writes other frames under the same header, proof
    and all. Neither message is proven; the same message for a key only the service
    ever held is."""
    create_key(client, kid="leaked", exportable=True)
    key = base64.urlsafe_b64decode(client.get(f"{KEYS}/leaked/export").json()["k"] + "==")
    assert client.patch(f"{KEYS}/leaked", json={"exportable": False}).is_success
    keyring = AesKeyring("leaked#1", key)
    proof = service_proof(api).endorse
    genuine = written([keyring], service_pairs("leaked"), endorse=proof)
    header = parse_header(genuine)
    data_key = keyring.unwrap(header.encrypted_data_keys[0], header.context_bytes)
    assert data_key is not None
    forged_data = b"forged " * 1000
    forged = written([keyring], header.context, forged_data, drawn=(data_key, header.message_id))
    assert parse_header(forged).context["sealstream:proof"] == header.context["sealstream:proof"]
    for message, data in ((genuine, DATA), (forged, forged_data)):
        opened = decrypt(client, message)
        assert opened.status_code == 200 and opened.content == data
        assert opened.headers["X-Message-Proven"] == "false"
    held_here = written(
        [RsaKeyring("rsaKey#1", public_rsa_key(client))], service_pairs(), endorse=proof
    )
    assert decrypt(client, held_here).headers["X-Message-Proven"] == "true"

    monkeypatch.setattr(api.settings, "refuse_unproven_messages", True)
    problem(decrypt(client, forged), 422, "message-unproven")
    problem(
        exchange(api.url, REENCRYPT, form({"kid": "rsaKey"}, [forged])), 422, "message-unproven"
    )


def test_a_recipient_dropped_from_a_message_breaks_its_proof(
    api: Api, client: httpx.Client
) -> None:
    """A partner of an unsigned message an older build wrote knows its data key: it
    drops its own EDK, so that the message looks sealed for the service's key alone."""
    _, partner = partner_jwks()["rsa"]
    ours = RsaKeyring("rsaKey#1", public_rsa_key(client))
    drawn = (os.urandom(32), os.urandom(32))
    proof = service_proof(api).endorse
    genuine = written([ours, partner], service_pairs(), endorse=proof, drawn=drawn)
    assert decrypt(client, genuine).headers["X-Message-Proven"] == "false"  # a partner's
    dropped = written([ours], parse_header(genuine).context, drawn=drawn)
    assert key_names(parse_header(dropped)) == ["rsaKey#1"]
    problem(decrypt(client, dropped), 400, "message-proof-invalid")
    moved = written([partner, ours], parse_header(genuine).context, drawn=drawn)
    problem(decrypt(client, moved), 400, "message-proof-invalid")


def test_a_proof_made_by_another_deployment_is_unproven_not_invalid(
    api: Api, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = [RsaKeyring("rsaKey#1", public_rsa_key(client))]
    elsewhere = written(ours, service_pairs(), endorse=Provenance(os.urandom(32)).endorse)
    opened = decrypt(client, elsewhere)
    assert opened.status_code == 200 and opened.headers["X-Message-Proven"] == "false"
    proof = parse_header(written(ours, service_pairs(), endorse=service_proof(api).endorse))
    form_, key_id, _ = proof.context["sealstream:proof"].split(":")
    assert (form_, key_id) == ("v2", service_proof(api).key_id) and len(key_id) == 8
    spoilt = f"v2:{key_id}:{base64.b64encode(bytes(32)).decode()}"
    problem(
        decrypt(client, outside_message(client, **{"sealstream:proof": spoilt})),
        400,
        "message-proof-invalid",
    )
    monkeypatch.setattr(api.settings, "refuse_unproven_messages", True)
    problem(decrypt(client, elsewhere), 422, "message-unproven")


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_a_proof_in_the_first_form_proves_a_signed_message_only(
    api: Api, client: httpx.Client, signed: bool
) -> None:
    """Builds before recipients were bound wrote the MAC alone, over the binding
    without them: it still proves a signed message, whose footer binds every EDK."""
    ours = RsaKeyring("rsaKey#1", public_rsa_key(client))
    key = api.records.key.derive(MESSAGE_PROOF_PURPOSE)

    def first_form(binding: bytes) -> dict[str, str]:
        fields = binding[len(b"sealstream/header-binding/v2\x00") : -len(recipients_field(ours))]
        mac = hmac.digest(key, b"sealstream/header-binding/v1\x00" + fields, "sha256")
        return {"sealstream:proof": base64.b64encode(mac).decode()}

    message = written([ours], service_pairs(), endorse=first_form, signed=signed)
    opened = decrypt(client, message)
    assert opened.status_code == 200 and opened.content == DATA
    assert opened.headers["X-Message-Proven"] == ("true" if signed else "false")


def recipients_field(keyring: Keyring) -> bytes:
    """The recipients' part of a v2 header binding for one keyring (docs/FORMAT.md)."""
    provider, name = keyring.recipient
    return (
        struct.pack(">HH", 1, len(provider))
        + provider.encode()
        + struct.pack(">H", len(name))
        + name
    )
