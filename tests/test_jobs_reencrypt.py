"""The reencrypt job over real HTTP on both backends, and under a real Celery worker: after a
rotation, stored objects are sealed again under a fresh data key and message ID for the
key's primary version, checked before they are swapped in, and left alone when they no
longer decrypt to what was uploaded; reruns, kills and cancels leave no upload pending.

Also: objects that the former header-only rewrap moved are found and re-encrypted, and
no (key, IV) is sealed twice anywhere in the service while all this happens."""

import base64
import dataclasses
import hashlib
import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import services.keys
import services.reencrypt
from envelope import (
    AesKeyring,
    DataKeyUnavailable,
    Encryptor,
    Header,
    Keyring,
    key_names,
    parse_header,
)
from envelope.context import serialize_context
from envelope.frames import FrameOpener, FrameSealer
from envelope.header import PUBLIC_KEY_CONTEXT_KEY, serialize_header_body
from envelope.suite import derive_keys
from keystore import KeyRecord
from sealstream.wiring import Parts, build_parts
from services.jobs import JobKind, JobRecord, JobStatus, ReencryptParams, VerifyParams
from services.jobs import context as job_context
from services.keys import Sealing
from storage import MIN_PART_SIZE, MultipartWriter, ObjectStore
from storage.records import ObjectRecord, load_record, save_record
from tests.conftest import Api, api_settings, live_api
from tests.support.data import random_bytes, random_chunks
from tests.support.envelope import decrypt_all, frame_count
from tests.support.http import KEYS, create_key, encrypt, read_object
from tests.support.jobs import JobStack, finished_job, get_job, no_job_queued
from tests.support.jobs import store_object as store_streamed
from tests.support.seals import SealRecorder
from tests.support.storage import leave_pending
from tests.support.waiting import wait_until
from workers import reencrypt
from workers.execution import run_job
from workers.lifecycle import run_sweeps
from workers.registry import JOB_BODIES

KID = "mySymKey"
FRAME = 64 * 1024
# Bigger than one minimum part by a few frames: on S3 the new object goes up in two parts.
SIZES = {"docs/empty": 0, "docs/small": 10_000, "docs/big": MIN_PART_SIZE + 3 * FRAME + 17}


def store_object(client: httpx.Client, key: str, data: bytes) -> dict[str, Any]:
    response = encrypt(client, data, destination={"key": key, "overwrite": True}, frameLength=FRAME)
    assert response.status_code == 201, response.text
    stored: dict[str, Any] = response.json()
    finished(client, stored["verifyJob"])  # so no verify job races the re-encryption
    return stored


def finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's record once it has a final status."""
    record: dict[str, Any] = {}

    def done() -> bool:
        record.update(client.get(f"/api/jobs/{job_id}").json())
        return record["status"] in ("succeeded", "failed", "cancelled")

    wait_until(done, f"job {job_id} to finish", timeout=120)
    return record


def start(client: httpx.Client, route: str = "reencrypt", **body: Any) -> httpx.Response:
    response = client.post(f"/api/jobs/{route}", json={"kid": KID, **body})
    assert response.status_code == 202, response.text
    return response


def reencrypt_job(client: httpx.Client, **body: Any) -> dict[str, Any]:
    return finished(client, start(client, **body).json()["id"])


def succeeded(job: dict[str, Any]) -> dict[str, Any]:
    assert job["status"] == "succeeded", job
    result: dict[str, Any] = job["result"]
    return result


def counts(result: dict[str, Any]) -> tuple[int, int, int, int]:
    return result["reencrypted"], result["skipped"], result["tampered"], result["failed"]


def version_keyring(client: httpx.Client, version: int) -> Keyring:
    """One version of the key, exported and made a keyring here, outside the service."""
    jwk = client.get(f"{KEYS}/{KID}/export", params={"version": version}).json()
    material = base64.urlsafe_b64decode(jwk["k"] + "=" * (-len(jwk["k"]) % 4))
    return AesKeyring(f"{KID}#{version}", material)


def named_keyring(client: httpx.Client, header: Header) -> Keyring:
    """The exported version of the key that the message's one EDK names."""
    (name,) = key_names(header)
    return version_keyring(client, int(name.rsplit("#", 1)[1]))


def data_key(header: Header, keyring: Keyring) -> bytes:
    (edk,) = header.encrypted_data_keys
    unwrapped = keyring.unwrap(edk, header.context_bytes)
    assert unwrapped is not None
    return unwrapped


