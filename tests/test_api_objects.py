"""Stored objects as a resource, over real HTTP on both backends: listed (paged, with what
each one's record says), deleted with their record and index marker, a deletion cut
short finished by the sweep; and the index of key versions kept by every write.

Another tenant's objects are out of reach, and a file copied into the local directory by
hand neither breaks a listing nor has its path told.
"""

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from services.inventory import Marker, VersionIndex
from services.placement import Spaces
from services.stored_objects import DeletionNote, finish_deletions
from storage import LocalStore, ObjectNotFound
from storage.records import load_record, record_key
from tests.conftest import Api
from tests.support.data import random_bytes
from tests.support.http import KEYS, create_key, encrypt, problem, read_object

OBJECTS = "/api/objects"
KID = "mySymKey"
TENANT = "default"


def store(client: httpx.Client, key: str, data: bytes, **destination: Any) -> dict[str, Any]:
    response = encrypt(client, data, destination={"key": key, **destination})
    assert response.status_code == 201, response.text
    stored: dict[str, Any] = response.json()
    return stored


def marked(api: Api, version: int, kid: str = KID) -> list[str]:
    """The storage keys the index lists under `kid#version`, sorted."""
    return sorted(
        m.storage_key
        for m in VersionIndex(api.records, api.parts.spaces).markers(TENANT, kid, version)
    )


def listing(client: httpx.Client, **query: Any) -> dict[str, Any]:
    response = client.get(OBJECTS, params=query)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def tenant_client(api: Api, admin: httpx.Client, tenant: str, *scopes: str) -> httpx.Client:
    issued = admin.post("/api/admin/tokens", json={"tenant": tenant, "scopes": list(scopes)})
    assert issued.status_code == 201, issued.text
    return api.client(issued.json()["token"])


