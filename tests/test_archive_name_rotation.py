"""Rotating a tenant's name key, over real HTTP on a local directory and on moto, and
through the `sealstream` command: new runs hide names under the new version, while the
objects, records and manifests of the old one stay readable and verifiable, a rerun into
an old prefix names under the version its manifest records (landing on the objects it
wrote, stream and batch job alike), and a job keeps the version it was created with
across a rotation. No answer holds material."""

from typing import Any

import httpx
import pytest

from sealstream.wiring import build_parts
from services.jobs import JobKind, JobRecord, JobStatus
from storage.records import RECORD_METADATA, object_record, record_metadata, save_record
from tests.conftest import Api, live_api
from tests.support.data import tar_archive
from tests.support.http import create_key, problem, read_object
from tests.support.jobs import finished_job
from tests.test_api_archives import manifest, upload
from tests.test_archive_names import FILES, hidden_upload, stored_record, verify
from tests.test_cli_commands import run_json
from tests.test_jobs_batch import batch_params
from workers.execution import run_job
from workers.registry import JOB_BODIES

NAME_KEY = "/api/admin/name-key"
TENANT = "tenants/default/"


def name_key(client: httpx.Client, method: str = "GET", path: str = "") -> dict[str, Any]:
    response = client.request(method, NAME_KEY + path)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    assert set(view) == {"tenant", "current", "versions"}  # versions and dates only
    assert all(set(entry) == {"version", "createdAt"} for entry in view["versions"])
    return view


def batch(client: httpx.Client, prefix: str, **more: Any) -> dict[str, str]:
    """A batch job over in/archive.tar into `prefix`, hiding names; its members' keys."""
    body = {"kid": "mySymKey", "source": {"key": "in/archive.tar"}, "names": "encrypted"}
    started = client.post(
        "/api/jobs/batch-encrypt", json={**body, "destination": {"prefix": prefix}, **more}
    )
    assert started.status_code == 202, started.text
    job = finished_job(client, started.json()["id"])
    assert job["status"] == "succeeded", job
    return {m["path"]: m["key"] for m in manifest(client, prefix)["members"]}


def stored(api: Api, prefix: str) -> set[tuple[str, str]]:
    return {(info.key, info.etag) for info in api.objects.list(prefix)}


def versions_of(api: Api, keys: dict[str, str]) -> set[int]:
    return {stored_record(api, TENANT + key)["nameKeyVersion"] for key in keys.values()}


def test_rotation_names_new_runs_anew_and_keeps_old_ones_readable_and_found(api: Api) -> None:
    api.objects.put(TENANT + "in/archive.tar", tar_archive(FILES))
    archive = tar_archive(FILES)
    with api.client() as client:
        create_key(client)
        assert name_key(client) == {"tenant": "default", "current": None, "versions": []}
        streamed = hidden_upload(client, archive, prefix="old/")
        batched = batch(client, "batch-old/")
        assert name_key(client)["current"] == 1

        rotated = name_key(client, "POST", "/rotate")
        assert rotated["current"] == 2 and [v["version"] for v in rotated["versions"]] == [1, 2]

        # New runs, into new prefixes: the new version.
        fresh = hidden_upload(client, archive, prefix="new/")
        assert manifest(client, "new/")["nameKeyVersion"] == 2
        assert versions_of(api, fresh) == {2}
        assert versions_of(api, batch(client, "batch-new/")) == {2}
        assert manifest(client, "batch-new/")["nameKeyVersion"] == 2

        # What version 1 wrote stays readable, verifiable, and mapped back by its manifest.
        for prefix, keys in (("old/", streamed), ("batch-old/", batched)):
            document = manifest(client, prefix)
            assert document["nameKeyVersion"] == 1
            assert {m["path"]: m["key"] for m in document["members"]} == keys
            assert versions_of(api, keys) == {1}
            for path, key in keys.items():
                assert read_object(client, key).content == FILES[path]
        assert verify(client, streamed["hr/notes.txt"])["status"] == "succeeded"

        # A rerun into an old prefix names under the version its manifest records.
        overwrite = {"prefix": "old/", "overwrite": True}
        assert hidden_upload(client, archive, destination=overwrite) == streamed
        assert manifest(client, "old/")["nameKeyVersion"] == 1
        assert batch(client, "batch-old/", overwrite=True) == batched
        assert manifest(client, "batch-old/")["nameKeyVersion"] == 1
    stored = {info.key for info in api.objects.list(TENANT + "old/")}
    assert stored == {TENANT + key for key in streamed.values()} | {TENANT + "old/manifest.json"}