def stored_bytes(objects: ObjectStore, storage_key: str) -> bytes:
    return b"".join(objects.read(storage_key))


def record_of(api: Api, storage_key: str) -> ObjectRecord:
    return load_record(api.records, api.objects.bucket, storage_key)


def nothing_pending(objects: ObjectStore) -> bool:
    # Tenants' objects only: the service's records are written at any time (usage counts).
    return not objects.pending_uploads("tenants/")


# A client, the plaintext of each object and its encrypt-to-storage answer.
Rotated = tuple[httpx.Client, dict[str, bytes], dict[str, dict[str, Any]]]


@pytest.fixture
def setup(api: Api) -> Iterator[Rotated]:
    """An exportable key, the objects of SIZES sealed under its version 1, then rotated.
    The objects are unsigned, as builds before every message for an exportable key was
    signed wrote them (and header-only rewrap, which some tests play, rewrote them)."""
    with api.client() as client, pytest.MonkeyPatch.context() as patch:
        create_key(client, exportable=True)
        patch.setattr(KeyRecord, "may_be_known_outside", False)
        data = {key: random_bytes(size, seed=len(key)) for key, size in SIZES.items()}
        stored = {key: store_object(client, key, plaintext) for key, plaintext in data.items()}
        patch.undo()
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        yield client, data, stored


