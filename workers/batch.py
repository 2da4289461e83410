"""The batch-encrypt job: seal each member of an archive (or each object under a prefix)
as an object of its own under a destination prefix, with a manifest; or seal the whole
archive as one object.

Members are read as streams (`workers.archives`) and each is written like an upload to
storage: its own message, multipart upload and object record, so `verify` works on it.
An unsafe member is refused and a member that cannot be written (an existing object, a
storage error) fails; either way only that member, and the manifest lists them.

A redelivered job resumes rather than starts over. Before writing a member the job adds
an entry to its journal, `sealstream/jobs/<tenant>/<job id>.partial/` in the service's
store: the object it is about to write, and the members finished since the entry before.
Each entry is small, so a large archive never rewrites a growing file. A rerun skips the
finished members, aborts the upload its killed predecessor left pending on the claimed
object, and rewrites that object even with `overwrite: false`: it is the job's own.

The journal is also where the manifest's member list comes from: the manifest is written
at the end as a stream, an entry at a time, so a job of a million members never holds
their list. Its SHA-256 and size go into the job's result, which is what a client checks
the manifest against.
"""

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import IO, Any

from pydantic import BaseModel

from sealstream.settings import Settings
from sealstream.wiring import Parts
from services.errors import error_code, public_detail
from services.jobs import REPORTS_PREFIX, BatchEncryptParams, ObjectTarget, PrefixTarget
from services.keys import start_sealing
from services.objects import MEMBER_FIELDS, ObjectSummary
from services.placement import Placement
from services.seal_to_storage import seal_stream
from storage import ObjectExists, ObjectNotFound, ObjectStore, StorageError
from storage.integrity import Records
from storage.records import ObjectRecord
from workers.archives import (
    ArchiveLimits,
    InvalidArchive,
    Member,
    MemberSource,
    ObjectReader,
    PrefixSource,
    UnsafeMember,
    member_path,
    open_archive,
)
from workers.execution import JobCancelled, JobContext, JobFailed

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
READ_SIZE = 1 << 20
RESULT_LIST_LIMIT = 100  # refusals and failures in the job record; the manifest has all
FINAL_ENTRY = "final.json"
JOURNAL_KIND = "batch-journal"

MemberHook = Callable[[str], None]


@dataclass
class Resumed:
    """What earlier attempts left: the paths of the members sealed, the object being
    written when the last one stopped, and the result if the job had finished."""

    started: bool = False
    done: set[str] = field(default_factory=set)
    claim: str | None = None
    result: dict[str, Any] | None = None


class JournalEntry(BaseModel):
    claim: str | None
    done: list[dict[str, Any]]


class JournalResult(BaseModel):
    result: dict[str, Any]


