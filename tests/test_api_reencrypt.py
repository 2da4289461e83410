"""Streaming re-encryption over real HTTP: a message streamed back under another key with
a fresh data key and message ID, frame in and frame out; a tampered or truncated message
aborting the stream before the new message could end; and objects re-encrypted from
storage to storage on both backends, with the reencrypt job's code."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from envelope import TruncatedMessage, key_names, parse_header
from envelope.frames import REGULAR_OVERHEAD
from services.inventory import VersionIndex
from tests.conftest import Api, live_api, local_settings
from tests.support.data import KiB, MiB, flip_bit, pieces, random_bytes, random_chunks
from tests.support.envelope import frame_count, frame_offset
from tests.support.http import (
    DECRYPT,
    Exchange,
    create_key,
    decrypt,
    encrypt,
    exchange,
    form,
    post_form,
    problem,
    read_object,
)
from tests.support.jobs import finished_job
from tests.support.memory import PeakRss
from tests.test_api_signed_messages import partner_jwks

REENCRYPT = "/api/crypto/stream/reencrypt"
FINAL_FRAME_MARKER = b"\xff\xff\xff\xff"
FRAME = 4096
DATA = random_bytes(300 * KiB + 17, seed=11)
LARGER = random_bytes(2 * MiB + 5, seed=12)  # well past what the response holds back


@pytest.fixture(scope="module")
def local_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One live server (local directory) with the documented AES key, an RSA key and an
    ML-KEM key, and a signing key."""
    with live_api(local_settings(tmp_path_factory.mktemp("reencrypt"))) as api:
        with api.client() as client:
            _keys(client)
        yield api


def _keys(client: httpx.Client) -> None:
    create_key(client)
    create_key(client, kid="rsaKey", kty="RSA", alg="RSA-OAEP-256", keySize=2048)
    create_key(client, kid="pqKey", kty="ML-KEM", alg="ML-KEM-768")
    create_key(client, kid="signer", kty="EC", alg="ES256", keyOps=["sign", "verify"])


@pytest.fixture
def client(local_api: Api) -> Iterator[httpx.Client]:
    with local_api.client() as client:
        yield client


def message_of(client: httpx.Client, data: bytes = DATA, **metadata: Any) -> bytes:
    response = encrypt(client, data, frameLength=FRAME, **metadata)
    assert response.status_code == 200, response.text
    return response.content


def reencrypted(api: Api, message: bytes, **metadata: Any) -> Exchange:
    body = form({"kid": "pqKey", **metadata}, pieces(message, 64 * KiB))
    return exchange(api.url, REENCRYPT, body)


def no_final_frame(output: bytes) -> bool:
    """Whether no final frame begins in `output` (a new message, cut off anywhere): each
    frame, regular ones included, starts where the one before it ends, and only the
    final frame starts with the end marker."""
    try:
        header = parse_header(output)
    except TruncatedMessage:
        return True  # not even a header
    stride = header.frame_length + REGULAR_OVERHEAD
    starts = range(header.length, len(output), stride)
    return all(output[start : start + 4] != FINAL_FRAME_MARKER for start in starts)


