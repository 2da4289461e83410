"""Re-encrypting a stored object: its message opened, and sealed again over the object
itself as a new message (a fresh data key and message ID) for its key's primary version.

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
Until then nothing is visible, and any failure aborts the upload. Then the object's
record follows, with a fresh `createdAt`.
"""

import hashlib
from collections import deque
from collections.abc import Iterable
from functools import partial

from envelope import Decryptor
from envelope.encrypt import Piece
from keystore import KeyStore
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
    object_metadata,
    sealed_record,
)
from services.open_stored import OnChunk, open_stored
from storage import MultipartWriter, ObjectInfo, ObjectStore
from storage.integrity import Records
from storage.records import ObjectRecord, save_record


class ObjectTampered(Exception):
    """The object decrypts, but not to what was uploaded: it is left as it is."""

    code = "tampered"


class ReadBackMismatch(Exception):
    """The new message did not read back as the plaintext sealed into it."""

    code = "read-back-mismatch"


def reencrypt_object(
    keys: KeyStore,
    records: Records,
    store: ObjectStore,
    recorded: ObjectRecord,
    original: ObjectInfo,
    on_chunk: OnChunk,
) -> ObjectRecord:
    """Re-encrypt the object `original` (its current version, as `head` gave it), whose
    upload record is `recorded`, for its key's primary version; its new record.

    `on_chunk(bytes read)` runs for each chunk of the object read (progress, heartbeat,
    a cancel point). The key is checked again as the object is read and sealed, at most
    once a second each way: a key disabled meanwhile stops the job.
    """
    tenant, kid = recorded.tenant, recorded.kid
    keys_for = partial(opening_keys, keys, tenant, expected_kid=kid)
    digest = hashlib.sha256()
    with open_stored(store, original.key, original.size, keys_for, tenant, on_chunk) as old:
        header = old.header
        sealing = start_sealing(
            keys,
            tenant,
            kid,
            client_context(header.context),
            header.frame_length,
            object_key=original.key,
        )
        with store.multipart(
            original.key, metadata=object_metadata(sealing), if_match=original.etag
        ) as writer:
            new = _Resealing(sealing, writer)
            watch = KeyWatch.for_sealing(keys, sealing)
            for piece in old.plaintext:
                digest.update(piece)
                new.write(piece)
                watch.check_if_due()
            try:
                check_against_record(old.decryptor, digest.hexdigest(), recorded)
            except RecordMismatch as mismatch:
                raise ObjectTampered(f"{mismatch}: the object was not re-encrypted") from None
            stored = new.complete()
    record = sealed_record(sealing, recorded.bucket, recorded.key, digest.hexdigest(), stored)
    save_record(records, record)
    return record


class _Resealing:
    """Plaintext in; the new message out into `writer`, each piece of it first opened
    with the new keyring alone, whose plaintext must be what was sealed."""

    def __init__(self, sealing: Sealing, writer: MultipartWriter) -> None:
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

    def complete(self) -> ObjectInfo:
        """Seal the final frame, read it back, and make the object visible."""
        self._send(self._encryptor.finish())
        self._reader.finish()
        if self._unread:
            raise ReadBackMismatch("the new message reads back shorter than what was sealed")
        return self._writer.complete()

    def _send(self, pieces: Iterable[Piece]) -> None:
        for piece in pieces:
            for opened in self._reader.update(piece):
                self._match(opened)
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
