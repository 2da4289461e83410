"""The batch-encrypt job: seal each member of an archive (or each object under a prefix)
as an object of its own under a destination prefix, with a manifest; or seal the whole
archive as one object.

Members are read as streams (`services.archives`) and each is written like an upload to
storage: its own message, multipart upload and object record, so `verify` works on it.
An unsafe member is refused and a member that cannot be written (an existing object, a
storage error) fails; either way only that member, and the manifest lists them.

Members are sealed up to `SEALSTREAM_BATCH_CONCURRENCY` at once (`ParallelSealing`)
while the archive is read in order. Small members (up to `SMALL_MEMBER` bytes) are read
whole and handed on a wave at a time, one wave per free slot, larger ones streamed a few
chunks ahead of their sealing.

A redelivered job resumes rather than starts over. Before writing members the job adds
an entry to its journal (`workers.journal`) in the service's store: the objects it is
about to write (a whole wave in one entry), and the members finished since the entry
before. A rerun skips the finished members, aborts the uploads its killed predecessor
left pending (those the journal names: a member streamed, or the manifest, larger than
one part on S3; never another writer's upload of the same key), and rewrites the claimed
objects even with `overwrite: false`: they are the job's own.

The journal is also where the manifest's member list comes from: the manifest is written
at the end as a stream (`workers.manifest`), an entry at a time, so a job of a million
members never holds their list. It is a message sealed under the job's key and recorded
like the members, so it is read back through decrypt and a changed one is refused.

With `names: "encrypted"`, each member's object is named by its path sealed under the
tenant's name key (`keystore.name_keys`): the journal, kept beside the objects, holds
only those names, the manifest the paths (the names opened again), and the job's result
lists refusals and failures without their paths.
"""

import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import IO, Any

from keystore.name_keys import NameKey, NameTooLong
from sealstream.wiring import Parts, archive_limits
from services.archives import (
    InvalidArchive,
    Member,
    MemberSource,
    ObjectReader,
    PrefixSource,
    UnsafeMember,
    member_path,
    open_archive,
)
from services.archives.sealing import (
    MemberFeed,
    MemberSealing,
    Outcome,
    ParallelSealing,
    ReadingStopped,
    settle,
)
from services.errors import error_code, public_detail
from services.inventory import RunIndex, run_index
from services.jobs import BatchChunkParams, BatchEncryptParams, ObjectTarget, PrefixTarget
from services.jobs.context import JobContext, JobFailed
from services.objects import MEMBER_FIELDS, ObjectSummary
from services.open_stored import intent_of
from services.placement import Placement
from storage import ObjectExists, ObjectInfo, ObjectNotFound, ObjectStore, UploadStarted
from storage.integrity import RecordTampered
from storage.records import ObjectRecord, object_record
from workers.journal import Journal, Resumed
from workers.manifest import json_object

MANIFEST_NAME = "manifest.json"
READ_SIZE = 1 << 20
SMALL_MEMBER = READ_SIZE  # read whole and sealed in waves; larger members are streamed
RESULT_LIST_LIMIT = 100  # refusals and failures in the job record; the manifest has all

MemberHook = Callable[[str], None]


class ClaimTaken(Exception):
    """A rerun found at a place its job had claimed an object the job did not write (its
    record names another writer, or none): without `overwrite`, a conflict, left as is."""

    code = "object-conflict"


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
    wave: list["_Waiting"] = field(default_factory=list)  # small members read, not started

    def __post_init__(self) -> None:
        self.params = self.context.params(BatchEncryptParams)
        self.source = self.params.source
        assert isinstance(self.params.destination, PrefixTarget)  # as members mode requires
        self.destination = self.params.destination
        self.store = self.services.spaces.store(self.tenant, self.destination.bucket)
        self.prefix = self.destination.prefix
        self.storage_prefix = self.destination.storage_prefix
        self.name_key = _name_key(self.services, self.tenant, self.params)
        # The marker in the index of every object the job writes under its prefix.
        self.run = run_index(
            self.services.records,
            self.tenant,
            self.store.bucket,
            self.prefix,
            self.storage_prefix,
            writer_id(self.context),
        )

    @property
    def tenant(self) -> str:
        return self.context.record.tenant

    def same_bucket(self) -> bool:
        return self.source.bucket == self.destination.bucket

    def object_name(self, path: str) -> str:
        """The member `path`'s object name under the prefix; `UnsafeMember` if its hidden
        name is too long."""
        if self.name_key is None:
            return path
        try:
            return self.name_key.encrypt_name(path, self.store.bucket, self.prefix)
        except NameTooLong as refusal:
            raise UnsafeMember(str(refusal)) from None

    def member_path(self, name: str) -> str:
        """The path of the member whose object is `name`."""
        if self.name_key is None:
            return name
        return self.name_key.decrypt_name(name, self.store.bucket, self.prefix)


