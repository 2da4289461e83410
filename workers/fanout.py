"""Batch-encrypt jobs fanned out across workers.

A members job over a prefix, or over a zip in storage, with more members than one chunk
holds (`SEALSTREAM_BATCH_CHUNK_MEMBERS`) is split into chunks, each a job of its own
(`batch-encrypt-chunk`) queued for every worker to take. A prefix is split into ranges
of keys, which never overlap; a zip into runs of members in its index, each chunk reading
the index again and failing if it is not the one the job was split from (its digest).
A tar cannot be split by offset: it is read by one job, as `workers.batch` does.

The split (the plan) is saved in the job's journal before any chunk exists, so that a
rerun of the job finds the same chunks again; a chunk's id is the job's and its index.
Each chunk seals its members as the batch job does, with a journal of its own, so that a
chunk whose worker was killed is resumed by the next one to take it, each member sealed
once. A chunk's journal is kept when it ends: the job writes the manifest from them, in
the order of the plan, then deletes them. The members are the job's: their records name
it, and one run marker in the index stands for all of them (`services.inventory`),
settled by the job after its manifest.

While it waits the job runs chunks itself, from the last back (workers take them from
the first), and reports its chunks' progress as its own. A chunk stops at its next
checkpoint once its job is cancelled (`JobRecord.stopped_by`); the job then cancels the
chunks no one has started and waits for the others to stop.

A chunk's record, in the job store and its report, holds the parameters of its job and
its share; with hidden names its refusals and failures name members by hidden name
only. Neither holds key material; a chunk's task carries only its id.
"""

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from keystore.name_keys import NameTooLong, NameUnreadable
from sealstream.wiring import Parts, archive_limits
from services.archives import (
    InvalidArchive,
    MemberKind,
    MemberSource,
    PrefixSource,
    UnsafeMember,
    member_path,
)
from services.archives.opening import open_archive
from services.archives.sealing import settle
from services.archives.zip_reading import ZipSource
from services.jobs import (
    BatchChunkParams,
    BatchEncryptParams,
    JobKind,
    JobRecord,
    JobStatus,
    JobStore,
    ObjectTarget,
    PrefixTarget,
    QueueUnavailable,
    chunk_id,
)
from services.jobs.context import (
    REPORT_INTERVAL,
    JobCancelled,
    JobContext,
    JobFailed,
    LeaseLost,
    finish_job,
)
from storage.integrity import Records, RecordTampered
from workers.batch import (
    MANIFEST_NAME,
    _Batch,
    _counts,
    _manifest,
    _require_absent,
    _result,
    _seal_each,
    _source_size,
    _write_manifest,
    abort_left_pending,
    batch_encrypt,
)
from workers.execution import run_job
from workers.journal import Journal, Resumed

logger = logging.getLogger(__name__)

MAX_CHUNKS = 256  # past this, chunks hold more members than the setting asks
STOP_WAIT = 60.0  # seconds a cancelled job waits for its running chunks to stop


class ChunkSlice(BaseModel):
    """The members one chunk seals: `count` members from the `start`-th on, in the
    source's order, about `bytes` bytes. Under a prefix they are the objects after `after`
    up to `last`, in key order: ranges that never overlap."""

    start: int
    count: int
    bytes: int
    after: str | None = None
    last: str | None = None


class Plan(BaseModel):
    """How a job was split: its source's format, a zip's index digest (which each chunk
    finds again, or fails), and the chunks."""

    format: str
    directory: str | None = None
    chunks: list[ChunkSlice]


# The job


def batch_job(context: JobContext, services: Parts) -> dict[str, Any]:
    """The batch-encrypt job's body: fanned out if its source splits into chunks, else
    run here as one (`workers.batch`)."""
    params = context.params(BatchEncryptParams)
    if params.mode == "whole":
        return batch_encrypt(context, services)
    tenant, job_id = context.record.tenant, context.record.id
    journal = Journal(services.records, tenant, job_id)
    rerun = context.record.attempts > 1
    resumed = journal.resume() if rerun else Resumed()
    plan = journal.plan(Plan) if rerun else None
    if plan is None:
        if resumed.started:  # an earlier attempt ran it as one, or ended it
            return batch_encrypt(context, services)
        plan = _split(context, services, params)
        if plan is None:
            return batch_encrypt(context, services)
        if not params.overwrite:
            _require_manifest_absent(context, services, params)
        journal.save_plan(plan)
    chunks = [chunk_id(job_id, index) for index in range(len(plan.chunks))]
    journals = _Chunks(services.records, tenant, job_id, chunks)
    batch = _Batch(context, services, journals, resumed, None)
    try:
        abort_left_pending(batch.store, resumed)  # its manifest's
        return _fanned_out(batch, plan, chunks)
    except LeaseLost:
        raise  # another worker runs the job now, from the same journals
    except Exception:
        journal.discard()
        _discard_journals(services, tenant, chunks)
        raise


