"""The rewrap job: after a key rotation, re-wrap stored objects' data keys to the key's
primary version without re-encrypting their bodies.

For each object sealed under the key whose record names an older version: a new header
(same data key, message ID and commitment, the primary version's encrypted data key,
`sealstream:key-version` updated) goes in front of the old body in a staging object,
written server-side where storage allows (`ObjectStore.rewrite_head`). The staging
object is decrypted in full with the new key alone and checked against the plaintext
size and SHA-256 recorded at upload; only then does it replace the original (a copy
conditional on the original being unchanged), and the record follows.

Reruns converge: objects whose record names the primary version are skipped, an object
replaced by a run that stopped before updating its record is verified and recorded,
and staging objects are per job and overwritten or deleted. A failure on one object is
reported in the result and leaves that object as it was; a job on one object fails
with it.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from envelope import Header, key_names, rewrap_header
from sealstream.errors import error_code
from sealstream.objects import (
    RESERVED_CONTEXT_PREFIX,
    opening_keyrings,
    read_stored_header,
)
from sealstream.spaces import tenant_prefix
from storage import ObjectInfo, ObjectNotFound, ObjectStore, StorageUnavailable
from storage.records import ObjectRecord, load_record, save_record
from workers.execution import JobCancelled, JobContext, JobFailed
from workers.services import WorkerServices
from workers.verify import check_against_record

STAGING_PREFIX = "sealstream/staging/"
KEY_VERSION_CONTEXT = f"{RESERVED_CONTEXT_PREFIX}key-version"
KEY_VERSION_METADATA = "sealstream-key-version"  # as `ObjectSealer` writes it


@dataclass(frozen=True)
class _Target:
    storage_key: str
    size: int
    record: ObjectRecord


@dataclass
class _Report:
    rewrapped: int = 0
    skipped: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"rewrapped": self.rewrapped, "skipped": self.skipped, "failed": len(self.failures)}


def rewrap(context: JobContext, services: WorkerServices) -> dict[str, Any]:
    tenant, params = context.record.tenant, context.params
    job = _RewrapJob(context, services, services.spaces.store(tenant, params["bucket"]))
    job.clear_staging()
    targets = job.targets()
    bytes_total = sum(target.size for target in targets)
    bytes_done = 0
    context.progress(
        items_total=len(targets), bytes_total=bytes_total, items_done=0, bytes_done=0, force=True
    )
    report = _Report()
    for index, target in enumerate(targets):
        job.run(index, target, report)
        bytes_done += target.size
        context.progress(items_done=index + 1, bytes_done=bytes_done)
    if "storageKey" in params and report.failures:
        (failure,) = report.failures
        raise JobFailed(failure["code"], failure["detail"])
    key = {"bucket": job.store.bucket, "kid": job.key.kid, "keyVersion": job.key.primary_version}
    return {**key, **report.counts(), "failures": report.failures}


def sweep_staging(
    services: WorkerServices, abandoned_after: timedelta, now: datetime | None = None
) -> list[str]:
    """Clear the staging areas that rewrap jobs left behind; the ids of those jobs.

    A job clears its own staging as it goes and when it starts again, so only a job that
    ended without finishing its step (or that will never run again) leaves some: one
    whose record says it is over, or whose record is gone and whose staged objects are
    all older than `abandoned_after`. Uploads still pending for a job with no record are
    left for the bucket's lifecycle rule: their age cannot be told.
    """
    now = now or datetime.now(UTC)
    cleared = []
    for store in services.spaces.every_store():
        newest: dict[str, datetime] = {}
        for info in store.list(STAGING_PREFIX):
            job_id = _staging_job(info.key)
            newest[job_id] = max(newest.get(job_id, info.last_modified), info.last_modified)
        pending = {_staging_job(key) for key in store.pending_uploads(STAGING_PREFIX)}
        for job_id in sorted(newest.keys() | pending):
            record = services.jobs.load(job_id)
            if record is None:
                abandoned = job_id in newest and newest[job_id] < now - abandoned_after
            else:
                abandoned = record.status.finished
            if abandoned:
                clear_staging(store, job_id)
                cleared.append(job_id)
    return cleared


def clear_staging(store: ObjectStore, job_id: str) -> None:
    """Remove what a job has staged, uploads included."""
    prefix = f"{STAGING_PREFIX}{job_id}/"
    store.abort_pending(prefix)
    for info in store.list(prefix):
        store.delete(info.key)


def _staging_job(key: str) -> str:
    return key.removeprefix(STAGING_PREFIX).split("/", 1)[0]


class _RewrapJob:
    def __init__(self, context: JobContext, services: WorkerServices, store: ObjectStore) -> None:
        self.context = context
        self.services = services
        self.store = store
        self.tenant = context.record.tenant
        # The version objects are rewrapped to is the primary one when the job starts.
        self.key, self.keyring = services.keys.encryption_keyring(
            self.tenant, context.params["kid"]
        )
        self.staging_prefix = f"{STAGING_PREFIX}{context.record.id}/"

    def clear_staging(self) -> None:
        """Remove what an earlier attempt of this job left staged, uploads included."""
        clear_staging(self.store, self.context.record.id)

    def targets(self) -> list[_Target]:
        """The one object named, or every recorded object under the prefix sealed under
        the key."""
        params = self.context.params
        if "storageKey" in params:
            return [self._named_target(params["storageKey"])]
        found = []
        for info in self.store.list(params["storagePrefix"]):
            record = self._record(info.key)
            if record is not None and record.kid == self.key.kid:
                found.append(_Target(info.key, info.size, record))
        return found

    def run(self, index: int, target: _Target, report: _Report) -> None:
        """Rewrap one object, counting the outcome; its failure is reported, not raised."""
        try:
            done = self._rewrap(index, target)
        except (JobCancelled, StorageUnavailable):
            raise  # not about this object: the job stops
        except Exception as error:
            key = target.storage_key
            report.failures.append(
                {
                    "key": key.removeprefix(tenant_prefix(self.tenant)),
                    "storageKey": key,
                    "code": error_code(error),
                    "detail": str(error) or type(error).__name__,
                }
            )
            return
        if done:
            report.rewrapped += 1
        else:
            report.skipped += 1

    def _named_target(self, storage_key: str) -> _Target:
        record = self._record(storage_key)
        if record is None:
            raise JobFailed(
                "object-record-missing",
                "no upload record for this object: it was not written by encrypt-to-storage",
            )
        if record.kid != self.key.kid:
            raise JobFailed(
                "object-not-sealed-under-key",
                f"the object is sealed under key {record.kid!r}, not {self.key.kid!r}",
            )
        return _Target(storage_key, self.store.head(storage_key).size, record)

    def _record(self, storage_key: str) -> ObjectRecord | None:
        try:
            return load_record(self.services.objects, self.store.bucket, storage_key)
        except ObjectNotFound:
            return None

    def _rewrap(self, index: int, target: _Target) -> bool:
        """True if the object was rewrapped now, False if it already was."""
        if target.record.key_version == self.key.primary_version:
            return False
        key = target.storage_key
        original = self.store.head(key)
        header = read_stored_header(self.store, key, original.size)
        if key_names(header) == [self.keyring.key_name]:
            # Replaced by a run that stopped before recording it: check, then record.
            self._verify(key, original.size, target.record)
            self._save_record(target.record, original)
            return True
        staging_key = f"{self.staging_prefix}{index}"
        try:
            staged = self._stage(original, header, staging_key)
            self._verify(staging_key, staged.size, target.record)
            # Conditional: an object overwritten meanwhile is not replaced by the old one.
            replaced = self.store.copy(staging_key, key, if_match=original.etag)
            self._save_record(target.record, replaced)
        finally:
            self.store.delete(staging_key)
        return True

    def _stage(self, original: ObjectInfo, header: Header, staging_key: str) -> ObjectInfo:
        """The original with a header wrapped for the primary version, at `staging_key`."""
        _, opening = opening_keyrings(self.services.keys, self.tenant, header, self.key.kid)
        version = str(self.key.primary_version)
        new_header = rewrap_header(
            header,
            opening,
            [self.keyring],
            context={**header.context, KEY_VERSION_CONTEXT: version},
        )
        return self.store.rewrite_head(
            original.key,
            staging_key,
            new_header.to_bytes(),
            header.length,
            metadata={**original.metadata, KEY_VERSION_METADATA: version},
        )

    def _verify(self, key: str, size: int, recorded: ObjectRecord) -> None:
        """Decrypt the object with the new keyring alone; its plaintext must be the
        recorded one."""
        # Each chunk is a heartbeat, and where a cancel request stops the job.
        check_against_record(
            self.store,
            key,
            size,
            lambda _: [self.keyring],
            recorded,
            lambda _: self.context.progress(),
        )

    def _save_record(self, record: ObjectRecord, stored: ObjectInfo) -> None:
        changes = {
            "key_version": self.key.primary_version,
            "etag": stored.etag,
            "ciphertext_size": stored.size,
        }
        save_record(self.services.objects, record.model_copy(update=changes))
