"""The encrypt and decrypt pipelines behind the crypto routes.

Streamed back, each request chunk is encrypted on the event loop as it arrives: the
encryptor seals it straight into its frame, so a step costs AES-GCM over one chunk
(uvicorn hands over at most 256,000 bytes at a time), a fraction of a millisecond
whatever the frame length, and less than a hop to a worker thread would cost in GIL
hand-offs. When the upload declared its length, each chunk's ciphertext is sent as soon
as it is sealed (`Encryptor.expect_length`); otherwise each frame is held until full,
since only then is it known not to be the final one. Decrypting, chunks are gathered
into batches of about a frame, since a frame is released only once authenticated whole;
a batch of up to 2 MiB is opened on the loop, larger ones on a worker thread, so the loop
never stalls. To storage, batches are sealed, hashed and handed to the multipart writer
in one worker-thread call. Backpressure holds end to end: the next chunk is read only
once the previous one has been sent to the client or accepted by the writer, which blocks
while its parts in flight are at their limit.

A thread that writes into storage, or reads out of it, waits as long as the store makes
it wait; those come from a pool of their own (`Services.transfers`), so that streams held
up by a slow store leave the default pool to the short calls every request makes.
"""

import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import anyio
from anyio import CapacityLimiter, to_thread
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.duplex import DuplexStreamingResponse
from api.multipart import UploadForm
from api.problems import Problem
from envelope import (
    AuthenticationError,
    Decryptor,
    FrameReader,
    Header,
    HeaderReader,
    Keyring,
    MessageFormatError,
    MessageLayout,
    OpenedMessage,
    RangeDecryptor,
    TruncatedMessage,
    open_message,
)
from keystore import KeyRecord, KeyStore
from services.keys import Sealing, opening_keyrings, start_sealing
from services.keys import required_context as required
from services.objects import (
    check_placement,
    check_recorded_message,
    read_stored_header,
    read_stored_layout,
)
from services.placement import Placement
from services.seal_to_storage import ObjectSealer
from storage import InvalidRange, ObjectNotFound
from storage.integrity import Records
from storage.records import ObjectRecord, load_record

logger = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

KEY_CHECK_INTERVAL = 1.0  # seconds between checks that a streaming key is still usable
# Decrypted and streamed back, a batch of up to this many bytes is opened on the event loop
# itself: about 0.2 ms of AES-GCM, less than the thread hop would cost in GIL hand-offs
# (measured sealing that way, bench/stream.py: 1.04 against 1.21 server CPU s/GiB).
# Larger batches (frames over 2 MiB) go to a worker thread, so the loop never holds long.
INLINE_BYTES = 2 * 1024 * 1024
# To storage, the writer may block on parts in flight, so batches always go to a thread;
# bigger ones make fewer hops.
STORAGE_BATCH_BYTES = 4 * 1024 * 1024


@dataclass
class EncryptionJob:
    """One encryption under way: the sealing, its response headers, and the key's watch."""

    sealing: Sealing
    headers: dict[str, str]
    watch: "KeyWatch"


def start_encryption(
    keys: KeyStore,
    tenant: str,
    kid: str,
    context: Mapping[str, str],
    frame_length: int,
    placement: Placement | None,
) -> EncryptionJob:
    """Check the key may encrypt now and start a message under its primary version, for
    `placement` if it is bound for storage."""
    object_key = None if placement is None else placement.storage_key
    sealing = start_sealing(keys, tenant, kid, context, frame_length, object_key=object_key)
    return EncryptionJob(
        sealing=sealing,
        headers=key_headers(kid, sealing.key, sealing.keyring),
        watch=KeyWatch(partial(keys.encryption_keyring, tenant, kid)),
    )


def key_headers(requested: str, record: KeyRecord, keyring: Keyring) -> dict[str, str]:
    """The headers naming the key asked for, the key used (`kid#version`), and its algorithm."""
    return {
        "X-Key-Requested": requested,
        "X-Key-Used": keyring.key_name,
        "X-Algorithm-Used": record.alg,
    }


@dataclass
class KeyWatch:
    """Re-checks, at most once per interval, that a key may still serve a running stream, so
    that disabling a key stops long transfers too (within the key cache's TTL)."""

    check: Callable[[], object]
    last: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return time.monotonic() - self.last >= KEY_CHECK_INTERVAL

    async def __call__(self) -> None:
        if self.due():
            await run_in_threadpool(self.check)
            self.last = time.monotonic()


