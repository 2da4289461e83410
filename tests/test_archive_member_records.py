"""Archive members small enough for one write carry their record in their own metadata,
on a local directory and on moto: one write each (their run marked once in the index), no
record file and no intent, yet read, listed, verified and deleted like any recorded object; and a
bucket writer without the KEK can neither alter such a record, nor move one (with its
object or alone) onto another object, nor make an object without one pass for recorded;
nor, by putting back an older record file or an older member, get the key version a
member needs retired and destroyed."""

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from keystore import KeyStore
from sealstream.wiring import build_parts
from services.inventory import RUN_NAME_PREFIX, version_prefix
from services.retirement import Retirements
from storage import ObjectInfo, ObjectNotFound, ObjectStore
from storage.local import LocalStore
from storage.records import INTENTS_PREFIX, RECORD_METADATA, object_record, record_key
from tests.conftest import Api
from tests.support.data import random_bytes, tar_archive
from tests.support.http import (
    FORM_TYPE,
    KEYS,
    create_key,
    encrypt,
    form_bytes,
    problem,
    read_object,
)
from tests.support.jobs import finished_job, start_verify

ARCHIVE = "/api/crypto/stream/encrypt-archive"
KID = "mySymKey"
TENANT = "tenants/default/"
SMALL = {f"small-{n}.bin": random_bytes(600 + 3_000 * n, seed=n) for n in range(3)}
LARGE = {"large.bin": random_bytes(5 * 1024 * 1024 + 1, seed=9)}  # past one S3 part


def exists(store: ObjectStore, key: str) -> bool:
    try:
        store.head(key)
    except ObjectNotFound:
        return False
    return True


def stream_in(
    client: httpx.Client, members: dict[str, bytes], *, overwrite: bool = False
) -> list[dict[str, Any]]:
    fields = {"kid": "mySymKey", "destination": {"prefix": "out/", "overwrite": overwrite}}
    body = form_bytes(fields, tar_archive(members))
    response = client.post(ARCHIVE, content=body, headers={"Content-Type": FORM_TYPE})
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["status"] == "succeeded", lines[-1]
    return [line for line in lines if line.get("event") == "member"]


