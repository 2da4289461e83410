"""Re-encrypting a message: opened, and sealed again as a new message (a fresh data key
and message ID) for a key's primary version, in one pass, frame in and frame out.

An uploaded message streams back re-encrypted (`reencrypt_upload`). Each of its frames is
authenticated before its plaintext is sealed into the new message, and the new message's
final frame is sealed only once the old one has ended with its final frame: a tampered or
truncated message aborts the stream before it could end as a valid message.

A stored object is re-encrypted in place, for its key's primary version (the reencrypt
job), or into another object, for any key (`reencrypt_object`), as follows. A message
sealed for several keys stays sealed for all of them: the key it moves from (its record's)
is replaced by the one it moves to, and every other key of the tenant's keeps its access,
sealed for its primary version (counted as a use of it). A message sealed for a key the
service does not hold (a partner's public key, or another provider's) cannot be sealed for
it again, and is refused (`RecipientNotHeld`) rather than moved without it.

A message cannot move to another key through a new header alone. Its frames' key is
derived from its data key and message ID, and a new header that kept both would be
tagged under that key with the all-zero IV a second time, over other bytes. The two
header tags together give away GCM's hash key, and with it a forgery of every frame
(docs/FORMAT.md §14). So the whole message is sealed again, under a key that nothing
else has used.

One streaming pass in constant memory, with no plaintext on disk. The object is read and
each frame authenticated and opened (`services.open_stored`). Its plaintext is hashed and
sealed into the new message. Each new frame is opened again with the primary version's
keyring alone and must give back what was sealed, and only then goes into a multipart
upload of the object's own key. The upload completes only once
- the old message has ended with its final frame, and its plaintext's size and SHA-256
  are the ones recorded at upload. Otherwise the object is `ObjectTampered`, and is not
  re-sealed: that would launder a forgery into a message no check could tell from an
  upload;
- the new message has been read back whole;
- the object is still the version that was read. Completion is conditional on its etag,
  so an object replaced or deleted meanwhile is left to whoever did that.
Until then nothing is visible, and any failure aborts the upload. The new record's
intent is noted before the swap (`storage.records`), so that a read meanwhile takes the
new message for what it is, and a crash before the record follows leaves the sweep what
it needs to save it (`services.unfinished`). Then the object's record follows, with a
fresh `createdAt`.
"""

import hashlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

from anyio import to_thread

from envelope import PROVIDER_ID, Decryptor, Header, key_names
from envelope.encrypt import Piece
from keystore import KeyMismatch, KeyRecord, KeyStore, Uses
from keystore.material import KEY_NAME_PATTERN
from services.inventory import Inventory, Marker, record_at
from services.keys import (
    KeyWatch,
    Sealing,
    client_context,
    opening_keys,
    required_context,
    start_sealing,
)
from services.objects import (
    RecordMismatch,
    check_against_record,
    hidden_plaintext,
    intended_record,
    object_metadata,
    plaintext_digest,
    stored_record,
)
from services.open_stored import OnChunk, damage_reported, open_stored, recorded_object
from services.open_upload import OpenedUpload, open_upload
from services.placement import Placement
from services.seal_to_client import seal_to_client
from storage import MultipartWriter, ObjectInfo, ObjectStore, StorageError, UploadStarted
from storage.integrity import Records
from storage.records import ObjectRecord, drop_intent, save_intent, save_record


class ObjectTampered(Exception):
    """The object decrypts, but not to what was uploaded: it is left as it is."""

    code = "tampered"


class RecipientNotHeld(Exception):
    """The object is sealed for a key the service does not hold, which a re-encryption
    would have to drop: it is left as it is."""

    code = "recipient-not-held"


class ReadBackMismatch(Exception):
    """The new message did not read back as the plaintext sealed into it."""

    code = "read-back-mismatch"


@dataclass
class Reencrypting:
    """An uploaded message being re-encrypted: the message opened, the new one being
    sealed, and the new message's bytes, to be read once."""

    opened: OpenedUpload
    sealing: Sealing
    message: AsyncIterator[bytearray | memoryview]


@dataclass(frozen=True)
class Reencrypted:
    """An object re-encrypted: its new record, the key that opened the old message (and
    that key's uses with it), and the new message's sealing."""

    record: ObjectRecord
    opened_by: KeyRecord
    opened_uses: Uses
    sealing: Sealing


