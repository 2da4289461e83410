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

A writer may vouch for its messages (`Endorse`): given the new message's `header_binding`
(its suite, message ID, frame length, key commitment, context and the ordered list of its
recipients, each keyring's provider ID and key name), it returns pairs to add to the
context, say a MAC only it can make. A reader recomputes the binding from the header
(`header_binding_of`, one recipient per EDK) to check them, so an EDK dropped, added or
moved breaks them. The EDKs' bytes are not in the binding: the AES and ML-KEM wraps take
the whole context, those pairs included, as their AAD, so they are made after it. The key
commitment stands for them: every data key that opens the message is the one it commits
to. The binding says nothing about the body: whoever knows the data key can write other
frames under the same header, which only a signed message's footer rules out.
`first_header_binding_of` is the binding before recipients were in it, which proofs of
that time cover.
"""

import hmac
import os
import struct
from collections.abc import Callable, Mapping, Sequence
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
from envelope.footer import FooterSigner
from envelope.frames import FrameOpener, FrameSealer
from envelope.header import (
    DEFAULT_LIMITS,
    PUBLIC_KEY_CONTEXT_KEY,
    Header,
    serialize_header_body,
)
from envelope.keyrings.base import Keyring
from envelope.keyrings.names import recipients_of
from envelope.suite import (
    DATA_KEY_LENGTH,
    MESSAGE_ID_LENGTH,
    SIGNED_SUITE_ID,
    UNSIGNED_SUITE_ID,
    DerivedKeys,
    derive_keys,
)

# A new message's `header_binding` in; the pairs that vouch for it out.
Endorse = Callable[[bytes], Mapping[str, str]]
_BINDING = b"sealstream/header-binding/v2\x00"
_FIRST_BINDING = b"sealstream/header-binding/v1\x00"

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
    context_bytes = serialize_context(context)
    if len(context_bytes) > DEFAULT_LIMITS.max_context_length:
        raise InvalidParameter(
            f"the encryption context exceeds {DEFAULT_LIMITS.max_context_length} bytes"
        )
    return context_bytes


def header_binding(
    suite_id: int,
    message_id: bytes,
    frame_length: int,
    commitment: bytes,
    context: EncryptionContext,
    recipients: Sequence[tuple[str, bytes]],
) -> bytes:
    """The bytes an endorsement of a message covers: all of its header but the EDKs' bytes
    (which the commitment stands for; their provider IDs and key names are in, in order)
    and the endorsing pairs themselves."""
    return b"".join(
        [
            _BINDING,
            _fields(suite_id, message_id, frame_length, commitment, context),
            struct.pack(">H", len(recipients)),
            *(_counted(provider.encode("utf-8")) + _counted(name) for provider, name in recipients),
        ]
    )


def header_binding_of(header: Header, endorsing_keys: Sequence[str]) -> bytes:
    """The binding a header's endorsement, held in the pairs `endorsing_keys`, covers."""
    return header_binding(
        header.suite_id,
        header.message_id,
        header.frame_length,
        header.commitment,
        _unendorsed(header, endorsing_keys),
        recipients_of(header),
    )


def first_header_binding_of(header: Header, endorsing_keys: Sequence[str]) -> bytes:
    """The binding of the format's first version, without the recipients."""
    context = _unendorsed(header, endorsing_keys)
    return _FIRST_BINDING + _fields(
        header.suite_id, header.message_id, header.frame_length, header.commitment, context
    )


def _fields(
    suite_id: int,
    message_id: bytes,
    frame_length: int,
    commitment: bytes,
    context: EncryptionContext,
) -> bytes:
    return (
        struct.pack(">H32sI", suite_id, message_id, frame_length)
        + commitment
        + serialize_context(context)
    )


def _counted(field: bytes) -> bytes:
    return struct.pack(">H", len(field)) + field


def _unendorsed(header: Header, endorsing_keys: Sequence[str]) -> dict[str, str]:
    return {k: v for k, v in header.context.items() if k not in endorsing_keys}


def new_message(
    keyrings: Sequence[Keyring],
    context: EncryptionContext,
    frame_length: int,
    *,
    signer: FooterSigner | None = None,
    endorse: Endorse | None = None,
) -> tuple[Header, FrameSealer]:
    """A sealed header for a new message and the sealer for its frames. With `signer`, the
    message is signed (suite 0x0578): the signer's public key goes into the context (its
    writer hashes every byte of the message, the header first). With `endorse`, its
    pairs for the message join the context."""
    check_keyrings(keyrings)
    check_frame_length(frame_length)
    reject_reserved_keys(context)
    suite_id = UNSIGNED_SUITE_ID if signer is None else SIGNED_SUITE_ID
    data_key = os.urandom(DATA_KEY_LENGTH)
    message_id = os.urandom(MESSAGE_ID_LENGTH)
    keys = derive_keys(data_key, message_id, suite_id)
    full_context = dict(context)
    if signer is not None:
        full_context[PUBLIC_KEY_CONTEXT_KEY] = signer.public_key
    if endorse is not None:
        binding = header_binding(
            suite_id,
            message_id,
            frame_length,
            keys.commitment,
            full_context,
            [keyring.recipient for keyring in keyrings],
        )
        full_context = _with_endorsement(full_context, endorse(binding))
    context_bytes = writable_context(full_context)
    cipher = FrameSealer(keys.encryption_key, message_id)
    edks = tuple(keyring.wrap(data_key, context_bytes) for keyring in keyrings)
    body = serialize_header_body(
        message_id=message_id,
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        frame_length=frame_length,
        commitment=keys.commitment,
        suite_id=suite_id,
    )
    header = Header(
        message_id=message_id,
        context=full_context,
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        frame_length=frame_length,
        commitment=keys.commitment,
        body=body,
        # The one sealing under this key with the all-zero IV, which no frame uses.
        tag=cipher.header_tag(body),
        suite_id=suite_id,
    )
    return header, cipher


def _with_endorsement(context: dict[str, str], pairs: Mapping[str, str]) -> dict[str, str]:
    if any(key in context for key in pairs):
        raise InvalidParameter("an endorsing pair would replace a pair of the context")
    return {**context, **pairs}


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
    keys, keyring = _authenticated(header, keyrings)
    cipher = FrameOpener(keys.encryption_key, header.message_id)
    missing = missing_pairs(header.context, required_context or {})
    if missing:
        raise EncryptionContextMismatch(
            "the encryption context lacks or differs on: " + ", ".join(sorted(missing))
        )
    return OpenedMessage(header, cipher, keyring)


def resume_message(header: Header, keyrings: Sequence[Keyring]) -> FrameSealer:
    """The sealer of a message whose writing stopped and goes on elsewhere: its data key
    unwrapped from `header` by one of `keyrings`, the key commitment and the header tag
    checked as `open_message` checks them. It tags no header (that was done once).

    Its caller takes the nonce's uniqueness on itself: each sequence number must be
    sealed with one plaintext, as regular or final frame, whatever process seals it. The
    service's resumable uploads record each frame's plaintext (as an HMAC) before they
    seal it, and seal a frame again only for the very same bytes, which gives the very
    same frame (`services.resumable`)."""
    keys, _ = _authenticated(header, keyrings)
    return FrameSealer(keys.encryption_key, header.message_id, header_tagged=True)


def _authenticated(header: Header, keyrings: Sequence[Keyring]) -> tuple[DerivedKeys, Keyring]:
    """The message's keys, from a data key one of `keyrings` unwraps, once the key
    commitment and the header tag have been checked."""
    data_key, keyring = _unwrap_data_key(header, keyrings)
    keys = derive_keys(data_key, header.message_id, header.suite_id)
    if not hmac.compare_digest(keys.commitment, header.commitment):
        raise CommitmentMismatch("the data key does not match the header's key commitment")
    FrameOpener(keys.encryption_key, header.message_id).verify_header_tag(header.body, header.tag)
    return keys, keyring


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
