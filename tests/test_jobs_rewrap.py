"""The rewrap job over real HTTP on both backends: after a rotation, stored objects are
re-wrapped to the key's primary version, verified before they replace the originals,
and left alone when verification fails; reruns, redeliveries and cancels converge."""

import base64
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from envelope import AesKeyring, DataKeyUnavailable, Keyring, key_names, parse_header
from storage import MIN_PART_SIZE, ObjectStore
from storage.records import ObjectRecord, load_record, save_record
from tests.conftest import Api
from tests.envelope_helpers import decrypt_all
from tests.stream_helpers import (
    KEYS,
    create_key,
    encrypt,
    random_bytes,
    read_object,
    wait_until,
)
from workers import execution
from workers.execution import run_job
from workers.jobs import JobKind, JobRecord, JobStatus
from workers.registry import JOB_BODIES
from workers.rewrap import STAGING_PREFIX, sweep_staging
from workers.services import WorkerServices, build_worker_services

KID = "mySymKey"
FRAME = 64 * 1024
# Bigger than one minimum part by a few frames: on S3 the rewrite reads the first part
# and copies the rest server-side.
SIZES = {"docs/empty": 0, "docs/small": 10_000, "docs/big": MIN_PART_SIZE + 3 * FRAME + 17}


def store_object(client: httpx.Client, key: str, data: bytes) -> dict[str, Any]:
    response = encrypt(client, data, destination={"key": key}, frameLength=FRAME)
    assert response.status_code == 201, response.text
    stored: dict[str, Any] = response.json()
    finished(client, stored["verifyJob"])  # so no verify job races the rewrap
    return stored


def finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's record once it has a final status."""
    record: dict[str, Any] = {}

    def done() -> bool:
        record.update(client.get(f"/api/jobs/{job_id}").json())
        return record["status"] in ("succeeded", "failed", "cancelled")

    wait_until(done, f"job {job_id} to finish", timeout=120)
    return record


def rewrap(client: httpx.Client, **target: str) -> dict[str, Any]:
    response = client.post("/api/jobs/rewrap", json={"kid": KID, **target})
    assert response.status_code == 202, response.text
    return finished(client, response.json()["id"])


def succeeded(job: dict[str, Any]) -> dict[str, Any]:
    assert job["status"] == "succeeded", job
    result: dict[str, Any] = job["result"]
    return result


def version_keyring(client: httpx.Client, version: int) -> Keyring:
    """One version of the key, exported and made a keyring here, outside the service."""
    jwk = client.get(f"{KEYS}/{KID}/export", params={"version": version}).json()
    material = base64.urlsafe_b64decode(jwk["k"] + "=" * (-len(jwk["k"]) % 4))
    return AesKeyring(f"{KID}#{version}", material)


def stored_bytes(objects: ObjectStore, storage_key: str) -> bytes:
    return b"".join(objects.read(storage_key))


def record_of(api: Api, storage_key: str) -> ObjectRecord:
    return load_record(api.objects, api.objects.bucket, storage_key)


def nothing_left_over(objects: ObjectStore) -> bool:
    """No staging object and no unfinished upload anywhere in the bucket."""
    return not list(objects.list(STAGING_PREFIX)) and not objects.pending_uploads()


# A client, the plaintext of each object and its encrypt-to-storage answer.
Rotated = tuple[httpx.Client, dict[str, bytes], dict[str, dict[str, Any]]]


@pytest.fixture
def setup(api: Api) -> Iterator[Rotated]:
    """An exportable key, the objects of SIZES sealed under its version 1, then rotated."""
    with api.client() as client:
        create_key(client, exportable=True)
        data = {key: random_bytes(size, seed=len(key)) for key, size in SIZES.items()}
        stored = {key: store_object(client, key, plaintext) for key, plaintext in data.items()}
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        yield client, data, stored


def assert_rewrapped(
    api: Api, client: httpx.Client, key: str, data: bytes, storage_key: str
) -> None:
    """The object names version 2 only, opens with version 2 alone, and still reads and
    verifies through the service; its record follows."""
    message = stored_bytes(api.objects, storage_key)
    header = parse_header(message)
    assert key_names(header) == [f"{KID}#2"]
    assert header.context["sealstream:key-version"] == "2"
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
    assert info.metadata["sealstream-key-version"] == "2"


