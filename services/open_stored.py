"""Open a stored object: whole or a range of it, streamed to a client; or read whole and
checked against the object's upload record (the verify job, re-encryption).

To a client, nothing is sent before the object's header and final frame have
authenticated: they, not the object's size (which whoever writes the bucket controls),
say how long its plaintext is, and every length and range in the answer comes from that
layout. A range is read and opened alone, frame by frame (`RangeDecryptor`).

Read whole, the object is read in one pass, whose header, met first, says which keyrings
open it; every frame is authenticated before its plaintext is handed on, and the
plaintext's size and SHA-256 are compared with the record once the final frame has been
read. Streamed to a client, a recorded object's plaintext is compared so too, and the
answer's last piece is held back until that and the final frame (and a signed message's
footer) have passed: an answer of known length that has all its bytes has ended cleanly,
whatever fails after. A range cannot be compared with the record, which holds the whole
plaintext's digest only: its frames authenticate, and whoever holds the message's data key
(any of its recipients) could have written them.

A thread that reads out of storage waits as long as the store makes it wait; those come
from a pool of their own (`transfers`), so that streams held up by a slow store leave the
default pool to the short calls every request makes.
"""

import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from functools import partial

from anyio import CapacityLimiter, to_thread

from envelope import (
    AuthenticationError,
    BodyReader,
    Decryptor,
    EncryptionContextMismatch,
    Header,
    HeaderReader,
    MessageFormatError,
    MessageLayout,
    OpenedMessage,
    RangeDecryptor,
    TruncatedMessage,
    open_message,
    start_decryption,
)
from keystore import KeyRecord, KeyStore, Uses
from keystore.name_keys import NameKeys
from services.keys import KeyWatch, OpeningKeys, opening_keys, proven_by_proof, required_context
from services.objects import (
    RecordMismatch,
    check_against_record,
    check_placement,
    check_recorded_message,
    check_recorded_plaintext,
    header_digest,
    plaintext_digest,
    read_stored_header,
    read_stored_layout,
)
from services.placement import Placement
from storage import InvalidRange, ObjectInfo, ObjectNotFound, ObjectStore, PreconditionFailed
from storage.integrity import Records, RecordTampered
from storage.readahead import ReadAhead
from storage.records import ObjectRecord, load_intent, load_record, object_record, outdated

logger = logging.getLogger(__name__)

OnChunk = Callable[[int], None]  # told the size of each chunk read (progress, heartbeat)


class StoredObjectRefused(Exception):
    """A stored object the service will not serve; the message names it as the client
    did, never where it is stored."""


class ObjectUnrecorded(StoredObjectRefused):
    """An object the service has no record of storing."""

    code = "object-unrecorded"


class ObjectDamaged(StoredObjectRefused):
    """A stored object that is no whole, authentic message: damage in storage, not a
    fault of the request."""

    code = "object-damaged"


@dataclass
class CheckedObject:
    """A stored message whose header and final frame have authenticated, so its layout is
    the message's own; the key that opened it, and the watch that stops a read of it once
    that key may no longer decrypt."""

    placement: Placement
    key: KeyRecord
    opened: OpenedMessage
    layout: MessageLayout
    watch: KeyWatch
    uses: Uses  # the key's, this read counted
    proven: bool  # its content, read whole, this service's: its record or its proof says so
    range_proven: bool  # any range of it this service's: its proof alone can say so
    recorded: ObjectRecord | None  # what its upload recorded (or its intent), if anything
    version: str  # the etag of the object checked, which its reads must be of