class _Chunks(Journal):
    """The job's journal, whose sealed members are its chunks', in the plan's order."""

    def __init__(self, records: Records, tenant: str, job_id: str, chunks: list[str]) -> None:
        super().__init__(records, tenant, job_id)
        self._chunks = [Journal(records, tenant, chunk) for chunk in chunks]

    def sealed(self) -> Iterator[dict[str, Any]]:
        for journal in self._chunks:
            yield from journal.sealed()


def _discard_journals(services: Parts, tenant: str, chunks: Iterable[str]) -> None:
    for job_id in chunks:
        Journal(services.records, tenant, job_id).discard()


def _require_manifest_absent(
    context: JobContext, services: Parts, params: BatchEncryptParams
) -> None:
    store = services.spaces.store(context.record.tenant, params.destination.bucket)
    prefix, storage_prefix = _prefixes(params)
    _require_absent(store, storage_prefix + MANIFEST_NAME, prefix + MANIFEST_NAME)


def _prefixes(params: BatchEncryptParams) -> tuple[str, str]:
    destination = params.destination
    assert isinstance(destination, PrefixTarget)  # as members mode requires
    return destination.prefix, destination.storage_prefix


# Splitting


def _split(context: JobContext, services: Parts, params: BatchEncryptParams) -> Plan | None:
    """The chunks of a prefix or a zip with more members than a chunk holds; None for
    fewer, or for a tar."""
    store = services.spaces.store(context.record.tenant, params.source.bucket)
    limits = archive_limits(services.settings)
    source = params.source
    if isinstance(source, ObjectTarget):
        if params.format not in ("auto", "zip"):
            return None
        _source_size(store, source)
        with open_archive(store, source.storage_key, params.format, limits) as archive:
            if not isinstance(archive, ZipSource):
                return None
            spans = archive.spans
            plan = Plan(
                format="zip",
                directory=archive.index_digest(),
                chunks=_slices(services, spans, [None] * len(spans)),
            )
    else:
        _, storage_prefix = _prefixes(params)
        skip = storage_prefix if source.bucket == params.destination.bucket else None
        listed = PrefixSource(store, source.storage_prefix, skip, limits.max_members).listed
        sizes, keys = [size for _, size in listed], [key for key, _ in listed]
        plan = Plan(format="prefix", chunks=_slices(services, sizes, list(keys)))
    return plan if len(plan.chunks) > 1 else None


def _slices(services: Parts, sizes: list[int], keys: list[str | None]) -> list[ChunkSlice]:
    """Runs of members of `sizes` and, under a prefix, their `keys`."""
    per_chunk = max(services.settings.batch_chunk_members, math.ceil(len(sizes) / MAX_CHUNKS))
    slices = []
    for start in range(0, len(sizes), per_chunk):
        end = min(start + per_chunk, len(sizes))
        slices.append(
            ChunkSlice(
                start=start,
                count=end - start,
                bytes=sum(sizes[start:end]),
                after=keys[start - 1] if start else None,
                last=keys[end - 1],
            )
        )
    return slices


# Running the chunks


def _fanned_out(batch: _Batch, plan: Plan, chunks: list[str]) -> dict[str, Any]:
    context, services = batch.context, batch.services
    context.progress(
        items_total=sum(c.count for c in plan.chunks),
        bytes_total=sum(c.bytes for c in plan.chunks),
        force=True,
    )
    for index in range(len(chunks)):
        record = _chunk_record(services.jobs, context.record, plan, index)
        if record.status is JobStatus.QUEUED:
            _queue(context, record)
    finals = _wait_for(context, services, plan, chunks)
    damage = _gather(batch, finals)
    manifest_key = batch.storage_prefix + MANIFEST_NAME
    _write_manifest(batch, manifest_key, _manifest(batch, plan.format, damage))
    settle(batch.run, batch.store)  # the chunks' run: theirs are the job's objects
    result = {**_result(batch, plan.format, manifest_key), "chunks": len(chunks)}
    total = context.record.progress.bytes_total
    context.progress(items_done=batch.items, items_total=batch.items, bytes_done=total)
    if damage is not None:
        context.save_partial(result)
        raise damage
    batch.journal.finish(result)
    _discard_journals(services, context.record.tenant, chunks)
    return result