def test_a_prefix_is_rewrapped_to_the_primary_version(api: Api, setup: Rotated) -> None:
    client, data, stored = setup
    outside = store_object(client, "elsewhere/doc", b"not under the prefix")
    before = stored_bytes(api.objects, outside["storageKey"])

    result = succeeded(rewrap(client, prefix="docs/"))

    assert (result["rewrapped"], result["skipped"], result["failed"]) == (3, 0, 0)
    assert result["keyVersion"] == 2
    for key, plaintext in data.items():
        assert_rewrapped(api, client, key, plaintext, stored[key]["storageKey"])
    assert stored_bytes(api.objects, outside["storageKey"]) == before
    assert nothing_left_over(api.objects)


def test_one_object_is_rewrapped_and_a_second_run_changes_nothing(api: Api, setup: Rotated) -> None:
    client, data, stored = setup
    storage_key = stored["docs/big"]["storageKey"]

    first = succeeded(rewrap(client, key="docs/big"))
    after_first = api.objects.head(storage_key)
    second = succeeded(rewrap(client, key="docs/big"))

    assert (first["rewrapped"], second["skipped"], second["rewrapped"]) == (1, 1, 0)
    assert api.objects.head(storage_key) == after_first
    assert_rewrapped(api, client, "docs/big", data["docs/big"], storage_key)
    assert key_names(
        parse_header(stored_bytes(api.objects, stored["docs/small"]["storageKey"]))
    ) == [f"{KID}#1"]
    assert nothing_left_over(api.objects)


def test_a_second_prefix_run_skips_everything(api: Api, setup: Rotated) -> None:
    client, _, stored = setup
    succeeded(rewrap(client, prefix=""))
    etags = {key: api.objects.head(s["storageKey"]).etag for key, s in stored.items()}

    again = succeeded(rewrap(client, prefix=""))

    assert (again["rewrapped"], again["skipped"], again["failed"]) == (0, 3, 0)
    assert {key: api.objects.head(s["storageKey"]).etag for key, s in stored.items()} == etags


def _corrupt_record(api: Api, storage_key: str) -> None:
    """The recorded plaintext digest no longer matches, so verification must fail."""
    record = record_of(api, storage_key)
    save_record(api.objects, record.model_copy(update={"plaintext_sha256": "0" * 64}))


def test_an_object_that_fails_verification_keeps_its_original(api: Api, setup: Rotated) -> None:
    client, data, stored = setup
    storage_key = stored["docs/big"]["storageKey"]
    _corrupt_record(api, storage_key)
    original = stored_bytes(api.objects, storage_key)

    result = succeeded(rewrap(client, prefix="docs/"))

    assert (result["rewrapped"], result["failed"]) == (2, 1)
    (failure,) = result["failures"]
    assert (failure["key"], failure["storageKey"]) == ("docs/big", storage_key)
    assert failure["code"] == "plaintext-digest-mismatch"
    assert stored_bytes(api.objects, storage_key) == original
    assert record_of(api, storage_key).key_version == 1
    assert_rewrapped(
        api, client, "docs/small", data["docs/small"], stored["docs/small"]["storageKey"]
    )
    assert nothing_left_over(api.objects)


def test_a_one_object_job_fails_with_its_object(api: Api, setup: Rotated) -> None:
    client, _, stored = setup
    storage_key = stored["docs/small"]["storageKey"]
    _corrupt_record(api, storage_key)
    original = stored_bytes(api.objects, storage_key)

    job = rewrap(client, key="docs/small")

    assert job["status"] == "failed"
    assert job["error"]["code"] == "plaintext-digest-mismatch"
    assert stored_bytes(api.objects, storage_key) == original
    assert nothing_left_over(api.objects)


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

    result = succeeded(rewrap(client, prefix="docs/"))

    assert (result["rewrapped"], result["skipped"], result["failed"]) == (3, 0, 0)
    assert api.objects.head(unrecorded.key) == unrecorded
    assert key_names(parse_header(stored_bytes(api.objects, other.json()["storageKey"]))) == [
        "otherKey#1"
    ]
    refused = rewrap(client, key="docs/other")
    assert (refused["status"], refused["error"]["code"]) == (
        "failed",
        "object-not-sealed-under-key",
    )


# The job body run here, as a worker runs a redelivered or cancelled job


@pytest.fixture
def worker(api: Api) -> Iterator[WorkerServices]:
    """A worker's own services on the API's storage and keys."""
    services = build_worker_services(api.settings)
    yield services
    services.keys.close()