def test_a_message_streams_back_under_another_key_with_a_fresh_data_key(
    local_api: Api, client: httpx.Client
) -> None:
    old = message_of(client, encryptionContext={"purpose": "q3"})
    answer = reencrypted(local_api, old, sourceKid="mySymKey", encryptionContext={"purpose": "q3"})
    assert answer.status == 200 and answer.complete, answer.body[:300]
    new = answer.body
    assert answer.headers["X-Source-Key-Requested"] == "mySymKey"
    assert answer.headers["X-Source-Key-Used"] == "mySymKey#1"
    assert answer.headers["X-Source-Algorithm-Used"] == "AES-256"
    assert answer.headers["X-Key-Requested"] == "pqKey"
    assert answer.headers["X-Key-Used"] == "pqKey#1"
    assert answer.headers["X-Algorithm-Used"] == "ML-KEM-768"
    old_header, new_header = parse_header(old), parse_header(new)
    assert new_header.message_id != old_header.message_id
    assert key_names(new_header) == ["pqKey#1"]
    assert new_header.frame_length == old_header.frame_length == FRAME
    assert new_header.context["purpose"] == "q3"
    assert new_header.context["sealstream:kid"] == "pqKey"
    opened = decrypt(client, new, kid="pqKey", encryptionContext={"purpose": "q3"})
    assert opened.status_code == 200 and opened.content == DATA
    # And back again, to RSA: any key that encrypts, from any key that decrypts.
    back = reencrypted(local_api, new, kid="rsaKey")
    assert back.complete and decrypt(client, back.body).content == DATA


def test_the_source_is_checked_before_any_byte_is_answered(
    local_api: Api, client: httpx.Client
) -> None:
    old = message_of(client)
    problem(reencrypted(local_api, old, sourceKid="rsaKey"), 422, "key-mismatch")
    mismatch = reencrypted(local_api, old, encryptionContext={"purpose": "other"})
    problem(mismatch, 422, "encryption-context-mismatch")
    problem(reencrypted(local_api, old, kid="signer"), 403, "operation-not-permitted")
    problem(reencrypted(local_api, old, kid="nope"), 404, "key-not-found")
    problem(
        reencrypted(local_api, flip_bit(old, parse_header(old).length - 5)),
        400,
        "header-authentication-failed",
    )
    problem(post_form(client, REENCRYPT, {}, old), 422, "missing-kid")
    only_destination = {"kid": "pqKey", "destination": {"key": "x"}}
    problem(post_form(client, REENCRYPT, only_destination, old), 422, "invalid-destination")


@pytest.mark.parametrize(
    ("spoil", "what"),
    [
        (lambda m: flip_bit(m, frame_offset(m, 300) + 100), "a frame tampered"),
        (lambda m: flip_bit(m, frame_offset(m, frame_count(m)) + 30), "the final frame tampered"),
        (lambda m: m[: frame_offset(m, frame_count(m))], "no final frame"),
        (lambda m: m + b"\x00" * 3, "bytes after the final frame"),
        (lambda m: m[: frame_offset(m, 300)] + m[frame_offset(m, 301) :], "a frame dropped"),
    ],
    ids=["tampered-frame", "tampered-final-frame", "no-final-frame", "trailing", "dropped"],
)
def test_a_spoiled_source_aborts_before_the_new_message_can_end(
    local_api: Api, client: httpx.Client, spoil: Any, what: str
) -> None:
    answer = reencrypted(local_api, spoil(message_of(client, LARGER)))
    assert answer.status == 200 and not answer.complete, what
    # The new message's final frame waits for the old one's: what came out is regular
    # frames only, which no decrypt accepts as a message. (It may be nothing at all: the
    # abort resets the connection, and a reset discards what the client had not read yet.)
    assert no_final_frame(answer.body), what
    cut_short = exchange(local_api.url, DECRYPT, form({}, [answer.body]))
    assert cut_short.status != 200 or not cut_short.complete, what


def test_a_large_message_is_reencrypted_in_constant_memory(
    local_api: Api, client: httpx.Client
) -> None:
    # The server reads bodies in pieces of up to 4 MiB, a few of which are in flight at
    # once (the read, the parser's copy, the frame being sealed): a bound of 32 MiB on a
    # message three times that size tells constant memory from holding the message.
    size = 96 * MiB
    sealed = exchange(
        local_api.url,
        "/api/crypto/stream/encrypt",
        form({"kid": "mySymKey"}, random_chunks(size, seed=5)),
    )
    assert sealed.complete
    peak = PeakRss()
    peak.reset()
    body = form({"kid": "rsaKey"}, pieces(sealed.body, MiB))
    answer = exchange(local_api.url, REENCRYPT, body, keep_body=False)
    assert answer.status == 200 and answer.complete and answer.size > size
    assert peak.growth() < 32 * MiB