def _chunk_record(store: JobStore, job: JobRecord, plan: Plan, index: int) -> JobRecord:
    """The chunk's record: as an earlier attempt of the job made it, or made now."""
    job_id = chunk_id(job.id, index)
    record = store.find(job.tenant, job_id)
    if record is not None:
        return record
    params = BatchChunkParams.model_validate(
        {
            **job.params_as(BatchEncryptParams).model_dump(),
            "parent": job.id,
            "index": index,
        }
    )
    now = datetime.now(UTC)
    record = JobRecord(
        id=job_id,
        kind=JobKind.BATCH_CHUNK,
        tenant=job.tenant,
        params=params,
        created_at=now,
        updated_at=now,
    )
    store.save(record)
    return record


def _queue(context: JobContext, record: JobRecord) -> None:
    """Queue a chunk for every worker; if it cannot be, the job runs it itself."""
    if context.submit is None:
        return
    try:
        context.submit(record)
    except QueueUnavailable as error:
        logger.warning("job %s: running chunk %s here: %s", context.record.id, record.id, error)


def _wait_for(
    context: JobContext, services: Parts, plan: Plan, chunks: list[str]
) -> list[JobRecord]:
    """Run chunks here until each has ended, wherever it ran; their final records."""
    store, stop = services.jobs, threading.Event()
    helper = threading.Thread(
        target=_run_here, args=(services, chunks, stop), name="sealstream-chunks", daemon=True
    )
    helper.start()
    try:
        while True:
            records = [_chunk_record(store, context.record, plan, i) for i in range(len(chunks))]
            context.progress(
                items_done=sum(r.progress.items_done for r in records),
                bytes_done=sum(r.progress.bytes_done for r in records),
                force=True,
            )
            if all(record.status.finished for record in records):
                return records
            stop.wait(REPORT_INTERVAL)
    except JobCancelled:
        stop.set()
        helper.join()
        _stop_chunks(services, context.record, plan, chunks)
        raise
    finally:
        stop.set()
        helper.join()


def _run_here(services: Parts, chunks: list[str], stop: threading.Event) -> None:
    """Run the chunks no worker has finished, from the last back, until all have ended
    or `stop` is set; those another worker holds are tried again a little later."""
    while not stop.is_set():
        waiting = [job_id for job_id in reversed(chunks) if not _ended(services.jobs, job_id)]
        if not waiting:
            return
        for job_id in waiting:
            if stop.is_set():
                return
            try:
                run_job(job_id, services, {JobKind.BATCH_CHUNK: batch_chunk})
            except Exception:
                logger.exception("chunk %s: could not be run here; left to the workers", job_id)
        stop.wait(services.settings.job_lease_ttl / 3)


def _ended(store: JobStore, job_id: str) -> bool:
    """Ended, or nothing to run here: gone, or refused (the job fails on it)."""
    try:
        record = store.load(job_id)
    except RecordTampered:
        return True
    return record is None or record.status.finished


def _stop_chunks(services: Parts, job: JobRecord, plan: Plan, chunks: list[str]) -> None:
    """After the job's cancel: the chunks not started are cancelled, and the job waits
    (a while) for the running ones to stop at their next checkpoint."""
    store = services.jobs
    deadline = time.monotonic() + STOP_WAIT
    for index in range(len(chunks)):
        record = _chunk_record(store, job, plan, index)
        if record.status is JobStatus.QUEUED:
            finish_job(store, services.audit, record, JobStatus.CANCELLED)
    while time.monotonic() < deadline:
        if all(_ended(store, job_id) for job_id in chunks):
            return
        time.sleep(REPORT_INTERVAL)
    logger.warning("job %s: cancelled; some of its chunks are still stopping", job.id)


def _gather(batch: _Batch, finals: list[JobRecord]) -> JobFailed | None:
    """Add up what the chunks did; the first one's failure, if any failed."""
    damage = None
    for record in finals:
        result = record.result or {}
        counts = result.get("counts", {})
        batch.items += counts.get("items", 0)
        batch.sealed += counts.get("sealed", 0)
        batch.skipped += counts.get("skipped", 0)
        batch.refused += [_shown(batch, entry) for entry in result.get("refused", [])]
        batch.failed += [_shown(batch, entry) for entry in result.get("failed", [])]
        error = record.error or result.get("error")
        if damage is None and record.status is not JobStatus.SUCCEEDED:
            error = error or {"code": "chunk-cancelled", "detail": "a chunk was cancelled"}
        if damage is None and error is not None:
            damage = JobFailed(error["code"], f"chunk {record.id}: {error['detail']}")
    return damage


# A chunk


