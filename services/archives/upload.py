"""An archive sealed member by member as it is uploaded: the body of the encrypt-archive
job, which the request that sends the archive runs on a thread of its own.

The archive is read front to back from the upload (`UploadReader`) as it arrives; each
member is sealed into an object of its own under the destination prefix, up to
`SEALSTREAM_BATCH_CONCURRENCY` of them at once (`ParallelSealing`), so nothing of the
archive is ever at rest in plaintext, on disk or in memory beyond a few chunks per
member in flight. Member rules and limits are those of the batch job
(`services.archives`): a member that breaks a rule is refused and listed, a member that
cannot be written fails alone, and an archive that breaks off or crosses a limit fails
the job, keeping the members sealed before.

Every member's outcome goes to `emit` (the uploader's progress stream) and into the
manifest, a message sealed under the same key as the members at `<prefix>manifest.json`,
written as the members go and completed at the end, marked complete or not. Both are
written by a thread of their own (`services.archives.reporting`), as each member ends,
with the job's record: the thread reading the archive waits on the upload, which a slow
client holds back, and members sealed meanwhile are said to be at once all the same.
"""

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from keystore.name_keys import NameKey, NameTooLong
from services.archives.limits import ArchiveLimits, InvalidArchive
from services.archives.members import (
    Member,
    MemberKind,
    MemberSource,
    UnsafeMember,
    member_path,
)
from services.archives.opening import detect_format
from services.archives.reporting import Reporter
from services.archives.sealing import (
    MemberSealing,
    Outcome,
    ParallelSealing,
    ReadingStopped,
    settle,
)
from services.archives.tar_reading import TarSource
from services.archives.zip_streaming import ZipStream
from services.errors import error_code, public_detail
from services.jobs import ArchiveUploadParams
from services.jobs.context import REPORT_INTERVAL, JobCancelled, JobContext, JobFailed
from services.objects import MEMBER_FIELDS, ObjectSummary
from services.placement import Placement
from services.seal_to_storage import ObjectSealer
from services.stored_objects import delete_object
from storage import ObjectStore
from storage.records import ObjectRecord

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sealstream-archive-manifest/1"
READ_SIZE = 1 << 20  # bytes of a member handed to its sealer at a time
READ_AHEAD = 64 << 10  # of the upload, before it is decompressed
RESULT_LIST_LIMIT = 100  # refusals and failures in the job record; the manifest has all
# Seconds between reports of members ended (progress lines, manifest entries): a busy
# run's members are said a step at a time, an idle run's as each ends.
REPORT_PACE = 0.05

COUNTS = ("items", "sealed", "skipped", "refused", "failed", "withdrawn")
# The kinds of member the zip's central directory may say a sealed member is, and keep it.
KEPT_KINDS = (MemberKind.FILE,)

# The events of the members that ended while the last were reported, sent together: one
# hop to the response and one piece of it, where a member each cost both. Called from
# any thread.
Emit = Callable[[list[dict[str, Any]]], None]


class UploadBroken(Exception):
    """The upload stopped being read or sent as a form should: the client went away,
    stalled, stopped reading its progress, or cut the form short."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


# What ends a run before the archive's end, the members sealed before kept.
STOPPING = (InvalidArchive, JobCancelled, UploadBroken)


class UploadReader(io.RawIOBase):
    """The archive's bytes as they arrive: `next_chunk()` blocks for the next piece of
    the upload and returns None at its end; `position` counts what has been taken."""

    def __init__(self, next_chunk: Callable[[], bytes | None]) -> None:
        self._next_chunk = next_chunk
        self._chunk = memoryview(b"")
        self._ended = False
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        while not self._chunk and not self._ended:
            chunk = self._next_chunk()
            self._ended = chunk is None
            self._chunk = memoryview(chunk or b"")
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(self._chunk))
        view[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        self.position += count
        return count

    def drain(self) -> None:
        """Read to the end of the upload, which checks that the form around it ends as it
        should: bytes after an archive's end are not members."""
        while self.read(READ_SIZE):
            pass


def open_upload(reader: UploadReader, format_: str, limits: ArchiveLimits) -> MemberSource:
    """The uploaded archive as members; `format_` "auto" is told by its first bytes."""
    buffered = io.BufferedReader(reader, READ_AHEAD)
    if format_ == "auto":
        format_ = detect_format(buffered.peek(READ_AHEAD))
    if format_ == "zip":
        return ZipStream(buffered, lambda: reader.position, limits)
    return TarSource(buffered, lambda: reader.position, format_, limits, None)