async def frame_batches(
    chunks: AsyncIterator[memoryview], size: int
) -> AsyncIterator[list[memoryview]]:
    """Chunks grouped into batches of at least `size` bytes (the last may be shorter)."""
    batch: list[memoryview] = []
    total = 0
    async for chunk in chunks:
        batch.append(chunk)
        total += len(chunk)
        if total >= size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


async def off_loop_if_large(
    work: Callable[[S, Sequence[memoryview]], list[T]],
    subject: S,
    batch: Sequence[memoryview],
    frame_length: int,
) -> list[T]:
    """`work(subject, batch)`, on a worker thread when a batch is too large to run inline."""
    if frame_length <= INLINE_BYTES:
        return work(subject, batch)
    return await run_in_threadpool(work, subject, batch)


async def encrypt_to_client(
    form: UploadForm, job: EncryptionJob
) -> AsyncIterator[bytearray | memoryview]:
    """The message as the file part arrives: chunk by chunk if the file part's length
    can be planned on (`UploadForm.expected_file_length`), frame by frame otherwise."""
    encryptor = job.sealing.encryptor
    if form.expected_file_length is not None:
        encryptor.expect_length(form.expected_file_length)
    async for chunk in form.file_chunks():
        # Asked first: awaiting the watch for every chunk took 2.1 µs a chunk in the live
        # server, against 0.9 µs to ask.
        if job.watch.due():
            await job.watch()
        for piece in encryptor.update(chunk):
            yield piece
            # Sent, so spent: uvicorn copies each piece of a chunked body, with its
            # chunk-size line, into one write before `send` returns. A slow reader in
            # tests/test_api_stream.py holds the server to that.
            encryptor.recycle(piece)
    # The final frame is sealed twice over (PendingFrame): up to two frames of AES-GCM.
    for piece in await run_in_threadpool(encryptor.finish):
        yield piece


async def encrypt_to_storage(
    form: UploadForm,
    job: EncryptionJob,
    placement: Placement,
    *,
    overwrite: bool,
    records: Records,
    transfers: CapacityLimiter,
) -> ObjectRecord:
    """Seal the file part into `placement` through a multipart upload, and record it.

    Any failure on the way (client gone, malformed body, storage error, key disabled)
    aborts the upload, so nothing becomes visible and no upload is left pending.
    """
    sealer = await to_thread.run_sync(
        partial(ObjectSealer, job.sealing, placement, overwrite=overwrite, records=records),
        limiter=transfers,
    )
    try:
        size = max(job.sealing.encryptor.frame_length, STORAGE_BATCH_BYTES)
        async for batch in frame_batches(form.file_chunks(), size):
            await job.watch()
            await to_thread.run_sync(sealer.write, batch, limiter=transfers)
        return await to_thread.run_sync(sealer.complete, limiter=transfers)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(sealer.abort, limiter=transfers)
        raise


# Decryption


@dataclass
class OpeningKeys:
    """The keyrings that may open a message, the record they came from, and its watch."""

    record: KeyRecord
    keyrings: list[Keyring]
    watch: KeyWatch


def keys_for(keys: KeyStore, tenant: str, header: Header, expected_kid: str | None) -> OpeningKeys:
    """The tenant's keyrings for the keys the header names (`kid#version`)."""
    record, keyrings = opening_keyrings(keys, tenant, header, expected_kid)
    return OpeningKeys(
        record, keyrings, KeyWatch(partial(keys.decryption_keyrings, tenant, record.kid))
    )


