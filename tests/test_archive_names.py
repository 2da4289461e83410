"""Hidden member names (`"names": "encrypted"`) over real HTTP, on a local directory and
on moto: object keys derived from the paths under the tenant's name key, the same keys on
a rerun, the sealed manifest mapping them back, records holding no plaintext digest, and
verify checking the HMAC that stands for it; what a bucket writer without the KEK can
still do to such objects is refused."""

import hashlib
import json
import re
from typing import Any

import httpx
import pytest

from storage.records import (
    RECORD_METADATA,
    ObjectRecord,
    object_record,
    record_key,
    record_metadata,
    save_record,
)
from tests.conftest import Api
from tests.support.data import random_bytes, tar_archive
from tests.support.http import create_key, read_object
from tests.support.jobs import finished_job
from tests.test_api_archives import manifest, upload

FILES = {
    "hr/dismissals/2026/jane-doe.pdf": random_bytes(70_000, seed=7),
    "hr/notes.txt": b"confidential\n" * 40,
    "a": b"x",
    "long/" + "n" * 300: b"a long name",  # 541 bytes encrypted, in three segments
}
TOO_LONG = "t" * 1000  # its encrypted name would pass 1,024 bytes
BASE32_SEGMENTS = re.compile(r"[a-z2-7]{1,192}(/[a-z2-7]{1,192})*")
SCOPES = ["crypto:encrypt", "crypto:decrypt", "jobs:write", "jobs:read", "keys:write"]


def hidden_upload(client: httpx.Client, archive: bytes, **more: Any) -> dict[str, str]:
    """Upload with hidden names; each sealed member's path and the key it was given."""
    response, lines = upload(client, archive, names="encrypted", **more)
    assert response.status_code == 200, response.text
    assert lines[-1]["status"] == "succeeded", lines[-1]
    return {line["path"]: line["key"] for line in lines if line.get("status") == "sealed"}


def stored_record(api: Api, storage_key: str) -> dict[str, Any]:
    """The record as the bucket holds it: in the object's metadata (a small member's) or
    in its record file."""
    metadata = api.objects.head(storage_key).metadata
    if RECORD_METADATA in metadata:
        sealed = metadata[RECORD_METADATA]
    else:
        sealed = api.objects.get(record_key(api.objects.bucket, storage_key)).decode()
    record: dict[str, Any] = json.loads(sealed)["record"]
    return record


def verify(client: httpx.Client, key: str) -> dict[str, Any]:
    started = client.post("/api/jobs/verify", json={"key": key})
    assert started.status_code == 202, started.text
    return finished_job(client, started.json()["id"])


def test_names_are_hidden_found_again_and_mapped_back(api: Api) -> None:
    archive = tar_archive({**FILES, TOO_LONG: b"refused"})
    with api.client() as client:
        create_key(client)
        keys = hidden_upload(client, archive)
        assert set(keys) == set(FILES)
        for path, key in keys.items():
            name = key.removeprefix("out/")
            assert BASE32_SEGMENTS.fullmatch(name), key
            assert len(name) <= 1024
            opened = read_object(client, key)
            assert opened.status_code == 200 and opened.content == FILES[path], path
        document = manifest(client)
        assert document["names"] == "encrypted" and document["nameKeyVersion"] == 1
        mapped = {m["path"]: m["key"] for m in document["members"] if m["status"] == "sealed"}
        assert mapped == keys
        refused = [m for m in document["members"] if m["status"] == "refused"]
        assert [m["path"] for m in refused] == [TOO_LONG]
        assert "1024" in refused[0]["reason"]

        rerun = hidden_upload(client, archive, destination={"prefix": "out/", "overwrite": True})
        assert rerun == keys, "a rerun lands on the objects it wrote"
        elsewhere = hidden_upload(client, archive, prefix="other/")
        assert {k.removeprefix("other/") for k in elsewhere.values()}.isdisjoint(
            k.removeprefix("out/") for k in keys.values()
        ), "the prefix is associated data"

        storage_keys = [info.key for info in api.objects.list("tenants/default/out/")]
        assert not any(word in key for key in storage_keys for word in ("jane", "dismissals"))
        for path, key in keys.items():
            record = stored_record(api, "tenants/default/" + key)
            text = json.dumps(record)
            assert hashlib.sha256(FILES[path]).hexdigest() not in text
            assert "plaintextSha256" not in record and "plaintextSize" not in record
            assert record["nameKeyVersion"] == 1 and len(record["plaintextMac"]) == 64
            job = verify(client, key)
            assert job["status"] == "succeeded", job
            assert job["result"]["plaintextSha256"] is None  # the job record is kept in the bucket