async def check_stored(
    keys: KeyStore,
    tenant: str,
    placement: Placement,
    *,
    records: Records,
    serve_unrecorded: bool,
    expected_kid: str | None,
    context: Mapping[str, str],
    refuse_unproven: bool,
    transfers: CapacityLimiter,
) -> CheckedObject:
    """Authenticate a stored object's header and final frame, with the tenant's key its
    header names (which must be `expected_kid`, if given), demanding `context`'s pairs.

    An object with a record must be the message its record names, of the size its upload
    recorded; one without a record (written by another ESDK client, say) is served on its
    own authentication only if `serve_unrecorded`, else refused (`ObjectUnrecorded`).
    An object that fails is damage in storage: `ObjectDamaged`. A recorded object is
    proven by its record; one without is proven by its proof of provenance, and refused
    without one if `refuse_unproven`. A proof that fails fails any object. A range checks
    neither footer nor recorded digest, so it is proven only by a proof of a message whose
    every recipient only the service ever held (`services.provenance`).

    An object replaced while it is checked (re-encrypted in place, say) is checked again,
    once, as it is now; one whose record is not saved yet (or was never, its writer lost)
    is checked against its record's intent (`storage.records`). A read thus sees the old
    message or the new one, whole. The check reads the version it found, and so must
    the reads of its plaintext (`stored_plaintext`, `stored_range`).
    """
    store, storage_key = placement.store, placement.storage_key
    check = partial(
        _check_version,
        keys,
        tenant,
        placement,
        records=records,
        serve_unrecorded=serve_unrecorded,
        expected_kid=expected_kid,
        context=context,
        refuse_unproven=refuse_unproven,
        transfers=transfers,
    )
    found = await to_thread.run_sync(store.head, storage_key)
    refusal: StoredObjectRefused | PreconditionFailed
    try:
        return await check(found, None)
    except (StoredObjectRefused, PreconditionFailed) as refused:
        refusal = refused
    latest = await to_thread.run_sync(store.head, storage_key)
    if latest.etag != found.etag:
        try:
            return await check(latest, None)
        except (StoredObjectRefused, PreconditionFailed) as refused:
            refusal = refused
    intent = await to_thread.run_sync(intent_of, records, placement, latest.size)
    if intent is None:
        raise refusal
    return await check(latest, intent)


async def _check_version(
    keys: KeyStore,
    tenant: str,
    placement: Placement,
    found: ObjectInfo,
    recorded: ObjectRecord | None,
    *,
    records: Records,
    serve_unrecorded: bool,
    expected_kid: str | None,
    context: Mapping[str, str],
    refuse_unproven: bool,
    transfers: CapacityLimiter,
) -> CheckedObject:
    """`check_stored` of the version `found` of the object, against `recorded`, or by
    default against its record; `PreconditionFailed` if it is replaced meanwhile."""
    store, storage_key = placement.store, placement.storage_key
    size, version = found.size, found.etag
    if recorded is None:
        recorded = await to_thread.run_sync(
            partial(recorded_object, serve_unrecorded=serve_unrecorded), records, placement, found
        )
    with damage_reported(placement):
        header = await to_thread.run_sync(
            partial(read_stored_header, if_match=version), store, storage_key, size
        )
        opening = await to_thread.run_sync(opening_keys, keys, tenant, header, expected_kid)
        opened = await to_thread.run_sync(
            open_message, header, opening.keyrings, required_context(context, tenant)
        )
        check_placement(header, storage_key)  # authenticated now, with the header
        if recorded is not None:
            check_recorded_message(header, recorded)
        unrecorded_refused = refuse_unproven and recorded is None
        check = partial(proven_by_proof, keys, tenant, header, opening.key)
        verdict = await to_thread.run_sync(partial(check, refuse_unproven=unrecorded_refused))
        layout = await to_thread.run_sync(
            partial(read_stored_layout, if_match=version),
            store,
            storage_key,
            header,
            opened.cipher,
            size,
            limiter=transfers,
        )
    uses = await to_thread.run_sync(opening.opened, opened.keyring)
    proven = verdict.whole or recorded is not None
    key, watch = opening.key, opening.watch
    return CheckedObject(
        placement, key, opened, layout, watch, uses, proven, verdict.any_part, recorded, version
    )