async def decrypt_upload(
    keys: KeyStore,
    tenant: str,
    form: UploadForm,
    *,
    expected_kid: str | None,
    required_context: Mapping[str, str],
    idle_timeout: float,
) -> Response:
    """Read the uploaded message's header, find its key, then stream the plaintext back."""
    chunks = form.file_chunks()
    reader = HeaderReader()
    header = None
    async for chunk in chunks:
        header = reader.feed(chunk)
        if header is not None:
            break
    if header is None:
        raise TruncatedMessage("the message ends inside its header")
    opening = await run_in_threadpool(keys_for, keys, tenant, header, expected_kid)
    decryptor = Decryptor(opening.keyrings, required_context=required(required_context, tenant))
    first = await run_in_threadpool(decryptor.update, header.to_bytes() + reader.remainder)
    assert decryptor.keyring is not None

    async def plaintext() -> AsyncIterator[bytes]:
        for piece in first:
            yield piece
        async for batch in frame_batches(chunks, header.frame_length):
            await opening.watch()
            for piece in await off_loop_if_large(_open, decryptor, batch, header.frame_length):
                yield piece
        decryptor.finish()

    return DuplexStreamingResponse(
        plaintext(),
        idle_timeout=idle_timeout,
        media_type="application/octet-stream",
        headers=key_headers(expected_kid or opening.record.kid, opening.record, decryptor.keyring),
    )


def _open(decryptor: Decryptor, batch: Sequence[memoryview]) -> list[bytes]:
    return [piece for chunk in batch for piece in decryptor.update(chunk)]


@dataclass
class CheckedObject:
    """A stored message whose header and final frame have authenticated, so its layout is
    the message's own, and the keys that opened it."""

    opening: OpeningKeys
    opened: OpenedMessage
    layout: MessageLayout


async def check_object(
    keys: KeyStore,
    tenant: str,
    placement: Placement,
    *,
    records: Records,
    serve_unrecorded: bool,
    expected_kid: str | None,
    required_context: Mapping[str, str],
    transfers: CapacityLimiter,
) -> CheckedObject:
    """Authenticate a stored object's header and final frame: they, not the object's size
    (which whoever writes the bucket controls), say how long its plaintext is.

    An object with a record must be the message its record names, of the size its upload
    recorded; one without a record (written by another ESDK client, say) is served on its
    own authentication only if `serve_unrecorded`, else refused (502 `object-unrecorded`).
    An object that fails is damage in storage: 502 `object-damaged`.
    """
    store, storage_key = placement.store, placement.storage_key
    size = (await run_in_threadpool(store.head, storage_key)).size
    recorded = await run_in_threadpool(
        partial(_recorded, serve_unrecorded=serve_unrecorded), records, placement, size
    )
    with _damage_reported(placement):
        header = await run_in_threadpool(read_stored_header, store, storage_key, size)
        opening = await run_in_threadpool(keys_for, keys, tenant, header, expected_kid)
        opened = await run_in_threadpool(
            open_message, header, opening.keyrings, required(required_context, tenant)
        )
        check_placement(header, storage_key)  # authenticated now, with the header
        if recorded is not None:
            check_recorded_message(header, recorded)
        layout = await to_thread.run_sync(
            read_stored_layout, store, storage_key, header, opened.cipher, size, limiter=transfers
        )
    return CheckedObject(opening, opened, layout)


def decrypt_object(
    checked: CheckedObject,
    placement: Placement,
    range_header: str | None,
    *,
    expected_kid: str | None,
    idle_timeout: float,
    transfers: CapacityLimiter,
) -> Response:
    """Decrypt a checked stored object, or just the frames a `Range` needs (206): every
    length and range in the answer comes from the authenticated layout."""
    opening, opened, layout = checked.opening, checked.opened, checked.layout
    total = layout.plaintext_length
    wanted = parse_range(range_header, total)
    headers = {
        "Accept-Ranges": "bytes",
        **key_headers(expected_kid or opening.record.kid, opening.record, opened.keyring),
    }
    read = partial(placement.store.read, placement.storage_key)
    if wanted is None:
        frames = FrameReader(opened.cipher, layout.frame_length)
        body = _pump(
            partial(read, layout.header_length, layout.message_length), frames.feed, transfers
        )
        return DuplexStreamingResponse(
            _checked(body, lambda: frames.final_frame_read),
            idle_timeout=idle_timeout,
            media_type="application/octet-stream",
            headers={**headers, "Content-Length": str(total)},
        )
    first, last = wanted
    span = layout.span(first, last)
    ranged = RangeDecryptor(opened.cipher, layout, span)
    body = _pump(partial(read, span.start, span.end), ranged.update, transfers)

    async def checked_range() -> AsyncIterator[bytes]:
        async for piece in body:
            yield piece
        ranged.finish()

    return DuplexStreamingResponse(
        checked_range(),
        idle_timeout=idle_timeout,
        status_code=206,
        media_type="application/octet-stream",
        headers={
            **headers,
            "Content-Length": str(last - first + 1),
            "Content-Range": f"bytes {first}-{last}/{total}",
        },
    )


