"""Stored objects and their records: what the service notes of each object it seals, how
answers and job results describe such an object, and the checks that a stored message is
the one the service stored at that place.

The API (encrypt-to-storage, decrypt from storage) and the workers (verify,
batch-encrypt, reencrypt) share these pieces, so an object is recorded and read back the
same way whoever handles it.
"""

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any, Protocol, Self

from envelope import (
    AuthenticationError,
    Decryptor,
    FinalFrameCheck,
    Header,
    HeaderReader,
    MessageFormatError,
    MessageLayout,
    TruncatedMessage,
)
from envelope.frames import FrameOpener
from keystore.name_keys import NameKey, NameKeys, NameUnreadable
from services.frame_chain import FrameChain
from services.keys import OBJECT_CONTEXT_KEY, Sealing
from storage import ObjectInfo, ObjectStore
from storage.documents import CamelModel
from storage.records import ObjectRecord, next_generation

HEADER_READ_SIZE = 64 * 1024
# What a batch manifest says of each object sealed, and a verify job of the object read.
MEMBER_FIELDS = (
    "key",
    "storage_key",
    "plaintext_size",
    "plaintext_sha256",
    "ciphertext_size",
    "key_version",
)
VERIFIED_FIELDS = (
    "bucket",
    "key",
    "storage_key",
    "ciphertext_size",
    "plaintext_size",
    "plaintext_sha256",
)


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