def test_reencrypt_takes_both_crypto_scopes(local_api: Api, client: httpx.Client) -> None:
    old = message_of(client)
    token = client.post(
        "/api/admin/tokens", json={"tenant": "default", "scopes": ["crypto:decrypt"]}
    ).json()["token"]
    with local_api.client(token) as decrypter:
        problem(post_form(decrypter, REENCRYPT, {"kid": "pqKey"}, old), 403, "insufficient-scope")


def test_storage_to_storage_into_another_object_and_in_place(api: Api, tmp_path: Path) -> None:
    with api.client() as client:
        _keys(client)
        stored = encrypt(client, DATA, frameLength=FRAME, destination={"key": "q3/old.bin"})
        assert stored.status_code == 201, stored.text
        metadata = {"kid": "pqKey", "source": {"key": "q3/old.bin"}}
        moved = post_form(
            client, REENCRYPT, {**metadata, "destination": {"key": "q3/new.bin"}}, None
        )
        assert moved.status_code == 201, moved.text
        body = moved.json()
        assert (body["key"], body["kid"], body["keyVersion"]) == ("q3/new.bin", "pqKey", 1)
        assert moved.headers["X-Source-Key-Used"] == "mySymKey#1"
        assert moved.headers["X-Key-Used"] == "pqKey#1"
        assert read_object(client, "q3/new.bin").content == DATA
        assert read_object(client, "q3/old.bin", kid="mySymKey").content == DATA
        again = post_form(
            client, REENCRYPT, {**metadata, "destination": {"key": "q3/new.bin"}}, None
        )
        problem(again, 409, "object-exists")
        in_place = post_form(client, REENCRYPT, {**metadata, "sourceKid": "mySymKey"}, None)
        assert in_place.status_code == 201 and in_place.json()["key"] == "q3/old.bin"
        assert read_object(client, "q3/old.bin", kid="pqKey").content == DATA
        # The index of key versions follows: the copy is marked under its key, and the
        # object re-encrypted in place leaves its old version's index.
        assert _marked(api, "mySymKey") == []
        assert _marked(api, "pqKey") == ["tenants/default/q3/new.bin", "tenants/default/q3/old.bin"]
        stale = post_form(client, REENCRYPT, {**metadata, "sourceKid": "mySymKey"}, None)
        problem(stale, 422, "key-mismatch")
        problem(
            post_form(client, REENCRYPT, {"kid": "pqKey", "source": {"key": "absent"}}, None),
            404,
            "object-not-found",
        )


def test_storage_to_storage_demands_the_context_given_and_starts_a_verify_job(
    local_api: Api, client: httpx.Client
) -> None:
    context = {"dept": "finance"}
    stored = encrypt(client, DATA, destination={"key": "ctx/old.bin"}, encryptionContext=context)
    assert stored.status_code == 201, stored.text
    metadata = {"kid": "rsaKey", "source": {"key": "ctx/old.bin"}}
    wrong = {**metadata, "encryptionContext": {"dept": "sales"}}
    problem(post_form(client, REENCRYPT, wrong, None), 422, "encryption-context-mismatch")
    moved = post_form(
        client,
        REENCRYPT,
        {**metadata, "encryptionContext": context, "destination": {"key": "ctx/new.bin"}},
        None,
    )
    assert moved.status_code == 201, moved.text
    job = finished_job(client, moved.json()["verifyJob"])
    assert job["status"] == "succeeded", job
    assert job["params"]["key"] == "ctx/new.bin"
    opened = read_object(client, "ctx/new.bin", encryptionContext=context)
    assert opened.status_code == 200 and opened.content == DATA


