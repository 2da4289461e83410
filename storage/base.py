"""The object-store interface every backend implements: `ObjectStore`, `MultipartWriter`,
`ObjectInfo`, and uploads written part by part across processes (`PartUpload`, `Part`).

What must behave the same on every backend lives here once: range checks, metadata
checks, `put` as a one-part upload, and the writer's life cycle (open → completed or
aborted, and abort on any failure). Backends fill in the underscored hooks.
"""

import builtins  # `list` names a store method inside the store classes
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from types import TracebackType
from typing import ClassVar, Self

from storage.errors import (
    InvalidMetadata,
    InvalidObjectKey,
    InvalidRange,
    PreconditionFailed,
    StorageError,
)

DEFAULT_CHUNK_SIZE = 1 << 20
# Told (key, upload id) when a writer starts an upload that a killed process would leave
# pending (`ObjectStore.multipart`).
UploadStarted = Callable[[str, str], None]

# S3 sends user metadata as `x-amz-meta-<name>` headers and lowercases the names; anything
# outside these patterns would be refused or altered there, so every backend refuses it.
_METADATA_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_METADATA_VALUE = re.compile(r"(?:[!-~](?:[ -~]*[!-~])?)?")


@dataclass(frozen=True)
class SmallObject:
    """An object read whole, and the etag of the version read."""

    data: bytes
    etag: str


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object.

    `etag` is opaque: it changes when the content changes, and is not comparable across
    backends. `last_modified` is timezone-aware (UTC).
    """

    key: str
    size: int
    etag: str
    metadata: dict[str, str]
    last_modified: datetime


@dataclass(frozen=True)
class PartUpload:
    """An upload written part by part, which outlives the process that started it: what
    its caller keeps (in a sealed record) to put more parts, complete it or abort it.
    `upload_id` is the store's own; nothing of it is secret."""

    key: str
    upload_id: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class Part:
    """One part stored: its number (from 1), where it starts in the object and its size,
    and what the store needs to join it (`etag`, `checksum`)."""

    number: int
    offset: int
    size: int
    etag: str
    checksum: str = ""


