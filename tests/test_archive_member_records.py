"""Archive members small enough for one write carry their record in their own metadata,
on a local directory and on moto: one write each besides the marker, no record file and
no intent, yet read, listed, verified and deleted like any recorded object; and a
bucket writer without the KEK can neither alter such a record, nor move one (with its
object or alone) onto another object, nor make an object without one pass for recorded."""

import json
import os
from typing import Any

import httpx

from storage import ObjectNotFound, ObjectStore
from storage.records import INTENTS_PREFIX, RECORD_METADATA, record_key
from tests.conftest import Api
from tests.support.data import random_bytes, tar_archive
from tests.support.http import FORM_TYPE, create_key, encrypt, form_bytes, problem, read_object
from tests.support.jobs import finished_job, start_verify

ARCHIVE = "/api/crypto/stream/encrypt-archive"
TENANT = "tenants/default/"
SMALL = {f"small-{n}.bin": random_bytes(600 + 3_000 * n, seed=n) for n in range(3)}
LARGE = {"large.bin": random_bytes(5 * 1024 * 1024 + 1, seed=9)}  # past one S3 part


def exists(store: ObjectStore, key: str) -> bool:
    try:
        store.head(key)
    except ObjectNotFound:
        return False
    return True


def stream_in(client: httpx.Client, members: dict[str, bytes]) -> list[dict[str, Any]]:
    fields = {"kid": "mySymKey", "destination": {"prefix": "out/"}}
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
        fields = {"kid": "mySymKey", "destination": {"prefix": "out/", "overwrite": True}}
        body = form_bytes(fields, tar_archive({name: SMALL[name]}))
        replaced = client.post(ARCHIVE, content=body, headers={"Content-Type": FORM_TYPE})
        assert json.loads(replaced.text.splitlines()[-1])["status"] == "succeeded"
        assert read_object(client, f"out/{name}").content == SMALL[name]
    assert not exists(api.objects, record_key(api.objects.bucket, f"{TENANT}out/{name}"))
