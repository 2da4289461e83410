"""A tenant's stored objects as the objects API shows them: listed with what their records
say of each, and deleted together with their record and index marker.

A deletion is three removals that no store makes atomic: the object, its record and its
markers, in that order, since a marker may go only once its object is gone. A sealed
note, written first, says what is being deleted:

    sealstream/deleting/<bucket>/<storage key>.json

and `finish_deletions`, which the lifecycle sweep runs, completes what a crash cut short.
The note names the object's version (its etag), so that an object written at the same
key since is left alone.
"""

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Self

from keystore.records import KID_PATTERN
from keystore.store import Proceed, always
from services.inventory import Inventory, Marker
from services.placement import BucketNotAllowed, Spaces, tenant_prefix
from storage import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, StorageUnavailable
from storage.documents import CamelModel, FrozenCamelModel
from storage.integrity import Records, RecordTampered
from storage.records import ObjectRecord, load_record, object_record, record_key

logger = logging.getLogger(__name__)

DELETING_PREFIX = "sealstream/deleting/"
NOTE_KIND = "deletion"


class ObjectState(StrEnum):
    """What an object's record says of it: a check of a listing, not a read of the object
    (the verify job reads it whole)."""

    SEALED = "sealed"  # its record is authentic and names this very object: size and etag
    CHANGED = "changed"  # its record names another object there: replaced behind our back
    UNRECORDED = "unrecorded"  # no record: not stored by the service (a manifest, say)
    RECORD_REFUSED = "record-refused"  # a record that failed authentication


class ObjectEntry(CamelModel):
    """One object of a listing."""

    key: str
    bucket: str
    size: int  # stored bytes: the ciphertext
    created_at: datetime
    kid: str | None = None
    key_version: int | None = None
    plaintext_size: int | None = None
    state: ObjectState

    @classmethod
    def of(cls, records: Records, store: ObjectStore, info: ObjectInfo, key: str) -> Self:
        """The entry of the listed object `info`, named `key` by its tenant."""
        base = cls(
            key=key,
            bucket=store.bucket,
            size=info.size,
            created_at=info.last_modified,
            state=ObjectState.SEALED,
        )
        try:
            record = object_record(records, store, info.key, info)
        except ObjectNotFound:
            return base.model_copy(update={"state": ObjectState.UNRECORDED})
        except RecordTampered:
            return base.model_copy(update={"state": ObjectState.RECORD_REFUSED})
        matches = (record.etag, record.ciphertext_size) == (info.etag, info.size)
        return base.model_copy(
            update={
                "created_at": record.created_at,
                "kid": record.kid,
                "key_version": record.key_version,
                "plaintext_size": record.plaintext_size,
                "state": ObjectState.SEALED if matches else ObjectState.CHANGED,
            }
        )


def list_objects(
    records: Records, store: ObjectStore, tenant: str, prefix: str, *, after: str, limit: int
) -> tuple[list[ObjectEntry], str | None]:
    """Up to `limit` of the tenant's objects whose keys start with `prefix`, after the key
    `after`, in key order; and the cursor of the next page (None on the last)."""
    base = tenant_prefix(tenant)
    entries: list[ObjectEntry] = []
    for info in store.list(base + prefix, start_after=base + after if after else ""):
        if len(entries) == limit:
            return entries, entries[-1].key
        entries.append(ObjectEntry.of(records, store, info, info.key.removeprefix(base)))
    return entries, None


class DeletionNote(FrozenCamelModel):
    """An object being deleted: the version of it (etag), and its markers' key versions."""

    tenant: str
    bucket: str
    storage_key: str
    etag: str
    versions: tuple[tuple[str, int], ...]  # (kid, version) of each marker it may have
    created_at: datetime

    @property
    def name(self) -> str:
        return f"{DELETING_PREFIX}{self.bucket}/{self.storage_key}.json"

    def markers(self) -> Iterator[Marker]:
        for kid, version in self.versions:
            yield Marker.new(self.tenant, kid, version, self.bucket, self.storage_key)