async def reencrypt_upload(
    keys: KeyStore,
    tenant: str,
    chunks: AsyncIterator[memoryview],
    *,
    source_kid: str | None,
    kid: str,
    context: Mapping[str, str],
    refuse_unproven: bool,
) -> Reencrypting:
    """Read the message's header from `chunks` and authenticate it as decrypting does
    (with `source_kid`, if given, demanding `context`'s pairs, and refusing it unproven
    if `refuse_unproven`), then start the new message for `kid`'s primary version,
    carrying the old one's client pairs and frame length, signed if it was."""
    opened = await open_upload(
        keys,
        tenant,
        chunks,
        expected_kid=source_kid,
        context=context,
        refuse_unproven=refuse_unproven,
    )
    header = opened.header
    sealing = await to_thread.run_sync(
        partial(
            start_sealing,
            keys,
            tenant,
            kid,
            client_context(header.context),
            header.frame_length,
            signed=header.signed,
        )
    )
    # The plaintext iterator ends only once the old message's final frame has been
    # authenticated, and only then does `seal_to_client` seal the new final frame.
    message = seal_to_client(keys, sealing, opened.plaintext, None)
    return Reencrypting(opened, sealing, message)


def reencrypt_stored(
    keys: KeyStore,
    records: Records,
    source: Placement,
    *,
    source_kid: str | None,
    kid: str,
    destination: Placement | None,
    overwrite: bool = False,
    context: Mapping[str, str] | None = None,
) -> tuple[ObjectRecord, Reencrypted]:
    """Re-encrypt the recorded object `source` (sealed for `source_kid`, if given, and
    carrying `context`'s pairs) for `kid`'s primary version, in place or into
    `destination`: `reencrypt_object` on a client's request. Its old record, and what was
    done."""
    original = source.store.head(source.storage_key)
    recorded = recorded_object(records, source, original, serve_unrecorded=False)
    assert recorded is not None  # an unrecorded object was refused
    if source_kid is not None and recorded.kid != source_kid:
        raise KeyMismatch(f"the object is not sealed for key {source_kid!r}")
    if destination is not None and _same_object(source, destination):
        destination = None
    with damage_reported(source):
        new = reencrypt_object(
            keys,
            records,
            source.store,
            recorded,
            original,
            _unwatched,
            kid=kid,
            destination=destination,
            overwrite=overwrite,
            context=context,
        )
    return recorded, new


def _same_object(one: Placement, other: Placement) -> bool:
    return (one.bucket, one.storage_key) == (other.bucket, other.storage_key)


def _unwatched(read: int) -> None:
    """A request reports no progress: the client sees it by the answer coming."""


def reencrypt_object(
    keys: KeyStore,
    records: Records,
    store: ObjectStore,
    recorded: ObjectRecord,
    original: ObjectInfo,
    on_chunk: OnChunk,
    *,
    kid: str | None = None,
    destination: Placement | None = None,
    overwrite: bool = False,
    context: Mapping[str, str] | None = None,
    on_upload: UploadStarted | None = None,
) -> Reencrypted:
    """Re-encrypt the object `original` (its current version, as `head` gave it), whose
    upload record is `recorded`, for the primary version of `kid` (by default its own
    key), in place or into `destination` (replacing an object there only if
    `overwrite`); the new object's record, with the keys used. The object must carry
    `context`'s pairs, as a decrypt demands them.

    `on_chunk(bytes read)` runs for each chunk of the object read (progress, heartbeat,
    a cancel point). The keys are checked again as the object is read and sealed, at most
    once a second each way: a key disabled meanwhile stops the job. `on_upload` is told
    of an upload started that a killed process would leave pending
    (`ObjectStore.multipart`).
    """
    tenant = recorded.tenant
    inventory = Inventory(records)
    keys_for = partial(opening_keys, keys, tenant, expected_kid=recorded.kid)
    target_store, bucket, target_key = (
        (store, recorded.bucket, original.key)
        if destination is None
        else (destination.store, destination.bucket, destination.storage_key)
    )
    replaced = (
        recorded
        if destination is None
        else record_at(records, destination.store, destination.storage_key)
        if overwrite
        else None
    )
    digest = hashlib.sha256()  # the new record's, whatever the old one holds
    check = plaintext_digest(recorded, digest)
    with open_stored(
        store, original.key, original.size, keys_for, tenant, on_chunk, context=context
    ) as old:
        header = old.header
        sealing = start_sealing(
            keys,
            tenant,
            kid or recorded.kid,
            client_context(header.context),
            header.frame_length,
            object_key=target_key,
            signed=header.signed,
            more_kids=other_recipients(header, recorded.kid, kid or recorded.kid),
        )
        # In place, only the version that was read is replaced; elsewhere, nothing unless
        # asked to.
        with target_store.multipart(
            target_key,
            metadata=object_metadata(sealing),
            if_absent=destination is not None and not overwrite,
            if_match=original.etag if destination is None else None,
            on_upload=on_upload,
        ) as writer:
            new = _Resealing(sealing, writer)
            watch = KeyWatch.for_sealing(keys, sealing)
            for piece in old.plaintext:
                digest.update(piece)
                if check is not digest:
                    check.update(piece)
                new.write(piece)
                watch.check_if_due()
            try:
                check_against_record(old.decryptor, check.hexdigest(), recorded, keys.name_keys)
            except RecordMismatch as mismatch:
                raise ObjectTampered(f"{mismatch}: the object was not re-encrypted") from None
            key = sealing.key
            marker = Marker.new(tenant, key.kid, key.primary_version, bucket, target_key)
            intent = new.intent(bucket, target_key, digest.hexdigest(), replaced)
            if recorded.name_key_version is not None:  # a hidden name's digest stays hidden
                name_key = keys.name_keys.version(
                    tenant, recorded.name_key_version, recorded.name_key_fingerprint
                )
                intent = hidden_plaintext(intent, name_key)
            stored = _swap(records, inventory, new, marker, intent)
    record = stored_record(intent, stored)
    save_record(records, record)
    with suppress(StorageError):  # one left over is dropped by the sweep
        drop_intent(records, intent)
    inventory.moved(replaced, record)
    return Reencrypted(record, old.key, old.uses, sealing)