class Journal:
    """The job's progress in the service's store, one small entry per object written.

    Entries are sealed records: a rerun trusts them to say which object it may overwrite
    as its own, so one planted or altered in the bucket fails the job instead.
    """

    def __init__(self, records: Records, tenant: str, job_id: str) -> None:
        self._records = records
        self._objects = records.store
        self._prefix = f"{REPORTS_PREFIX}{tenant}/{job_id}.partial/"
        self._entries = 0
        self._settled: list[dict[str, Any]] = []

    def resume(self) -> Resumed:
        resumed = Resumed()
        self._objects.abort_pending(self._prefix)  # an entry cut off mid-write
        for key, entry in self._read_all():
            resumed.started = True
            if key.endswith(FINAL_ENTRY):
                resumed.result = entry["result"]
                continue
            self._entries = int(key.removeprefix(self._prefix).removesuffix(".json"))
            resumed.done.update(done["path"] for done in entry["done"])
            resumed.claim = entry["claim"]
        return resumed

    def sealed(self) -> Iterator[dict[str, Any]]:
        """The members sealed by this attempt (up to its last claim) and those before, in
        the order they were sealed, read back an entry at a time."""
        for key, entry in self._read_all():
            if not key.endswith(FINAL_ENTRY):
                yield from entry["done"]

    def _read_all(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for info in self._objects.list(self._prefix):
            model = JournalResult if info.key.endswith(FINAL_ENTRY) else JournalEntry
            yield info.key, self._records.get(JOURNAL_KIND, info.key, model).model_dump()

    def claim(self, storage_key: str | None) -> None:
        """Record the members settled since the last entry, and the object about to be
        written (None: no object is the job's until the next claim)."""
        self._entries += 1
        entry = JournalEntry(claim=storage_key, done=self._settled)
        self._records.put(JOURNAL_KIND, f"{self._prefix}{self._entries:010d}.json", entry)
        self._settled = []

    def settle(self, entry: dict[str, Any]) -> None:
        self._settled.append(entry)

    def finish(self, result: dict[str, Any]) -> None:
        """Keep only the result, which a rerun after a crash right now returns as it is."""
        self._records.put(JOURNAL_KIND, self._prefix + FINAL_ENTRY, JournalResult(result=result))
        self._delete(keep=self._prefix + FINAL_ENTRY)

    def discard(self) -> None:
        """The job ended without a result: nothing will resume from the journal."""
        try:
            self._delete(keep=None)
        except StorageError as error:
            logger.warning("cannot delete the journal %s: %s", self._prefix, error)

    def _delete(self, keep: str | None) -> None:
        for info in list(self._objects.list(self._prefix)):
            if info.key != keep:
                self._objects.delete(info.key)


def batch_encrypt(
    context: JobContext, services: Parts, *, before_member: MemberHook | None = None
) -> dict[str, Any]:
    """The job body. `before_member` is called with each member's path before it is
    written (tests inject crashes there)."""
    journal = Journal(services.records, context.record.tenant, context.record.id)
    resumed = journal.resume() if context.record.attempts > 1 else Resumed()
    if resumed.result is not None:
        return resumed.result
    try:
        if context.params(BatchEncryptParams).mode == "whole":
            result = _seal_whole(context, services, journal, resumed)
        else:
            batch = _Batch(context, services, journal, resumed, before_member)
            result = _seal_members(batch)
    except Exception:
        journal.discard()
        raise
    journal.finish(result)
    return result


@dataclass
class _Batch:
    """One members-mode run: where it writes, and what became of each member so far."""

    context: JobContext
    services: Parts
    journal: Journal
    resumed: Resumed
    before_member: MemberHook | None
    sealed: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0
    items: int = 0
    seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.params = self.context.params(BatchEncryptParams)
        self.source = self.params.source
        assert isinstance(self.params.destination, PrefixTarget)  # as members mode requires
        self.destination = self.params.destination
        self.store = self.services.spaces.store(self.tenant, self.destination.bucket)
        self.prefix = self.destination.prefix
        self.storage_prefix = self.destination.storage_prefix

    @property
    def tenant(self) -> str:
        return self.context.record.tenant

    def same_bucket(self) -> bool:
        return self.source.bucket == self.destination.bucket


def _seal_members(batch: _Batch) -> dict[str, Any]:
    manifest_key = batch.storage_prefix + MANIFEST_NAME
    if not batch.resumed.started and not batch.params.overwrite:
        _require_absent(batch.store, manifest_key, batch.prefix + MANIFEST_NAME)
    if batch.resumed.claim is not None:
        batch.store.abort_pending(batch.resumed.claim)
    with _open_source(batch) as source:
        batch.context.progress(
            items_total=source.items_total, bytes_total=source.bytes_total, force=True
        )
        damage = _seal_each(batch, source)
        batch.context.progress(
            items_done=batch.items, items_total=batch.items, bytes_done=source.bytes_total
        )
    batch.journal.claim(None)  # the members settled since the last claim, for the manifest
    manifest = _write_manifest(batch.store, manifest_key, _manifest(batch, source.format, damage))
    result = _result(batch, source.format, manifest_key, manifest)
    if damage is not None:
        batch.context.save_partial(result)  # the failed job still reports what it sealed
        raise JobFailed(damage.code, str(damage))
    return result


def _open_source(batch: _Batch) -> AbstractContextManager[MemberSource]:
    store = batch.services.spaces.store(batch.tenant, batch.source.bucket)
    limits = archive_limits(batch.services.settings)
    if isinstance(batch.source, ObjectTarget):
        _source_size(store, batch.source)
        return open_archive(store, batch.source.storage_key, batch.params.format, limits)
    # Earlier output under the destination is not input (a prefix may hold both).
    skip = batch.storage_prefix if batch.same_bucket() else None
    source = PrefixSource(store, batch.source.storage_prefix, skip, limits.max_members)
    return nullcontext(source)


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_expansion=settings.batch_max_expansion,
        max_unpacked=settings.batch_max_unpacked,
        max_member_size=settings.batch_max_member_size,
        max_header_size=settings.batch_max_header_size,
        max_members=settings.batch_max_members,
    )


