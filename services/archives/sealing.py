"""Members of an archive sealed into objects of their own: a stream of a member's bytes
in, a complete, recorded object out, or nothing at all; several members at once.

`MemberSealing` holds what every object of one run is sealed with (the key, the
context, the frame length); `seal` writes one object and may run on several threads at
once, each with a member of its own: it shares nothing between calls but the key store
and the records, which are thread-safe.

`ParallelSealing` seals up to `SEALSTREAM_BATCH_CONCURRENCY` members at once on threads
of its own while the caller reads the archive in order on its thread: the caller starts
a member (`start`, which waits for a free slot) and hands its bytes to the `MemberFeed`
it gets back, where at most `FEED_DEPTH` chunks wait, so memory stays at a few chunks per
member in flight whatever the members' sizes. What became of each member comes back to
the caller's thread (`finished`, `drain`), or, given `ended`, is handed to it on the
sealer's thread as the member ends, before the member's slot is freed: a slow `ended`
holds the next members back, so nothing it is handed piles up.
"""

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Self, TypeVar

from keystore import KeyStore
from keystore.name_keys import NameKey
from services.inventory import RunIndex
from services.keys import Sealing, start_sealing
from services.placement import Placement
from services.seal_to_storage import ObjectSealer, seal_stream
from storage import ObjectStore, StorageError, UploadStarted
from storage.integrity import Records
from storage.records import ObjectRecord

FEED_DEPTH = 2  # chunks of a member waiting for its sealer
POLL_SECONDS = 0.1  # how soon a reader waiting on a full feed sees that its sealer stopped

Tag = TypeVar("Tag")


@dataclass(frozen=True)
class MemberSealing:
    """How one run seals each object it writes."""

    keys: KeyStore
    records: Records
    tenant: str
    kid: str
    context: Mapping[str, str]
    frame_length: int
    # Where names are hidden: the records keep the plaintext's digest only as an HMAC.
    name_key: NameKey | None = None
    # The job writing them, named in each record (`storage.records.MessageRecord.job_id`).
    job_id: str | None = None
    # The run's marker in the index, which stands for every object it writes.
    run: RunIndex | None = None

    def open(self, placement: Placement, *, overwrite: bool) -> ObjectSealer:
        """A message at `placement`, to be written a piece at a time and completed (or
        aborted) by the caller."""
        return ObjectSealer(
            self._start(placement),
            placement,
            overwrite=overwrite,
            records=self.records,
            name_key=self.name_key,
            job_id=self.job_id,
            run=self.run,
        )

    def seal(
        self,
        placement: Placement,
        chunks: Iterable[bytes],
        *,
        overwrite: bool,
        after_chunk: Callable[[], None],
        replacing: str | None = None,
        on_upload: UploadStarted | None = None,
    ) -> ObjectRecord:
        """Seal `chunks` at `placement` as a message of its own, counted as one use of
        the key, and record it (with `replacing`, an etag, only over that version of the
        object there; telling `on_upload` of an upload started that a killed process
        would leave pending); on any failure (or an exception from `after_chunk`, a
        cancel), nothing is left: no object, no pending upload."""
        return seal_stream(
            self._start(placement),
            placement,
            chunks,
            overwrite=overwrite,
            records=self.records,
            after_chunk=after_chunk,
            name_key=self.name_key,
            record_in_metadata=True,  # a small member is one write, with its record
            job_id=self.job_id,
            replacing=replacing,
            on_upload=on_upload,
            run=self.run,
        )

    def _start(self, placement: Placement) -> Sealing:
        return start_sealing(
            self.keys,
            self.tenant,
            self.kid,
            self.context,
            self.frame_length,
            object_key=placement.storage_key,
        )


def settle(run: RunIndex | None, store: ObjectStore) -> None:
    """Once a run has ended, settle its markers (`RunIndex.settle`); one that cannot be
    settled now is expanded when the index is read, as while the run went on."""
    if run is not None:
        with suppress(StorageError):
            run.settle(store)


class ReadingStopped(Exception):
    """The member's reading stopped before its end: its sealing is abandoned."""