def assert_reencrypted(
    api: Api, client: httpx.Client, key: str, data: bytes, storage_key: str, before: bytes
) -> None:
    """The object is a new message (another message ID and data key) for version 2 alone,
    reads and verifies through the service, and its record follows with a fresh date."""
    message, old = stored_bytes(api.objects, storage_key), parse_header(before)
    header = parse_header(message)
    assert key_names(header) == [f"{KID}#2"]
    assert header.context["sealstream:key-version"] == "2"
    assert header.message_id != old.message_id
    assert data_key(header, version_keyring(client, 2)) != data_key(old, named_keyring(client, old))
    assert decrypt_all([version_keyring(client, 2)], message) == data
    with pytest.raises(DataKeyUnavailable):
        decrypt_all([version_keyring(client, 1)], message)
    through_api = read_object(client, key)
    assert through_api.status_code == 200
    assert hashlib.sha256(through_api.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert through_api.headers["X-Key-Used"] == f"{KID}#2"
    verification = client.post("/api/jobs/verify", json={"key": key})
    assert succeeded(finished(client, verification.json()["id"]))["keyUsed"] == f"{KID}#2"
    info, record = api.objects.head(storage_key), record_of(api, storage_key)
    assert (record.key_version, record.etag, record.ciphertext_size) == (2, info.etag, info.size)
    assert record.created_at > key_version_created(client, 2)
    assert info.metadata["sealstream-key-version"] == "2"


def key_version_created(client: httpx.Client, version: int) -> datetime:
    versions = client.get(f"{KEYS}/{KID}").json()["versions"]
    (created,) = [v["createdAt"] for v in versions if v["version"] == version]
    return datetime.fromisoformat(created)


def test_a_prefix_is_reencrypted_to_the_primary_version(api: Api, setup: Rotated) -> None:
    client, data, stored = setup
    outside = store_object(client, "elsewhere/doc", b"not under the prefix")
    before = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    untouched = stored_bytes(api.objects, outside["storageKey"])

    result = succeeded(reencrypt_job(client, prefix="docs/"))

    assert counts(result) == (3, 0, 0, 0), result["failures"]
    assert (result["keyVersion"], result["failures"]) == (2, [])
    for key, plaintext in data.items():
        storage_key = stored[key]["storageKey"]
        assert_reencrypted(api, client, key, plaintext, storage_key, before[key])
    assert stored_bytes(api.objects, outside["storageKey"]) == untouched
    assert nothing_pending(api.objects)


@pytest.mark.parametrize("route", ["reencrypt", "rewrap"])
def test_the_headers_before_and_after_differ_in_message_id_and_data_key(
    api: Api, setup: Rotated, route: str
) -> None:
    """Through the job's name and its deprecated one alike: the object becomes another
    message, whose header shares nothing with the old one but the context's client pairs
    and the frame length."""
    client, _, stored = setup
    storage_key = stored["docs/small"]["storageKey"]
    old = parse_header(stored_bytes(api.objects, storage_key))

    response = start(client, route, key="docs/small")
    job = finished(client, response.json()["id"])

    new = parse_header(stored_bytes(api.objects, storage_key))
    old_key, new_key = (
        data_key(old, version_keyring(client, 1)),
        data_key(new, version_keyring(client, 2)),
    )
    assert new.message_id != old.message_id
    assert new_key != old_key
    assert new.commitment != old.commitment
    assert new.encrypted_data_keys != old.encrypted_data_keys
    assert new.frame_length == old.frame_length
    assert derive_keys(new_key, new.message_id).commitment == new.commitment
    assert (job["kind"], succeeded(job)["reencrypted"]) == (route, 1)
    if route == "rewrap":
        assert response.headers["Deprecation"].startswith("@")
        assert response.headers["Link"] == '</api/jobs/reencrypt>; rel="successor-version"'
        assert succeeded(job)["rewrapped"] == 1
    else:
        assert "Deprecation" not in response.headers
        assert "rewrapped" not in succeeded(job)


def test_a_reencrypt_request_names_one_object_or_one_prefix(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        for body in ({}, {"key": "a", "prefix": "b/"}, {"key": "a", "rewrapped": "maybe"}):
            response = client.post("/api/jobs/reencrypt", json={"kid": KID, **body})
            assert response.status_code in (400, 422), response.text
            assert response.headers["content-type"] == "application/problem+json"
        assert (
            client.post("/api/jobs/reencrypt", json={"kid": "nope", "key": "a"}).status_code == 404
        )


def test_one_object_is_reencrypted_and_a_second_run_changes_nothing(
    api: Api, setup: Rotated
) -> None:
    client, data, stored = setup
    storage_key = stored["docs/big"]["storageKey"]
    before = stored_bytes(api.objects, storage_key)

    first = succeeded(reencrypt_job(client, key="docs/big"))
    after_first = api.objects.head(storage_key)
    second = succeeded(reencrypt_job(client, key="docs/big"))

    assert (first["reencrypted"], second["skipped"], second["reencrypted"]) == (1, 1, 0)
    assert api.objects.head(storage_key) == after_first
    assert_reencrypted(api, client, "docs/big", data["docs/big"], storage_key, before)
    small = parse_header(stored_bytes(api.objects, stored["docs/small"]["storageKey"]))
    assert key_names(small) == [f"{KID}#1"]
    assert nothing_pending(api.objects)


def test_a_second_prefix_run_skips_everything(api: Api, setup: Rotated) -> None:
    client, _, stored = setup
    succeeded(reencrypt_job(client, prefix=""))
    etags = {key: api.objects.head(s["storageKey"]).etag for key, s in stored.items()}

    again = succeeded(reencrypt_job(client, prefix="", rewrapped=True))

    assert counts(again) == (0, 3, 0, 0), again["failures"]
    assert {key: api.objects.head(s["storageKey"]).etag for key, s in stored.items()} == etags


# Objects the former header-only rewrap moved


def legacy_rewrap(api: Api, client: httpx.Client, storage_key: str) -> None:
    """Do to a stored object what header-only rewrap did: the same data key and message
    ID under a header for version 2, tagged under the same key and IV as the old header;
    the record then names version 2 and keeps its createdAt, and (as `sealstream
    upgrade-records` leaves a record of that time) the header the object has now."""
    message = stored_bytes(api.objects, storage_key)
    header = parse_header(message)
    secret = data_key(header, version_keyring(client, 1))
    context_bytes = serialize_context({**header.context, "sealstream:key-version": "2"})
    body = serialize_header_body(
        message_id=header.message_id,
        context_bytes=context_bytes,
        encrypted_data_keys=(version_keyring(client, 2).wrap(secret, context_bytes),),
        frame_length=header.frame_length,
        commitment=header.commitment,
    )
    cipher = FrameSealer(derive_keys(secret, header.message_id).encryption_key, header.message_id)
    sealed_header = body + cipher.header_tag(body)
    metadata = {**api.objects.head(storage_key).metadata, "sealstream-key-version": "2"}
    replaced = api.objects.put(
        storage_key, sealed_header + message[header.length :], metadata=metadata
    )
    moved = {
        "key_version": 2,
        "etag": replaced.etag,
        "ciphertext_size": replaced.size,
        "header_sha256": hashlib.sha256(sealed_header).hexdigest(),
    }
    save_record(api.records, record_of(api, storage_key).model_copy(update=moved))


def forge_first_frame(api: Api, client: httpx.Client, storage_key: str) -> None:
    """Change the first byte of the object's plaintext and tag its frame again under the
    message's own key, as anyone can who has two headers of the message (and so GCM's
    hash key): the object still decrypts, to other bytes. Its record is left as it was."""
    message = bytearray(stored_bytes(api.objects, storage_key))
    header = parse_header(bytes(message))
    secret = data_key(header, named_keyring(client, header))
    key = derive_keys(secret, header.message_id).encryption_key
    final = frame_count(bytes(message)) == 0
    start, end = header.length, header.length + header.frame_length + 32
    frame = memoryview(message)[start : len(message) if final else end]
    plaintext = bytearray(FrameOpener(key, header.message_id).open(1, frame, final=final))
    plaintext[0] ^= 1
    forged = FrameSealer(key, header.message_id).seal(1, memoryview(plaintext), final=final)
    message[start : start + len(forged)] = forged
    api.objects.put(storage_key, bytes(message), metadata=api.objects.head(storage_key).metadata)


def test_objects_a_rewrap_moved_are_found_and_reencrypted(api: Api, setup: Rotated) -> None:
    """They are on the primary version already, so a plain run skips them; a run with
    `rewrapped` re-encrypts them, and none of those sealed for that version since."""
    client, data, stored = setup
    fresh = store_object(client, "docs/fresh", b"sealed under version 2")
    for key in ("docs/small", "docs/big"):
        legacy_rewrap(api, client, stored[key]["storageKey"])
    before = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    fresh_etag = api.objects.head(fresh["storageKey"]).etag

    plain = succeeded(reencrypt_job(client, prefix="docs/"))
    upgraded = succeeded(reencrypt_job(client, prefix="docs/", rewrapped=True))
    again = succeeded(reencrypt_job(client, prefix="docs/", rewrapped=True))

    assert counts(plain) == (1, 3, 0, 0), plain["failures"]  # docs/empty, still on version 1
    assert counts(upgraded) == (2, 2, 0, 0), upgraded["failures"]
    assert counts(again) == (0, 4, 0, 0), again["failures"]
    for key in ("docs/small", "docs/big"):
        storage_key = stored[key]["storageKey"]
        assert_reencrypted(api, client, key, data[key], storage_key, before[key])
    assert api.objects.head(fresh["storageKey"]).etag == fresh_etag
    assert nothing_pending(api.objects)


def test_an_object_rewrapped_after_its_version_began_is_found_by_its_storage_date(
    api: Api, setup: Rotated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload that began under version 1 and ended after the rotation has a record
    younger than version 2; once rewrapped, the object was stored after its record was
    written, and that is how it is found."""
    client, data, stored = setup
    fresh = store_object(client, "docs/fresh", b"sealed under version 2")
    storage_key = stored["docs/small"]["storageKey"]
    version_2 = key_version_created(client, 2)
    late = {"created_at": version_2 + timedelta(microseconds=1)}
    save_record(api.records, record_of(api, storage_key).model_copy(update=late))
    # Storage dates may be whole seconds: write in a later one than the record's date.
    wait_until(
        lambda: datetime.now(UTC) >= version_2.replace(microsecond=0) + timedelta(seconds=1),
        "the next second",
    )
    before = stored_bytes(api.objects, storage_key)
    legacy_rewrap(api, client, storage_key)
    succeeded(reencrypt_job(client, prefix="docs/"))  # the objects still on version 1
    monkeypatch.setattr(reencrypt, "RECORD_SKEW", timedelta(0))  # no clock differs here

    result = succeeded(reencrypt_job(client, prefix="docs/", rewrapped=True))

    assert counts(result) == (1, 3, 0, 0), result["failures"]
    assert_reencrypted(api, client, "docs/small", data["docs/small"], storage_key, before)
    assert key_names(parse_header(stored_bytes(api.objects, fresh["storageKey"]))) == [f"{KID}#2"]


def test_a_forged_object_is_reported_tampered_and_left_alone(api: Api, setup: Rotated) -> None:
    """A rewrapped object whose frame was changed and tagged again decrypts cleanly; its
    plaintext no longer matches its record, so it is reported and not re-sealed, which
    would launder the forgery into a message with a key nobody else has seen."""
    client, data, stored = setup
    for key in ("docs/small", "docs/big"):
        legacy_rewrap(api, client, stored[key]["storageKey"])
    forged_key = stored["docs/small"]["storageKey"]
    forge_first_frame(api, client, forged_key)
    forged, record = stored_bytes(api.objects, forged_key), record_of(api, forged_key)
    assert decrypt_all([version_keyring(client, 2)], forged) != data["docs/small"]

    result = succeeded(reencrypt_job(client, prefix="docs/", rewrapped=True))
    single = reencrypt_job(client, key="docs/small", rewrapped=True)

    assert counts(result) == (2, 0, 1, 1), result["failures"]
    (failure,) = result["failures"]
    assert (failure["key"], failure["storageKey"], failure["code"]) == (
        "docs/small",
        forged_key,
        "tampered",
    )
    assert (single["status"], single["error"]["code"]) == ("failed", "tampered")
    assert stored_bytes(api.objects, forged_key) == forged
    assert record_of(api, forged_key) == record
    assert nothing_pending(api.objects)


def test_an_object_changed_meanwhile_is_not_clobbered(
    api: Api, setup: Rotated, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another upload replaces the object while it is re-encrypted: the swap, conditional
    on the version that was read, fails, and the newer upload stays."""
    client, _, stored = setup
    storage_key = stored["docs/big"]["storageKey"]
    opened = api.objects.multipart
    newer = b"written while the job ran"

    def multipart(key: str, **options: Any) -> MultipartWriter:
        # A swap of a tenant's object, not the service's own conditional writes (a key
        # record taking the uses counted meanwhile).
        if options.get("if_match") is not None and key.startswith("tenants/"):
            api.objects.put(key, newer)
        return opened(key, **options)

    monkeypatch.setattr(api.objects, "multipart", multipart)
    result = succeeded(reencrypt_job(client, prefix="docs/"))
    monkeypatch.undo()

    assert counts(result) == (0, 0, 0, 3), result["failures"]
    assert {failure["code"] for failure in result["failures"]} == {"precondition-failed"}
    assert stored_bytes(api.objects, storage_key) == newer
    assert record_of(api, storage_key).key_version == 1
    assert nothing_pending(api.objects)


class CorruptingEncryptor(Encryptor):
    """Seals each chunk with its first byte changed: the fault the read-back is for."""

    __slots__ = ()

    def update(self, data: bytes | bytearray | memoryview) -> list[Any]:
        changed = bytearray(data)
        changed[:1] = bytes(byte ^ 1 for byte in changed[:1])
        return super().update(changed)


def test_a_new_message_that_does_not_read_back_is_not_swapped_in(
    api: Api, setup: Rotated, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, stored = setup
    before = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    start_sealing = services.keys.start_sealing

    def corrupting(*args: Any, **options: Any) -> Sealing:
        sealing = start_sealing(*args, **options)
        header = sealing.encryptor.header
        context = {k: v for k, v in header.context.items() if k != PUBLIC_KEY_CONTEXT_KEY}
        encryptor = CorruptingEncryptor(
            [sealing.keyring],
            context=context,
            frame_length=header.frame_length,
            signed=header.signed,
        )
        return dataclasses.replace(sealing, encryptor=encryptor)

    monkeypatch.setattr(services.reencrypt, "start_sealing", corrupting)
    result = succeeded(reencrypt_job(client, prefix="docs/"))

    # The empty object has no byte to change.
    assert counts(result) == (1, 0, 0, 2), result["failures"]
    assert {failure["code"] for failure in result["failures"]} == {"read-back-mismatch"}
    for key in ("docs/small", "docs/big"):
        assert stored_bytes(api.objects, stored[key]["storageKey"]) == before[key]
    assert nothing_pending(api.objects)


def test_objects_without_a_record_or_of_another_key_are_not_touched(
    api: Api, setup: Rotated
) -> None:
    client, _, stored = setup
    create_key(client, kid="otherKey")
    other = encrypt(client, b"other key", destination={"key": "docs/other"}, kid="otherKey")
    assert other.status_code == 201, other.text
    finished(client, other.json()["verifyJob"])
    space = stored["docs/small"]["storageKey"].removesuffix("docs/small")
    unrecorded = api.objects.put(f"{space}docs/raw", b"raw")

    result = succeeded(reencrypt_job(client, prefix="docs/"))

    assert counts(result) == (3, 0, 0, 0), result["failures"]
    assert api.objects.head(unrecorded.key) == unrecorded
    other_header = parse_header(stored_bytes(api.objects, other.json()["storageKey"]))
    assert key_names(other_header) == ["otherKey#1"]
    refused = reencrypt_job(client, key="docs/other")
    assert (refused["status"], refused["error"]["code"]) == (
        "failed",
        "object-not-sealed-under-key",
    )
    missing = reencrypt_job(client, key="docs/raw")
    assert (missing["status"], missing["error"]["code"]) == ("failed", "object-record-missing")


# The job body run here, as a worker runs a redelivered or cancelled job


@pytest.fixture
def worker(api: Api) -> Parts:
    """A worker's own services on the API's storage and keys."""
    return build_parts(api.settings)


def job_record(
    worker: Parts, storage_key: str, kind: JobKind = JobKind.REENCRYPT, **target: str
) -> JobRecord:
    """A saved job record for the tenant of `storage_key`, as the API writes it (without
    `rewrapped`, as the API wrote rewrap jobs)."""
    tenant = storage_key.split("/")[1]
    placed = {key: f"tenants/{tenant}/{value}" for key, value in target.items()}
    storage = {"key": "storageKey", "prefix": "storagePrefix"}
    params = {
        "kid": KID,
        "bucket": worker.objects.bucket,
        **target,
        **{storage[key]: value for key, value in placed.items()},
    }
    record = JobRecord.new(kind, tenant, ReencryptParams.model_validate(params))
    worker.jobs.save(record)
    return record


def run(worker: Parts, record: JobRecord) -> JobRecord:
    run_job(record.id, worker, JOB_BODIES)
    final = worker.jobs.load(record.id)
    assert final is not None
    return final


def test_a_queued_rewrap_job_runs_as_reencrypt(api: Api, setup: Rotated, worker: Parts) -> None:
    """A rewrap job queued before the upgrade (its record in the job store, its params
    as they were) re-encrypts, and reports under both names."""
    client, data, stored = setup
    before = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    record = job_record(worker, stored["docs/small"]["storageKey"], JobKind.REWRAP, prefix="docs/")

    final = run(worker, record)

    assert final.status is JobStatus.SUCCEEDED and final.result is not None
    assert (final.result["rewrapped"], final.result["reencrypted"]) == (3, 3)
    for key, plaintext in data.items():
        storage_key = stored[key]["storageKey"]
        assert_reencrypted(api, client, key, plaintext, storage_key, before[key])


def test_a_rerun_aborts_the_upload_its_killed_attempt_left_on_that_object_only(
    api: Api, setup: Rotated, worker: Parts
) -> None:
    client, data, stored = setup
    storage_key = stored["docs/big"]["storageKey"]
    before = stored_bytes(api.objects, storage_key)
    record = job_record(worker, storage_key, key="docs/big")
    # The killed attempt noted the object it was writing and its upload's id, and died;
    # an upload of another object whose key starts with the same name is someone else's,
    # and so is another writer's upload of the same object (a resumable upload between
    # two parts, which no one holds then).
    own = leave_pending(api.objects, storage_key, if_match=api.objects.head(storage_key).etag)
    neighbour = api.objects.multipart(f"{storage_key}-draft")
    neighbour.write(random_bytes(MIN_PART_SIZE + 1))
    resumable = api.objects.start_parts(storage_key)
    part = api.objects.put_part(resumable, 1, 0, b"another writer's first part")
    left = {"reencrypted": 0, "writing": storage_key, "writingUpload": own}
    killed = record.model_copy(update={"status": JobStatus.RUNNING, "attempts": 1, "result": left})
    worker.jobs.save(killed)

    final = run(worker, killed)

    assert final.status is JobStatus.SUCCEEDED and final.result is not None, final
    assert (final.attempts, final.result["reencrypted"]) == (2, 1)
    assert api.objects.pending_uploads("tenants/") == [storage_key, f"{storage_key}-draft"]
    assert api.objects.abort_pending(storage_key, exact=True, upload_ids={own}) == 0
    assert_reencrypted(api, client, "docs/big", data["docs/big"], storage_key, before)
    neighbour.abort()
    assert api.objects.complete_parts(resumable, [part], if_absent=False).size == part.size
    assert nothing_pending(api.objects)


class _CancelOncePending:
    """Asks to cancel as soon as the job's upload is pending: mid-object, deterministically."""

    def __init__(self, worker: Parts) -> None:
        self._objects = worker.objects
        self._original = worker.jobs.cancel_requested

    def __call__(self, job_id: str) -> bool:
        return self._original(job_id) or bool(self._objects.pending_uploads("tenants/"))


def test_a_cancelled_job_leaves_no_upload_pending(
    api: Api, setup: Rotated, worker: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, stored = setup
    # Parts enough that the job reads on, and so checks for a cancel, after the first.
    big = store_object(client, "docs/bigger", random_bytes(3 * MIN_PART_SIZE, seed=9))
    assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    before = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    before["docs/bigger"] = stored_bytes(api.objects, big["storageKey"])
    records = {key: record_of(api, s["storageKey"]) for key, s in stored.items()}
    monkeypatch.setattr(job_context, "REPORT_INTERVAL", 0)  # check for a cancel at every step
    monkeypatch.setattr(worker.jobs, "cancel_requested", _CancelOncePending(worker))

    final = run(worker, job_record(worker, big["storageKey"], key="docs/bigger"))

    assert final.status is JobStatus.CANCELLED
    assert nothing_pending(api.objects)
    assert stored_bytes(api.objects, big["storageKey"]) == before["docs/bigger"]
    assert {key: record_of(api, s["storageKey"]) for key, s in stored.items()} == records


class _DisableMidRead:
    """Disables the key in the worker's own key store once the job is under way: when the
    object's header has been read and opened (its second chunk), and for a job that
    writes, once its upload is pending too."""

    def __init__(self, worker: Parts, tenant: str, *, writes: bool) -> None:
        self._worker, self._tenant, self._writes = worker, tenant, writes
        self._original = job_context.JobContext.add_bytes
        self.chunks = 0
        self.disabled_at: int | None = None

    def __call__(self, context: job_context.JobContext, count: int) -> None:
        self._original(context, count)
        self.chunks += 1
        pending = bool(self._worker.objects.pending_uploads("tenants/"))
        if self.disabled_at is None and self.chunks >= 2 and (pending or not self._writes):
            self._worker.keys.disable(self._tenant, KID)
            self.disabled_at = self.chunks


@pytest.mark.parametrize("kind", [JobKind.VERIFY, JobKind.REENCRYPT])
def test_a_key_disabled_while_a_job_reads_stops_the_job(
    api: Api, setup: Rotated, worker: Parts, monkeypatch: pytest.MonkeyPatch, kind: JobKind
) -> None:
    """As it stops an HTTP stream: the job re-checks the key as it reads (about once a
    second; every chunk here) and fails with the code a stream's problem has."""
    client, _, _ = setup
    data = random_bytes(3 * MIN_PART_SIZE, seed=10)
    big = store_object(client, "docs/long", data)
    if kind is JobKind.REENCRYPT:
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    before = stored_bytes(api.objects, big["storageKey"])
    tenant = big["storageKey"].split("/")[1]
    monkeypatch.setattr(services.keys, "KEY_CHECK_INTERVAL", 0)
    hook = _DisableMidRead(worker, tenant, writes=kind is JobKind.REENCRYPT)

    def add_bytes(context: job_context.JobContext, count: int) -> None:
        hook(context, count)

    monkeypatch.setattr(job_context.JobContext, "add_bytes", add_bytes)
    if kind is JobKind.VERIFY:
        target = {"bucket": worker.objects.bucket, "key": "docs/long"}
        params = VerifyParams.model_validate({**target, "storageKey": big["storageKey"]})
        record = JobRecord.new(kind, tenant, params)
        worker.jobs.save(record)
    else:
        record = job_record(worker, big["storageKey"], key="docs/long")

    final = run(worker, record)

    assert hook.disabled_at is not None
    assert final.status is JobStatus.FAILED, final
    assert final.error is not None and final.error["code"] == "key-disabled"
    assert hook.chunks < len(data) // (1 << 20)  # it stopped reading
    assert nothing_pending(api.objects)
    assert stored_bytes(api.objects, big["storageKey"]) == before


def test_the_sweep_clears_what_rewrap_jobs_staged(api: Api, worker: Parts) -> None:
    """Each staged object held a second header of a stored message: with the stored one,
    GCM's hash key. Nothing stages any more, and the sweep removes what was left."""
    store = worker.objects
    staging = reencrypt.REWRAP_STAGING_PREFIX
    store.put(f"{staging}job_a/0", b"a staged header and body")
    store.put(f"{staging}job_b/3", b"another")
    leave_pending(store, f"{staging}job_a/1")
    elsewhere = store.put("sealstream/other/0", b"not staged")

    assert run_sweeps(worker, no_job_queued)["clearedStaging"] == 3

    assert list(store.list(staging)) == [] and store.pending_uploads() == []
    assert store.head(elsewhere.key) == elsewhere
    assert run_sweeps(worker, no_job_queued)["clearedStaging"] == 0


# No key and IV seal twice, anywhere in the service


@pytest.fixture(params=["local", "s3"])
def watched_api(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Api, SealRecorder]]:
    """A live API server (jobs in its own process) built after every sealing is watched."""
    recorder = SealRecorder()
    recorder.install(monkeypatch)
    with live_api(api_settings(request.param, tmp_path, request)) as api:
        yield api, recorder


def test_no_key_and_iv_seals_twice_in_the_service(watched_api: tuple[Api, SealRecorder]) -> None:
    """Keys made and rotated (KEK wraps), messages streamed back ending at each kind of
    frame boundary, objects stored under AES and ML-KEM keys, re-encrypted by both of the
    job's names and verified: every sealing has a (key, IV) of its own, and every message
    a (data key, message ID) of its own."""
    api, seals = watched_api
    with api.client() as client:
        create_key(client, exportable=True)
        create_key(client, kid="pq", kty="ML-KEM", alg="ML-KEM-768")
        for size in (0, 100, 4096, 3 * 4096, 20 * 4096 + 5):
            for kid in (KID, "pq"):
                response = encrypt(client, random_bytes(size), kid=kid, frameLength=4096)
                assert response.status_code == 200, response.text
        for kid in (KID, "pq"):
            for name, size in (("a", 0), ("b", 3 * 4096), ("c", 20 * 4096 + 5)):
                destination = {"key": f"{kid}/{name}"}
                response = encrypt(
                    client, random_bytes(size), kid=kid, frameLength=4096, destination=destination
                )
                assert response.status_code == 201, response.text
                finished(client, response.json()["verifyJob"])
            assert client.post(f"{KEYS}/{kid}/rotate").status_code == 200
        succeeded(reencrypt_job(client, prefix=f"{KID}/"))
        job = finished(client, start(client, "rewrap", kid="pq", prefix="pq/").json()["id"])
        assert succeeded(job)["reencrypted"] == 3
        succeeded(reencrypt_job(client, prefix="", rewrapped=True))

    assert seals.repeated() == []
    messages = seals.messages()
    # Ten streamed back, six stored, those six re-encrypted.
    assert len(messages) == len(set(messages)) == 22
    places = {seal.where for seal in seals.seals}
    assert places == {
        "envelope.frames",
        "envelope.keyrings.aes",
        "envelope.keyrings.mlkem",
        "keystore.kek",
    }


# Under a real Celery worker

BIG = 24 * 1024 * 1024  # at the proxy's 8 MiB/s, the job reads it for about 3 s
PACE = 8 * 1024 * 1024


def test_a_worker_killed_mid_object_leaves_no_upload_pending(job_stack: JobStack) -> None:
    """The pool process dies while its upload of the re-encrypted object is pending. The
    job runs again, aborts that upload, and re-encrypts the object."""
    worker, proxy = job_stack.workers[0], job_stack.proxy
    assert proxy is not None
    objects = job_stack.api.objects
    with job_stack.client() as client:
        stored = store_streamed(client, "big.bin", random_chunks(BIG, seed=3))
        assert finished_job(client, stored["verifyJob"], timeout=60)["status"] == "succeeded"
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        storage_key = stored["storageKey"]
        proxy.pace(PACE)
        job_id = start(client, key="big.bin").json()["id"]
        wait_until(
            lambda: "writingUpload" in (get_job(client, job_id)["result"] or {}),
            "the upload to begin, its id noted",
            60,
        )
        assert objects.pending_uploads() == [storage_key]
        proxy.hold()
        wait_until(proxy.holding, "the worker's download held at the proxy")
        (pool,) = worker.pool_pids()
        os.kill(pool, signal.SIGKILL)
        proxy.release()
        record = finished_job(client, job_id, timeout=90)
        read = read_object(client, "big.bin")

    assert record["status"] == "succeeded", record
    assert (record["attempts"], record["result"]["reencrypted"]) == (2, 1)
    assert objects.pending_uploads() == []
    assert key_names(parse_header(b"".join(objects.read(storage_key, 0, 4096)))) == [f"{KID}#2"]
    assert hashlib.sha256(read.content).hexdigest() == stored["plaintextSha256"]