def test_a_bucket_writer_cannot_swap_or_alter_hidden_objects(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        keys = hidden_upload(client, tar_archive(FILES))
        first, second = (f"tenants/default/{keys[path]}" for path in ("hr/notes.txt", "a"))
        store = api.objects
        store.put(second, store.get(first), metadata=store.head(first).metadata)
        job = verify(client, keys["a"])  # the record it carries names another place
        assert job["status"] == "failed" and job["error"]["code"] == "record-tampered", job
        assert read_object(client, keys["a"]).status_code >= 400

        # An authentic record whose HMAC is not the plaintext's: only the HMAC can tell.
        target = f"tenants/default/{keys['hr/notes.txt']}"
        recorded = object_record(api.records, store, target)
        altered = recorded.model_copy(update={"plaintext_mac": "00" * 32})
        altered = ObjectRecord.model_validate(altered.model_dump())
        metadata = store.head(target).metadata
        if RECORD_METADATA in metadata:  # sealed as the service would: a small member's
            plain = {k: v for k, v in metadata.items() if k != RECORD_METADATA}
            resealed = record_metadata(api.records, altered, plain)
            assert resealed is not None
            store.put(target, store.get(target), metadata=resealed)
        else:
            save_record(api.records, altered)
        job = verify(client, keys["hr/notes.txt"])
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "plaintext-mac-mismatch", job


@pytest.mark.parametrize("api", ["local"], indirect=True)
def test_another_tenants_name_key_names_differently(api: Api) -> None:
    archive = tar_archive(FILES)
    with api.client() as admin:
        create_key(admin)
        ours = hidden_upload(admin, archive)
        issued = admin.post("/api/admin/tokens", json={"tenant": "acme", "scopes": SCOPES})
        assert issued.status_code == 201, issued.text
    with api.client(issued.json()["token"]) as acme:
        create_key(acme)
        theirs = hidden_upload(acme, archive)
    assert set(ours.values()).isdisjoint(theirs.values())
    wrapped = [
        json.loads(api.objects.get(f"sealstream/name-keys/{tenant}.json"))["record"]
        for tenant in ("default", "acme")
    ]
    assert [w["tenant"] for w in wrapped] == ["default", "acme"]
    materials = {w["versions"][0]["wrappedMaterial"] for w in wrapped}
    assert len(materials) == 2


def test_the_batch_job_hides_names_and_a_rerun_lands_on_them(api: Api) -> None:
    """The batch job over an archive in storage: hidden names, the same as the stream
    route's, a sealed manifest mapping them back, and a rerun over the same objects."""
    api.objects.put("tenants/default/in/archive.tar", tar_archive(FILES))
    body = {
        "kid": "mySymKey",
        "source": {"key": "in/archive.tar"},
        "destination": {"prefix": "out/"},
        "names": "encrypted",
    }
    with api.client() as client:
        create_key(client)
        streamed = hidden_upload(client, tar_archive(FILES), prefix="streamed/")
        for overwrite in (False, True):
            started = client.post("/api/jobs/batch-encrypt", json={**body, "overwrite": overwrite})
            assert started.status_code == 202, started.text
            job = finished_job(client, started.json()["id"])
            assert job["status"] == "succeeded", job
            document = manifest(client)
            keys = {m["path"]: m["key"] for m in document["members"]}
            if not overwrite:
                first = keys
        assert keys == first, "a rerun lands on the objects it wrote"
        assert set(keys) == set(FILES)
        for path, key in keys.items():
            assert BASE32_SEGMENTS.fullmatch(key.removeprefix("out/")), key
            assert read_object(client, key).content == FILES[path]
            assert "plaintextSha256" not in stored_record(api, "tenants/default/" + key)
        assert {k.removeprefix("out/") for k in keys.values()}.isdisjoint(
            k.removeprefix("streamed/") for k in streamed.values()
        )
        refused = client.post("/api/jobs/batch-encrypt", json={**body, "mode": "whole"})
        assert refused.status_code == 422, refused.text
    journal_and_reports = b"".join(
        api.objects.get(info.key) for info in api.objects.list("sealstream/")
    )
    assert b"jane-doe" not in journal_and_reports