class MemberFeed:
    """A member's bytes on their way from the thread reading the archive to the thread
    sealing it. Used as a context manager by the reader: leaving it normally ends the
    member, leaving it by an exception abandons it (its sealer then leaves nothing)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | ReadingStopped | None] = queue.Queue(FEED_DEPTH)
        self._gone = threading.Event()  # the sealer stopped: nothing more is taken

    def put(self, chunk: bytes) -> None:
        """Hand on the next chunk, waiting while `FEED_DEPTH` wait; dropped once the
        sealer has stopped (its failure is reported with its outcome)."""
        self._offer(chunk)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._offer(None if error is None else ReadingStopped("the archive's reading stopped"))

    def chunks(self) -> Iterator[bytes]:
        """The chunks, on the sealer's thread, until the member ends."""
        while (item := self._queue.get()) is not None:
            if isinstance(item, ReadingStopped):
                raise item
            yield item

    def close(self) -> None:
        """The sealer is done with the feed, whatever became of the member."""
        self._gone.set()

    def _offer(self, item: bytes | ReadingStopped | None) -> None:
        while not self._gone.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue


@dataclass(frozen=True)
class Outcome(Generic[Tag]):
    """What became of one member: its record, or the error that stopped its sealing."""

    tag: Tag
    record: ObjectRecord | None
    error: BaseException | None

    def result(self) -> ObjectRecord:
        """The member's record, or the error raised again (`ReadingStopped`: the run
        stopped while the member was read)."""
        if self.record is None:
            assert self.error is not None
            raise self.error
        return self.record


class ParallelSealing(Generic[Tag]):
    """Up to `limit` members sealed at once, each told apart by the caller's `Tag`; each
    member's outcome goes to `ended` on its sealer's thread, or, without it, waits for
    `finished` or `drain`."""

    def __init__(
        self,
        sealing: MemberSealing,
        limit: int,
        ended: Callable[[Outcome[Tag]], None] | None = None,
    ) -> None:
        self._sealing = sealing
        self._executor = ThreadPoolExecutor(limit, thread_name_prefix="sealstream-member")
        self._slots = threading.Semaphore(limit)
        self._outcomes: queue.SimpleQueue[Outcome[Tag]] = queue.SimpleQueue()
        self._ended = self._outcomes.put if ended is None else ended
        self._in_flight = 0  # only the caller's thread counts

    def start(
        self,
        tag: Tag,
        placement: Placement,
        *,
        overwrite: bool,
        replacing: str | None = None,
        on_upload: UploadStarted | None = None,
    ) -> MemberFeed:
        """Begin sealing a member at `placement` (only over the version `replacing`, if
        given; telling `on_upload`, on the sealing thread, of a pending upload started)
        once fewer than `limit` are in flight; its bytes go to the feed returned (to be
        used as a context manager)."""
        self._slots.acquire()
        feed = MemberFeed()
        self._in_flight += 1
        self._executor.submit(self._seal, tag, placement, overwrite, replacing, on_upload, feed)
        return feed

    def finished(self) -> Iterator[Outcome[Tag]]:
        """The outcomes of the members that ended since the last call, without waiting."""
        while self._in_flight:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            yield outcome

    def drain(self) -> Iterator[Outcome[Tag]]:
        """The outcomes of every member still in flight, as each ends."""
        while self._in_flight:
            outcome = self._outcomes.get()
            self._in_flight -= 1
            yield outcome

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Members whose bytes were all handed on are sealed before the run ends.
        self._executor.shutdown(wait=True)

    def _seal(
        self,
        tag: Tag,
        placement: Placement,
        overwrite: bool,
        replacing: str | None,
        on_upload: UploadStarted | None,
        feed: MemberFeed,
    ) -> None:
        try:
            record = self._sealing.seal(
                placement,
                feed.chunks(),
                overwrite=overwrite,
                after_chunk=_nothing,
                replacing=replacing,
                on_upload=on_upload,
            )
            outcome = Outcome(tag, record, None)
        except BaseException as error:  # reported to the reading thread with the member
            outcome = Outcome(tag, None, error)
        finally:
            feed.close()
        try:
            self._ended(outcome)
        finally:
            self._slots.release()


def _nothing() -> None:
    """Progress and cancels are the reading thread's: it notices them between chunks."""