@dataclass(frozen=True)
class MemberPlaces:
    """Where members' objects go: under a prefix, named by their paths, or with
    `name_key`, by their paths encrypted under it (`keystore.name_keys`)."""

    store: ObjectStore
    prefix: str  # as the client names it ('' or ending in '/')
    storage_prefix: str
    name_key: NameKey | None = None

    def place(self, name: str) -> Placement:
        """The object named `name` under the prefix, as it is."""
        return Placement(
            self.store, self.store.bucket, self.prefix + name, self.storage_prefix + name
        )

    def member(self, path: str) -> Placement:
        """The member `path`'s object; `UnsafeMember` if its hidden name is too long."""
        if self.name_key is None:
            return self.place(path)
        try:
            return self.place(self.name_key.encrypt_name(path, self.store.bucket, self.prefix))
        except NameTooLong as refusal:
            raise UnsafeMember(str(refusal)) from None


class Manifest:
    """The manifest, sealed as it is written: a JSON object whose `members` list grows an
    entry at a time, closed by the fields known only at the end."""

    def __init__(self, sealer: ObjectSealer, head: dict[str, Any]) -> None:
        self._sealer = sealer
        self._separator = "\n"
        fields = ",\n".join(f"{_json(name)}: {_json(value)}" for name, value in head.items())
        self._write("{\n" + fields + ',\n"members": [')

    def add(self, entries: list[dict[str, Any]]) -> None:
        """Add the entries in one write: each write is a call into the sealer."""
        text = []
        for entry in entries:
            text.append(self._separator + _json(entry))
            self._separator = ",\n"
        self._write("".join(text))

    def complete(self, tail: dict[str, Any]) -> ObjectRecord:
        fields = "".join(f",\n{_json(name)}: {_json(value)}" for name, value in tail.items())
        self._write("\n]" + fields + "\n}\n")
        return self._sealer.complete()

    def abort(self) -> None:
        self._sealer.abort()

    def _write(self, text: str) -> None:
        self._sealer.write((text.encode(),))


def _json(value: Any) -> str:
    return json.dumps(value)


@dataclass
class UploadRun:
    """One encrypt-archive job: where it writes, and what became of each member so far.
    The reading thread counts the members taken, skipped and refused; the reporting
    thread those sealed and failed, and keeps `failed` and `sealed`: each count has
    one writer."""

    context: JobContext
    sealing: MemberSealing
    places: MemberPlaces
    limits: ArchiveLimits
    emit: Emit
    concurrency: int  # members sealed at once
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    refused: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    # Each member sealed: its place among the members, its path and its storage key.
    sealed: list[tuple[int, str, str]] = field(default_factory=list)
    withdrawn: list[dict[str, str]] = field(default_factory=list)

    @property
    def params(self) -> ArchiveUploadParams:
        return self.context.params(ArchiveUploadParams)


def manifest_place(places: MemberPlaces) -> Placement:
    return places.place(MANIFEST_NAME)


def open_manifest(run: UploadRun) -> Manifest:
    """Start the manifest's message; nothing of it is visible until it is completed."""
    params = run.params
    sealer = run.sealing.open(manifest_place(run.places), overwrite=params.overwrite)
    head = {
        "format": MANIFEST_FORMAT,
        "jobId": run.context.record.id,
        "kid": params.kid,
        "destination": params.destination.model_dump(mode="json", include={"bucket", "prefix"}),
        "names": params.names,
        "nameKeyVersion": None if run.places.name_key is None else run.places.name_key.version,
        "createdAt": datetime.now(UTC).isoformat(),
    }
    return Manifest(sealer, head)


def seal_upload(run: UploadRun, reader: UploadReader) -> dict[str, Any]:
    """The job's body: seal every member of the upload, then complete the manifest. An
    archive that breaks off, or a cancel, still completes the manifest, marked
    incomplete, before the job fails (`JobFailed`) or is cancelled."""
    manifest = open_manifest(run)
    try:
        format_, stopped = _seal_all(run, reader, manifest)
        if stopped is None:
            stopped = _drained(reader)
    except BaseException:
        manifest.abort()
        raise
    record = manifest.complete(_summary(run, format_, stopped))
    settle(run.sealing.run, run.places.store)
    result = _result(run, format_, record)
    if isinstance(stopped, JobCancelled):
        run.context.save_partial(result)
        raise stopped
    if stopped is not None:
        run.context.save_partial(result)
        raise JobFailed(error_code(stopped), public_detail(stopped))
    return result