def test_a_small_member_is_recorded_in_its_metadata_and_read_like_any(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        sealed = stream_in(client, SMALL | LARGE)
        assert {entry["path"] for entry in sealed} == set(SMALL) | set(LARGE)
        for name, data in (SMALL | LARGE).items():
            assert read_object(client, f"out/{name}").content == data
        listed = client.get("/api/objects", params={"prefix": "out/"}).json()["objects"]
        states = {entry["key"]: (entry["state"], entry["kid"]) for entry in listed}
        assert states[f"out/{next(iter(SMALL))}"] == ("sealed", "mySymKey")
        verified = finished_job(client, start_verify(client, f"out/{next(iter(SMALL))}")["id"])
        assert verified["status"] == "succeeded", verified
    bucket = api.objects.bucket
    for name in SMALL:
        assert RECORD_METADATA in api.objects.head(f"{TENANT}out/{name}").metadata
        assert not exists(api.objects, record_key(bucket, f"{TENANT}out/{name}"))
    # On S3 a member written part by part keeps a record file, as any large object; a
    # local directory writes every object at once.
    on_s3 = api.settings.storage_url.startswith("s3://")
    assert exists(api.objects, record_key(bucket, f"{TENANT}out/large.bin")) == on_s3
    assert not list(api.objects.list(INTENTS_PREFIX))
    with api.client() as client:
        assert client.delete(f"/api/objects/out/{next(iter(SMALL))}").status_code == 204
        assert client.get("/api/objects", params={"prefix": "out/small-0"}).json() == {
            "objects": [],
            "next": None,
        }


def test_a_record_in_metadata_altered_moved_or_dropped_is_refused(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        stream_in(client, SMALL)
    a, b, c = (f"{TENANT}out/{name}" for name in SMALL)
    # Altered: the size it records.
    info = api.objects.head(a)
    sealed = json.loads(info.metadata[RECORD_METADATA])
    sealed["record"]["plaintextSize"] += 1
    altered = {**info.metadata, RECORD_METADATA: json.dumps(sealed)}
    api.objects.put(a, api.objects.get(a), metadata=altered)
    # Moved: b's record put on c, over c's bytes, and b's object and record over a's.
    api.objects.put(c, api.objects.get(c), metadata=api.objects.head(b).metadata)
    with api.client() as client:
        problem(read_object(client, "out/small-0.bin"), 502, "record-tampered")
        problem(read_object(client, "out/small-2.bin"), 502, "record-tampered")
        api.objects.put(a, api.objects.get(b), metadata=api.objects.head(b).metadata)
        problem(read_object(client, "out/small-0.bin"), 502, "record-tampered")
        # Dropped: the object no longer passes for one the service stored.
        api.objects.put(b, api.objects.get(b), metadata={})
        problem(read_object(client, "out/small-1.bin"), 502, "object-unrecorded")
        listed = client.get("/api/objects", params={"prefix": "out/small-"}).json()["objects"]
        states = [entry["state"] for entry in listed]
        assert states == ["record-refused", "unrecorded", "record-refused"]


def test_members_replaced_by_members_leave_no_stale_record(api: Api) -> None:
    """A member sealed over an object that had a record file removes that file: the
    record the object carries is the only one."""
    name = next(iter(SMALL))
    with api.client() as client:
        create_key(client)
        response = encrypt(client, os.urandom(100), destination={"key": f"out/{name}"})
        assert response.status_code == 201, response.text
        assert exists(api.objects, record_key(api.objects.bucket, f"{TENANT}out/{name}"))
        stream_in(client, {name: SMALL[name]}, overwrite=True)
        assert read_object(client, f"out/{name}").content == SMALL[name]
    assert not exists(api.objects, record_key(api.objects.bucket, f"{TENANT}out/{name}"))


def retire(client: httpx.Client, version: int) -> httpx.Response:
    confirm = {"confirm": f"{KID}#{version}", "pendingWindowDays": 1}
    return client.post(f"{KEYS}/{KID}/versions/{version}/retire", json=confirm)


def reencrypt(client: httpx.Client, version: int) -> None:
    job = client.post("/api/jobs/reencrypt", json={"kid": KID, "version": version})
    assert finished_job(client, job.json()["id"], timeout=120)["status"] == "succeeded"


def sweep_after_the_window(api: Api) -> Retirements:
    """The destruction sweep, as it will run once a one-day pending window has passed."""
    parts = build_parts(api.settings)
    later = datetime.now(UTC) + timedelta(days=2)
    keys = KeyStore(parts.records, parts.kek, clock=lambda: later)
    return Retirements(keys, parts.records, parts.spaces)


def member_beside_an_old_record_file(api: Api, client: httpx.Client, data: bytes) -> str:
    """A bucket writer keeps the record file of an object (version 1) that a member
    (version 2) later replaced, puts it back and deletes the member's index marker (its
    run's); the tenant then rotates and re-encrypts what the index lists of version 2.
    The old record file's etag."""
    storage_key = f"{TENANT}out/x"
    create_key(client)
    old = encrypt(client, data, destination={"key": "out/x"})
    assert old.status_code == 201, old.text
    old_record = api.objects.get(record_key(api.objects.bucket, storage_key))
    assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    stream_in(client, {"x": data}, overwrite=True)
    api.objects.put(record_key(api.objects.bucket, storage_key), old_record)
    index = version_prefix("default", KID, 2)
    for info in api.objects.list(index):
        if info.key.removeprefix(index).startswith(RUN_NAME_PREFIX):  # the member's run's
            api.objects.delete(info.key)
    assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
    reencrypt(client, 2)  # what it finds of version 2: the archive's manifest
    etag: str = old.json()["etag"]
    return etag


def test_an_old_record_file_put_back_beside_a_member_does_not_hide_its_version(
    api: Api,
) -> None:
    """Reads believe the record in the member's metadata, and so do listings and the
    census that stands in for the index: the version the member needs is not retired."""
    data = random_bytes(3_000, seed=21)
    with api.client() as client:
        member_beside_an_old_record_file(api, client, data)
        listed = client.get("/api/objects", params={"prefix": "out/x"}).json()["objects"]
        assert [(entry["keyVersion"], entry["state"]) for entry in listed] == [(2, "sealed")]
        problem(retire(client, 2), 409, "version-in-use")
        assert read_object(client, "out/x").content == data


def test_nor_does_it_with_the_members_etag_edited_to_match(api: Api) -> None:
    """On a local directory an etag is a token in the sidecar: edited to the old record
    file's, with a member of the same size, the record file passes for the member's. The
    census reads the header of an object whose record names another version, and the
    member's names version 2."""
    store_ = api.objects
    if not isinstance(store_, LocalStore):
        pytest.skip("the local directory backend only")
    data = random_bytes(3_000, seed=23)
    with api.client() as client:
        etag = member_beside_an_old_record_file(api, client, data)
        sidecar_path = store_.root / ".meta" / f"{TENANT}out/x.json"
        sidecar = json.loads(sidecar_path.read_text())
        sidecar_path.write_text(json.dumps({**sidecar, "etag": etag}))
        listed = client.get("/api/objects", params={"prefix": "out/x"}).json()["objects"]
        assert [(entry["keyVersion"], entry["state"]) for entry in listed] == [(1, "sealed")]
        problem(retire(client, 2), 409, "version-in-use")


def test_destruction_waits_while_a_rolled_back_member_uses_the_version(api: Api) -> None:
    """A member re-encrypted in place has a record file; a bucket writer puts back the
    member from before, with its metadata: the sweep holds version 1's material until
    that member is gone."""
    storage_key = f"{TENANT}out/x"
    with api.client() as client:
        create_key(client)
        stream_in(client, {"x": random_bytes(3_000, seed=22)})
        old_object, old_metadata = api.objects.get(storage_key), api.objects.head(storage_key)
        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        reencrypt(client, 1)
        assert retire(client, 1).status_code == 200

        api.objects.put(storage_key, old_object, metadata=old_metadata.metadata)
        retirements = sweep_after_the_window(api)
        assert retirements.destroy_due() == []

        assert client.delete("/api/objects/out/x").status_code == 204
        assert retirements.destroy_due() == [f"default/{KID}#1"]


def test_members_over_free_keys_read_nothing_first_and_over_taken_ones_replace_them(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With overwrite, a member whose key is free is written on the condition that it
    still is, without first reading what it would replace (a HEAD that finds nothing);
    one whose key is taken is written over it, its record's generation past the
    replaced one's. (On a local directory a listing heads each file: the run's end lists
    its prefix, and finds the members.)"""
    headed: list[str] = []  # keys headed and found
    missed: list[str] = []  # keys headed and not found
    store_class = type(api.objects)
    head = store_class.head

    def noted_head(store: ObjectStore, key: str) -> ObjectInfo:
        try:
            found = head(store, key)
        except ObjectNotFound:
            missed.append(key)
            raise
        headed.append(key)
        return found

    monkeypatch.setattr(store_class, "head", noted_head)
    members = {f"{TENANT}out/{name}" for name in SMALL}

    def generations() -> dict[str, int]:
        return {
            key: object_record(api.records, api.objects, key, head(api.objects, key)).generation
            for key in members
        }

    with api.client() as client:
        create_key(client)
        stream_in(client, SMALL, overwrite=True)
        assert not members & set(missed)
        first = generations()
        again = {name: data[::-1] for name, data in SMALL.items()}
        stream_in(client, again, overwrite=True)
        assert members <= set(headed)
        for name, data in again.items():
            assert read_object(client, f"out/{name}").content == data
    assert all(generation > first[key] for key, generation in generations().items())