def _name_key(services: Parts, tenant: str, params: BatchEncryptParams) -> NameKey | None:
    """With hidden names, the version of the name key the API chose for the job (its
    newest for a job queued before versions were chosen); every attempt names alike."""
    if params.names != "encrypted":
        return None
    if params.name_key_version is None:
        return services.keys.name_keys.current(tenant)
    return services.keys.name_keys.version(
        tenant, params.name_key_version, params.name_key_fingerprint
    )


def _seal_members(batch: _Batch) -> dict[str, Any]:
    manifest_key = batch.storage_prefix + MANIFEST_NAME
    if not batch.resumed.started and not batch.params.overwrite:
        _require_absent(batch.store, manifest_key, batch.prefix + MANIFEST_NAME)
    abort_left_pending(batch.store, batch.resumed)
    with _open_source(batch) as source:
        batch.context.progress(
            items_total=source.items_total, bytes_total=source.bytes_total, force=True
        )
        damage = _seal_each(batch, source)
        batch.context.progress(
            items_done=batch.items, items_total=batch.items, bytes_done=source.bytes_total
        )
    batch.journal.claim([])  # the members settled since the last claim, for the manifest
    _write_manifest(batch, manifest_key, _manifest(batch, source.format, damage))
    settle(batch.run, batch.store)
    result = _result(batch, source.format, manifest_key)
    if damage is not None:
        batch.context.save_partial(result)  # the failed job still reports what it sealed
        raise JobFailed(damage.code, str(damage))
    return result


def abort_left_pending(store: ObjectStore, resumed: Resumed) -> None:
    """Abort the uploads the job's killed attempts started and left pending: those its
    journal names, of objects not sealed since, and no other writer's."""
    for storage_key, upload_ids in sorted(resumed.uploads.items()):
        store.abort_pending(storage_key, exact=True, upload_ids=upload_ids)


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


@dataclass(frozen=True)
class _Started:
    """A member on its way: its path, and where its object goes."""

    path: str
    name: str
    placement: Placement


@dataclass(frozen=True)
class _Write:
    """How a member's object may be written: over an object there (`overwrite`), and
    then, with `replacing` (an etag), only over that version of it."""

    overwrite: bool
    replacing: str | None = None


@dataclass(frozen=True)
class _Waiting:
    """A small member read whole, waiting for its wave to start."""

    started: _Started
    data: bytes
    write: _Write


def _seal_each(batch: _Batch, source: MemberSource) -> InvalidArchive | None:
    """Seal every member; the damage if the archive breaks off part-way (the members read
    before it broke are sealed all the same)."""
    concurrency = batch.services.settings.batch_concurrency
    sealing = _sealing(batch.context, batch.services, batch.name_key, batch.run)
    with ParallelSealing[_Started](sealing, concurrency) as parallel:
        try:
            _read_all(batch, source, parallel)
        except InvalidArchive as damage:
            _start_wave(batch, parallel)
            return damage
        finally:
            batch.wave.clear()  # read, never started: left to a rerun
            for outcome in parallel.drain():
                _settle(batch, outcome)
    return None


def _read_all(batch: _Batch, source: MemberSource, sealing: ParallelSealing[_Started]) -> None:
    for member in source.members():
        _take(batch, source, member, sealing)
        batch.items += 1
        for outcome in sealing.finished():
            _settle(batch, outcome)
        batch.context.progress(items_done=batch.items, bytes_done=source.bytes_read)
    _start_wave(batch, sealing)


