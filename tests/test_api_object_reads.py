"""Reading stored objects fails closed, over real HTTP on both backends.

Whoever can write the bucket controls a stored object's size, so before anything is
answered the object's header and its final frame must authenticate, and its size must be
the one they imply. A damaged object (cut, extended, tampered) is refused by every range
form and whole, record or no record, before a byte of body; an object without a record
(written by the aws-encryption-sdk package, say) is refused, or served on its own
authentication where `SEALSTREAM_SERVE_UNRECORDED_OBJECTS` allows it; and no `Range`
header, however hostile, gets a 5xx.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import aws_encryption_sdk
import httpx
import pytest
from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
from aws_cryptographic_material_providers.mpl.models import (
    AesWrappingAlg,
    CreateRawAesKeyringInput,
)
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy

import services.keys
from envelope import PROVIDER_ID, parse_header
from keystore.algorithms import b64url
from services.keys import TENANT_CONTEXT_KEY
from storage.records import record_key
from tests.conftest import Api, api_settings, live_api
from tests.support.data import flip_bit, random_bytes
from tests.support.envelope import frame_count, frame_offset, seal_frames, sealer_for
from tests.support.http import (
    DECRYPT,
    KEYS,
    Exchange,
    create_key,
    encrypt,
    exchange,
    form,
    problem,
    read_back,
    read_object,
)
from tests.support.waiting import wait_until
from tests.test_api_signed_messages import partner_jwks
from tests.test_envelope_ranged import signature_of_length

FRAME = 4096
SIZE = 300_000  # 73 regular frames and a final frame of 992 bytes
DATA = random_bytes(SIZE, seed=18)
# Every range form, and none: from the start, a slice, the middle, the end, a suffix.
RANGE_FORMS = [
    None,
    "bytes=0-",
    "bytes=0-99",
    f"bytes={10 * FRAME + 5}-{12 * FRAME}",
    f"bytes={SIZE - 10}-",
    "bytes=-100",
]


def damaged_versions(message: bytes) -> dict[str, bytes]:
    """`message` cut, extended or changed in each way a bucket writer might."""
    final = frame_offset(message, frame_count(message))
    return {
        "cut-at-a-frame-boundary": message[: frame_offset(message, 50)],
        "cut-before-the-final-frame": message[:final],
        "cut-inside-a-frame": message[: frame_offset(message, 50) + 1000],
        "cut-inside-the-final-frame": message[:-10],
        "cut-inside-the-header": message[: frame_offset(message, 0) - 10],
        "header-only": message[: frame_offset(message, 0)],
        "empty": b"",
        "bytes-appended": message + bytes(100),
        "a-frame-appended": message + message[frame_offset(message, 7) : frame_offset(message, 8)],
        "a-frame-dropped": message[: frame_offset(message, 10)]
        + message[frame_offset(message, 11) :],
        "final-frame-swapped-with-the-last-frame": message[: final - FRAME - 32]
        + message[final:]
        + message[final - FRAME - 32 : final],
        "final-frame-tampered": flip_bit(message, len(message) - 20),
        "header-tampered": flip_bit(message, frame_offset(message, 0) - 1),
        "not-a-message": b"not a message" * 100,
    }


@pytest.fixture(params=["local", "s3"])
def lenient_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """A live server of each backend that serves objects it has no record of."""
    settings = api_settings(request.param, tmp_path, request)
    with live_api(settings.model_copy(update={"serve_unrecorded_objects": True})) as api:
        yield api


def refused_as_damaged(response: httpx.Response, key: str) -> None:
    """A 502 problem before any body, naming the object as the client did, never by its
    storage key."""
    body = problem(response, 502, "object-damaged")
    assert repr(key) in body["detail"] and "tenants/" not in body["detail"], body


def delete_record(api: Api, storage_key: str) -> None:
    """Take an object's record away, as anyone who can write the bucket could."""
    api.records.store.delete(record_key(api.objects.bucket, storage_key))


