"""Encryption context: the string pairs every message authenticates but does not hide.

The serialization is the AWS Encryption SDK's: a pair count, then (key, value) pairs
sorted by the key's UTF-8 bytes, each length-prefixed with two bytes. An empty context
serializes to no bytes at all. Parsing accepts only that canonical form, so the bytes in
a header and the bytes a keyring binds to are always the same.
"""

import struct
from collections.abc import Mapping

from envelope.errors import HeaderLimitExceeded, InvalidParameter, MessageFormatError

EncryptionContext = Mapping[str, str]

MAX_SERIALIZED_LENGTH = 0xFFFF  # the header's two-byte length field
RESERVED_PREFIX = "aws-crypto-"  # the SDK keeps these keys for itself

_U16 = struct.Struct(">H")


def serialize_context(context: EncryptionContext) -> bytes:
    """The canonical bytes of `context`; raises `InvalidParameter` if it cannot be encoded."""
    if not context:
        return b""
    pairs = sorted((_encode(key), _encode(value)) for key, value in context.items())
    out = bytearray(_U16.pack(len(pairs)))
    for key, value in pairs:
        for field in (key, value):
            if len(field) > 0xFFFF:
                raise InvalidParameter("an encryption context key or value exceeds 65535 bytes")
            out += _U16.pack(len(field))
            out += field
    if len(out) > MAX_SERIALIZED_LENGTH:
        raise InvalidParameter("the serialized encryption context exceeds 65535 bytes")
    return bytes(out)


def parse_context(data: bytes, *, max_length: int = MAX_SERIALIZED_LENGTH) -> dict[str, str]:
    """Parse canonical context bytes; anything else raises a `MessageFormatError`."""
    if len(data) > max_length:
        raise HeaderLimitExceeded(f"encryption context of {len(data)} bytes exceeds {max_length}")
    if not data:
        return {}
    count, offset = _read_u16(data, 0)
    if count == 0:
        raise MessageFormatError("a non-empty encryption context declares zero pairs")
    context: dict[str, str] = {}
    previous: bytes | None = None
    for _ in range(count):
        key, offset = _read_field(data, offset)
        value, offset = _read_field(data, offset)
        if previous is not None and key <= previous:
            raise MessageFormatError("encryption context keys are not sorted and unique")
        previous = key
        context[_decode(key)] = _decode(value)
    if offset != len(data):
        raise MessageFormatError("encryption context has bytes after its last pair")
    return context


def reject_reserved_keys(context: EncryptionContext) -> None:
    """Refuse keys the AWS Encryption SDK reserves, so its decrypt never trips on ours."""
    for key in context:
        if key.startswith(RESERVED_PREFIX):
            raise InvalidParameter(
                f"encryption context keys starting {RESERVED_PREFIX!r} are reserved"
            )


def missing_pairs(context: EncryptionContext, required: EncryptionContext) -> list[str]:
    """Keys of `required` that `context` lacks or holds with another value."""
    return [key for key, value in required.items() if context.get(key) != value]


def _encode(text: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidParameter("encryption context keys and values must be strings")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter("encryption context is not valid Unicode") from exc


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageFormatError("encryption context is not valid UTF-8") from exc


def _read_u16(data: bytes, offset: int) -> tuple[int, int]:
    if offset + 2 > len(data):
        raise MessageFormatError("encryption context ends inside a length field")
    return _U16.unpack_from(data, offset)[0], offset + 2


def _read_field(data: bytes, offset: int) -> tuple[bytes, int]:
    length, offset = _read_u16(data, offset)
    end = offset + length
    if end > len(data):
        raise MessageFormatError("encryption context ends inside a field")
    return data[offset:end], end