def _seal_each(batch: _Batch, source: MemberSource) -> InvalidArchive | None:
    """Seal every member; the damage if the archive breaks off part-way."""
    try:
        for member in source.members():
            _take(batch, source, member)
            batch.items += 1
            batch.context.progress(items_done=batch.items, bytes_done=source.bytes_read)
    except InvalidArchive as damage:
        return damage
    return None


def _take(batch: _Batch, source: MemberSource, member: Member) -> None:
    """Seal one member, or note why not."""
    try:
        path = member_path(member.name, member.kind)
        if path is None:
            batch.skipped += 1
            return
        _check_destination(batch, path)
    except UnsafeMember as refusal:
        batch.refused.append({"path": member.name, "reason": str(refusal)})
        return
    if path in batch.resumed.done:
        batch.sealed += 1  # by an earlier attempt
    else:
        _seal_or_fail(batch, source, member, path)


def _seal_or_fail(batch: _Batch, source: MemberSource, member: Member, path: str) -> None:
    """Seal one member, or note why it failed; an archive that breaks off while the
    member is read fails the job (`_seal_each`), not just the member, and so does
    running out of memory."""
    if batch.before_member is not None:
        batch.before_member(path)
    try:
        _seal_member(batch, source, member, path)
        batch.sealed += 1
    except (JobCancelled, InvalidArchive, MemoryError):
        raise
    except Exception as error:
        batch.failed.append(
            {"path": path, "code": error_code(error), "detail": public_detail(error)}
        )


def _check_destination(batch: _Batch, path: str) -> None:
    """Refuse members whose object would clash with another member, the manifest or the
    archive being read."""
    if path in batch.seen:
        raise UnsafeMember("a second member of the same name")
    batch.seen.add(path)
    if path == MANIFEST_NAME:
        raise UnsafeMember("the manifest's name")
    archive = batch.source.storage_key if isinstance(batch.source, ObjectTarget) else None
    if batch.same_bucket() and batch.storage_prefix + path == archive:
        raise UnsafeMember("the name of the archive being read")


def _seal_member(batch: _Batch, source: MemberSource, member: Member, path: str) -> None:
    storage_key = batch.storage_prefix + path
    ours = storage_key == batch.resumed.claim  # written by the attempt that was stopped
    overwrite = batch.params.overwrite or ours
    if not overwrite:
        _require_absent(batch.store, storage_key, batch.prefix + path, job=False)
    batch.journal.claim(storage_key)
    placement = Placement(batch.store, batch.store.bucket, batch.prefix + path, storage_key)
    try:
        with member.open() as stream:
            record = _seal(
                batch.context,
                batch.services,
                placement,
                overwrite,
                stream,
                lambda: source.bytes_read,
            )
    except JobCancelled:
        raise
    except Exception:
        batch.journal.claim(None)  # an object there now is someone else's
        raise
    batch.journal.settle({"path": path, **_object_entry(placement, record)})


def _seal(
    context: JobContext,
    services: Parts,
    placement: Placement,
    overwrite: bool,
    stream: IO[bytes],
    bytes_read: Callable[[], int],
) -> ObjectRecord:
    """Write `stream` sealed at `placement`; on any failure or cancel, nothing is left."""
    params = context.params(BatchEncryptParams)
    sealing = start_sealing(
        services.keys,
        context.record.tenant,
        params.kid,
        params.encryption_context,
        params.frame_length,
        object_key=placement.storage_key,
    )
    return seal_stream(
        sealing,
        placement,
        _chunks(stream),
        overwrite=overwrite,
        records=services.records,
        # Where a cancel request is noticed.
        after_chunk=lambda: context.progress(bytes_done=bytes_read()),
    )


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    return iter(partial(stream.read, READ_SIZE), b"")


def _source_size(store: ObjectStore, source: ObjectTarget) -> int:
    """The archive's size; a missing one fails the job without naming where it is kept."""
    try:
        return store.head(source.storage_key).size
    except ObjectNotFound:
        raise JobFailed("object-not-found", f"no object {source.key!r}") from None


def _require_absent(store: ObjectStore, storage_key: str, key: str, *, job: bool = True) -> None:
    """Raise `object-exists` (failing the job, or with `job=False` the member)."""
    try:
        store.head(storage_key)
    except ObjectNotFound:
        return
    if not job:
        raise ObjectExists("the object exists and overwrite is false", storage_key)
    raise JobFailed("object-exists", f"{key!r} already exists and overwrite is false")