def _seal_all(
    run: UploadRun, reader: UploadReader, manifest: Manifest
) -> tuple[str, Exception | None]:
    """Seal the members as they come; the archive's format, and what stopped the run
    before the archive's end, if anything did."""
    format_ = run.params.format
    try:
        source = open_upload(reader, format_, run.limits)
    except STOPPING as stopped:
        return format_, stopped
    try:
        # Leaving the block waits for the members in flight, reported as they end, and
        # then for the reporting of them all.
        with (
            _reporting(run, manifest, reader) as reporter,
            ParallelSealing[_Started](run.sealing, run.concurrency, reporter.put) as sealing,
        ):
            _read_all(run, source, reporter, sealing)
        if isinstance(source, ZipStream):
            _check_index(run, source)
    except STOPPING as stopped:
        return source.format, stopped
    finally:
        source.close()
    return source.format, None


@dataclass(frozen=True)
class _Started:
    """A member handed to its sealer: its place among the members, path and object."""

    index: int
    path: str
    placement: Placement


# What the reporting thread is handed: a member's outcome, or the entry of one that
# was never sealed (skipped, refused).
_Ended = Outcome[_Started] | dict[str, Any]


def _reporting(run: UploadRun, manifest: "Manifest", reader: UploadReader) -> Reporter[_Ended]:
    """The run's reporting thread: each member's entry into the manifest and the
    progress as it ends, and the job's record written as the run goes (entries of at
    most as many members as are sealed at once wait for it)."""

    def report(ended: list[_Ended]) -> None:
        _report(run, manifest, [_entry(run, item) for item in ended])

    record = _RecordWriter(run.context)
    return Reporter(
        report,
        lambda: record.update(items_done=run.counts["items"], bytes_done=reader.position),
        depth=run.concurrency,
        interval=REPORT_INTERVAL,
        pace=REPORT_PACE,
    )


def _entry(run: UploadRun, ended: _Ended) -> dict[str, Any] | None:
    return _sealed_entry(run, ended) if isinstance(ended, Outcome) else ended


def _report(run: UploadRun, manifest: "Manifest", entries: list[dict[str, Any] | None]) -> None:
    """The members' entries (None: nothing to say) into the manifest and the progress."""
    said = [entry for entry in entries if entry is not None]
    if said:
        manifest.add(said)
        run.emit([{"event": "member", **entry} for entry in said])


class _RecordWriter:
    """The job's progress, kept as it changes and written once `REPORT_INTERVAL` has
    passed since the last write (which also notices a cancel), however long the next
    change takes: what a run stalled by its uploader had done is in its record, and the
    stall costs no write."""

    def __init__(self, context: JobContext) -> None:
        self._context = context
        self._written = (-1, -1)
        self._at = float("-inf")

    def update(self, *, items_done: int, bytes_done: int) -> None:
        if (items_done, bytes_done) == self._written:
            return
        now = time.monotonic()
        due = now - self._at >= REPORT_INTERVAL
        if due:
            self._written, self._at = (items_done, bytes_done), now
        self._context.progress(force=due, items_done=items_done, bytes_done=bytes_done)


def _read_all(
    run: UploadRun,
    source: MemberSource,
    reporter: Reporter[_Ended],
    sealing: ParallelSealing[_Started],
) -> None:
    for member in source.members():
        reporter.check()
        run.counts["items"] += 1
        taken = _take(run, member, reporter, sealing)
        if taken is not None:
            reporter.put(taken)


def _drained(reader: UploadReader) -> UploadBroken | None:
    try:
        reader.drain()
    except UploadBroken as broken:
        return broken
    return None