def test_objects_are_listed_paged_with_their_key_version_and_state(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        for name in ("a", "b", "c"):
            store(client, f"docs/{name}", random_bytes(1000, seed=ord(name)))
        store(client, "other/x", b"x")
        # An object the service did not store, and one whose record was tampered with.
        api.objects.put("tenants/default/docs/d-unrecorded", b"not a message")
        store(client, "docs/e", b"e")
        name = record_key(api.objects.bucket, "tenants/default/docs/e")
        api.objects.put(
            name, api.objects.get(name).replace(b'"plaintextSize": 1', b'"plaintextSize": 2')
        )

        first = listing(client, prefix="docs/", limit=2)
        second = listing(client, prefix="docs/", limit=2, after=first["next"])
        third = listing(client, prefix="docs/", limit=2, after=second["next"])

    entries = first["objects"] + second["objects"] + third["objects"]
    assert [entry["key"] for entry in entries] == [
        "docs/a",
        "docs/b",
        "docs/c",
        "docs/d-unrecorded",
        "docs/e",
    ]
    assert third["next"] is None
    a = entries[0]
    assert (a["kid"], a["keyVersion"], a["plaintextSize"], a["state"]) == (KID, 1, 1000, "sealed")
    assert a["size"] > 1000 and a["bucket"] == api.objects.bucket
    datetime.fromisoformat(a["createdAt"])
    assert entries[3]["state"] == "unrecorded" and entries[3]["kid"] is None
    assert entries[4]["state"] == "record-refused"
    assert "tenants/" not in str(entries)


def test_every_write_marks_its_object_under_its_key_version(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
        store(client, "docs/b", b"b")
        assert marked(api, 1) == ["tenants/default/docs/a", "tenants/default/docs/b"]

        assert client.post(f"{KEYS}/{KID}/rotate").status_code == 200
        # Replaced under the new version: the marker moves with it.
        store(client, "docs/a", b"a2", overwrite=True)
        # Replaced under the same version: its marker stays.
        store(client, "docs/a", b"a3", overwrite=True)
        # A refused write leaves no marker of its own.
        refused = encrypt(client, b"x", destination={"key": "docs/b"})
        problem(refused, 409, "object-exists")

    assert marked(api, 1) == ["tenants/default/docs/b"]
    assert marked(api, 2) == ["tenants/default/docs/a"]
    assert VersionIndex(api.records, api.parts.spaces).counts(TENANT, KID) == {1: 1, 2: 1}


def test_deleting_an_object_takes_its_record_and_marker_too(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        store(client, "docs/a b", b"a")
        store(client, "docs/keep", b"k")

        assert client.delete(f"{OBJECTS}/docs/a b").status_code == 204

        problem(client.delete(f"{OBJECTS}/docs/a b"), 404, "object-not-found")
        problem(read_object(client, "docs/a b"), 404, "object-not-found")
        assert [e["key"] for e in listing(client)["objects"]] == ["docs/keep"]
    with pytest.raises(ObjectNotFound):
        load_record(api.records, api.objects.bucket, "tenants/default/docs/a b")
    assert marked(api, 1) == ["tenants/default/docs/keep"]
    assert list(api.objects.list("sealstream/deleting/")) == []


def test_a_deletion_cut_short_is_finished_by_the_sweep(api: Api) -> None:
    with api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
        store(client, "docs/b", b"b")
    storage_key = "tenants/default/docs/a"
    # What a process killed right after noting the deletion leaves behind.
    note = DeletionNote(
        tenant=TENANT,
        bucket=api.objects.bucket,
        storage_key=storage_key,
        etag=api.objects.head(storage_key).etag,
        versions=((KID, 1),),
        created_at=datetime.now(UTC),
    )
    api.records.put("deletion", note.name, note)
    # And one whose object was written again since: that object stays.
    stale = note.model_copy(update={"storage_key": "tenants/default/docs/b", "etag": "other"})
    api.records.put("deletion", stale.name, stale)

    spaces = Spaces(api.objects, {}, lambda bucket: api.objects)
    # Both notes are cleared; only the first deletion was the note's to complete.
    assert [note.storage_key for note in finish_deletions(api.records, spaces)] == [storage_key]

    with pytest.raises(ObjectNotFound):
        api.objects.head(storage_key)
    with pytest.raises(ObjectNotFound):
        load_record(api.records, api.objects.bucket, storage_key)
    assert marked(api, 1) == ["tenants/default/docs/b"]
    assert api.objects.head("tenants/default/docs/b").size > 0
    assert list(api.objects.list("sealstream/deleting/")) == []
    assert finish_deletions(api.records, spaces) == []


def test_another_tenants_objects_are_not_found_and_scopes_are_required(api: Api) -> None:
    with api.client() as admin:
        create_key(admin)
        store(admin, "docs/secret", b"s")
        with tenant_client(api, admin, "acme", "objects:read", "objects:write") as acme:
            assert listing(acme)["objects"] == []
            problem(acme.delete(f"{OBJECTS}/docs/secret"), 404, "object-not-found")
        with tenant_client(api, admin, TENANT, "keys:read") as reader:
            problem(reader.get(OBJECTS), 403, "insufficient-scope")
            problem(reader.delete(f"{OBJECTS}/docs/secret"), 403, "insufficient-scope")
        problem(admin.get(OBJECTS, params={"prefix": "../"}), 400, "invalid-object-key")
        problem(admin.delete(f"{OBJECTS}/docs/%07x"), 400, "invalid-object-key")
    assert api.objects.head("tenants/default/docs/secret").size > 0


def test_a_file_copied_into_the_local_store_by_hand_is_skipped_without_a_path(
    api: Api,
) -> None:
    if not isinstance(api.objects, LocalStore):
        pytest.skip("the local directory backend only")
    with api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
        (api.objects.root / "tenants" / "default" / "docs" / "copied").write_bytes(b"by hand")
        store(client, "docs/z", b"z")

        page = listing(client, prefix="docs/")
        read = read_object(client, "docs/copied")

    assert [entry["key"] for entry in page["objects"]] == ["docs/a", "docs/z"]
    assert read.status_code == 502 and str(api.objects.root) not in read.text
    assert "tenants/" not in read.text


def test_a_marker_is_sealed_and_bound_to_its_name(api: Api) -> None:
    """A marker moved to another version's name, or planted, is not believed."""
    with api.client() as client:
        create_key(client)
        store(client, "docs/a", b"a")
    inventory = VersionIndex(api.records, api.parts.spaces)
    (marker,) = inventory.markers(TENANT, KID, 1)
    moved = Marker.new(TENANT, KID, 7, marker.bucket, marker.storage_key)
    api.objects.put(moved.name, api.objects.get(marker.name))
    assert list(inventory.markers(TENANT, KID, 7)) == []
