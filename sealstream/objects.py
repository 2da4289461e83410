"""Sealing plaintext streams into stored objects, and opening stored objects again.

The API (encrypt-to-storage, decrypt from storage) and the workers (verify,
batch-encrypt, reencrypt) share these pieces, so an object is written, recorded and read
back the same way whoever handles it.
"""

import hashlib
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from envelope import (
    Encryptor,
    FinalFrameCheck,
    Header,
    HeaderReader,
    Keyring,
    MessageFormatError,
    MessageLayout,
    TruncatedMessage,
    key_names,
)
from envelope.frames import FrameCipher
from keystore import KeyRecord, KeyStore
from sealstream.spaces import Placement
from storage import ObjectInfo, ObjectStore, StorageError
from storage.integrity import Records
from storage.records import ObjectRecord, save_record

RESERVED_CONTEXT_PREFIX = "sealstream:"
TENANT_CONTEXT_KEY = f"{RESERVED_CONTEXT_PREFIX}tenant"
OBJECT_CONTEXT_KEY = f"{RESERVED_CONTEXT_PREFIX}object"
HEADER_READ_SIZE = 64 * 1024


@dataclass
class Sealing:
    """A message being written under a key's primary version."""

    tenant: str
    key: KeyRecord
    keyring: Keyring
    encryptor: Encryptor


def start_sealing(
    keys: KeyStore,
    tenant: str,
    kid: str,
    context: Mapping[str, str],
    frame_length: int,
    *,
    object_key: str | None = None,
) -> Sealing:
    """Check the key may encrypt now, and start a message under its primary version.

    The service adds `sealstream:` context pairs naming the tenant and the key, so a
    message names its owner in authenticated data and can be refused to anyone else; and,
    for a message bound for storage, the storage key it is written at (`object_key`), so
    that a copy of it put anywhere else is refused (`check_placement`).
    """
    record, keyring = keys.encryption_keyring(tenant, kid)
    sealed_context = {
        **context,
        TENANT_CONTEXT_KEY: tenant,
        f"{RESERVED_CONTEXT_PREFIX}kid": kid,
        f"{RESERVED_CONTEXT_PREFIX}key-version": str(record.primary_version),
    }
    if object_key is not None:
        sealed_context[OBJECT_CONTEXT_KEY] = object_key
    encryptor = Encryptor([keyring], context=sealed_context, frame_length=frame_length)
    return Sealing(tenant, record, keyring, encryptor)


class MisplacedObject(MessageFormatError):
    """A stored message sealed for another storage key: an authentic object copied over
    this one by whoever can write the bucket."""

    code = "object-misplaced"


def check_placement(header: Header, storage_key: str) -> None:
    """Refuse a message, whose header has authenticated, that names another storage key
    than the one it was read from. Messages that name none (written before messages named
    their place, or by another ESDK client) pass: nothing binds them."""
    named = header.context.get(OBJECT_CONTEXT_KEY)
    if named is not None and named != storage_key:
        raise MisplacedObject("the message was sealed for another object")


class ReplacedObject(MessageFormatError):
    """A stored message that is not the one its record says the service stored there:
    another message, authentic under the same key, put in its place."""

    code = "object-replaced"


def header_digest(header: Header) -> str:
    return hashlib.sha256(header.to_bytes()).hexdigest()


def check_recorded_message(header: Header, recorded: ObjectRecord) -> None:
    """Refuse a message, whose header has authenticated, that is not the one `recorded`
    names. Anyone holding an asymmetric key's public half can seal an authentic message
    for it with any context, even its message ID; not one with the same key commitment,
    which only the data key gives. Only the record, which the service sealed, tells the
    message it stored from one made to look like it."""
    if recorded.header_sha256 != header_digest(header):
        raise ReplacedObject("the message is not the one stored there")


def client_context(context: Mapping[str, str]) -> dict[str, str]:
    """A message's context without the pairs the service added: what its client gave."""
    return {k: v for k, v in context.items() if not k.startswith(RESERVED_CONTEXT_PREFIX)}


def object_metadata(sealing: Sealing) -> dict[str, str]:
    """The storage metadata of an object sealed by `sealing`."""
    return {
        "sealstream-kid": sealing.key.kid,
        "sealstream-key-version": str(sealing.key.primary_version),
        "sealstream-frame-length": str(sealing.encryptor.frame_length),
    }


