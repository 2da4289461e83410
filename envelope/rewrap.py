"""Re-wrapping a message's data key for other keys, without touching its body.

Frames are authenticated under a key derived from the data key and the message ID only,
so a new header that keeps the data key, message ID, key commitment and frame length
keeps every frame of the old body valid. Only the encrypted data keys, the encryption
context (which the keyrings bind to) and the header tag change.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace

from envelope.context import reject_reserved_keys, serialize_context
from envelope.errors import InvalidParameter
from envelope.header import DEFAULT_LIMITS, Header, serialize_header_body
from envelope.keyrings.base import Keyring
from envelope.message import _unwrap_data_key, open_message


def rewrap_header(
    header: Header,
    opening: Sequence[Keyring],
    new: Sequence[Keyring],
    *,
    context: Mapping[str, str] | None = None,
) -> Header:
    """The header of the same message sealed for the `new` keyrings, with `context`
    (default: the header's own) and a fresh header tag.

    The old header is opened with `opening` exactly as a reader opens it (commitment and
    header tag checked), so a tampered header or a wrong key raises here.
    """
    _check_keyrings(new)
    opened = open_message(header, opening)
    # open_message keeps the data key to itself; the keyring that opened the header
    # unwraps it again (deterministic, the same EDK comes first).
    data_key, _ = _unwrap_data_key(header, [opened.keyring])
    new_context = dict(header.context if context is None else context)
    context_bytes = header.context_bytes if context is None else _context_bytes(new_context)
    edks = tuple(keyring.wrap(data_key, context_bytes) for keyring in new)
    body = serialize_header_body(
        message_id=header.message_id,
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        frame_length=header.frame_length,
        commitment=header.commitment,
    )
    return replace(
        header,
        context=new_context,
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        body=body,
        tag=opened.cipher.header_tag(body),
    )


def _check_keyrings(keyrings: Sequence[Keyring]) -> None:
    if not 1 <= len(keyrings) <= DEFAULT_LIMITS.max_encrypted_data_keys:
        raise InvalidParameter(
            f"a message takes 1 to {DEFAULT_LIMITS.max_encrypted_data_keys} keyrings"
        )


def _context_bytes(context: Mapping[str, str]) -> bytes:
    reject_reserved_keys(context)
    context_bytes = serialize_context(context)
    if len(context_bytes) > DEFAULT_LIMITS.max_context_length:
        raise InvalidParameter(
            f"the encryption context exceeds {DEFAULT_LIMITS.max_context_length} bytes"
        )
    return context_bytes
