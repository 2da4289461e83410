"""Seal a stream into a placement: the message written through a multipart upload, its
plaintext's SHA-256 taken on the way, its marker in the index of key versions
(`services.inventory`) and its record's intent (`storage.records`) written before storage
makes it visible, and the object's record saved once it has. Any failure on the way
aborts the upload, so nothing becomes visible and no upload is left pending; a crash
between completing the upload and saving the record leaves the intent, from which the
sweep saves the record (`services.unfinished`). With `record_in_metadata` (archive
members), an object small enough for one request carries its record in its metadata
instead (`storage.records`): its marker, then the object with its record, two writes in
all, and nothing for the sweep to finish. A job's members are marked by one marker for
the run (`services.inventory.RunIndex`), written before its first member, so a small
member is one write.

From a request, batches are sealed, hashed and handed to the multipart writer in one
worker-thread call, which hashes on a second thread while it seals: SHA-256 costs about
as much as sealing and writing together, and both let other threads run meanwhile, so a
stream gets two cores' worth. Backpressure holds end to end: the next chunk is read only once the
previous one has been accepted by the writer, which blocks while its parts in flight are
at their limit. A thread that writes into storage waits as long as the store makes it
wait; those come from a pool of their own (`transfers`), so that streams held up by a
slow store leave the default pool to the short calls every request makes.
"""

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import suppress
from functools import partial

import anyio
from anyio import CapacityLimiter, to_thread

from envelope.encrypt import Piece
from keystore import KeyStore
from keystore.name_keys import NameKey
from services.inventory import Inventory, Marker, RunIndex, record_at
from services.keys import OBJECT_CONTEXT_KEY, KeyWatch, Sealing
from services.objects import hidden_plaintext, intended_record, object_metadata, stored_record
from services.placement import Placement
from services.streams import frame_batches
from storage import ObjectExists, PreconditionFailed, StorageError, UploadStarted
from storage.integrity import Records
from storage.pools import ForkSafePool
from storage.records import (
    ObjectRecord,
    drop_intent,
    record_key,
    record_metadata,
    save_intent,
    save_record,
)

# The writer may block on parts in flight, so batches always go to a thread; bigger ones
# make fewer hops.
STORAGE_BATCH_BYTES = 4 * 1024 * 1024


# Where plaintext is hashed beside its sealing. Hashing never waits on anything, so a
# pool as large as the default is never short for long.
HASHING = ForkSafePool("sealstream-sha256")
# Below this many bytes a write hashes them itself: handing them to another thread
# costs more than hashing them (an archive's small members are one write each).
HASH_BESIDE_BYTES = 64 * 1024