def sealed_record(
    sealing: Sealing, bucket: str, storage_key: str, plaintext_sha256: str, stored: ObjectInfo
) -> ObjectRecord:
    """The record of an object `sealing` has just finished and storage made visible."""
    return ObjectRecord(
        bucket=bucket,
        key=storage_key,
        tenant=sealing.tenant,
        kid=sealing.key.kid,
        key_version=sealing.key.primary_version,
        alg=sealing.key.alg,
        frame_length=sealing.encryptor.frame_length,
        plaintext_size=sealing.encryptor.plaintext_length,
        plaintext_sha256=plaintext_sha256,
        ciphertext_size=stored.size,
        etag=stored.etag,
        created_at=datetime.now(UTC),
        header_sha256=header_digest(sealing.encryptor.header),
    )


def required_context(context: Mapping[str, str], tenant: str) -> dict[str, str]:
    """What a decrypt demands: the caller's pairs, and that the message is the tenant's."""
    return {**context, TENANT_CONTEXT_KEY: tenant}


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
    ) -> None:
        """`sealing` must have been started for this placement (`start_sealing`'s
        `object_key`): a message that names no place could be copied anywhere."""
        named = sealing.encryptor.header.context.get(OBJECT_CONTEXT_KEY)
        if named != placement.storage_key:
            raise ValueError("the sealing was not started for this object's storage key")
        self._sealing = sealing
        self._placement = placement
        self._records = records
        self._digest = hashlib.sha256()
        self._writer = placement.store.multipart(
            placement.storage_key, metadata=object_metadata(sealing), if_absent=not overwrite
        )

    def write(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        encryptor = self._sealing.encryptor
        for chunk in chunks:
            self._digest.update(chunk)
            for piece in encryptor.update(chunk):
                self._writer.write(piece)  # writers keep nothing of it past the call
                encryptor.recycle(piece)

    def complete(self) -> ObjectRecord:
        """Seal the final frame, make the object visible, and record it."""
        encryptor = self._sealing.encryptor
        for piece in encryptor.finish():
            self._writer.write(piece)
        info = self._writer.complete()
        try:
            return self._record(info)
        except BaseException:
            # An object without its record could never be verified: take it back.
            with suppress(StorageError):
                self._placement.store.delete(self._placement.storage_key)
            raise

    def _record(self, info: ObjectInfo) -> ObjectRecord:
        placement = self._placement
        record = sealed_record(
            self._sealing, placement.bucket, placement.storage_key, self._digest.hexdigest(), info
        )
        save_record(self._records, record)
        return record

    def abort(self) -> None:
        self._writer.abort()


def read_stored_header(store: ObjectStore, storage_key: str, size: int) -> Header:
    """The header of a stored message, read in small ranged requests (one, nearly always:
    headers are a few hundred bytes) rather than by opening the whole object."""
    reader = HeaderReader()
    for start in range(0, size, HEADER_READ_SIZE):
        end = min(size, start + HEADER_READ_SIZE)
        for chunk in store.read(storage_key, start, end, chunk_size=HEADER_READ_SIZE):
            header = reader.feed(chunk)
            if header is not None:
                return header
    raise TruncatedMessage("the object ends inside its header")


def read_stored_layout(
    store: ObjectStore, storage_key: str, header: Header, cipher: FrameCipher, size: int
) -> MessageLayout:
    """The layout of a stored message of `size` bytes whose header is authenticated (by
    `open_message`, which gave `cipher`), vouched for by its final frame: one ranged read.

    The size alone is no evidence: a message cut at a frame boundary has a regular layout
    of its own, shorter than the message's. Its final frame is what says where it ends.
    """
    claimed = MessageLayout.of(header, size)
    check = FinalFrameCheck(cipher, claimed)
    start, end = claimed.final_frame
    for chunk in store.read(storage_key, start, end):
        check.update(chunk)
    return check.layout()


def opening_keyrings(
    keys: KeyStore, tenant: str, header: Header, expected_kid: str | None = None
) -> tuple[KeyRecord, list[Keyring]]:
    """The tenant's keyrings for the keys a message's header names."""
    return keys.opening_keyrings(tenant, key_names(header), expected_kid=expected_kid)