def _take(
    run: UploadRun, member: Member, reporter: Reporter[_Ended], sealing: ParallelSealing[_Started]
) -> dict[str, Any] | None:
    """Hand one member to its sealer, or say why not: its entry in the manifest, or None
    once it is on its way (its outcome comes later)."""
    try:
        path = member_path(member.name, member.kind)
        if path is None:
            run.counts["skipped"] += 1
            return {"path": member.name, "status": "skipped"}
        _check_clash(run, path)
        placement = run.places.member(path)
    except UnsafeMember as refusal:
        run.counts["refused"] += 1
        entry = {"path": member.name, "reason": str(refusal)}
        _note(run, run.refused, entry)
        return {**entry, "status": "refused"}
    started = _Started(run.counts["items"] - 1, path, placement)
    with (
        member.open() as stream,
        sealing.start(started, placement, overwrite=run.params.overwrite) as feed,
    ):
        for chunk in _chunks(stream):
            feed.put(chunk)
            reporter.check()  # where a cancel, or an uploader gone, stops the reading
    return None


def _sealed_entry(run: UploadRun, outcome: Outcome[_Started]) -> dict[str, Any] | None:
    """The manifest's entry for a member its sealer is done with; None if the run
    stopped while the member was read (it is not counted)."""
    started = outcome.tag
    try:
        record = outcome.result()
    except MemoryError:
        raise
    except ReadingStopped:
        return None
    except Exception as error:
        run.counts["failed"] += 1
        entry = {"path": started.path, "code": error_code(error), "detail": public_detail(error)}
        _note(run, run.failed, entry)
        return {**entry, "status": "failed"}
    run.counts["sealed"] += 1
    run.sealed.append((started.index, started.path, record.key))
    summary = ObjectSummary.of(record, started.placement.key)
    return {"path": started.path, "status": "sealed", **summary.fields(*MEMBER_FIELDS)}


def _check_index(run: UploadRun, source: ZipStream) -> None:
    """Once a zip's members are read: withdraw those its central directory says are not
    regular files, or all of them if it cannot be read or disagrees with what was read."""
    try:
        kinds = source.check_index()
    except InvalidArchive as mismatch:
        for _, path, storage_key in run.sealed:
            _withdraw(run, path, storage_key, f"the archive failed: {mismatch}")
        raise
    for index, path, storage_key in run.sealed:
        if kinds[index] not in KEPT_KINDS:
            reason = f"the zip's central directory says it is a {kinds[index]}: not followed"
            _withdraw(run, path, storage_key, reason)


def _withdraw(run: UploadRun, path: str, storage_key: str, reason: str) -> None:
    """Delete a member's object (and its record), sealed before it was found out."""
    delete_object(run.sealing.records, run.places.store, run.sealing.tenant, storage_key)
    run.counts["sealed"] -= 1
    run.counts["withdrawn"] += 1
    entry = {"path": path, "reason": reason}
    _note(run, run.withdrawn, entry)
    run.emit([{"event": "withdrawn", **entry}])


def _check_clash(run: UploadRun, path: str) -> None:
    if path in run.seen:
        raise UnsafeMember("a second member of the same name")
    run.seen.add(path)
    if path == MANIFEST_NAME:
        raise UnsafeMember("the manifest's name")


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(READ_SIZE):
        yield chunk


def _note(run: UploadRun, listed: list[dict[str, str]], entry: dict[str, str]) -> None:
    """Keep `entry` for the job's result, which is stored beside the objects: without
    the member's path where names are hidden (the sealed manifest has it)."""
    if len(listed) < RESULT_LIST_LIMIT:
        hidden = run.places.name_key is not None
        listed.append({k: v for k, v in entry.items() if not (hidden and k == "path")})


def _summary(run: UploadRun, format_: str, stopped: Exception | None) -> dict[str, Any]:
    """The manifest's closing fields."""
    error = None
    if stopped is not None:
        code = "job-cancelled" if isinstance(stopped, JobCancelled) else error_code(stopped)
        error = {"code": code, "detail": public_detail(stopped)}
    return {
        "withdrawn": run.withdrawn,
        "archiveFormat": format_,
        "counts": run.counts,
        "complete": stopped is None,
        "error": error,
    }


def _result(run: UploadRun, format_: str, manifest: ObjectRecord) -> dict[str, Any]:
    places = run.places
    return {
        "bucket": places.store.bucket,
        "manifestKey": places.prefix + MANIFEST_NAME,
        "manifestStorageKey": manifest.key,
        "format": format_,
        "counts": dict(run.counts),
        "refused": run.refused,
        "failed": run.failed,
        "withdrawn": run.withdrawn,
    }
