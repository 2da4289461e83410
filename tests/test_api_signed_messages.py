"""Signed messages and provenance over real HTTP: a signed message (suite 0x0578) written
on request, read back whole with its footer checked before the stream ends, and in ranges
that say their footer was not checked; and the service's proof that it wrote a message,
checked on every read: valid, absent (reported, or refused when set to), or forged."""

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from envelope import Encryptor, RsaKeyring, parse_header
from tests.conftest import Api, live_api, local_settings
from tests.support.data import KiB, flip_bit, pieces, random_bytes
from tests.support.http import (
    DECRYPT,
    ENCRYPT,
    create_key,
    decrypt,
    encrypt,
    exchange,
    form,
    post_form,
    problem,
    read_object,
)

FRAME = 4096
DATA = random_bytes(200 * KiB + 9, seed=23)
REENCRYPT = "/api/crypto/stream/reencrypt"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with live_api(local_settings(tmp_path_factory.mktemp("signed"))) as api:
        with api.client() as client:
            create_key(client)
            create_key(client, kid="rsaKey", kty="RSA", alg="RSA-OAEP-256", keySize=2048)
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


def public_rsa_key(client: httpx.Client) -> rsa.RSAPublicKey:
    jwk = client.get("/api/key-management/keys/rsaKey").json()["publicJwk"]
    n, e = (int.from_bytes(base64.urlsafe_b64decode(jwk[f] + "=="), "big") for f in "ne")
    return rsa.RSAPublicNumbers(e, n).public_key()


def outside_message(client: httpx.Client, **extra: str) -> bytes:
    """A message written outside the service with the RSA key's public half, with the
    pairs the service writes (and `extra`): anyone holding that public key can."""
    context = {
        "sealstream:tenant": "default",
        "sealstream:kid": "rsaKey",
        "sealstream:key-version": "1",
        **extra,
    }
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