def other_recipients(header: Header, source: str, kid: str) -> list[str]:
    """The tenant's keys, besides `source` (which `kid` replaces) and `kid`, that the
    message `header` starts is sealed for, in its order: a re-encryption keeps them."""
    kept: list[str] = []
    for edk in header.encrypted_data_keys:
        if edk.provider_id != PROVIDER_ID:
            raise RecipientNotHeld(
                "the object is also sealed for a key of another provider, which a "
                "re-encryption would drop: it was not re-encrypted"
            )
    for name in key_names(header):
        held = KEY_NAME_PATTERN.fullmatch(name)
        if held is None:
            raise RecipientNotHeld(
                f"the object is also sealed for {name!r}, a public key the service does not "
                "hold, which a re-encryption would drop: it was not re-encrypted"
            )
        if held["kid"] not in (source, kid, *kept):
            kept.append(held["kid"])
    return kept


def _swap(
    records: Records,
    inventory: Inventory,
    new: "_Resealing",
    marker: Marker,
    intent: ObjectRecord,
) -> ObjectInfo:
    """Put the new message in place, marked under its version and its record's intent
    noted first: the index never misses it, and it can be recorded whatever happens
    next. A swap that fails takes back the marker, if it was this call's; the intent
    stays for the sweep, in case the swap happened after all."""
    ours = inventory.add(marker)
    try:
        save_intent(records, intent)
        return new.complete()
    except BaseException:
        if ours:
            inventory.discard(marker)
        raise


class _Resealing:
    """Plaintext in; the new message out into `writer`, each piece of it first opened
    with the new keyring alone, whose plaintext must be what was sealed."""

    def __init__(self, sealing: Sealing, writer: MultipartWriter) -> None:
        self._sealing = sealing
        self._written = 0  # bytes of the new message
        self._encryptor = sealing.encryptor
        self._writer = writer
        self._reader = Decryptor(
            [sealing.keyring], required_context=required_context({}, sealing.tenant)
        )
        # Plaintext sealed and not yet read back: at most the frame the encryptor holds.
        self._unread: deque[bytes] = deque()

    def write(self, plaintext: bytes) -> None:
        if plaintext:  # an empty final frame's plaintext has nothing to match
            self._unread.append(plaintext)
        self._send(self._encryptor.update(plaintext))

    def intent(
        self,
        bucket: str,
        storage_key: str,
        plaintext_sha256: str,
        replaced: ObjectRecord | None,
    ) -> ObjectRecord:
        """Seal the final frame and read it back; the new object's record-to-be, over the
        object `replaced` records."""
        self._send(self._encryptor.finish())
        self._reader.finish()
        if self._unread:
            raise ReadBackMismatch("the new message reads back shorter than what was sealed")
        return intended_record(
            self._sealing, bucket, storage_key, plaintext_sha256, self._written, replaced
        )

    def complete(self) -> ObjectInfo:
        """Make the object visible, once its record's intent is noted."""
        return self._writer.complete()

    def _send(self, pieces: Iterable[Piece]) -> None:
        for piece in pieces:
            for opened in self._reader.update(piece):
                self._match(opened)
            self._written += len(piece)
            self._writer.write(piece)  # writers keep nothing of it past the call
            self._encryptor.recycle(piece)

    def _match(self, opened: bytes) -> None:
        # As bytes: comparing memoryviews goes item by item, far slower. Pieces
        # line up (a frame's plaintext each), so the slices are whole and copy nothing.
        while opened:
            if not self._unread:
                raise ReadBackMismatch("the new message reads back longer than what was sealed")
            sealed = self._unread[0]
            size = min(len(sealed), len(opened))
            if sealed[:size] != opened[:size]:
                raise ReadBackMismatch("the new message reads back other bytes than were sealed")
            opened = opened[size:]
            if size == len(sealed):
                self._unread.popleft()
            else:
                self._unread[0] = sealed[size:]