def test_a_job_keeps_the_name_key_version_it_was_created_with(api: Api) -> None:
    """A job created before a rotation and run (or rerun) after it names under the
    version the API chose: its attempts never scatter members under two versions."""
    api.objects.put(TENANT + "in/archive.tar", tar_archive(FILES))
    with api.client() as client:
        create_key(client)
        name_key(client, "POST", "/rotate")  # version 1, made by rotating
        name_key(client, "POST", "/rotate")
    services = build_parts(api.settings)
    bucket = api.objects.bucket
    params = batch_params(api).model_copy(update={"names": "encrypted", "name_key_version": 1})
    record = JobRecord.new(JobKind.BATCH_ENCRYPT, "default", params)
    services.jobs.save(record)
    run_job(record.id, services, JOB_BODIES)
    final = services.jobs.load(record.id)
    assert final is not None and final.status is JobStatus.SUCCEEDED, final
    first = services.keys.name_keys.version("default", 1)
    with api.client() as client:
        document = manifest(client)
    assert document["nameKeyVersion"] == 1
    assert {m["path"]: m["key"] for m in document["members"]} == {
        path: "out/" + first.encrypt_name(path, bucket, "out/") for path in FILES
    }


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_the_command_rotates_and_reads_old_manifests(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        keys = hidden_upload(client, tar_archive(FILES), prefix="old/")
    assert run_json(api, "name-key", "show")["current"] == 1
    rotated = run_json(api, "name-key", "rotate")
    assert rotated["current"] == 2 and len(rotated["versions"]) == 2
    document = run_json(api, "manifest", "old/")
    assert document["nameKeyVersion"] == 1
    assert {m["path"]: m["key"] for m in document["members"]} == keys


def test_a_rerun_under_a_version_a_rolled_back_record_lacks_is_refused(api: Api) -> None:
    """A bucket writer who puts back the name key record from before a rotation drops the
    version for every process that has not unwrapped it yet: a rerun there into a prefix
    named under it is refused (502), never a 500, and never named under another version."""
    with api.client() as client:
        create_key(client)
        hidden_upload(client, tar_archive(FILES), prefix="old/")
        before = api.objects.get("sealstream/name-keys/default.json")  # version 1 only
        name_key(client, "POST", "/rotate")
        hidden_upload(client, tar_archive(FILES), prefix="new/")
    api.objects.put("sealstream/name-keys/default.json", before)
    with live_api(api.settings) as restarted, restarted.client() as client:
        overwrite = {"prefix": "new/", "overwrite": True}
        response, _ = upload(client, tar_archive(FILES), names="encrypted", destination=overwrite)
        problem(response, 502, "name-unreadable")
    with api.client() as client:  # which still holds version 2: nothing was renamed
        assert manifest(client, "new/")["nameKeyVersion"] == 2


def test_a_rerun_under_a_version_number_reissued_with_other_material_is_refused(
    api: Api,
) -> None:
    """A bucket writer who deletes the name key record lets the next run make a new
    version 1 of other material: a rerun into a prefix its manifest says was named under
    the old version 1 is refused (502 name-key-mismatch), its manifest and objects kept,
    rather than named under the new material beside them."""
    api.objects.put(TENANT + "in/archive.tar", tar_archive(FILES))
    with api.client() as client:
        create_key(client)
        hidden_upload(client, tar_archive(FILES), prefix="old/")
        old = manifest(client, "old/")
    api.objects.delete("sealstream/name-keys/default.json")
    with live_api(api.settings) as restarted, restarted.client() as client:
        hidden_upload(client, tar_archive(FILES), prefix="elsewhere/")  # a new version 1
        before = stored(api, TENANT + "old/")
        overwrite = {"prefix": "old/", "overwrite": True}
        response, _ = upload(client, tar_archive(FILES), names="encrypted", destination=overwrite)
        problem(response, 502, "name-key-mismatch")
        body = {"kid": "mySymKey", "source": {"key": "in/archive.tar"}, "names": "encrypted"}
        started = client.post(
            "/api/jobs/batch-encrypt", json={**body, "destination": {"prefix": "old/"}}
        )
        problem(started, 502, "name-key-mismatch")
        assert stored(api, TENANT + "old/") == before
    with api.client() as client:  # still the old version 1: the manifest was kept
        assert manifest(client, "old/") == old


def test_a_manifest_without_a_fingerprint_is_refused_under_a_version_made_after_it(
    api: Api,
) -> None:
    """A manifest written before fingerprints were recorded names its version by number
    alone: a rerun into its prefix still names under that version, unless the version on
    record was made after the manifest (the record deleted, the number issued again)."""
    with api.client() as client:
        create_key(client)
        hidden_upload(client, tar_archive(FILES), prefix="old/")
        without_fingerprint(api, TENANT + "old/manifest.json")
        overwrite = {"prefix": "old/", "overwrite": True}
        response, _ = upload(client, tar_archive(FILES), names="encrypted", destination=overwrite)
        assert response.status_code == 200, response.text  # named under version 1, as before
        without_fingerprint(api, TENANT + "old/manifest.json")
        old = manifest(client, "old/")
    api.objects.delete("sealstream/name-keys/default.json")
    with live_api(api.settings) as restarted, restarted.client() as client:
        hidden_upload(client, tar_archive(FILES), prefix="elsewhere/")  # a new version 1
        response, _ = upload(client, tar_archive(FILES), names="encrypted", destination=overwrite)
        problem(response, 502, "name-key-mismatch")
    with api.client() as client:
        assert manifest(client, "old/") == old


def without_fingerprint(api: Api, storage_key: str) -> None:
    """Make the object's record as one from before fingerprints: sealed again without it."""
    record = object_record(api.records, api.objects, storage_key)
    assert record.name_key_fingerprint is not None
    legacy = record.model_copy(update={"name_key_fingerprint": None})
    stored = api.objects.head(storage_key)
    kept = {name: value for name, value in stored.metadata.items() if name != RECORD_METADATA}
    metadata = record_metadata(api.records, legacy, kept)
    assert metadata is not None
    put = api.objects.put(storage_key, api.objects.get(storage_key), metadata=metadata)
    save_record(api.records, legacy.model_copy(update={"etag": put.etag}))


def test_rotation_stops_at_the_most_versions_allowed(api: Api) -> None:
    """SEALSTREAM_NAME_KEY_MAX_VERSIONS caps the versions a tenant admin can make: the
    rotation past it is refused (409), the record left as it was."""
    capped = api.settings.model_copy(update={"name_key_max_versions": 3})
    with live_api(capped) as limited, limited.client() as client:
        for version in (1, 2, 3):
            assert name_key(client, "POST", "/rotate")["current"] == version
        problem(client.post(NAME_KEY + "/rotate"), 409, "name-key-versions-exhausted")
        view = name_key(client)
    assert view["current"] == 3 and len(view["versions"]) == 3