def delete_object(
    records: Records, store: ObjectStore, tenant: str, storage_key: str
) -> ObjectRecord | None:
    """Delete a stored object, its record and its markers; `ObjectNotFound` if there is
    no such object. The deleted object's record, if it had one that authenticates."""
    info = store.head(storage_key)
    record = _authentic_record(records, store, info)
    note = DeletionNote(
        tenant=tenant,
        bucket=store.bucket,
        storage_key=storage_key,
        etag=info.etag,
        versions=tuple(sorted(_marked_versions(record, info))),
        created_at=datetime.now(UTC),
    )
    records.put(NOTE_KIND, note.name, note)
    finish_deletion(records, store, note)
    return record if record is not None and record.etag == info.etag else None


def _authentic_record(
    records: Records, store: ObjectStore, info: ObjectInfo
) -> ObjectRecord | None:
    try:
        return object_record(records, store, info.key, info)
    except (ObjectNotFound, RecordTampered):
        return None


def finish_deletion(records: Records, store: ObjectStore, note: DeletionNote) -> bool:
    """Complete the deletion `note` describes; idempotent. Whether it was completed:
    false if another object has been written at the key since (that one stays)."""
    try:
        current = store.head(note.storage_key)
    except ObjectNotFound:
        current = None
    if current is not None and current.etag != note.etag:
        records.store.delete(note.name)  # written again since: that object is not ours
        return False
    store.delete(note.storage_key)
    newer = _record_unless(records, note)
    if newer is None:
        records.store.delete(record_key(note.bucket, note.storage_key))
    inventory = Inventory(records)
    for marker in note.markers():
        if newer is None or (newer.kid, newer.key_version) != (marker.kid, marker.key_version):
            inventory.remove(marker)
    records.store.delete(note.name)
    return True


def finish_deletions(
    records: Records, spaces: Spaces, proceed: Proceed = always
) -> list[DeletionNote]:
    """Complete every deletion a crash cut short (the lifecycle sweep), each once
    `proceed(tenant, storage key)` allows it (one it does not waits for the next sweep);
    the notes of those completed (not those overtaken by a newer object at the key)."""
    finished = []
    for name, note in records.all(NOTE_KIND, DELETING_PREFIX, DeletionNote):
        if name != note.name:
            continue  # sealed under its name, so only a defect could get here
        if not proceed(note.tenant, note.storage_key):
            continue
        try:
            completed = finish_deletion(records, spaces.store(note.tenant, note.bucket), note)
        except StorageUnavailable:
            raise  # the next sweep tries again
        except (BucketNotAllowed, StorageError) as error:
            # One that cannot be finished must not hold up the others; it stays noted.
            logger.warning("cannot finish the deletion noted at %s: %s", name, error)
            continue
        if completed:
            finished.append(note)
    return finished


def _record_unless(records: Records, note: DeletionNote) -> ObjectRecord | None:
    """The record at the note's object if it describes another object than the one
    deleted (one written since), else None: that record is the deleted object's, or
    there is none, or it fails authentication (and describes nothing to keep)."""
    try:
        record = load_record(records, note.bucket, note.storage_key)
    except (ObjectNotFound, RecordTampered):
        return None
    return None if record.etag == note.etag else record


def _marked_versions(record: ObjectRecord | None, info: ObjectInfo) -> set[tuple[str, int]]:
    """The key versions an object may have a marker under: its record's, and those its
    storage metadata names. Neither need be believed: once the object is gone, no marker
    of it stands for anything, so removing one too many is harmless."""
    versions: set[tuple[str, int]] = set()
    if record is not None:
        versions.add((record.kid, record.key_version))
    kid = info.metadata.get("sealstream-kid", "")
    version = info.metadata.get("sealstream-key-version", "")
    if KID_PATTERN.fullmatch(kid) and version.isdigit() and len(version) < 10:
        versions.add((kid, int(version)))
    return versions