def intent_of(records: Records, placement: Placement, size: int) -> ObjectRecord | None:
    """The intent noted for the `size`-byte message now stored at `placement`, if there
    is one and it is newer than the object's record, if any: the record its writer was
    about to save. Its header is read here unchecked; the intent names its digest, and the
    message is authenticated against it after."""
    bucket, storage_key = placement.bucket, placement.storage_key
    try:
        header = read_stored_header(placement.store, storage_key, size)
        intent = load_intent(records, bucket, storage_key, header_digest(header))
    except (MessageFormatError, InvalidRange, ObjectNotFound, RecordTampered):
        return None
    if intent.ciphertext_size != size:
        return None
    try:
        recorded = load_record(records, bucket, storage_key)
    except ObjectNotFound:
        return intent  # its write's first object there, or one deleted since
    except RecordTampered:
        return None  # no generation to stand over: the record's refusal stands
    return None if outdated(intent, recorded) else intent


async def stored_plaintext(
    checked: CheckedObject, transfers: CapacityLimiter, name_keys: NameKeys
) -> AsyncIterator[bytes]:
    """The whole plaintext of a checked object; it fails unless it ends with the final
    frame (and, if signed, a footer that verifies) and, if the object is recorded, its
    plaintext's size and SHA-256 are the recorded ones (`ObjectDamaged`); or once its key
    may no longer decrypt.

    The read of the version checked is opened here, before anything is answered: it
    raises `PreconditionFailed` if another version has replaced it since (check it
    again), and once open it reads the version checked to its end."""
    layout, recorded = checked.layout, checked.recorded
    body = BodyReader(checked.opened)
    digest = hashlib.sha256() if recorded is None else plaintext_digest(recorded)
    size = 0

    def opened(chunk: bytes) -> list[bytes]:
        nonlocal size
        pieces = body.feed(chunk)
        for piece in pieces:
            digest.update(piece)
            size += len(piece)
        return pieces

    def finish() -> None:
        body.finish()
        if recorded is None:
            return
        try:
            check_recorded_plaintext(size, digest.hexdigest(), recorded, name_keys)
        except RecordMismatch as mismatch:
            raise _damaged(checked.placement, str(mismatch)) from None

    chunks = await _opened_read(checked, layout.header_length, layout.message_length, transfers)
    return _then(_pump(chunks, opened, checked.watch, transfers), finish, transfers)


async def stored_range(
    checked: CheckedObject, first: int, last: int, transfers: CapacityLimiter
) -> AsyncIterator[bytes]:
    """Plaintext bytes `first` to `last` (inclusive) of a checked object, from just the
    frames they lie in; it fails once the object's key may no longer decrypt. Opened
    as `stored_plaintext` is."""
    span = checked.layout.span(first, last)
    ranged = RangeDecryptor(checked.opened.cipher, checked.layout, span)
    chunks = await _opened_read(checked, span.start, span.end, transfers)
    return _then(_pump(chunks, ranged.update, checked.watch, transfers), ranged.finish, transfers)


def recorded_object(
    records: Records, placement: Placement, stored: ObjectInfo, *, serve_unrecorded: bool
) -> ObjectRecord | None:
    """The object's record, refusing an object of another size than its upload recorded
    (cut short or replaced behind the service's back). An object without a record is
    refused unless `serve_unrecorded`: the service cannot tell it was the one to store it,
    and whoever holds an asymmetric key's public half can make one."""
    try:
        recorded = object_record(records, placement.store, placement.storage_key, stored)
    except ObjectNotFound:
        if serve_unrecorded:
            return None
        logger.warning("unrecorded object %s in bucket %s", placement.storage_key, placement.bucket)
        raise ObjectUnrecorded(
            f"the service has no record of storing {placement.key!r}, so it does not serve it"
        ) from None
    if recorded.ciphertext_size != stored.size:
        raise _damaged(
            placement,
            f"it is {stored.size} bytes; its upload recorded {recorded.ciphertext_size}",
        )
    return recorded


@contextmanager
def damage_reported(placement: Placement) -> Iterator[None]:
    """A stored object that is no whole, authentic message (malformed, cut, extended, or a
    tag that fails) as the damage in storage it is, not as a fault of the request."""
    try:
        yield
    except (MessageFormatError, AuthenticationError) as exc:
        raise _damaged(placement, str(exc)) from None
    except InvalidRange:  # shorter than a moment ago; its own message names the storage key
        raise _damaged(placement, "it changed while it was read") from None


