"""The reencrypt job: move stored objects to their key's primary version by re-encrypting
them (`services.reencrypt`): one object, every recorded object under a prefix, or every
object the index of key versions lists under one version of the key (`version`), in
whichever bucket. The last empties that version's index: each object moves to the
primary version, and a marker whose object is gone or has moved on already is dropped.

An object is due when its record names an older version of the key. With `rewrapped`,
objects that a header-only rewrap moved to a version are due too. Those are objects whose
record names a version created after the object was, or which were rewritten in storage
after their record was written. Each is re-encrypted under a fresh data key, or reported
`tampered` and left alone when it no longer decrypts to what was uploaded.

Reruns converge: an object whose record names the primary version (and which is not due
as rewrapped) is skipped, and a re-encrypted object's record is new. Before it writes an
object, the job notes that object's key in its record, and the id of the upload it
starts there before sending any of it (on S3, once the object outgrows a part). A rerun
after a worker was killed aborts that upload, and no other: not another writer's upload
of the same key (a resumable upload, say), which the store cannot tell apart. A failure
on one object is reported in the result and leaves that object as it was; a job on one
object fails with it.

`rewrap`, the job's former name, is kept as an alias for one release. Its records,
queued ones included, run this job. Header-only rewrap itself is gone: re-sealing a
header under its message's key gives away GCM's hash key (docs/FORMAT.md §14).
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from keystore import KeyRecord
from sealstream.wiring import Parts
from services.errors import error_code, public_detail
from services.inventory import Inventory, VersionIndex
from services.jobs import JobKind, ObjectTarget, ReencryptParams, VersionTarget
from services.jobs.context import JobCancelled, JobContext, JobFailed, LeaseLost
from services.placement import tenant_prefix
from services.reencrypt import ObjectTampered, reencrypt_object
from storage import ObjectInfo, ObjectNotFound, ObjectStore, StorageUnavailable
from storage.records import ObjectRecord, object_record

# What header-only rewrap jobs staged. Each staged object held another header of a stored
# message, which with the stored one gives away the message's GCM hash key.
REWRAP_STAGING_PREFIX = "sealstream/staging/"
# Time between an upload's last write reaching storage and its record being written,
# clock skew between the service and the storage included. An object stored later than
# that after its record was written has been rewritten since.
RECORD_SKEW = timedelta(minutes=1)
_NO_RECORD = "no upload record for this object: it was not written by encrypt-to-storage"


@dataclass(frozen=True)
class _Target:
    store: ObjectStore
    info: ObjectInfo
    record: ObjectRecord


@dataclass
class _Report:
    reencrypted: int = 0
    skipped: int = 0
    dropped: int = 0  # markers of the version selected that stood for nothing
    failures: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        tampered = sum(failure["code"] == ObjectTampered.code for failure in self.failures)
        return {
            "reencrypted": self.reencrypted,
            "skipped": self.skipped,
            "tampered": tampered,
            "failed": len(self.failures),
            "failures": self.failures,
        }


def reencrypt(context: JobContext, services: Parts) -> dict[str, Any]:
    job = _ReencryptJob(context, services, context.params(ReencryptParams))
    job.abort_left_pending()
    report = _Report()
    targets = job.targets(report)
    context.progress(
        items_total=len(targets),
        bytes_total=sum(target.info.size for target in targets),
        items_done=0,
        bytes_done=0,
        force=True,
    )
    bytes_done = 0
    for index, target in enumerate(targets):
        job.run(target, report)
        bytes_done += target.info.size
        context.progress(items_done=index + 1, bytes_done=bytes_done)
    if isinstance(job.params.target, ObjectTarget) and report.failures:
        (failure,) = report.failures
        raise JobFailed(failure["code"], failure["detail"])
    return job.result(report)


def clear_rewrap_staging(services: Parts) -> int:
    """Remove whatever header-only rewrap jobs left staged (nothing writes there now),
    uploads included; how many objects and uploads were removed."""
    cleared = 0
    for store in services.spaces.every_store():
        cleared += store.abort_pending(REWRAP_STAGING_PREFIX)
        for info in store.list(REWRAP_STAGING_PREFIX):
            store.delete(info.key)
            cleared += 1
    return cleared


class _ReencryptJob:
    def __init__(self, context: JobContext, services: Parts, params: ReencryptParams) -> None:
        self.context = context
        self.services = services
        self.params = params
        self.tenant = context.record.tenant
        self.inventory = Inventory(services.records)
        self.index = VersionIndex(services.records, services.spaces)
        # Refuses a key that may not encrypt now. Objects are moved to the version that is
        # primary when each is sealed: this one, unless the key rotates meanwhile. It is
        # at least the one the API saw, though this process may have cached an older one.
        self.key, _ = services.keys.encryption_keyring(
            self.tenant, params.kid, min_primary=params.key_version
        )

    def abort_left_pending(self) -> None:
        """Abort the upload a killed attempt of this job left on the object it wrote."""
        partial = self.context.record.result or {}
        writing, upload_id = partial.get("writing"), partial.get("writingUpload")
        if writing is not None and upload_id is not None:
            bucket = partial.get("writingBucket", self.params.bucket)
            self._store(bucket).abort_pending(writing, exact=True, upload_ids={upload_id})

    def targets(self, report: _Report) -> list[_Target]:
        """The one object named, every recorded object under the prefix sealed under the
        key, or every object the index lists under the version selected."""
        target = self.params.target
        if isinstance(target, VersionTarget):
            return self._indexed_targets(target.version, report)
        store = self._store(self.params.bucket)
        if isinstance(target, ObjectTarget):
            return [self._named_target(store, target.storage_key)]
        found = []
        for info in store.list(target.storage_prefix):
            record = self._record(store, info.key)
            if record is not None and record.kid == self.key.kid:
                found.append(_Target(store, info, record))
        return found

    def _indexed_targets(self, version: int, report: _Report) -> list[_Target]:
        """The objects the index lists under `version`; markers whose object is gone, or
        whose record names another version (moved on, but its marker left behind) stand
        for nothing and are dropped."""
        found = []
        for marker in self.index.markers(self.tenant, self.key.kid, version):
            store = self._store(marker.bucket)
            try:
                info = store.head(marker.storage_key)
            except ObjectNotFound:
                info = None
            record = None if info is None else self._record(store, marker.storage_key)
            if info is None or (
                record is not None and (record.kid, record.key_version) != (marker.kid, version)
            ):
                self.inventory.remove(marker)
                report.dropped += 1
            elif record is None:
                report.failures.append(
                    self._failure(marker.storage_key, "object-record-missing", _NO_RECORD)
                )
            else:
                found.append(_Target(store, info, record))
        return found

    def run(self, target: _Target, report: _Report) -> None:
        """Re-encrypt one object if it is due, counting the outcome; its failure is
        reported, not raised."""
        key, store = target.info.key, target.store
        try:
            if not self._due(target):
                report.skipped += 1
                return
            # Noted before its upload can begin, and its upload's id before any of it is
            # sent, for a rerun to abort if this attempt dies.
            writing = {"writing": key, "writingBucket": store.bucket}
            self.context.save_partial({**report.counts(), **writing})
            original = store.head(key)
            reencrypt_object(
                self.services.keys,
                self.services.records,
                store,
                target.record,
                original,
                self.context.add_bytes,
                on_upload=lambda _, upload_id: self.context.save_partial(
                    {**report.counts(), **writing, "writingUpload": upload_id}
                ),
            )
        except (JobCancelled, LeaseLost, StorageUnavailable):
            raise  # not about this object: the job stops
        except Exception as error:
            report.failures.append(self._failure(key, error_code(error), public_detail(error)))
            return
        report.reencrypted += 1

    def _failure(self, storage_key: str, code: str, detail: str) -> dict[str, str]:
        key = storage_key.removeprefix(tenant_prefix(self.tenant))
        return {"key": key, "storageKey": storage_key, "code": code, "detail": detail}

    def result(self, report: _Report) -> dict[str, Any]:
        key: dict[str, Any] = {"kid": self.key.kid, "keyVersion": self.key.primary_version}
        selected = self.params.target
        if isinstance(selected, VersionTarget):
            # What the index still lists under the version: 0 unless an object failed.
            left = self.index.counts(self.tenant, self.key.kid).get(selected.version, 0)
            key |= {"version": selected.version, "dropped": report.dropped, "remaining": left}
        else:
            key["bucket"] = self.params.bucket
        counts = report.counts()
        if self.context.record.kind is JobKind.REWRAP:
            counts["rewrapped"] = report.reencrypted  # as the deprecated job reported it
        return {**key, **counts}

    def _due(self, target: _Target) -> bool:
        record = target.record
        if record.key_version != self.key.primary_version:
            return True
        return self.params.rewrapped and _rewrapped(record, self.key, target.info.last_modified)

    def _named_target(self, store: ObjectStore, storage_key: str) -> _Target:
        record = self._record(store, storage_key)
        if record is None:
            raise JobFailed("object-record-missing", _NO_RECORD)
        if record.kid != self.key.kid:
            raise JobFailed(
                "object-not-sealed-under-key",
                f"the object is sealed under key {record.kid!r}, not {self.key.kid!r}",
            )
        return _Target(store, store.head(storage_key), record)

    def _store(self, bucket: str | None) -> ObjectStore:
        return self.services.spaces.store(self.tenant, bucket)

    def _record(self, store: ObjectStore, storage_key: str) -> ObjectRecord | None:
        try:
            return object_record(self.services.records, store, storage_key)
        except ObjectNotFound:
            return None


def _rewrapped(record: ObjectRecord, key: KeyRecord, last_modified: datetime) -> bool:
    """Whether a header-only rewrap may have moved the object to the version its record
    names: one created after the object was (a rewrap kept the record's `createdAt`), or
    storage holds a version of the object written after its record was."""
    created = record.created_at
    version_created = key.version(record.key_version).created_at
    return created < version_created or last_modified > created + RECORD_SKEW