def _recorded(
    records: Records, placement: Placement, size: int, *, serve_unrecorded: bool
) -> ObjectRecord | None:
    """The object's record, refusing an object of another size than its upload recorded
    (cut short or replaced behind the service's back). An object without a record is
    refused unless `serve_unrecorded`: the service cannot tell it was the one to store it,
    and whoever holds an asymmetric key's public half can make one."""
    try:
        recorded = load_record(records, placement.bucket, placement.storage_key)
    except ObjectNotFound:
        if serve_unrecorded:
            return None
        logger.warning("unrecorded object %s in bucket %s", placement.storage_key, placement.bucket)
        raise Problem(
            502,
            "object-unrecorded",
            f"the service has no record of storing {placement.key!r}, so it does not serve it",
        ) from None
    if recorded.ciphertext_size != size:
        raise _damaged(
            placement, f"it is {size} bytes; its upload recorded {recorded.ciphertext_size}"
        )
    return recorded


@contextmanager
def _damage_reported(placement: Placement) -> Iterator[None]:
    """A stored object that is no whole, authentic message (malformed, cut, extended, or a
    tag that fails) as the damage in storage it is, not as a fault of the request."""
    try:
        yield
    except (MessageFormatError, AuthenticationError) as exc:
        raise _damaged(placement, str(exc)) from None
    except InvalidRange:  # shorter than a moment ago; its own message names the storage key
        raise _damaged(placement, "it changed while it was read") from None


def _damaged(placement: Placement, reason: str) -> Problem:
    """502 `object-damaged`; the detail names the object by the key the client gave, the
    log by its storage key, for whoever repairs the store."""
    logger.warning(
        "damaged object %s in bucket %s: %s", placement.storage_key, placement.bucket, reason
    )
    return Problem(
        502,
        "object-damaged",
        f"the stored object {placement.key!r} is not a whole, authentic message: {reason}",
    )


async def _pump(
    read: Callable[[], Iterator[bytes]],
    open_chunk: Callable[[bytes], list[bytes]],
    transfers: CapacityLimiter,
) -> AsyncIterator[bytes]:
    """Read stored chunks and open them, each step in a transfer thread; the read starts
    in one too, since starting it asks the store for the object's size."""
    chunks: Iterator[bytes] | None = None

    def step() -> list[bytes] | None:
        nonlocal chunks
        if chunks is None:
            chunks = read()
        chunk = next(chunks, None)
        return None if chunk is None else open_chunk(chunk)

    while (pieces := await to_thread.run_sync(step, limiter=transfers)) is not None:
        for piece in pieces:
            yield piece


async def _checked(
    body: AsyncIterator[bytes], complete: Callable[[], bool]
) -> AsyncIterator[bytes]:
    async for piece in body:
        yield piece
    if not complete():
        raise TruncatedMessage("the stored message ends before its final frame")


# One range-spec (RFC 9110 §14.1.2); the unit is case-insensitive, the digits ASCII only.
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# No message holds 10^18 bytes (2^32 frames of at most 16 MiB), so a position or length
# with more significant digits than this is taken as 10^18, past the end of any plaintext,
# rather than converted: Python refuses to convert thousands of digits.
_MAX_DIGITS = 18


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, or None to send everything.

    A header this server cannot honour as one range (bad syntax, several ranges) is
    ignored, as RFC 9110 allows; a well-formed range outside the plaintext is a 416.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip(" \t"))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    start, end = match.group(1), match.group(2)
    if start == "":  # suffix: the last N bytes
        length = _position(end)
        if length == 0 or total == 0:
            raise _unsatisfiable(total)
        return max(0, total - length), total - 1
    first = _position(start)
    last = _position(end) if end else None
    if last is not None and last < first:
        return None  # an invalid range-spec: ignored like any header we cannot honour
    if first >= total:
        raise _unsatisfiable(total)
    return first, total - 1 if last is None else min(last, total - 1)


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _unsatisfiable(total: int) -> Problem:
    return Problem(
        416,
        "range-not-satisfiable",
        f"the range lies outside the {total} bytes of plaintext",
        headers={"Content-Range": f"bytes */{total}"},
    )
