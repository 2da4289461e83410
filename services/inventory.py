"""The index of stored objects by key version: which objects each version of a key seals,
listed without reading the bucket.

For every object the service writes (an encryption into storage, a batch member, a
re-encrypted object) a marker, a sealed record, names its tenant, kid, version, bucket
and storage key:

    sealstream/index/<tenant>/<kid>/<version>/<SHA-256 of bucket "/" storage key>.json

Named by a digest, a marker's name has the same length whatever the object's key, so
every key an object record can name has a marker too; a listing comes in digest order.

Markers err on the side of too many, never too few. One is written before its object's
upload completes, and removed only once its object is gone or has moved to another
version; a crash in between leaves one too many, which the reencrypt job's version
selector drops once it finds no such object. The index is a help, not the proof: whoever
can write the bucket can delete markers, so retiring a version checks the object records
too (`services.retirement`).
"""

import hashlib
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime
from typing import Self

from services.placement import client_key
from storage import ObjectExists, ObjectNotFound, ObjectStore, StorageError
from storage.documents import CamelModel, FrozenCamelModel
from storage.integrity import Records, RecordTampered
from storage.records import ObjectRecord, object_record

INDEX_PREFIX = "sealstream/index/"
MARKER_KIND = "object-marker"
MARKER_SUFFIX = ".json"


class Marker(FrozenCamelModel):
    """One stored object sealed under one key version."""

    tenant: str
    kid: str
    key_version: int
    bucket: str
    storage_key: str
    created_at: datetime

    @classmethod
    def new(cls, tenant: str, kid: str, version: int, bucket: str, storage_key: str) -> Self:
        """The marker of an object about to be sealed under `kid`'s `version`."""
        return cls(
            tenant=tenant,
            kid=kid,
            key_version=version,
            bucket=bucket,
            storage_key=storage_key,
            created_at=datetime.now(UTC),
        )

    @classmethod
    def of(cls, record: ObjectRecord) -> Self:
        """The marker of the object `record` describes."""
        return cls.new(record.tenant, record.kid, record.key_version, record.bucket, record.key)

    def moved_to(self, version: int) -> Self:
        """The marker of the same object sealed again under `version`."""
        return self.model_copy(update={"key_version": version, "created_at": datetime.now(UTC)})

    @property
    def name(self) -> str:
        return marker_name(self.tenant, self.kid, self.key_version, self.bucket, self.storage_key)


class IndexedObject(CamelModel):
    """A marker as a tenant sees it: the object named by its own key."""

    bucket: str
    key: str
    kid: str
    key_version: int
    marked_at: datetime

    @classmethod
    def of(cls, marker: Marker) -> Self:
        return cls(
            bucket=marker.bucket,
            key=client_key(marker.storage_key) or "",  # markers are of tenants' objects
            kid=marker.kid,
            key_version=marker.key_version,
            marked_at=marker.created_at,
        )


def key_prefix(tenant: str, kid: str) -> str:
    return f"{INDEX_PREFIX}{tenant}/{kid}/"


def version_prefix(tenant: str, kid: str, version: int) -> str:
    return f"{key_prefix(tenant, kid)}{version}/"


def marker_name(tenant: str, kid: str, version: int, bucket: str, storage_key: str) -> str:
    digest = hashlib.sha256(f"{bucket}/{storage_key}".encode()).hexdigest()
    return f"{version_prefix(tenant, kid, version)}{digest}{MARKER_SUFFIX}"


class Inventory:
    """The markers of every tenant's objects, kept beside the other records."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._store: ObjectStore = records.store

    def add(self, marker: Marker) -> bool:
        """Note that the object is (about to be) sealed under the marker's key version;
        whether this call wrote the marker (False: it was there already, and is not this
        caller's to take back)."""
        try:
            self._records.put(MARKER_KIND, marker.name, marker, if_absent=True)
        except ObjectExists:
            return False
        return True

    def remove(self, marker: Marker) -> None:
        """Drop a marker: once its object is gone, or sealed under another version."""
        self._store.delete(marker.name)

    def discard(self, marker: Marker) -> None:
        """`remove`, for a marker this process wrote for an object that never became
        visible: one left behind is one too many, which is safe."""
        with suppress(StorageError):
            self.remove(marker)

    def moved(self, before: ObjectRecord | None, after: ObjectRecord) -> None:
        """Once the object `after` describes has replaced the one `before` described (at
        the same place), drop `before`'s marker, unless both are of one key version."""
        if before is None:
            return
        if (before.kid, before.key_version) != (after.kid, after.key_version):
            self.discard(Marker.of(before))

    def markers(self, tenant: str, kid: str, version: int, after: str = "") -> Iterator[Marker]:
        """The authentic markers of one key version, in index order, from the cursor
        `after` on; a marker that fails authentication is logged, counted and passed over."""
        prefix = version_prefix(tenant, kid, version)
        start = f"{prefix}{after}{MARKER_SUFFIX}" if after else ""
        for info in self._store.list(prefix, start_after=start):
            try:
                yield self._records.get(MARKER_KIND, info.key, Marker)
            except (ObjectNotFound, RecordTampered):
                continue  # dropped since it was listed, or refused and counted

    def page(
        self, tenant: str, kid: str, version: int, *, limit: int, after: str = ""
    ) -> tuple[list[Marker], str | None]:
        """Up to `limit` markers of a key version after the cursor `after`, and the cursor
        of the next page (None on the last)."""
        found: list[Marker] = []
        for marker in self.markers(tenant, kid, version, after):
            if len(found) == limit:
                return found, cursor(found[-1])
            found.append(marker)
        return found, None

    def counts(self, tenant: str, kid: str) -> dict[int, int]:
        """How many markers each version of a key has, from one listing of the key's
        index: names, not read one by one."""
        prefix = key_prefix(tenant, kid)
        counted: dict[int, int] = {}
        for info in self._store.list(prefix):
            version, _, name = info.key.removeprefix(prefix).partition("/")
            if version.isdigit() and name.endswith(MARKER_SUFFIX):
                counted[int(version)] = counted.get(int(version), 0) + 1
        return counted


def record_at(records: Records, store: ObjectStore, storage_key: str) -> ObjectRecord | None:
    """The record of the object at a place, if there is one to believe: that of the object
    a write there replaces, whose marker then goes. One that cannot be believed leaves its
    marker, if any, in place: one too many."""
    try:
        return object_record(records, store, storage_key, store.head(storage_key))
    except (ObjectNotFound, RecordTampered):
        return None


def cursor(marker: Marker) -> str:
    """The opaque cursor after `marker`: its name's digest, which tells nothing of it."""
    return marker.name.rpartition("/")[2].removesuffix(MARKER_SUFFIX)