def batch_chunk(context: JobContext, services: Parts) -> dict[str, Any]:
    """The chunk's body: its share of the members sealed as `workers.batch` seals them,
    its journal kept for the job's manifest. Its result counts them, and lists every
    refusal and failure (their paths hidden where names are)."""
    params = context.params(BatchChunkParams)
    journal = Journal(services.records, context.record.tenant, context.record.id)
    resumed = journal.resume() if context.record.attempts > 1 else Resumed()
    if resumed.result is not None:
        return resumed.result
    plan = Journal(services.records, context.record.tenant, params.parent).plan(Plan)
    job = services.jobs.find(context.record.tenant, params.parent)
    if plan is None or job is None or job.status.finished:
        # Failed without its body (run too often, or stale), cancelled, or gone: no
        # manifest will list what this chunk would seal.
        raise JobFailed("job-ended", f"job {params.parent} has ended")
    batch = _Batch(context, services, journal, resumed, None)
    share = plan.chunks[params.index]
    try:
        abort_left_pending(batch.store, resumed)
        context.progress(items_total=share.count, bytes_total=share.bytes, force=True)
        with _open_share(batch, share, plan.directory) as source:
            damage = _seal_each(batch, source)
            found = source.items_total
        context.progress(items_done=batch.items, bytes_done=share.bytes)
        journal.claim([])  # the members settled since the last claim, for the manifest
    except JobCancelled:
        journal.discard()  # the job, cancelled, writes no manifest
        raise
    result = _chunk_result(batch, damage)
    if found != share.count:
        result["failed"].append(_changed(batch, share, found))
    journal.finish(result, keep_entries=True)
    return result


@contextmanager
def _open_share(batch: _Batch, share: ChunkSlice, directory: str | None) -> Iterator[MemberSource]:
    """The chunk's members: its range of keys, or its run of a zip's members (its index
    the one the job was split from, the names before it taken as seen)."""
    source = batch.source
    store = batch.services.spaces.store(batch.tenant, source.bucket)
    limits = archive_limits(batch.services.settings)
    if not isinstance(source, ObjectTarget):
        skip = batch.storage_prefix if batch.same_bucket() else None
        prefix, most = source.storage_prefix, limits.max_members
        yield PrefixSource(store, prefix, skip, most, after=share.after, last=share.last)
        return
    with open_archive(store, source.storage_key, "zip", limits) as archive:
        assert isinstance(archive, ZipSource)
        if archive.index_digest() != directory:
            raise JobFailed("archive-changed", "the archive changed after its job was split")
        for name, kind in archive.only(share.start, share.count):
            _seen(batch, name, kind)
        yield archive


def _seen(batch: _Batch, name: str, kind: MemberKind) -> None:
    """Count a member of an earlier chunk as seen, as its chunk does: a later one of the
    same name is refused."""
    try:
        path = member_path(name, kind)
        if path is not None:
            batch.object_name(path)
            batch.seen.add(path)
    except UnsafeMember:
        return


def _chunk_result(batch: _Batch, damage: Exception | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "counts": _counts(batch),
        "refused": [_hidden(batch, entry) for entry in batch.refused],
        "failed": [_hidden(batch, entry) for entry in batch.failed],
    }
    if isinstance(damage, InvalidArchive):
        result["error"] = {"code": damage.code, "detail": str(damage)}
    return result


def _changed(batch: _Batch, share: ChunkSlice, found: int | None) -> dict[str, str]:
    """The failure a bucket writer's change to the source is noted as: the chunk found
    more or fewer objects in its range than the job listed there."""
    entry = {
        "code": "source-changed",
        "detail": f"{share.count} objects listed when the job was split, {found} found later",
    }
    if batch.name_key is None and isinstance(batch.source, PrefixTarget):
        start = len(batch.source.storage_prefix)  # the range as the tenant names its keys
        after, last = (share.after or "")[start:], (share.last or "")[start:]
        entry["path"] = f"{after}..{last}"
    return entry


def _hidden(batch: _Batch, entry: dict[str, str]) -> dict[str, str]:
    """`entry` as a chunk's result keeps it: where names are hidden, its path as the
    member's hidden name, or none if it has none."""
    if batch.name_key is None or "path" not in entry:
        return entry
    kept = {k: v for k, v in entry.items() if k != "path"}
    with suppress(NameTooLong, UnicodeEncodeError):
        kept["hiddenPath"] = batch.name_key.encrypt_name(
            entry["path"], batch.store.bucket, batch.prefix
        )
    return kept


def _shown(batch: _Batch, entry: dict[str, str]) -> dict[str, str]:
    """A chunk's `entry` with its path back, for the sealed manifest."""
    if batch.name_key is None or "hiddenPath" not in entry:
        return entry
    shown = {k: v for k, v in entry.items() if k != "hiddenPath"}
    with suppress(NameUnreadable):
        shown["path"] = batch.member_path(entry["hiddenPath"])
    return shown