class ObjectSealer:
    """Writes one sealed message into storage: multipart upload, plaintext SHA-256, record.

    Nothing is visible until `complete()`; `abort()` (which the writer also does itself
    on any storage failure) leaves no object and no pending upload.
    """

    def __init__(
        self,
        sealing: Sealing,
        placement: Placement,
        *,
        overwrite: bool,
        records: Records,
        name_key: NameKey | None = None,
        record_in_metadata: bool = False,
        job_id: str | None = None,
        replacing: str | None = None,
        on_upload: UploadStarted | None = None,
        run: RunIndex | None = None,
    ) -> None:
        """`sealing` must have been started for this placement (`start_sealing`'s
        `object_key`): a message that names no place could be copied anywhere. With
        `name_key`, the record holds the plaintext's size and SHA-256 only as their HMAC
        under it; with `record_in_metadata`, a small object carries its record; `job_id`
        names the job writing it in its record; with `replacing` (an etag, and
        `overwrite`), it completes only over that version of the object
        (`PreconditionFailed` otherwise); `on_upload` is told of an upload started that a
        killed process would leave pending (`ObjectStore.multipart`); with `run`, the
        object is marked in the index by its run's marker rather than a marker of its own."""
        named = sealing.encryptor.header.context.get(OBJECT_CONTEXT_KEY)
        if named != placement.storage_key:
            raise ValueError("the sealing was not started for this object's storage key")
        self._sealing = sealing
        self._placement = placement
        self._records = records
        self._name_key = name_key
        self._job_id = job_id
        self._digest = hashlib.sha256()
        self._written = 0  # bytes of the message
        self._inventory = Inventory(records)
        self._run = run
        self._mark = self._inventory.add if run is None else run.mark
        self._overwrite = overwrite
        self._replacing = replacing
        self._record_in_metadata = record_in_metadata
        self._metadata = object_metadata(sealing)
        self._writer = placement.store.multipart(
            placement.storage_key,
            metadata=self._metadata,
            if_absent=not overwrite,
            if_match=replacing,
            on_upload=on_upload,
        )

    def write(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Seal `chunks`, the next of the plaintext, into the upload, and take them into
        its SHA-256 on another thread meanwhile (unless they are few bytes); return once
        both are done, so that the digest takes the plaintext in order."""
        if sum(len(chunk) for chunk in chunks) < HASH_BESIDE_BYTES:
            self._hash(chunks)
            self._seal(chunks)
            return
        hashed = HASHING.executor.submit(self._hash, chunks)
        try:
            self._seal(chunks)
        finally:
            hashed.result()

    def _hash(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self._digest.update(chunk)

    def _seal(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        encryptor = self._sealing.encryptor
        step = encryptor.frame_length
        for chunk in chunks:
            view = memoryview(chunk)
            # A frame's worth at a time, so that each frame's buffer is given back before
            # the next is sealed, and sealed into again rather than made and zeroed anew.
            for start in range(0, len(view), step):
                self._send(encryptor.update(view[start : start + step]))

    def _send(self, pieces: Iterable[Piece]) -> None:
        for piece in pieces:
            self._written += len(piece)
            self._writer.write(piece)  # writers keep nothing of it past the call
            self._sealing.encryptor.recycle(piece)

    def complete(self) -> ObjectRecord:
        """Seal the final frame, mark the object in the index and note its record's
        intent, make it visible, record it, and drop the marker of the object it
        replaced, if that was of another version; a run's object is noted in its run."""
        record = self._complete()
        if self._run is not None:
            self._run.sealed(record)
        return record

    def _complete(self) -> ObjectRecord:
        self._send(self._sealing.encryptor.finish())
        if self._overwrite and self._replacing is None and self._record_in_metadata:
            written = self._complete_where_free()
            if written is not None:
                return written
        replaced = self._replaced()
        marker, intent = self._intended(replaced)
        if self._sends_record(intent):
            return self._complete_recorded(marker, intent, replaced)
        # Before the object can be seen: the index never misses an object it holds, and
        # the intent is there to record it whatever happens next.
        ours = self._mark(marker)
        try:
            save_intent(self._records, intent)
            info = self._writer.complete()
        except BaseException:
            # The intent stays: a completion that failed on the way back may have made
            # the object visible all the same, and the sweep then records it.
            self._take_back(marker if ours else None, None)
            raise
        record = stored_record(intent, info)
        try:
            save_record(self._records, record)
        except BaseException:
            # An object without its record could never be verified: take it back.
            self._take_back(marker if ours else None, intent)
            raise
        with suppress(StorageError):  # one left over is dropped by the sweep
            drop_intent(self._records, intent)
        self._unmark_replaced(replaced, record, marker)
        return record

    def _intended(self, replaced: ObjectRecord | None) -> tuple[Marker, ObjectRecord]:
        """The object's marker, and its record's intent over the object `replaced`."""
        placement, sealing = self._placement, self._sealing
        marker = Marker.new(
            sealing.tenant,
            sealing.key.kid,
            sealing.key.primary_version,
            placement.bucket,
            placement.storage_key,
        )
        intent = intended_record(
            sealing,
            placement.bucket,
            placement.storage_key,
            self._digest.hexdigest(),
            self._written,
            replaced,
        )
        if self._name_key is not None:  # the intent tells no more than the record
            intent = hidden_plaintext(intent, self._name_key)
        if self._job_id is not None:
            intent = intent.model_copy(update={"job_id": self._job_id})
        return marker, intent

    def _complete_where_free(self) -> ObjectRecord | None:
        """Complete an object that carries its record as over nothing, if its key is
        free: most keys an overwrite names are, and only a taken one needs the record of
        what it replaces read first. None if the key is taken (its marker then written,
        as the completion over what is there will want it) or the object is too large to
        carry its record."""
        marker, intent = self._intended(None)
        if not self._sends_record(intent):
            return None
        self._mark(marker)  # one left by a failure is one too many: harmless
        info = self._writer.complete_if_absent()
        return None if info is None else intent.model_copy(update={"etag": info.etag})

    def _sends_record(self, intent: ObjectRecord) -> bool:
        """Whether the object is to carry its record, and will (small enough)."""
        if not self._record_in_metadata:
            return False
        metadata = record_metadata(self._records, intent, self._metadata)
        return metadata is not None and self._writer.send_whole(metadata)

    def _complete_recorded(
        self, marker: Marker, record: ObjectRecord, replaced: ObjectRecord | None
    ) -> ObjectRecord:
        """Complete an object that carries its record: the marker first, as ever."""
        marked = self._mark(marker)
        try:
            info = self._writer.complete()
        except (ObjectExists, PreconditionFailed):
            self._take_back(marker if marked else None, None)  # nothing was made visible
            raise
        # Otherwise the marker stays: a completion that failed on the way back may have
        # made the object visible all the same, and one marker too many is harmless.
        if replaced is not None:  # a record file of the object replaced would be stale
            with suppress(StorageError):
                self._records.store.delete(record_key(replaced.bucket, replaced.key))
        record = record.model_copy(update={"etag": info.etag})
        self._unmark_replaced(replaced, record, marker)
        return record

    def _unmark_replaced(
        self, replaced: ObjectRecord | None, record: ObjectRecord, marker: Marker
    ) -> None:
        """Drop the marker of the object `record`'s replaced, if it had one: unless it is
        of the same version, where it stands for this object too; a run's member is its
        run's marker's, and a marker of its own would list it twice.

        A marker is named by place and version, so the one a run's member drops is also
        that of any write of the same key and version under way or done meanwhile. So the
        member marks the object it finds there afterwards, if not its own, and a write
        that may have replaced one (overwrite) writes its marker again once it is
        complete: whichever of the two comes last leaves the object there marked."""
        if self._run is None:
            self._inventory.moved(replaced, record)
            if self._overwrite:
                with suppress(StorageError):  # the object stands; one write's race lost
                    self._inventory.add(marker)
        elif replaced is not None:
            self._inventory.discard(Marker.of(replaced))
            self._mark_successor(record)

    def _mark_successor(self, record: ObjectRecord) -> None:
        """Mark the object now at this one's place if another write has replaced it."""
        now = self._replaced()
        if now is not None and now.etag != record.etag:
            with suppress(StorageError):
                self._inventory.add(Marker.of(now))

    def _replaced(self) -> ObjectRecord | None:
        """The record of the object this one will replace, if any can be read."""
        if not self._overwrite:
            return None  # the upload completes only where there is no object
        return record_at(self._records, self._placement.store, self._placement.storage_key)

    def _take_back(self, marker: Marker | None, visible: ObjectRecord | None) -> None:
        """Undo what `complete` did before it failed: the object it made `visible`, if it
        did, and its intent (only once the object is gone may they go), and the marker,
        if this writer wrote it. What cannot be undone is left to the sweep."""
        with suppress(StorageError):
            if visible is not None:
                self._placement.store.delete(self._placement.storage_key)
                drop_intent(self._records, visible)
            if marker is not None:
                self._inventory.remove(marker)

    def abort(self) -> None:
        self._writer.abort()


async def seal_upload(
    keys: KeyStore,
    sealing: Sealing,
    chunks: AsyncIterator[memoryview],
    placement: Placement,
    *,
    overwrite: bool,
    records: Records,
    transfers: CapacityLimiter,
) -> ObjectRecord:
    """Seal `chunks`, as a request's body delivers them, into `placement`, and record it.
    The key is checked again as the stream runs (`KeyWatch`): a key disabled meanwhile
    aborts the upload too."""
    watch = KeyWatch.for_sealing(keys, sealing)
    sealer = await to_thread.run_sync(
        partial(ObjectSealer, sealing, placement, overwrite=overwrite, records=records),
        limiter=transfers,
    )
    try:
        size = max(sealing.encryptor.frame_length, STORAGE_BATCH_BYTES)
        async for batch in frame_batches(chunks, size):
            await watch()
            await to_thread.run_sync(sealer.write, batch, limiter=transfers)
        return await to_thread.run_sync(sealer.complete, limiter=transfers)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(sealer.abort, limiter=transfers)
        raise


def seal_stream(
    sealing: Sealing,
    placement: Placement,
    chunks: Iterable[bytes],
    *,
    overwrite: bool,
    records: Records,
    after_chunk: Callable[[], None],
    name_key: NameKey | None = None,
    record_in_metadata: bool = False,
    job_id: str | None = None,
    replacing: str | None = None,
    on_upload: UploadStarted | None = None,
    run: RunIndex | None = None,
) -> ObjectRecord:
    """Seal `chunks`, read from a blocking stream, into `placement`, and record it (its
    plaintext hidden under `name_key`, if given; in its metadata if small enough and
    `record_in_metadata`; naming `job_id` as its writer, if given; only over the version
    `replacing`, if given; telling `on_upload` of a pending upload started, if given;
    marked by `run`'s marker, if given); `after_chunk()` runs once each chunk is written
    (progress, a cancel point)."""
    sealer = ObjectSealer(
        sealing,
        placement,
        overwrite=overwrite,
        records=records,
        name_key=name_key,
        record_in_metadata=record_in_metadata,
        job_id=job_id,
        replacing=replacing,
        on_upload=on_upload,
        run=run,
    )
    try:
        for chunk in chunks:
            sealer.write((chunk,))
            after_chunk()
        return sealer.complete()
    except BaseException:
        sealer.abort()  # no object, no pending upload
        raise