def _damaged(placement: Placement, reason: str) -> ObjectDamaged:
    """`ObjectDamaged`, naming the object by the key the client gave; the log names it by
    its storage key, for whoever repairs the store."""
    logger.warning(
        "damaged object %s in bucket %s: %s", placement.storage_key, placement.bucket, reason
    )
    return ObjectDamaged(
        f"the stored object {placement.key!r} is not a whole, authentic message: {reason}"
    )


async def _opened_read(
    checked: CheckedObject, start: int, end: int, transfers: CapacityLimiter
) -> Iterator[bytes]:
    """Bytes `start` to `end` of the version checked, the store's read opened (its first
    chunk read) in a transfer thread: opening asks the store for the object's size."""
    placement = checked.placement
    read = partial(
        placement.store.read, placement.storage_key, start, end, if_match=checked.version
    )
    return await to_thread.run_sync(_started, read, limiter=transfers)


def _started(read: Callable[[], Iterator[bytes]]) -> Iterator[bytes]:
    chunks = read()
    first = next(chunks, None)
    return iter(()) if first is None else itertools.chain((first,), chunks)


async def _pump(
    chunks: Iterator[bytes],
    open_chunk: Callable[[bytes], list[bytes]],
    watch: KeyWatch,
    transfers: CapacityLimiter,
) -> AsyncIterator[bytes]:
    """Open stored chunks, each step in a transfer thread. The key is checked again as
    the read runs (`watch`): a key disabled meanwhile stops it too."""

    def step() -> list[bytes] | None:
        chunk = next(chunks, None)
        return None if chunk is None else open_chunk(chunk)

    while (pieces := await to_thread.run_sync(step, limiter=transfers)) is not None:
        for piece in pieces:
            yield piece
        # Asked first: asking is cheaper than awaiting the watch for every chunk.
        if watch.due():
            await watch()


async def _then(
    body: AsyncIterator[bytes], finish: Callable[[], None], transfers: CapacityLimiter
) -> AsyncIterator[bytes]:
    """`body`, and `finish()`, which raises if what was read is not all there is, before
    the last piece: once an answer of known length has all its bytes, its client takes it
    as whole, and an abort after that goes unseen."""
    held: bytes | None = None
    async for piece in body:
        if not piece:  # an empty final frame's: holding it back would release the last bytes
            continue
        if held:
            yield held
        held = piece
    await to_thread.run_sync(finish, limiter=transfers)
    if held:
        yield held


@dataclass
class StoredMessage:
    """A stored object being read: its authenticated header, the decryptor reading it,
    the key that opened it and that key's uses with this read, and its plaintext, in
    pieces that have each passed their frame's tag."""

    header: Header
    decryptor: Decryptor
    key: KeyRecord
    uses: Uses
    plaintext: Iterator[bytes]


def verify_stored(
    keys: KeyStore,
    store: ObjectStore,
    storage_key: str,
    size: int,
    recorded: ObjectRecord,
    on_chunk: OnChunk,
) -> Decryptor:
    """Read a stored object whole (every frame and the header authenticated) and check it
    against its upload record `recorded` (`RecordMismatch` if it differs); the decryptor
    that read it, which names the keyring that opened it."""
    tenant = recorded.tenant
    digest = plaintext_digest(recorded)
    keys_for = partial(opening_keys, keys, tenant, counted=False)
    with open_stored(store, storage_key, size, keys_for, tenant, on_chunk) as stored:
        for piece in stored.plaintext:
            digest.update(piece)
    check_against_record(stored.decryptor, digest.hexdigest(), recorded, keys.name_keys)
    return stored.decryptor