class RecordMismatch(Exception):
    """A stored object decrypts, but not to the plaintext its upload recorded."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def check_against_record(
    decryptor: Decryptor, sha256: str, recorded: ObjectRecord, name_keys: NameKeys
) -> None:
    """Once the whole object has been read (`sha256`: its plaintext's, in hex): require
    its final frame, the message its record names, and the plaintext's size and SHA-256
    recorded at upload (in the clear, or as their HMAC under the tenant's name key)."""
    decryptor.finish()
    assert decryptor.header is not None
    try:
        check_recorded_message(decryptor.header, recorded)
    except ReplacedObject as replaced:
        raise RecordMismatch(replaced.code, str(replaced)) from None
    check_recorded_plaintext(decryptor.plaintext_length, sha256, recorded, name_keys)


def check_recorded_plaintext(
    size: int, sha256: str, recorded: ObjectRecord, name_keys: NameKeys
) -> None:
    """Require a whole read's plaintext (`size` bytes, `sha256` in hex) to be the one
    recorded at upload. The record's header digest ties a message to its header only:
    whoever holds its data key (any recipient of a message sealed for several) can write
    other frames under the same header."""
    if recorded.plaintext_mac is not None:
        _check_plaintext_mac(size, sha256, recorded, name_keys)
        return
    if size != recorded.plaintext_size:
        raise RecordMismatch(
            "plaintext-size-mismatch",
            f"the object decrypts to {size} bytes; "
            f"{recorded.plaintext_size} were recorded at upload",
        )
    if sha256 != recorded_digest(recorded):
        raise RecordMismatch(
            "plaintext-digest-mismatch",
            "the plaintext's digest differs from the one recorded at upload",
        )


class PlaintextDigest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def plaintext_digest(
    recorded: ObjectRecord, sha256: PlaintextDigest | None = None
) -> PlaintextDigest:
    """What to take over an object's plaintext to check it against its record: the
    SHA-256 (`sha256`, if one is taken anyway), or the chain over its frames of an
    object a resumable upload sealed."""
    if recorded.plaintext_frame_chain is not None:
        return FrameChain(recorded.frame_length)
    return hashlib.sha256() if sha256 is None else sha256


def recorded_digest(recorded: ObjectRecord) -> str | None:
    """The digest of its plaintext the record holds (`plaintext_digest` takes it)."""
    if recorded.plaintext_frame_chain is not None:
        return recorded.plaintext_frame_chain
    return recorded.plaintext_sha256


def _check_plaintext_mac(size: int, sha256: str, recorded: ObjectRecord, names: NameKeys) -> None:
    mismatch = RecordMismatch(
        "plaintext-mac-mismatch",
        "the plaintext's size or SHA-256 differs from what was recorded at upload",
    )
    if recorded.name_key_version is None or recorded.plaintext_mac is None:
        raise mismatch
    try:
        name_key = names.version(
            recorded.tenant, recorded.name_key_version, recorded.name_key_fingerprint
        )
    except NameUnreadable:  # a NameKeyMismatch too: the MAC was made under other material
        raise mismatch from None
    expected = name_key.plaintext_mac(recorded.bucket, recorded.key, size, sha256)
    if not hmac.compare_digest(expected, recorded.plaintext_mac):
        raise mismatch


def hidden_plaintext(record: ObjectRecord, name_key: NameKey) -> ObjectRecord:
    """`record` with its plaintext's size and SHA-256 replaced by their HMAC under
    `name_key`, so that the record confirms no known file to whoever reads it."""
    assert record.plaintext_size is not None and record.plaintext_sha256 is not None
    mac = name_key.plaintext_mac(
        record.bucket, record.key, record.plaintext_size, record.plaintext_sha256
    )
    return record.model_copy(
        update={
            "plaintext_size": None,
            "plaintext_sha256": None,
            "plaintext_mac": mac,
            "name_key_version": name_key.version,
            "name_key_fingerprint": name_key.fingerprint,
        }
    )


def object_metadata(sealing: Sealing) -> dict[str, str]:
    """The storage metadata of an object sealed by `sealing`."""
    return {
        "sealstream-kid": sealing.key.kid,
        "sealstream-key-version": str(sealing.key.primary_version),
        "sealstream-frame-length": str(sealing.encryptor.frame_length),
    }


def intended_record(
    sealing: Sealing,
    bucket: str,
    storage_key: str,
    plaintext_sha256: str,
    size: int,
    replaced: ObjectRecord | None,
) -> ObjectRecord:
    """The record of the `size`-byte object `sealing` has just finished, before storage
    makes it visible over the object `replaced` records (if any): its intent, with no etag
    yet and the write's generation (`storage.records`)."""
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
        ciphertext_size=size,
        etag="",
        created_at=datetime.now(UTC),
        header_sha256=header_digest(sealing.encryptor.header),
        generation=next_generation(replaced),
    )


def stored_record(intent: ObjectRecord, stored: ObjectInfo) -> ObjectRecord:
    """The record of the object `intent` named, once storage has made it visible."""
    return intent.model_copy(
        update={
            "ciphertext_size": stored.size,
            "etag": stored.etag,
            "created_at": datetime.now(UTC),
        }
    )


class ObjectSummary(CamelModel):
    """A stored object the service sealed, as answers, job results and batch manifests
    describe it (each giving the fields it needs): the key the client names it by, and
    what its record says. Never the record's header digest: that is the service's check."""

    bucket: str
    key: str
    storage_key: str
    ciphertext_size: int
    plaintext_size: int | None  # None where the member's name is hidden
    plaintext_sha256: str | None
    etag: str
    kid: str
    key_version: int
    frame_length: int

    @classmethod
    def of(cls, record: ObjectRecord, key: str, **more: Any) -> Self:
        """The summary of the object `record` records, which its client names `key`;
        `more` sets the fields a subclass adds."""
        return cls(
            bucket=record.bucket,
            key=key,
            storage_key=record.key,
            ciphertext_size=record.ciphertext_size,
            plaintext_size=record.plaintext_size,
            plaintext_sha256=record.plaintext_sha256,
            etag=record.etag,
            kid=record.kid,
            key_version=record.key_version,
            frame_length=record.frame_length,
            **more,
        )

    def fields(self, *names: str) -> dict[str, Any]:
        """The fields `names` (Python names), as JSON names them."""
        return self.model_dump(include=set(names))


def read_stored_header(
    store: ObjectStore, storage_key: str, size: int, *, if_match: str | None = None
) -> Header:
    """The header of a stored message (of the version `if_match`, if given), read in small
    ranged requests (one, nearly always: headers are a few hundred bytes) rather than by
    opening the whole object."""
    reader = HeaderReader()
    for start in range(0, size, HEADER_READ_SIZE):
        end = min(size, start + HEADER_READ_SIZE)
        chunks = store.read(storage_key, start, end, chunk_size=HEADER_READ_SIZE, if_match=if_match)
        for chunk in chunks:
            header = reader.feed(chunk)
            if header is not None:
                return header
    raise TruncatedMessage("the object ends inside its header")


def read_stored_layout(
    store: ObjectStore,
    storage_key: str,
    header: Header,
    cipher: FrameOpener,
    size: int,
    *,
    if_match: str | None = None,
) -> MessageLayout:
    """The layout of a stored message of `size` bytes whose header is authenticated (by
    `open_message`, which gave `cipher`), vouched for by its final frame: one ranged read.

    The size alone is no evidence: a message cut at a frame boundary has a regular layout
    of its own, shorter than the message's. Its final frame is what says where it ends.
    A signed message's footer is read with it, for its form; only a whole read checks
    its signature. A footer's length varies with its signature's, so a signed message's
    final frame may start in either of two places: the one this package's footer gives
    is read first, the other only if that fails (`MessageLayout.claims`).
    """
    refusal: MessageFormatError | AuthenticationError | None = None
    for claimed in MessageLayout.claims(header, size):
        check = FinalFrameCheck(cipher, claimed)
        start, end = claimed.tail
        try:
            for chunk in store.read(storage_key, start, end, if_match=if_match):
                check.update(chunk)
            return check.layout()
        except (MessageFormatError, AuthenticationError) as refused:
            refusal = refusal or refused
    assert refusal is not None
    raise refusal
