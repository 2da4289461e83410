"""Which objects still use a key version, and retiring one, over real HTTP: on both
backends with the in-process job runner, and on moto with the reencrypt job on a Celery
worker.

The whole flow: objects sealed under version 1, a rotation, version 1's objects listed,
its retirement refused while they use it, a reencrypt job selecting that version, the
retirement confirmed, and then a copy streamed back under version 1 earlier refused
with a clean 4xx; its material destroyed by the sweep after the pending window. And what
a bucket writer can do to the index (delete markers, delete object records, tamper with
them) does not let a version in use be retired.
"""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from audit import AUDIT_KEY_PURPOSE
from audit.reading import authentic_events
from keystore import KeyStore
from keystore.errors import KeyVersionRetired
from keystore.persistence import RECORD_KIND as KEY_KIND
from keystore.persistence import record_key as key_record_name
from keystore.records import KeyRecord
from sealstream.wiring import build_parts
from services.inventory import RUN_MARKER_KIND, RunMarker, VersionIndex
from services.retirement import Retirements
from storage.local import LocalStore
from storage.records import record_key
from tests.conftest import Api, api_settings, live_api
from tests.support.data import random_bytes, tar_archive
from tests.support.http import (
    FORM_TYPE,
    KEYS,
    create_key,
    decrypt,
    encrypt,
    form_bytes,
    problem,
    read_object,
)
from tests.support.jobs import JobStack, finished_job
from tests.support.waiting import wait_until
from workers.lifecycle import run_sweeps

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KID = "mySymKey"
TENANT = "default"
V1 = f"{KID}#1"
RETIRE_V1 = f"{KEYS}/{KID}/versions/1/retire"
ARCHIVE = "/api/crypto/stream/encrypt-archive"


def store(client: httpx.Client, key: str, data: bytes) -> None:
    response = encrypt(client, data, destination={"key": key})
    assert response.status_code == 201, response.text


def version_objects(client: httpx.Client, version: int, **query: Any) -> dict[str, Any]:
    response = client.get(f"{KEYS}/{KID}/objects", params={"version": version, **query})
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def object_counts(client: httpx.Client) -> list[int]:
    view = client.get(f"{KEYS}/{KID}").json()
    return [version["objectCount"] for version in view["versions"]]


