"""Starting and opening a message: data key, encrypted data keys, commitment, header tag.

`new_message` draws a fresh data key and message ID, wraps the data key once per keyring
and seals the header. `open_message` finds a keyring that unwraps one of the header's
data keys, then checks the key commitment and the header tag before anything is read
from the body, so a wrong key or a changed header fails here, never halfway through.

`new_message` is the only way to a header tag, and it draws the data key and message ID
itself: a header is tagged once, under a key no other message has (docs/FORMAT.md §14).
A message for other keys is a new message, never the old one's data key under a new
header: the header tag's IV is always zero, so two headers tagged under one message's key
would give away GCM's hash key, and with it a forgery of every frame.
"""

import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envelope.context import (
    EncryptionContext,
    missing_pairs,
    reject_reserved_keys,
    serialize_context,
)
from envelope.errors import (
    CommitmentMismatch,
    DataKeyUnavailable,
    EncryptionContextMismatch,
    InvalidParameter,
)
from envelope.frames import FrameOpener, FrameSealer
from envelope.header import DEFAULT_LIMITS, Header, serialize_header_body
from envelope.keyrings.base import Keyring
from envelope.suite import DATA_KEY_LENGTH, MESSAGE_ID_LENGTH, derive_keys

DEFAULT_FRAME_LENGTH = 1024 * 1024
FRAME_LENGTH_MULTIPLE = 128  # the reference SDK refuses other frame lengths when it encrypts


def check_frame_length(frame_length: int) -> None:
    """Refuse frame lengths this service will not write."""
    low, high = DEFAULT_LIMITS.min_frame_length, DEFAULT_LIMITS.max_frame_length
    if not low <= frame_length <= high or frame_length % FRAME_LENGTH_MULTIPLE:
        raise InvalidParameter(
            f"frame length must be a multiple of {FRAME_LENGTH_MULTIPLE} in [{low}, {high}]"
        )


def check_keyrings(keyrings: Sequence[Keyring]) -> None:
    """Refuse a message with no recipient, or more than a reader will accept."""
    if not 1 <= len(keyrings) <= DEFAULT_LIMITS.max_encrypted_data_keys:
        raise InvalidParameter(
            f"a message takes 1 to {DEFAULT_LIMITS.max_encrypted_data_keys} keyrings"
        )


def writable_context(context: EncryptionContext) -> bytes:
    """The serialized context, refusing what this service will not write."""
    reject_reserved_keys(context)
    context_bytes = serialize_context(context)
    if len(context_bytes) > DEFAULT_LIMITS.max_context_length:
        raise InvalidParameter(
            f"the encryption context exceeds {DEFAULT_LIMITS.max_context_length} bytes"
        )
    return context_bytes


def new_message(
    keyrings: Sequence[Keyring],
    context: EncryptionContext,
    frame_length: int,
) -> tuple[Header, FrameSealer]:
    """A sealed header for a new message and the sealer for its frames."""
    check_keyrings(keyrings)
    check_frame_length(frame_length)
    context_bytes = writable_context(context)
    data_key = os.urandom(DATA_KEY_LENGTH)
    message_id = os.urandom(MESSAGE_ID_LENGTH)
    keys = derive_keys(data_key, message_id)
    cipher = FrameSealer(keys.encryption_key, message_id)
    edks = tuple(keyring.wrap(data_key, context_bytes) for keyring in keyrings)
    body = serialize_header_body(
        message_id=message_id,
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        frame_length=frame_length,
        commitment=keys.commitment,
    )
    header = Header(
        message_id=message_id,
        context=dict(context),
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        frame_length=frame_length,
        commitment=keys.commitment,
        body=body,
        # The one sealing under this key with the all-zero IV, which no frame uses.
        tag=cipher.header_tag(body),
    )
    return header, cipher


@dataclass(frozen=True)
class OpenedMessage:
    """An authenticated header, the opener of its frames, and the keyring that opened it."""

    header: Header
    cipher: FrameOpener
    keyring: Keyring


def open_message(
    header: Header,
    keyrings: Sequence[Keyring],
    required_context: Mapping[str, str] | None = None,
) -> OpenedMessage:
    """Unwrap the data key and authenticate the header; raises if any check fails."""
    data_key, keyring = _unwrap_data_key(header, keyrings)
    keys = derive_keys(data_key, header.message_id)
    if not hmac.compare_digest(keys.commitment, header.commitment):
        raise CommitmentMismatch("the data key does not match the header's key commitment")
    cipher = FrameOpener(keys.encryption_key, header.message_id)
    cipher.verify_header_tag(header.body, header.tag)
    missing = missing_pairs(header.context, required_context or {})
    if missing:
        raise EncryptionContextMismatch(
            "the encryption context lacks or differs on: " + ", ".join(sorted(missing))
        )
    return OpenedMessage(header, cipher, keyring)


def _unwrap_data_key(header: Header, keyrings: Sequence[Keyring]) -> tuple[bytes, Keyring]:
    for edk in header.encrypted_data_keys:
        for keyring in keyrings:
            data_key = keyring.unwrap(edk, header.context_bytes)
            if data_key is not None and len(data_key) == DATA_KEY_LENGTH:
                return data_key, keyring
    raise DataKeyUnavailable(
        f"none of the message's {len(header.encrypted_data_keys)} encrypted data keys "
        "could be unwrapped with the given keys"
    )