def test_an_object_for_several_keys_keeps_every_other_key_when_reencrypted(
    local_api: Api, client: httpx.Client
) -> None:
    """The key it moves from is replaced by the one it moves to; the others still open
    it. One sealed for a partner's key too is refused, and left as it was."""
    several = {"kid": ["mySymKey", "rsaKey"], "destination": {"key": "multi/old.bin"}}
    assert encrypt(client, DATA, frameLength=FRAME, **several).status_code == 201
    metadata = {"kid": "pqKey", "sourceKid": "mySymKey", "source": {"key": "multi/old.bin"}}
    for key in ("multi/new.bin", "multi/old.bin"):  # into another object, then in place
        place = {} if key == "multi/old.bin" else {"destination": {"key": key}}
        moved = post_form(client, REENCRYPT, {**metadata, **place}, None)
        assert moved.status_code == 201, moved.text
        assert moved.headers["X-Key-Used"] == "pqKey#1, rsaKey#1"
        assert moved.headers["X-Algorithm-Used"] == "ML-KEM-768, RSA-OAEP-256"
        header = parse_header(local_api.objects.get(f"tenants/default/{key}"))
        assert key_names(header) == ["pqKey#1", "rsaKey#1"] and header.signed
        for kid in ("pqKey", "rsaKey"):
            assert read_object(client, key, kid=kid).content == DATA
        problem(read_object(client, key, kid="mySymKey"), 422, "key-mismatch")

    jwk, _ = partner_jwks()["rsa"]
    shared = {"recipientPublicKey": jwk, "destination": {"key": "multi/shared.bin"}}
    assert encrypt(client, DATA, frameLength=FRAME, **shared).status_code == 201
    before = local_api.objects.get("tenants/default/multi/shared.bin")
    source = {"kid": "pqKey", "source": {"key": "multi/shared.bin"}}
    for request in (source, {**source, "destination": {"key": "multi/shared-new.bin"}}):
        refused = problem(post_form(client, REENCRYPT, request, None), 409, "recipient-not-held")
        assert "jwk#" in refused["detail"]
    assert local_api.objects.get("tenants/default/multi/shared.bin") == before
    assert not list(local_api.objects.list("tenants/default/multi/shared-new.bin"))


def _marked(api: Api, kid: str) -> list[str]:
    """The storage keys the index lists under `kid#1`, sorted."""
    return sorted(
        m.storage_key
        for m in VersionIndex(api.records, api.parts.spaces).markers("default", kid, 1)
    )


def test_both_keys_usage_warnings_come_with_each_reencrypt_answer(
    local_api: Api, client: httpx.Client
) -> None:
    create_key(client, kid="warnFrom", softUsageLimit=1)
    create_key(client, kid="warnTo", softUsageLimit=1, maxUsageLimit=9)
    stored = encrypt(client, DATA, kid="warnFrom", destination={"key": "warn/old.bin"})
    assert stored.status_code == 201, stored.text
    # Storage to storage: the old message's opening and the new one's sealing count.
    source = {"kid": "warnTo", "source": {"key": "warn/old.bin"}}
    moved = post_form(client, REENCRYPT, {**source, "destination": {"key": "warn/new.bin"}}, None)
    assert moved.status_code == 201, moved.text
    assert moved.headers["X-Source-Key-Usage-Limit-Warning"] == "usageCount=2; softUsageLimit=1"
    assert moved.headers["X-Key-Usage-Limit-Warning"] == (
        "usageCount=1; softUsageLimit=1; maxUsageLimit=9"
    )
    # Streamed, the same headers.
    old = message_of(client, kid="warnFrom")
    answer = reencrypted(local_api, old, kid="warnTo")
    assert answer.status == 200 and answer.complete
    assert answer.headers["X-Source-Key-Usage-Limit-Warning"] == "usageCount=4; softUsageLimit=1"
    assert answer.headers["X-Key-Usage-Limit-Warning"] == (
        "usageCount=2; softUsageLimit=1; maxUsageLimit=9"
    )