def holds_recorded_message(
    keys: KeyStore, store: ObjectStore, recorded: ObjectRecord
) -> ObjectInfo | None:
    """The object at `recorded`'s key if it is exactly the message `recorded` (a record
    or its intent) names, else None: read back whole, its header the recorded one, every
    frame authenticated under its data key, and its plaintext's size and digest (SHA-256,
    or a resumable upload's frame chain) the recorded ones. It is the proof that holds on
    any store, where an etag proves nothing (a local directory's, SSE-KMS's, or an object
    put whole): its header is no secret, but without the KEK no one can seal frames under
    the data key it wraps. The object must be the same (etag and size) after the read as
    before, so that the object proven is the one described. A key that cannot open it
    now (`KeystoreError`, `DataKeyUnavailable`) tells nothing, and is raised."""
    try:
        before = store.head(recorded.key)
        verify_stored(keys, store, recorded.key, before.size, recorded, _unwatched)
        after = store.head(recorded.key)
    except ObjectNotFound:
        return None
    except (
        RecordMismatch,
        MessageFormatError,
        AuthenticationError,
        EncryptionContextMismatch,
        InvalidRange,
    ) as refused:
        logger.warning("the object at %s is not the message recorded: %s", recorded.key, refused)
        return None
    return before if (before.etag, before.size) == (after.etag, after.size) else None


def _unwatched(_size: int) -> None:
    """No progress to report, and nothing to cancel: a sweep or a request reading back."""


@contextmanager
def open_stored(
    store: ObjectStore,
    storage_key: str,
    size: int,
    keys_for: Callable[[Header], OpeningKeys],
    tenant: str,
    on_chunk: OnChunk,
    *,
    context: Mapping[str, str] | None = None,
) -> Iterator[StoredMessage]:
    """The object's message opened with the keyrings of `keys_for(its header)`, which must
    name `tenant` as its owner, carry `context`'s pairs, and name no other place than
    `storage_key` (`check_placement`);
    `on_chunk(bytes read)` runs per chunk (a cancel point). Their key is checked again as
    the object is read, at most once a second: a key disabled meanwhile stops the read.

    Two threads: one reads the object and opens its frames, the caller's works on the
    plaintext. SHA-256, which every reader of a stored object runs, is the slowest step
    by far (several times slower than AES-GCM), and hashlib releases the GIL while it
    works. A third thread for AES-GCM would cost more in hand-offs than it would take over.
    """
    with closing(store.read(storage_key, 0, size)) as chunks:
        required = required_context(context or {}, tenant)
        decryptor, first, opening, uses = _opened(chunks, keys_for, required, on_chunk)
        assert decryptor.header is not None
        check_placement(decryptor.header, storage_key)
        pieces = _plaintext(first, decryptor, chunks, on_chunk, opening.watch)
        with ReadAhead(pieces) as plaintext:
            yield StoredMessage(decryptor.header, decryptor, opening.key, uses, iter(plaintext))


def _opened(
    stream: Iterator[bytes],
    keys_for: Callable[[Header], OpeningKeys],
    required: Mapping[str, str],
    on_chunk: OnChunk,
) -> tuple[Decryptor, list[bytes], OpeningKeys, Uses]:
    """A decryptor past the header, which is read from the front of `stream`, the
    plaintext of the frames that came with it, the keys that opened it, and the key's uses
    with this message."""
    reader = HeaderReader()
    for chunk in stream:
        on_chunk(len(chunk))
        header = reader.feed(chunk)
        if header is not None:
            opening = keys_for(header)
            decryptor, first = start_decryption(
                header,
                reader.remainder,
                opening.keyrings,
                required_context=required,
            )
            assert decryptor.keyring is not None
            return decryptor, first, opening, opening.opened(decryptor.keyring)
    raise TruncatedMessage("the object ends inside its header")


def _plaintext(
    first: list[bytes],
    decryptor: Decryptor,
    stream: Iterator[bytes],
    on_chunk: OnChunk,
    watch: KeyWatch,
) -> Iterator[bytes]:
    yield from first
    for chunk in stream:
        yield from decryptor.update(chunk)
        on_chunk(len(chunk))
        watch.check_if_due()