class Scoped(ABC):
    """A context manager of itself: leaving its `with` block, however the block is left,
    calls `_leave`."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._leave()

    @abstractmethod
    def _leave(self) -> None:
        """Release what the object holds."""


class MultipartWriter(Scoped):
    """An object written incrementally; invisible until `complete()` returns.

    Any failure inside `write()` or `complete()` aborts the upload before it propagates,
    so a writer ends either completed or aborted, never half-visible. As a context manager
    it aborts on leaving the block unless `complete()` has returned: it never completes
    implicitly. One writer is used by one thread at a time.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.bytes_written = 0
        self._state = _WriterState.OPEN

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data`; may block while earlier parts upload (backpressure)."""
        view = memoryview(data).cast("B")
        self._append(view.nbytes, lambda: self._write(view))

    def _append(self, count: int, step: Callable[[], None]) -> None:
        """Run `step`, which appends `count` bytes; abort the upload if it fails."""
        self._require_open()
        if not count:
            return
        try:
            step()
        except BaseException:
            self.abort()
            raise
        self.bytes_written += count

    def send_whole(self, metadata: dict[str, str]) -> bool:
        """Make the object visible with `metadata` (instead of what the writer was opened
        with) if it is still to be written in one request, as a small object is; whether
        it will be. Nothing is sent until `complete()`."""
        self._require_open()
        return self._send_whole(metadata)

    def complete(self) -> ObjectInfo:
        """Make the object visible, if the writer's condition still holds."""
        self._require_open()
        try:
            info = self._complete()
        except BaseException:
            self.abort()
            raise
        self._state = _WriterState.COMPLETED
        return info

    def complete_if_absent(self) -> ObjectInfo | None:
        """`complete()` on the condition that the key is free, whatever the writer was
        opened with, for an object sent whole (`send_whole`) by a writer opened without
        `if_match`: None if the key is taken, the writer left open with its bytes, to be
        completed as opened (or aborted)."""
        self._require_open()
        try:
            info = self._complete_if_absent()
        except BaseException:
            self.abort()
            raise
        if info is not None:
            self._state = _WriterState.COMPLETED
        return info

    def abort(self) -> None:
        """Discard everything written; idempotent, and a no-op after `complete()`."""
        if self._state is not _WriterState.OPEN:
            return
        self._state = _WriterState.ABORTED
        self._abort()

    def _leave(self) -> None:
        self.abort()

    def _require_open(self) -> None:
        if self._state is not _WriterState.OPEN:
            raise StorageError(f"the upload is already {self._state.value}", self.key)

    @abstractmethod
    def _write(self, view: memoryview) -> None:
        """Take a non-empty run of bytes; `view` is only valid during the call."""

    @abstractmethod
    def _send_whole(self, metadata: dict[str, str]) -> bool: ...

    @abstractmethod
    def _complete(self) -> ObjectInfo:
        """Make the object visible and describe it."""

    @abstractmethod
    def _complete_if_absent(self) -> ObjectInfo | None:
        """Make the object visible if its key is free; None, and nothing changed, if not."""

    @abstractmethod
    def _abort(self) -> None:
        """Release everything the upload holds; called at most once."""


class _WriterState(Enum):
    OPEN = "open"
    COMPLETED = "completed"
    ABORTED = "aborted"


class ObjectStore(ABC):
    """A key → bytes store bound to one bucket; thread-safe."""

    bucket: str
    # Whether the store itself derives each object's etag (S3: from its bytes, or from
    # its parts' etags once completed), so that whoever writes the bucket cannot set it;
    # a local directory's is a token in a sidecar that any writer of the directory can.
    derives_etags: ClassVar[bool] = False

    def put(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> ObjectInfo:
        """Store `data` under `key`, conditionally as `multipart` explains."""
        with self.multipart(
            key, metadata=metadata, if_absent=if_absent, if_match=if_match
        ) as writer:
            writer.write(data)
            return writer.complete()

    def multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
        on_upload: UploadStarted | None = None,
    ) -> MultipartWriter:
        """A writer for an object too large or too incremental for one `put`.

        Its `complete` is conditional: with `if_absent` it raises `ObjectExists` if the
        key is taken; with `if_match` (an etag from `head`) it replaces only that version
        of the object, raising `PreconditionFailed` if another has replaced it and
        `ObjectNotFound` if it was deleted.

        `on_upload(key, upload id)` is called once the writer starts an upload that a
        killed process would leave pending, before any of its bytes are sent: on S3 when
        the object outgrows one part (a smaller one is sent whole by `complete`, and never
        calls it), on a local directory as the writer opens its file. Whoever keeps the
        id can later abort exactly that upload (`abort_pending`'s `upload_ids`). If it
        raises, the upload is aborted and the error propagates.
        """
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        return self._open_writer(key, checked_metadata(metadata), if_absent, if_match, on_upload)

    def read(
        self,
        key: str,
        start: int = 0,
        end: int | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        if_match: str | None = None,
    ) -> Generator[bytes, None, None]:
        """Stream bytes [start, end) of the object (end None: to its end) in chunks.

        The object's size is looked up now, so a missing object or a range outside it
        raises here rather than on the first chunk; an object that shrinks while it is
        read raises `StorageError` instead of reading as a shorter one.

        With `if_match` (an etag from `head`), the read is of that version: the first
        chunk raises `PreconditionFailed` if another has replaced it, and once the first
        chunk is read every later one is of that version, whatever replaces it meanwhile.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        info = self.head(key)
        if if_match is not None and info.etag != if_match:
            raise PreconditionFailed(f"the object is no longer the version {if_match}", key)
        size = info.size
        stop = size if end is None else end
        if not 0 <= start <= stop <= size:
            raise InvalidRange(f"range [{start}, {stop}) is not within its {size} bytes", key)
        if start == stop:
            return _nothing()
        # To the end: S3 then needs no Range header, so a whole read is one plain GET.
        until = None if stop == size else stop
        chunks = self._read_range(key, start, until, chunk_size, if_match)
        return _exactly(key, stop - start, chunks)

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object: for small ones (key records, manifests)."""

    @abstractmethod
    def get_small(self, key: str, limit: int) -> "SmallObject":
        """The whole object and its etag, in one request, the etag that of the bytes
        read; `ObjectTooLarge`, its bytes unread, if it has more than `limit`."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """The object's size, etag, metadata and modification time."""

    @abstractmethod
    def list(self, prefix: str = "", *, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects whose keys start with `prefix`, in lexicographic key order, from the
        first key after `start_after` on (a page's cursor).

        Listings carry no user metadata (`metadata` is empty): S3 would need one request
        per object to return it. Use `head` for that.
        """

    def unlisted(self, prefix: str) -> int:
        """How many things under `prefix` a listing leaves out because they are no whole
        object of the store's: none on S3, where every object is listed."""
        return 0

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abstractmethod
    def pending_uploads(self, prefix: str = "") -> builtins.list[str]:
        """Sorted keys under `prefix` that have unfinished uploads."""

    @abstractmethod
    def abort_pending(
        self, prefix: str, *, exact: bool = False, upload_ids: Collection[str] | None = None
    ) -> int:
        """Abort every unfinished upload under `prefix` (with `exact`, of the key `prefix`
        itself and no other), or with `upload_ids` only those of them whose id is listed;
        how many were aborted. A listed id that is no longer pending (completed or aborted
        meanwhile) is passed over.

        For uploads no writer will finish: those of a process killed mid-upload. Nothing
        tells whose an upload is but its id: without `upload_ids`, every writer's upload
        of a key goes, a resumable upload's or another job's included. On S3, which cannot
        tell a live upload from a dead one, a live writer whose upload is aborted fails on
        its next `write` or on `complete`; a local directory keeps the files live writers
        hold (`local_files.hold`).
        """

    def clear_abandoned(self, written_before: datetime) -> int:
        """Remove what uploads whose writer was lost left, untouched since `written_before`
        and held by no live writer (the lifecycle sweep); how many. Nothing on S3, where
        the bucket's `AbortIncompleteMultipartUpload` rule aborts them."""
        return 0

    def start_parts(self, key: str, *, metadata: Mapping[str, str] | None = None) -> PartUpload:
        """Start an upload its caller writes part by part, perhaps from several processes
        in turn (`put_part`), and completes (`complete_parts`) or aborts (`abort_parts`).
        Until then it is a pending upload (`pending_uploads`, `abort_pending`)."""
        encoded_key(key)
        return self._start_parts(key, checked_metadata(metadata))

    def put_part(
        self, upload: PartUpload, number: int, offset: int, data: bytes | bytearray
    ) -> Part:
        """Store part `number` (1 to 10,000), which starts at `offset` of the object;
        every part but the last is at least 5 MiB (S3's floor). Putting a part again
        replaces it. The part is durable once `sync_parts` has returned after it (on S3,
        at once)."""
        if not 1 <= number <= 10_000 or offset < 0:
            raise ValueError("part numbers run from 1 to 10,000, at offsets from 0")
        return self._put_part(upload, number, offset, data)

    @abstractmethod
    def sync_parts(self, upload: PartUpload) -> None:
        """Make every part put so far durable: one sync for as many parts as came
        before it."""

    @abstractmethod
    def complete_parts(
        self, upload: PartUpload, parts: Sequence[Part], *, if_absent: bool
    ) -> ObjectInfo:
        """Make the object of `parts` (in order, each following the one before) visible;
        with `if_absent`, only if the key is free (`ObjectExists`)."""

    @abstractmethod
    def abort_parts(self, upload: PartUpload) -> None:
        """Discard the upload and its parts; an upload already gone is not an error."""

    def listed_parts(self, upload: PartUpload) -> builtins.list[Part] | None:
        """The parts the store holds for `upload`, by number, as it lists them (each
        offset where it would start were they joined; a checksum only if the store lists
        it); `ObjectNotFound` if the upload is gone. None where the store keeps no list of
        its own: a local directory writes every part into one file."""
        return None

    @abstractmethod
    def _start_parts(self, key: str, metadata: dict[str, str]) -> PartUpload:
        """Start a part upload of `key`; `metadata` is already checked."""

    @abstractmethod
    def _put_part(
        self, upload: PartUpload, number: int, offset: int, data: bytes | bytearray
    ) -> Part:
        """Store one part (durable once `sync_parts` returns, where that syncs)."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: `StorageUnavailable` or `BucketNotFound` when not usable."""

    @abstractmethod
    def _open_writer(
        self,
        key: str,
        metadata: dict[str, str],
        if_absent: bool,
        if_match: str | None,
        on_upload: UploadStarted | None,
    ) -> MultipartWriter:
        """A writer for `key`; `metadata` and the condition are already checked."""

    @abstractmethod
    def _read_range(
        self, key: str, start: int, stop: int | None, chunk_size: int, if_match: str | None
    ) -> Generator[bytes, None, None]:
        """Bytes [start, stop) of the object (stop None: to its end), a non-empty range
        already checked; of the version `if_match` if given (`read`), opened as the first
        chunk is asked for."""


def encoded_key(key: str) -> bytes:
    """The key's UTF-8 bytes, refusing keys no backend can name."""
    if not key:
        raise InvalidObjectKey("the object key is empty")
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidObjectKey("the key is not valid Unicode text", key) from None


def checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of `metadata`, refusing names and values that S3 would refuse or alter."""
    checked = dict(metadata or {})
    for name, value in checked.items():
        if not _METADATA_NAME.fullmatch(name):
            raise InvalidMetadata(f"metadata name {name!r} is not lowercase [a-z0-9-]")
        if not _METADATA_VALUE.fullmatch(value):
            raise InvalidMetadata(
                f"metadata value of {name!r} is not printable ASCII without outer spaces"
            )
    return checked


def contiguous(parts: Sequence[Part]) -> int:
    """The size of the object `parts` make, refusing parts that do not follow one
    another from offset 0 and part number 1."""
    end = 0
    for number, part in enumerate(parts, start=1):
        if (part.number, part.offset) != (number, end):
            raise StorageError(f"part {part.number} does not follow the parts before it")
        end += part.size
    return end


def _nothing() -> Generator[bytes, None, None]:
    yield from ()


def _exactly(
    key: str, length: int, chunks: Generator[bytes, None, None]
) -> Generator[bytes, None, None]:
    """`chunks`, required to add up to `length` bytes."""
    received = 0
    try:
        for chunk in chunks:
            received += len(chunk)
            yield chunk
    finally:
        chunks.close()
    if received != length:
        raise StorageError(f"the object changed while read: {received} of {length} bytes", key)