def _take(
    batch: _Batch, source: MemberSource, member: Member, sealing: ParallelSealing[_Started]
) -> None:
    """Start sealing one member (or add it to the wave), or note why not."""
    try:
        path = member_path(member.name, member.kind)
        if path is None:
            batch.skipped += 1
            return
        name = batch.object_name(path)
        _check_destination(batch, path, name)
    except UnsafeMember as refusal:
        batch.refused.append({"path": member.name, "reason": str(refusal)})
        return
    if name in batch.resumed.done:
        batch.sealed += 1  # by an earlier attempt
        return
    try:
        started, write = _placed(batch, path, name)
    except (ObjectExists, ClaimTaken) as error:
        _note_failure(batch, path, error)
        return
    if member.size is not None and member.size <= SMALL_MEMBER:
        with member.open() as stream:
            batch.wave.append(_Waiting(started, stream.read(), write))
        if len(batch.wave) >= batch.services.settings.batch_concurrency:
            _start_wave(batch, sealing)
        return
    _start_wave(batch, sealing)
    _stream(batch, source, member, sealing, _Waiting(started, b"", write))


def _placed(batch: _Batch, path: str, name: str) -> tuple[_Started, _Write]:
    """Where the member goes, and whether it may replace an object there (`ObjectExists`
    if one is there that it may not replace)."""
    storage_key = batch.storage_prefix + name
    placement = Placement(batch.store, batch.store.bucket, batch.prefix + name, storage_key)
    write = _may_overwrite(batch.context, batch.services, batch.resumed, placement)
    return _Started(path, name, placement), write


def _may_overwrite(
    context: JobContext, services: Parts, resumed: Resumed, placement: Placement
) -> _Write:
    """Whether the job may write over an object at `placement`: with `overwrite`, or if
    an attempt of this job that was stopped claimed it and the object there is the one
    that attempt wrote (its record names this job), then only over that very version, so
    that another writer's coming between the check and the write fails the member rather
    than losing its object. `ObjectExists` if there is one it may
    not replace without `overwrite`; `ClaimTaken` if another writer put one at a place
    the job had claimed."""
    if context.params(BatchEncryptParams).overwrite:
        return _Write(overwrite=True)
    try:
        stored = placement.store.head(placement.storage_key)
    except ObjectNotFound:
        return _Write(overwrite=False)  # written only if still free
    if placement.storage_key not in resumed.claims:
        raise ObjectExists("the object exists and overwrite is false", placement.storage_key)
    if _writer(services, placement, stored) != writer_id(context):
        raise ClaimTaken("another writer put an object here after this job claimed it")
    return _Write(overwrite=True, replacing=stored.etag)


def _writer(services: Parts, placement: Placement, stored: ObjectInfo) -> str | None:
    """The job whose write the object `stored` is, as its record (or, for a write cut off
    before its record, its intent) proves; None if it proves none."""
    try:
        record = object_record(services.records, placement.store, placement.storage_key, stored)
    except ObjectNotFound:
        record = None
    except RecordTampered:
        return None  # refused and counted: it proves nothing
    if record is None or (record.etag, record.ciphertext_size) != (stored.etag, stored.size):
        record = intent_of(services.records, placement, stored.size)
    return None if record is None else record.job_id


def _start_wave(batch: _Batch, sealing: ParallelSealing[_Started]) -> None:
    """Claim the small members read so far in one journal entry, and start them."""
    if not batch.wave:
        return
    wave, batch.wave = batch.wave, []
    batch.journal.claim([waiting.started.placement.storage_key for waiting in wave])
    for waiting in wave:
        if batch.before_member is not None:
            batch.before_member(waiting.started.path)
        # Its upload is not journaled: on S3 a small member is sent whole and leaves
        # nothing pending, and on a local directory, where every writer opens a file, an
        # entry would add a write to each; a killed writer's file there is left to the
        # lifecycle sweep.
        with _start(sealing, waiting, None) as feed:
            feed.put(waiting.data)