def _object_entry(placement: Placement, record: ObjectRecord, *more: str) -> dict[str, Any]:
    """What the manifest and the result say of a sealed object: `MEMBER_FIELDS` and `more`."""
    summary = ObjectSummary.of(record, placement.key)
    return summary.fields(*MEMBER_FIELDS, *more)


def _manifest(batch: _Batch, format_: str, damage: InvalidArchive | None) -> Iterator[bytes]:
    """The manifest as a JSON document, in pieces: the members come from the journal."""
    fields: dict[str, Any] = {
        "jobId": batch.context.record.id,
        "source": batch.source.model_dump(mode="json"),
        "format": format_,
        "kid": batch.params.kid,
        "destination": batch.destination.model_dump(mode="json"),
        "createdAt": datetime.now(UTC).isoformat(),
    }
    if damage is not None:
        fields["error"] = {"code": damage.code, "detail": str(damage)}
    lists = {"members": batch.journal.sealed(), "refused": batch.refused, "failed": batch.failed}
    return _json_object(fields, lists)


def _json_object(fields: dict[str, Any], lists: dict[str, Iterable[Any]]) -> Iterator[bytes]:
    """A JSON object of `fields` then `lists`, each list encoded an item at a time."""
    members = [_json_member(name, json.dumps(value)) for name, value in fields.items()]
    yield ("{\n" + ",\n".join(members)).encode()
    for name, items in lists.items():
        yield (",\n" + _json_member(name, "[")).encode()
        separator = "\n"
        for item in items:
            yield (separator + json.dumps(item)).encode()
            separator = ",\n"
        yield b"\n]"
    yield b"\n}\n"


def _json_member(name: str, value: str) -> str:
    return f"{json.dumps(name)}: {value}"


def _write_manifest(store: ObjectStore, key: str, pieces: Iterator[bytes]) -> dict[str, Any]:
    """Write the manifest at `key` (all of it, or nothing); its SHA-256 and size."""
    digest = hashlib.sha256()
    with store.multipart(key) as writer:
        for piece in pieces:
            digest.update(piece)
            writer.write(piece)
        writer.complete()
    return {"sha256": digest.hexdigest(), "size": writer.bytes_written}


def _result(
    batch: _Batch, format_: str, manifest_key: str, manifest: dict[str, Any]
) -> dict[str, Any]:
    return {
        "bucket": batch.store.bucket,
        "manifestKey": batch.prefix + MANIFEST_NAME,
        "manifestStorageKey": manifest_key,
        "manifestSha256": manifest["sha256"],
        "manifestSize": manifest["size"],
        "format": format_,
        "counts": {
            "items": batch.items,
            "sealed": batch.sealed,
            "skipped": batch.skipped,
            "refused": len(batch.refused),
            "failed": len(batch.failed),
        },
        "refused": batch.refused[:RESULT_LIST_LIMIT],
        "failed": batch.failed[:RESULT_LIST_LIMIT],
    }


def _seal_whole(
    context: JobContext, services: Parts, journal: Journal, resumed: Resumed
) -> dict[str, Any]:
    """The archive object sealed as it is, as one object."""
    params, tenant = context.params(BatchEncryptParams), context.record.tenant
    source, destination = params.source, params.destination
    assert isinstance(source, ObjectTarget) and isinstance(destination, ObjectTarget)
    source_store = services.spaces.store(tenant, source.bucket)
    store = services.spaces.store(tenant, destination.bucket)
    placement = Placement(store, store.bucket, destination.key, destination.storage_key)
    ours = placement.storage_key == resumed.claim
    if ours:
        store.abort_pending(placement.storage_key)
    overwrite = params.overwrite or ours
    if not overwrite:
        _require_absent(store, placement.storage_key, placement.key)
    size = _source_size(source_store, source)
    context.progress(items_total=1, bytes_total=size, force=True)
    journal.claim(placement.storage_key)
    reader = ObjectReader(source_store, source.storage_key, size)
    with io.BufferedReader(reader, READ_SIZE) as stream:
        record = _seal(context, services, placement, overwrite, stream, lambda: reader.position)
    context.progress(items_done=1, bytes_done=size)
    return _object_entry(placement, record, "bucket", "kid")