def prefix_job(worker: WorkerServices, stored: dict[str, dict[str, Any]]) -> JobRecord:
    storage_key: str = stored["docs/small"]["storageKey"]
    tenant = storage_key.split("/")[1]
    params = {
        "kid": KID,
        "bucket": worker.objects.bucket,
        "prefix": "docs/",
        "storagePrefix": f"tenants/{tenant}/docs/",
    }
    record = JobRecord.new(JobKind.REWRAP, tenant, params)
    worker.jobs.save(record)
    return record


def run(worker: WorkerServices, record: JobRecord) -> JobRecord:
    run_job(record.id, worker, JOB_BODIES)
    final = worker.jobs.load(record.id)
    assert final is not None
    return final


def test_a_redelivered_job_converges(api: Api, setup: Rotated, worker: WorkerServices) -> None:
    client, data, stored = setup
    record = prefix_job(worker, stored)
    # The first attempt died after replacing docs/big but before recording it, leaving
    # staging objects and an upload behind.
    first = run(worker, record)
    big = stored["docs/big"]
    unrecorded = {"key_version": 1, "etag": big["etag"], "ciphertext_size": big["ciphertextSize"]}
    save_record(api.objects, record_of(api, big["storageKey"]).model_copy(update=unrecorded))
    for leftover in ("0", "7"):
        api.objects.put(f"{STAGING_PREFIX}{record.id}/{leftover}", b"staged")
    unfinished = api.objects.multipart(f"{STAGING_PREFIX}{record.id}/1")
    unfinished.write(random_bytes(MIN_PART_SIZE))  # an upload begun, never completed
    redelivered = record.model_copy(update={"status": JobStatus.RUNNING, "attempts": 1})
    worker.jobs.save(redelivered)

    second = run(worker, redelivered)

    assert first.result is not None and first.result["rewrapped"] == 3
    assert second.status is JobStatus.SUCCEEDED and second.result is not None
    assert (second.result["rewrapped"], second.result["skipped"]) == (1, 2)
    assert second.progress.items_done == second.progress.items_total == 3
    for key, plaintext in data.items():
        assert_rewrapped(api, client, key, plaintext, stored[key]["storageKey"])
    assert nothing_left_over(api.objects)


class _CancelOnceStaged:
    """Asks to cancel as soon as a staging object exists: mid-object, deterministically."""

    def __init__(self, worker: WorkerServices) -> None:
        self._objects = worker.objects
        self._original = worker.jobs.cancel_requested

    def __call__(self, job_id: str) -> bool:
        return self._original(job_id) or any(True for _ in self._objects.list(STAGING_PREFIX))


def test_a_cancelled_job_leaves_no_staging_object(
    api: Api, setup: Rotated, worker: WorkerServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, stored = setup
    before = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    monkeypatch.setattr(execution, "REPORT_INTERVAL", 0)  # check for a cancel at every step
    monkeypatch.setattr(worker.jobs, "cancel_requested", _CancelOnceStaged(worker))

    final = run(worker, prefix_job(worker, stored))

    assert final.status is JobStatus.CANCELLED
    assert nothing_left_over(api.objects)
    after = {key: stored_bytes(api.objects, s["storageKey"]) for key, s in stored.items()}
    assert after == before


def test_the_sweep_clears_the_staging_of_jobs_that_are_over(
    api: Api, worker: WorkerServices
) -> None:
    store = worker.objects

    def job(status: JobStatus) -> str:
        record = JobRecord.new(JobKind.REWRAP, "default", {}).model_copy(update={"status": status})
        worker.jobs.save(record)
        store.put(f"{STAGING_PREFIX}{record.id}/0", b"a staged object")
        return record.id

    over, running = job(JobStatus.FAILED), job(JobStatus.RUNNING)
    gone = "job_whose_record_expired"
    store.put(f"{STAGING_PREFIX}{gone}/3", b"a staged object")
    left_pending = store.multipart(f"{STAGING_PREFIX}{over}/1")
    left_pending.write(bytes(MIN_PART_SIZE + 1))  # a part shipped, never completed
    abandoned_after = timedelta(hours=6)

    def staged() -> set[str]:
        keys = [info.key for info in store.list(STAGING_PREFIX)] + store.pending_uploads()
        return {key.removeprefix(STAGING_PREFIX).split("/")[0] for key in keys}

    assert staged() == {over, running, gone}
    assert sweep_staging(worker, abandoned_after) == [over]
    assert staged() == {running, gone}  # a recordless job's objects are still fresh
    later = datetime.now(UTC) + 2 * abandoned_after
    assert sweep_staging(worker, abandoned_after, now=later) == [gone]
    assert staged() == {running}
    assert sweep_staging(worker, abandoned_after, now=later) == []