def _stream(
    batch: _Batch,
    source: MemberSource,
    member: Member,
    sealing: ParallelSealing[_Started],
    waiting: _Waiting,
) -> None:
    """Claim a larger member alone and hand its bytes to its sealer as they are read; an
    archive that breaks off while it is read fails the job (`_seal_each`), not just the
    member."""
    started = waiting.started
    batch.journal.claim([started.placement.storage_key])
    if batch.before_member is not None:
        batch.before_member(started.path)
    with (
        member.open() as stream,
        _start(sealing, waiting, batch.journal.upload_started) as feed,
    ):
        for chunk in _chunks(stream):
            feed.put(chunk)
            # Where a cancel request is noticed.
            batch.context.progress(bytes_done=source.bytes_read)


def _start(
    sealing: ParallelSealing[_Started], waiting: _Waiting, on_upload: UploadStarted | None
) -> MemberFeed:
    started, write = waiting.started, waiting.write
    return sealing.start(
        started,
        started.placement,
        overwrite=write.overwrite,
        replacing=write.replacing,
        on_upload=on_upload,
    )


def _settle(batch: _Batch, outcome: Outcome[_Started]) -> None:
    """Note what became of a member its sealer is done with; running out of memory fails
    the job, not just the member."""
    started = outcome.tag
    try:
        record = outcome.result()
    except MemoryError:
        raise
    except ReadingStopped:
        batch.journal.release(started.placement.storage_key)  # not the job's any more
        return
    except Exception as error:
        batch.journal.release(started.placement.storage_key)  # one there is someone else's
        _note_failure(batch, started.path, error)
        return
    batch.sealed += 1
    batch.journal.settle({"path": started.name, **_object_entry(started.placement, record)})


def _note_failure(batch: _Batch, path: str, error: Exception) -> None:
    batch.failed.append({"path": path, "code": error_code(error), "detail": public_detail(error)})


def _check_destination(batch: _Batch, path: str, name: str) -> None:
    """Refuse members whose object (`name`) would clash with another member, the
    manifest or the archive being read."""
    if path in batch.seen:
        raise UnsafeMember("a second member of the same name")
    batch.seen.add(path)
    if path == MANIFEST_NAME:
        raise UnsafeMember("the manifest's name")
    archive = batch.source.storage_key if isinstance(batch.source, ObjectTarget) else None
    if batch.same_bucket() and batch.storage_prefix + name == archive:
        raise UnsafeMember("the name of the archive being read")


def _sealing(
    context: JobContext, services: Parts, name_key: NameKey | None, run: RunIndex | None = None
) -> MemberSealing:
    """How the job seals each object it writes (each one: on any failure or cancel,
    nothing is left), each record naming the job; with `run`, marked in the index by
    the run's marker."""
    params = context.params(BatchEncryptParams)
    return MemberSealing(
        services.keys,
        services.records,
        context.record.tenant,
        params.kid,
        params.encryption_context,
        params.frame_length,
        name_key,
        writer_id(context),
        run,
    )


def writer_id(context: JobContext) -> str:
    """The job the objects `context`'s job writes are of, in their records and in the
    index: a fanned-out job's chunks write its objects, under one run marker for all of
    them that the job settles once, after its manifest (one marker a chunk, over the
    same prefix, would each stand unsettled, every one expanded over all their
    members)."""
    params = context.record.params
    return params.parent if isinstance(params, BatchChunkParams) else context.record.id


def _progress(context: JobContext, bytes_read: Callable[[], int]) -> Callable[[], None]:
    """Progress after each chunk sealed: where a cancel request is noticed."""
    return lambda: context.progress(bytes_done=bytes_read())


def _write_manifest(batch: _Batch, manifest_key: str, pieces: Iterator[bytes]) -> None:
    """Seal the manifest at `manifest_key`, all of it or nothing; a rerun replaces the
    one its killed predecessor may have completed (the job checked for one at its start)."""
    key = batch.prefix + MANIFEST_NAME
    placement = Placement(batch.store, batch.store.bucket, key, manifest_key)
    _sealing(batch.context, batch.services, batch.name_key, batch.run).seal(
        placement,
        _gathered(pieces),
        overwrite=True,
        after_chunk=_progress(batch.context, lambda: batch.context.record.progress.bytes_done),
        on_upload=batch.journal.upload_started,
    )