@pytest.mark.parametrize("record", [True, False], ids=["record-kept", "record-deleted"])
def test_a_damaged_object_is_refused_by_every_range_and_whole(
    lenient_api: Api, record: bool
) -> None:
    api = lenient_api
    with api.client() as client:
        create_key(client)
        for name, content in damaged_versions(
            encrypt(client, DATA, frameLength=FRAME).content
        ).items():
            stored = encrypt(client, DATA, frameLength=FRAME, destination={"key": name}).json()
            api.objects.put(stored["storageKey"], content)
            if not record:
                delete_record(api, stored["storageKey"])
            for range_header in RANGE_FORMS:
                refused_as_damaged(read_object(client, name, range_header), name)


# Objects without a record

SDK = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
)
MPL = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())


def sdk_encrypt(material: bytes, key_name: str, data: bytes) -> bytes:
    """`data` sealed by the aws-encryption-sdk package, with a raw AES keyring over
    `material`, for the default tenant (the context pair every decrypt requires)."""
    keyring = MPL.create_raw_aes_keyring(
        input=CreateRawAesKeyringInput(
            key_namespace=PROVIDER_ID,
            key_name=key_name,
            wrapping_key=material,
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    message, _ = SDK.encrypt(
        source=data,
        keyring=keyring,
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=FRAME,
        encryption_context={TENANT_CONTEXT_KEY: "default", "written-by": "aws-encryption-sdk"},
    )
    return bytes(message)


def store_without_record(api: Api, client: httpx.Client, writer: str, data: bytes) -> str:
    """An object holding `data`, written by `writer` and without an object record; its key."""
    if writer == "sealstream":
        stored = encrypt(client, data, frameLength=FRAME, destination={"key": writer}).json()
        delete_record(api, stored["storageKey"])
        return writer
    material = os.urandom(32)
    imported = {"kid": "byok", "jwk": {"kty": "oct", "alg": "AES-256", "k": b64url(material)}}
    assert client.post(f"{KEYS}/import", json=imported).status_code == 201
    api.objects.put(f"tenants/default/{writer}", sdk_encrypt(material, "byok#1", data))
    return writer


@pytest.mark.parametrize(
    ("writer", "size"),
    [("sealstream", SIZE), ("aws-encryption-sdk", SIZE), ("aws-encryption-sdk", 64 * FRAME)],
    ids=["sealstream", "aws-encryption-sdk", "aws-encryption-sdk-whole-frames"],
)
def test_an_object_without_a_record_is_served_on_its_own_authentication(
    lenient_api: Api, writer: str, size: int
) -> None:
    """Served whole and by every range exactly; cut at a frame boundary, refused."""
    api, data = lenient_api, DATA[:size]
    with api.client() as client:
        create_key(client)
        key = store_without_record(api, client, writer, data)
        for response in read_back(client, key, data, FRAME):
            assert response.headers["X-Key-Used"] in ("mySymKey#1", "byok#1")
        storage_key = f"tenants/default/{key}"
        message = api.objects.get(storage_key)
        api.objects.put(storage_key, message[: frame_offset(message, frame_count(message) // 2)])
        for range_header in RANGE_FORMS:
            refused_as_damaged(read_object(client, key, range_header), key)


@pytest.mark.parametrize("writer", ["sealstream", "aws-encryption-sdk"])
def test_an_object_without_a_record_is_refused_by_default(api: Api, writer: str) -> None:
    """Nothing says the service stored it: anyone with a public key could have."""
    with api.client() as client:
        create_key(client)
        key = store_without_record(api, client, writer, DATA)
        for range_header in RANGE_FORMS:
            body = problem(read_object(client, key, range_header), 502, "object-unrecorded")
            assert repr(key) in body["detail"] and "tenants/" not in body["detail"], body


# Range headers, hostile or odd: a 206, a 416, or ignored (the whole plaintext); never a 5xx

MANY = 5000  # digits: more than Python converts to an int
HOSTILE_RANGES: list[tuple[str, int, tuple[int, int] | None]] = [
    # (Range, status, the range a 206 holds)
    ("bytes=" + "9" * MANY + "-", 416, None),
    ("bytes=0-" + "9" * MANY, 206, (0, SIZE - 1)),
    ("bytes=-" + "9" * MANY, 206, (0, SIZE - 1)),
    ("bytes=" + "0" * MANY + "5-" + "0" * MANY + "9", 206, (5, 9)),
    ("bytes=" + "9" * MANY + "-" + "9" * MANY, 416, None),
    ("bytes=-" + "0" * MANY, 416, None),
    (f"bytes={2**64}-", 416, None),
    (f"bytes=0-{2**64}", 206, (0, SIZE - 1)),
    (f"bytes=-{2**64}", 206, (0, SIZE - 1)),
    ("bytes=-0", 416, None),
    ("bytes=-000", 416, None),
    (f"bytes={SIZE}-{SIZE}", 416, None),
    ("BYTES=0-9", 206, (0, 9)),
    ("Bytes=-5", 206, (SIZE - 5, SIZE - 1)),
    (" bytes=0-9 \t", 206, (0, 9)),  # whitespace around a field value is not part of it
    ("bytes = 0-9", 200, None),
    ("bytes=0 -9", 200, None),
    ("bytes=\t0-9", 200, None),
    ("bytes=0-9,20-29", 200, None),
    ("bytes=0-9, 20-29", 200, None),
    ("bytes=0-9,", 200, None),
    ("bytes=,0-9", 200, None),
    ("bytes=--5", 200, None),
    ("bytes=5--", 200, None),
    ("bytes=-5-", 200, None),
    ("bytes=1-2-3", 200, None),
    ("bytes=+5-", 200, None),
    ("bytes=0x10-", 200, None),
    ("bytes=1e3-", 200, None),
    ("bytes=9-5", 200, None),
    ("bytes=", 200, None),
    ("bytes=-", 200, None),
    ("bytes", 200, None),
    ("items=0-9", 200, None),
    ("", 200, None),
]


def read_with(api: Api, headers: dict[str, str]) -> Exchange:
    """Read the object "ranged" with `headers` sent as they are, byte for byte."""
    return exchange(api.url, DECRYPT, form({"source": {"key": "ranged"}}, None), headers=headers)


def test_hostile_range_headers_never_get_a_5xx(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        encrypt(client, DATA, frameLength=FRAME, destination={"key": "ranged"})
    for range_header, status, wanted in HOSTILE_RANGES:
        response = read_with(api, {"Range": range_header})
        assert response.complete and response.status == status, range_header[:40]
        if status == 416:
            problem(response, 416, "range-not-satisfiable")
            assert response.headers["Content-Range"] == f"bytes */{SIZE}"
        elif wanted is None:
            assert response.body == DATA, range_header[:40]
        else:
            first, last = wanted
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
            assert response.body == DATA[first : last + 1], range_header[:40]
    # Two Range lines make one list of two ranges, which is ignored like any other.
    twice = read_with(api, {"Range": "bytes=0-9", "range": "bytes=20-29"})
    assert twice.complete and twice.status == 200 and twice.body == DATA


# An object's plaintext against its record


def test_an_older_message_put_back_under_its_key_is_refused(api: Api) -> None:
    """A rollback: the first version of an object, authentic, proven and sealed for the
    same place, put back over the second by whoever can write the bucket."""
    first, second = DATA, random_bytes(SIZE, seed=19)
    with api.client() as client:
        create_key(client)
        stored = encrypt(client, first, frameLength=FRAME, destination={"key": "doc"}).json()
        older = api.objects.get(stored["storageKey"])
        place = {"key": "doc", "overwrite": True}
        assert encrypt(client, second, frameLength=FRAME, destination=place).status_code == 201
        api.objects.put(stored["storageKey"], older)
        for range_header in RANGE_FORMS:
            answer = read_object(client, "doc", range_header)
            body = problem(answer, 502, "object-damaged")
            assert "not the one stored there" in body["detail"]


@pytest.mark.parametrize("size", [SIZE, 73 * FRAME], ids=["final-frame", "empty-final-frame"])
def test_other_frames_under_the_stored_header_abort_a_whole_read(api: Api, size: int) -> None:
    """A recipient of a message sealed for several (unsigned, as builds before every
    message for a partner was signed wrote it), holding its data key, writes other frames
    under the very header stored: the header matches the record, every frame
    authenticates, and only the plaintext's digest tells. The answer stops short of its
    length, its last bytes never sent, even when its final frame is empty (a plaintext of
    whole frames); ranges, which the digest cannot cover, are served."""
    jwk, partner = partner_jwks()["rsa"]
    forged_data = random_bytes(size, seed=20)
    with api.client() as client, pytest.MonkeyPatch.context() as patch:
        create_key(client)
        metadata = {"recipientPublicKey": jwk, "signed": False, "destination": {"key": "shared"}}
        patch.setattr(services.keys, "known_outside", lambda *_: False)
        stored = encrypt(client, DATA[:size], frameLength=FRAME, **metadata).json()
        patch.undo()
        message = api.objects.get(stored["storageKey"])
        header = parse_header(message)
        forged = message[: header.length] + seal_frames(
            sealer_for(header, partner), forged_data, FRAME
        )
        assert len(forged) == len(message)
        api.objects.put(stored["storageKey"], forged)
        assert read_object(client, "shared", "bytes=0-99").content == forged_data[:100]
    whole = exchange(api.url, DECRYPT, form({"source": {"key": "shared"}}, None))
    assert whole.status == 200 and not whole.complete
    assert whole.size < size and forged_data.startswith(whole.body)
    with api.client() as client:
        wait_until(lambda: aborted_as_damaged(client), "the aborted read's audit event")


def aborted_as_damaged(client: httpx.Client) -> bool:
    events = client.get("/api/audit", params={"limit": 1000}).json()["events"]
    return any(
        (event.get("aborted"), event.get("code")) == (True, "object-damaged") for event in events
    )


# Signed objects whose footer is not as long as this package writes it


@pytest.mark.parametrize("length", [101, 102, 104])
@pytest.mark.parametrize("final", [0, 5, FRAME])
def test_a_signed_object_of_any_signature_length_reads_whole_and_by_range(
    api: Api, monkeypatch: pytest.MonkeyPatch, length: int, final: int
) -> None:
    """Other writers do not pad their footer's signature to a fixed length (nor does
    the server here, told not to): its final frame, not an assumed footer, says where the
    body ends."""
    monkeypatch.setattr("envelope.footer._static_length_signature", signature_of_length(length))
    data = DATA[: 20 * FRAME + final]
    with api.client() as client:
        create_key(client)
        place = {"key": "signed"}
        assert encrypt(client, data, frameLength=FRAME, signed=True, destination=place).is_success
        message = api.objects.get("tenants/default/signed")
        assert int.from_bytes(message[-length - 2 : -length]) == length
        read_back(client, "signed", data, FRAME)


# What a range of a stored object says of its provenance


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_a_range_of_a_message_a_partner_can_rewrite_is_never_proven(api: Api, signed: bool) -> None:
    """A partner recipient who can write the bucket rewrites the frames of a recorded
    message under its header (a signed message keeping its footer): a range checks
    neither footer nor recorded digest, so it serves the partner's frames, and must not
    call them the service's, signed or recorded as the message is. A range of a message
    only the service's own key opens stays proven."""
    jwk, partner = partner_jwks()["rsa"]
    forged_data = random_bytes(SIZE, seed=21)
    with api.client() as client, pytest.MonkeyPatch.context() as patch:
        create_key(client)
        assert encrypt(client, DATA, frameLength=FRAME, destination={"key": "ours"}).is_success
        metadata = {"recipientPublicKey": jwk, "destination": {"key": "shared"}}
        if not signed:  # as builds before every message for a partner was signed wrote it
            patch.setattr(services.keys, "known_outside", lambda *_: False)
        stored = encrypt(client, DATA, frameLength=FRAME, signed=False, **metadata).json()
        patch.undo()
        message = api.objects.get(stored["storageKey"])
        header = parse_header(message)
        assert header.signed == signed
        frames = seal_frames(sealer_for(header, partner), forged_data, FRAME)
        footer = message[header.length + len(frames) :]
        api.objects.put(stored["storageKey"], message[: header.length] + frames + footer)
        ranged = read_object(client, "shared", "bytes=0-99")
        assert ranged.status_code == 206 and ranged.content == forged_data[:100]
        assert ranged.headers["X-Message-Proven"] == "false"
        ours = read_object(client, "ours", "bytes=0-99")
        assert ours.status_code == 206 and ours.content == DATA[:100]
        assert ours.headers["X-Message-Proven"] == "true"