def walk_the_whole_flow(client: httpx.Client) -> bytes:
    """Encrypt under v1, rotate, list v1's objects, be refused, re-encrypt, retire, and
    find an old copy refused; the old copy (streamed back under v1)."""
    data = {name: random_bytes(5000 + index, seed=index) for index, name in enumerate("abc")}
    store(client, "docs/a", data["a"])
    store(client, "docs/b", data["b"])
    old_copy = encrypt(client, b"streamed back, tracked nowhere")
    assert old_copy.status_code == 200 and old_copy.headers["X-Key-Used"] == V1
    assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    store(client, "docs/c", data["c"])
    assert object_counts(client) == [2, 1]

    first = version_objects(client, 1, limit=1)
    second = version_objects(client, 1, limit=1, after=first["next"])
    assert second["next"] is None
    listed = first["objects"] + second["objects"]
    assert sorted(entry["key"] for entry in listed) == ["docs/a", "docs/b"]
    assert {(entry["kid"], entry["keyVersion"]) for entry in listed} == {(KID, 1)}

    # In use: refused before any confirmation is asked for.
    problem(client.post(RETIRE_V1, json={}), 409, "version-in-use")
    in_use = problem(client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-in-use")
    assert in_use["objectCount"] == 2 and "2 stored objects" in in_use["detail"]
    primary = client.post(f"{KEYS}/{KID}/versions/2/retire", json={"confirm": f"{KID}#2"})
    problem(primary, 409, "version-is-primary")

    job = client.post("/api/jobs/reencrypt", json={"kid": KID, "version": 1})
    assert job.status_code == 202, job.text
    result = finished_job(client, job.json()["id"], timeout=120)
    assert result["status"] == "succeeded", result
    assert (result["result"]["reencrypted"], result["result"]["remaining"]) == (2, 0)
    assert version_objects(client, 1)["objects"] == []
    assert object_counts(client) == [0, 3]

    unconfirmed = problem(client.post(RETIRE_V1, json={}), 428, "confirmation-required")
    assert [v["version"] for v in unconfirmed["versions"]] == [1, 2]
    assert {"usageCount", "lastUsedAt", "objectCount"} <= set(unconfirmed["versions"][0])
    assert V1 in unconfirmed["detail"]
    wrong = client.post(RETIRE_V1, json={"confirm": f"{KID}#2"})
    problem(wrong, 428, "confirmation-required")

    retired = client.post(RETIRE_V1, json={"confirm": V1, "pendingWindowDays": 1})
    assert retired.status_code == 200, retired.text
    version_1 = retired.json()["versions"][0]
    assert version_1["retiredAt"] is not None and version_1["destructionDate"] is not None
    again = client.post(RETIRE_V1, json={"confirm": V1})
    assert again.json()["versions"][0]["retiredAt"] == version_1["retiredAt"]

    refused = problem(decrypt(client, old_copy.content), 409, "key-version-retired")
    assert V1 in refused["detail"]
    for name, plaintext in data.items():
        assert read_object(client, f"docs/{name}").content == plaintext
    return old_copy.content


def destroy_after_the_window(api: Api, client: httpx.Client, old_copy: bytes) -> None:
    """The sweep, run two days on, destroys version 1's material."""
    parts = build_parts(api.settings)
    later = datetime.now(UTC) + timedelta(days=2)
    keys = KeyStore(parts.records, parts.kek, clock=lambda: later)
    assert Retirements(keys, parts.records, parts.spaces).destroy_due() == [f"{TENANT}/{V1}"]
    record = api.records.get(KEY_KIND, key_record_name(TENANT, KID), KeyRecord)
    version_1 = record.version(1)
    assert version_1.destroyed_at is not None and version_1.wrapped_material == b""
    problem(decrypt(client, old_copy), 409, "key-version-retired")
    assert Retirements(keys, parts.records, parts.spaces).destroy_due() == []


def test_the_whole_flow_on_each_backend(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        old_copy = walk_the_whole_flow(client)
        destroy_after_the_window(api, client, old_copy)


def test_the_whole_flow_with_a_celery_worker(job_stack: JobStack) -> None:
    with job_stack.client() as client:
        walk_the_whole_flow(client)


@pytest.fixture
def rotated(api: Api) -> Api:
    """mySymKey with version 1 sealing docs/a, and version 2 primary."""
    with api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    return api


def test_a_deleted_marker_does_not_let_a_version_in_use_be_retired(rotated: Api) -> None:
    (marker,) = VersionIndex(rotated.records, rotated.parts.spaces).markers(TENANT, KID, 1)
    rotated.objects.delete(marker.name)
    with rotated.client() as client:
        refused = problem(client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-in-use")
    assert refused["objectCount"] == 1


def test_nor_does_a_deleted_marker_and_object_record(rotated: Api) -> None:
    (marker,) = VersionIndex(rotated.records, rotated.parts.spaces).markers(TENANT, KID, 1)
    rotated.objects.delete(marker.name)
    rotated.objects.delete(record_key(rotated.objects.bucket, "tenants/default/docs/a"))
    with rotated.client() as client:
        problem(client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-in-use")


def test_nor_does_a_tampered_object_record(rotated: Api) -> None:
    (marker,) = VersionIndex(rotated.records, rotated.parts.spaces).markers(TENANT, KID, 1)
    rotated.objects.delete(marker.name)
    name = record_key(rotated.objects.bucket, "tenants/default/docs/a")
    rotated.objects.put(
        name, rotated.objects.get(name).replace(b'"keyVersion": 1', b'"keyVersion": 2')
    )
    with rotated.client() as client:
        problem(client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-usage-unknown")


def test_retiring_answers_clean_problems(rotated: Api) -> None:
    with rotated.client() as client:
        problem(client.post(f"{KEYS}/nokey/versions/1/retire", json={}), 404, "key-not-found")
        problem(client.post(f"{KEYS}/{KID}/versions/9/retire", json={}), 404, "key-not-found")
        window = {"confirm": V1, "pendingWindowDays": 31}
        problem(client.post(RETIRE_V1, json=window), 422, "invalid-pending-window")
        problem(client.get(f"{KEYS}/{KID}/objects", params={"version": 9}), 404, "key-not-found")
        bad_cursor: dict[str, Any] = {"version": 1, "after": "../x"}
        problem(client.get(f"{KEYS}/{KID}/objects", params=bad_cursor), 422, "invalid-request")
        selector = {"kid": KID, "version": 1, "prefix": ""}
        problem(client.post("/api/jobs/reencrypt", json=selector), 422, "invalid-source")
        missing = {"kid": KID, "version": 9}
        problem(client.post("/api/jobs/reencrypt", json=missing), 404, "key-not-found")
        issued = client.post(
            "/api/admin/tokens", json={"tenant": "acme", "scopes": ["keys:read", "keys:write"]}
        )
        with httpx.Client(
            base_url=rotated.url, headers={"Authorization": f"Bearer {issued.json()['token']}"}
        ) as acme:
            problem(acme.post(RETIRE_V1, json={"confirm": V1}), 404, "key-not-found")
            problem(
                acme.get(f"{KEYS}/{KID}/objects", params={"version": 1}), 403, "insufficient-scope"
            )


def test_destruction_waits_while_a_rolled_back_object_uses_the_version(api: Api) -> None:
    """Whoever can write the bucket puts back an object (and its record) from before its
    re-encryption: the sweep holds version 1's material until that object is gone."""
    storage_key = "tenants/default/docs/a"
    record_name = record_key(api.objects.bucket, storage_key)
    with api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
        old_object, old_record = api.objects.get(storage_key), api.objects.get(record_name)
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        job = client.post("/api/jobs/reencrypt", json={"kid": KID, "version": 1})
        assert finished_job(client, job.json()["id"], timeout=120)["status"] == "succeeded"
        retired = client.post(RETIRE_V1, json={"confirm": V1, "pendingWindowDays": 1})
        assert retired.status_code == 200, retired.text

        api.objects.put(storage_key, old_object)
        api.objects.put(record_name, old_record)
        parts = build_parts(api.settings)
        later = datetime.now(UTC) + timedelta(days=2)
        retirements = Retirements(
            KeyStore(parts.records, parts.kek, clock=lambda: later), parts.records, parts.spaces
        )
        assert retirements.destroy_due() == []

        assert client.delete("/api/objects/docs/a").status_code == 204
        assert retirements.destroy_due() == [f"{TENANT}/{V1}"]


def test_nor_does_an_object_stripped_of_record_marker_and_metadata(rotated: Api) -> None:
    """On the local store, a file without its metadata sidecar is left out of listings;
    an object without a record whose header does not read is not known to be no message.
    Either makes the version's use unknown."""
    store_ = rotated.objects
    if not isinstance(store_, LocalStore):
        pytest.skip("the local directory backend only")
    (marker,) = VersionIndex(rotated.records, rotated.parts.spaces).markers(TENANT, KID, 1)
    store_.delete(marker.name)
    storage_key = "tenants/default/docs/a"
    store_.delete(record_key(store_.bucket, storage_key))
    (store_.root / ".meta" / f"{storage_key}.json").unlink()
    # Another object, its record deleted and its header cut short.
    with rotated.client() as client:
        store(client, "docs/b", b"b")
    damaged = "tenants/default/docs/b"
    store_.delete(record_key(store_.bucket, damaged))
    store_.put(damaged, store_.get(damaged)[:40])
    with rotated.client() as client:
        refused = problem(
            client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-usage-unknown"
        )
    assert (refused["unknownCount"], refused["unlistedFiles"], refused["unreadableHeaders"]) == (
        2,
        1,
        1,
    )
    assert "for 2 of the tenant's stored objects" in refused["detail"]


def test_nor_does_an_object_stripped_of_record_and_marker_and_its_first_byte_changed(
    rotated: Api,
) -> None:
    """Whoever can write the bucket makes an object of version 1 look like no message (to
    put it back once the version is retired): it is not known to be none."""
    (marker,) = VersionIndex(rotated.records, rotated.parts.spaces).markers(TENANT, KID, 1)
    rotated.objects.delete(marker.name)
    storage_key = "tenants/default/docs/a"
    rotated.objects.delete(record_key(rotated.objects.bucket, storage_key))
    rotated.objects.put(storage_key, b"\x00" + rotated.objects.get(storage_key)[1:])
    with rotated.client() as client:
        refused = problem(
            client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-usage-unknown"
        )
    assert (refused["unknownCount"], refused["unreadableHeaders"]) == (1, 1)


def test_a_retirement_is_cancelled_within_its_pending_window(rotated: Api) -> None:
    cancel_v2 = f"{KEYS}/{KID}/versions/2/cancel-retirement"
    retire_v2 = {"confirm": f"{KID}#2"}
    with rotated.client() as client:
        sealed_by_2 = encrypt(client, b"x")
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        problem(client.post(cancel_v2), 409, "version-not-retired")
        retired = client.post(f"{KEYS}/{KID}/versions/2/retire", json=retire_v2)
        assert retired.status_code == 200, retired.text
        problem(decrypt(client, sealed_by_2.content), 409, "key-version-retired")
        kept = client.post(cancel_v2)
        assert kept.status_code == 200, kept.text
        version_2 = kept.json()["versions"][1]
        assert (version_2["retiredAt"], version_2["destructionDate"]) == (None, None)
        assert decrypt(client, sealed_by_2.content).status_code == 200
        again = client.post(f"{KEYS}/{KID}/versions/2/retire", json=retire_v2)
        assert again.status_code == 200, again.text
    # Past its destruction date it stays retired.
    parts = build_parts(rotated.settings)
    later = datetime.now(UTC) + timedelta(days=8)
    keys = KeyStore(parts.records, parts.kek, clock=lambda: later)
    with pytest.raises(KeyVersionRetired):
        keys.cancel_retirement(TENANT, KID, 2)
    audit_key = parts.records.key.derive(AUDIT_KEY_PURPOSE)
    cancelled = (f"{KEYS}/{{kid}}/versions/{{version}}/cancel-retirement", f"{KID}#2", 200)

    def audited() -> bool:
        return cancelled in [
            (e.get("route"), e.get("key"), e.get("status"))
            for e in authentic_events(parts.objects, audit_key)
        ]

    wait_until(audited, "the cancelled retirement in the audit trail", timeout=30)


def test_a_destruction_another_sweep_did_meanwhile_is_not_reported_again(rotated: Api) -> None:
    """What the sweep reports, the lifecycle audits as version-destruction: only a
    destruction it did itself."""
    with rotated.client() as client:
        store(client, "docs/b", b"b")  # under version 2
        assert client.delete("/api/objects/docs/a").status_code == 204
        retired = client.post(RETIRE_V1, json={"confirm": V1, "pendingWindowDays": 1})
        assert retired.status_code == 200, retired.text
    parts = build_parts(rotated.settings)
    later = datetime.now(UTC) + timedelta(days=2)
    keys = KeyStore(parts.records, parts.kek, clock=lambda: later)

    def another_sweep_first(tenant: str, name: str) -> bool:
        assert KeyStore(parts.records, parts.kek, clock=lambda: later).destroy_version(
            tenant, KID, 1
        )
        return True

    assert Retirements(keys, parts.records, parts.spaces).destroy_due(another_sweep_first) == []
    assert keys.get(TENANT, KID).version(1).destroyed_at is not None


def test_a_run_in_a_bucket_the_tenant_may_no_longer_use_still_counts(
    request: pytest.FixtureRequest, tmp_path: Path, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    """An archive sealed into another bucket, then the grant withdrawn (the service
    restarted without it): reading the key and retiring its version answer as before,
    for a bucket neither request names, and the objects there still hold the version."""
    other = f"{s3_bucket}-b"
    moto_s3.create_bucket(Bucket=other)
    granted = api_settings("s3", tmp_path, request).model_copy(
        update={"tenant_buckets": {TENANT: [other]}}
    )
    members = {f"m-{n}": random_bytes(300 + n, seed=n) for n in range(3)}
    with live_api(granted) as api, api.client() as client:
        create_key(client)
        destination = {"prefix": "out/", "bucket": other}
        body = form_bytes({"kid": KID, "destination": destination}, tar_archive(members))
        sealed = client.post(ARCHIVE, content=body, headers={"Content-Type": FORM_TYPE})
        assert sealed.status_code == 200 and '"succeeded"' in sealed.text, sealed.text
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    withdrawn = granted.model_copy(update={"tenant_buckets": {}})
    with live_api(withdrawn) as api, api.client() as client:
        assert object_counts(client) == [len(members) + 1, 0]  # and the manifest
        refused = problem(client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-in-use")
        assert refused["objectCount"] == len(members) + 1


def plant_run(api: Api, bucket: str) -> None:
    """An authentic run marker of version 1 (as the service writes) in `bucket`."""
    run = RunMarker(
        tenant=TENANT,
        kid=KID,
        key_version=1,
        bucket=bucket,
        storage_prefix="tenants/default/out/",
        job_id="a-job",
        created_at=datetime.now(UTC),
    )
    api.records.put(RUN_MARKER_KIND, run.name, run)


def test_a_run_whose_bucket_cannot_be_read_leaves_the_version_unknown(
    request: pytest.FixtureRequest, tmp_path: Path, s3_bucket: str
) -> None:
    """Its bucket is gone: the key reads, with that version's count unknown; the version
    is not retired, nor its material destroyed, and the sweep goes on to other keys."""
    with live_api(api_settings("s3", tmp_path, request)) as api, api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        create_key(client, kid="other")
        assert client.post(f"{KEYS}/other/rotate").status_code == 200
        for kid in (KID, "other"):
            if kid == KID:
                assert client.delete("/api/objects/docs/a").status_code == 204
            retire = f"{KEYS}/{kid}/versions/1/retire"
            retired = client.post(retire, json={"confirm": f"{kid}#1", "pendingWindowDays": 1})
            assert retired.status_code == 200, retired.text
        plant_run(api, f"{s3_bucket}-gone")

        assert object_counts(client) == [None, 0]
        parts = build_parts(api.settings)
        later = datetime.now(UTC) + timedelta(days=2)
        keys = KeyStore(parts.records, parts.kek, clock=lambda: later)
        destroyed = Retirements(keys, parts.records, parts.spaces).destroy_due()
        assert destroyed == [f"{TENANT}/other#1"]
        unretire = client.post(f"{KEYS}/{KID}/versions/1/cancel-retirement")
        assert unretire.status_code == 200, unretire.text
        problem(client.post(RETIRE_V1, json={"confirm": V1}), 409, "version-usage-unknown")


def test_a_sweep_that_fails_leaves_the_others_to_run(
    request: pytest.FixtureRequest, tmp_path: Path, s3_bucket: str
) -> None:
    """A bucket granted to a tenant does not exist: the sweep that clears rewrap jobs'
    staging in every tenant bucket fails there, is named, and the sweeps after it run."""
    settings = api_settings("s3", tmp_path, request).model_copy(
        update={"tenant_buckets": {TENANT: [f"{s3_bucket}-missing"]}}
    )
    with live_api(settings) as api:
        swept = run_sweeps(build_parts(api.settings), lambda job: None)
    assert swept["failedSweeps"] == ["rewrap staging"]
    assert swept["finishedDeletions"] == 0 and swept["expiredUploads"] == 0