def _gathered(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """`pieces` joined into chunks of about `READ_SIZE`: a manifest's entries are small."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) >= READ_SIZE:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    return iter(partial(stream.read, READ_SIZE), b"")


def _source_size(store: ObjectStore, source: ObjectTarget) -> int:
    """The archive's size; a missing one fails the job without naming where it is kept."""
    try:
        return store.head(source.storage_key).size
    except ObjectNotFound:
        raise JobFailed("object-not-found", f"no object {source.key!r}") from None


def _require_absent(store: ObjectStore, storage_key: str, key: str) -> None:
    """Fail the job with `object-exists` if there is an object at `storage_key`."""
    try:
        store.head(storage_key)
    except ObjectNotFound:
        return
    raise JobFailed("object-exists", f"{key!r} already exists and overwrite is false")


def _object_entry(placement: Placement, record: ObjectRecord, *more: str) -> dict[str, Any]:
    """What the manifest and the result say of a sealed object: `MEMBER_FIELDS` and `more`."""
    summary = ObjectSummary.of(record, placement.key)
    return summary.fields(*MEMBER_FIELDS, *more)


def _manifest(
    batch: _Batch, format_: str, damage: InvalidArchive | JobFailed | None
) -> Iterator[bytes]:
    """The manifest as a JSON document, in pieces: the members come from the journal."""
    fields: dict[str, Any] = {
        "jobId": batch.context.record.id,
        "source": batch.source.model_dump(mode="json"),
        "format": format_,
        "kid": batch.params.kid,
        "destination": batch.destination.model_dump(mode="json"),
        "names": batch.params.names,
        "nameKeyVersion": None if batch.name_key is None else batch.name_key.version,
        "createdAt": datetime.now(UTC).isoformat(),
    }
    if damage is not None:
        fields["error"] = {"code": damage.code, "detail": str(damage)}
    members = (
        {**entry, "path": batch.member_path(entry["path"])} for entry in batch.journal.sealed()
    )
    lists = {"members": members, "refused": batch.refused, "failed": batch.failed}
    return json_object(fields, lists)


def _result(batch: _Batch, format_: str, manifest_key: str) -> dict[str, Any]:
    return {
        "bucket": batch.store.bucket,
        "manifestKey": batch.prefix + MANIFEST_NAME,
        "manifestStorageKey": manifest_key,
        "format": format_,
        "counts": _counts(batch),
        "refused": _listed(batch, batch.refused),
        "failed": _listed(batch, batch.failed),
    }


def _counts(batch: _Batch) -> dict[str, int]:
    return {
        "items": batch.items,
        "sealed": batch.sealed,
        "skipped": batch.skipped,
        "refused": len(batch.refused),
        "failed": len(batch.failed),
    }


def _listed(batch: _Batch, entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """What the job's result, kept beside the objects, lists of `entries`: no paths where
    names are hidden (the sealed manifest has them)."""
    hidden = batch.name_key is not None
    return [
        {k: v for k, v in entry.items() if not (hidden and k == "path")}
        for entry in entries[:RESULT_LIST_LIMIT]
    ]


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
    abort_left_pending(store, resumed)
    try:
        write = _may_overwrite(context, services, resumed, placement)
    except ObjectExists:
        detail = f"{placement.key!r} already exists and overwrite is false"
        raise JobFailed("object-exists", detail) from None
    except ClaimTaken as conflict:
        raise JobFailed(conflict.code, f"{placement.key!r}: {conflict}") from None
    size = _source_size(source_store, source)
    context.progress(items_total=1, bytes_total=size, force=True)
    journal.claim([placement.storage_key])
    reader = ObjectReader(source_store, source.storage_key, size)
    with io.BufferedReader(reader, READ_SIZE) as stream:
        record = _sealing(context, services, None).seal(
            placement,
            _chunks(stream),
            overwrite=write.overwrite,
            replacing=write.replacing,
            after_chunk=_progress(context, lambda: reader.position),
            on_upload=journal.upload_started,
        )
    context.progress(items_done=1, bytes_done=size)
    return _object_entry(placement, record, "bucket", "kid")
