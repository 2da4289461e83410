"""The message header: its fields, its bytes, and an incremental parser with hard limits.

Layout (all integers big-endian), every byte up to the tag authenticated by it:

    version(1)=0x02  suite(2)=0x0478 or 0x0578  message_id(32)
    context_length(2)  context(context_length)
    edk_count(2)  edk_count × [id_len(2) id  info_len(2) info  ct_len(2) ct]
    content_type(1)=0x02  frame_length(4)  commitment(32)
    tag(16)

A signed message (suite 0x0578) carries the public key its footer is checked with in its
context (`aws-crypto-public-key`); an unsigned one may not carry that pair.

The parser checks every length the header claims against `Limits` as soon as the length
field is read, before waiting for the bytes it announces, so hostile input cannot make a
reader buffer or loop without bound.
"""

import struct
from dataclasses import dataclass, field

from envelope.context import parse_context
from envelope.errors import (
    HeaderLimitExceeded,
    MessageFormatError,
    StateError,
    TruncatedMessage,
    UnsupportedMessage,
)
from envelope.suite import (
    COMMITMENT_LENGTH,
    FRAMED_CONTENT,
    MESSAGE_FORMAT_VERSION,
    MESSAGE_ID_LENGTH,
    NON_FRAMED_CONTENT,
    TAG_LENGTH,
    UNSIGNED_SUITE_ID,
    check_suite,
    is_signed,
)

PUBLIC_KEY_CONTEXT_KEY = "aws-crypto-public-key"  # a signed message's footer key

MIN_FRAME_LENGTH = 4096
MAX_FRAME_LENGTH = 16 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The most a header may claim before the reader refuses it."""

    max_encrypted_data_keys: int = 16
    max_edk_field_length: int = 8192
    max_context_length: int = 16384
    min_frame_length: int = MIN_FRAME_LENGTH
    max_frame_length: int = MAX_FRAME_LENGTH


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class EncryptedDataKey:
    """The data key wrapped for one recipient key, as the keyring that made it wrote it."""

    provider_id: str
    provider_info: bytes
    ciphertext: bytes

    def to_bytes(self) -> bytes:
        provider_id = self.provider_id.encode("utf-8")
        return b"".join(
            _U16.pack(len(part)) + part
            for part in (provider_id, self.provider_info, self.ciphertext)
        )


@dataclass(frozen=True)
class Header:
    """A parsed or freshly built header; `body` holds the exact bytes the tag covers."""

    message_id: bytes
    context: dict[str, str]
    context_bytes: bytes
    encrypted_data_keys: tuple[EncryptedDataKey, ...]
    frame_length: int
    commitment: bytes
    body: bytes = field(repr=False)
    tag: bytes = field(repr=False)
    suite_id: int = UNSIGNED_SUITE_ID

    @property
    def signed(self) -> bool:
        """Whether a footer signature over the whole message follows its final frame."""
        return is_signed(self.suite_id)

    @property
    def length(self) -> int:
        """Bytes the header occupies at the start of the message."""
        return len(self.body) + len(self.tag)

    def to_bytes(self) -> bytes:
        return self.body + self.tag


_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def serialize_header_body(
    *,
    message_id: bytes,
    context_bytes: bytes,
    encrypted_data_keys: tuple[EncryptedDataKey, ...],
    frame_length: int,
    commitment: bytes,
    suite_id: int = UNSIGNED_SUITE_ID,
) -> bytes:
    """The header bytes that precede (and are authenticated by) the header tag."""
    return b"".join(
        [
            struct.pack(
                ">BH32sH",
                MESSAGE_FORMAT_VERSION,
                suite_id,
                message_id,
                len(context_bytes),
            ),
            context_bytes,
            _U16.pack(len(encrypted_data_keys)),
            *(edk.to_bytes() for edk in encrypted_data_keys),
            struct.pack(">BI", FRAMED_CONTENT, frame_length),
            commitment,
        ]
    )


class _NeedBytes(Exception):
    """Control flow inside the parser: the buffer must hold `total` bytes to go on."""

    def __init__(self, total: int) -> None:
        self.total = total


class _Cursor:
    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.offset = 0

    def take(self, count: int) -> bytes:
        end = self.offset + count
        if end > len(self.data):
            raise _NeedBytes(end)
        chunk = bytes(self.data[self.offset : end])
        self.offset = end
        return chunk

    def u8(self) -> int:
        return int(_U8.unpack(self.take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])


def _parse(data: bytes | bytearray, limits: Limits) -> Header:
    cursor = _Cursor(data)
    _check_version(cursor.u8())
    suite_id = cursor.u16()
    check_suite(suite_id)
    message_id = cursor.take(MESSAGE_ID_LENGTH)
    context_length = cursor.u16()
    if context_length > limits.max_context_length:
        raise HeaderLimitExceeded(
            f"encryption context of {context_length} bytes exceeds {limits.max_context_length}"
        )
    context_bytes = cursor.take(context_length)
    context = parse_context(context_bytes)
    if is_signed(suite_id) != (PUBLIC_KEY_CONTEXT_KEY in context):
        raise MessageFormatError(
            f"a message of suite 0x{suite_id:04X} "
            + ("lacks" if is_signed(suite_id) else "may not carry")
            + f" the {PUBLIC_KEY_CONTEXT_KEY!r} pair"
        )
    edks = _parse_edks(cursor, limits)
    _check_content_type(cursor.u8())
    frame_length = cursor.u32()
    if not limits.min_frame_length <= frame_length <= limits.max_frame_length:
        raise HeaderLimitExceeded(
            f"frame length {frame_length} is outside "
            f"[{limits.min_frame_length}, {limits.max_frame_length}]"
        )
    commitment = cursor.take(COMMITMENT_LENGTH)
    body = bytes(data[: cursor.offset])
    tag = cursor.take(TAG_LENGTH)
    return Header(
        message_id=message_id,
        context=context,
        context_bytes=context_bytes,
        encrypted_data_keys=edks,
        frame_length=frame_length,
        commitment=commitment,
        body=body,
        tag=tag,
        suite_id=suite_id,
    )


def _check_version(version: int) -> None:
    if version == 0x01:
        raise UnsupportedMessage("message format version 1 is not supported (only version 2)")
    if version != MESSAGE_FORMAT_VERSION:
        raise MessageFormatError(f"not an encrypted message (version byte 0x{version:02X})")


def _check_content_type(content_type: int) -> None:
    if content_type == NON_FRAMED_CONTENT:
        raise UnsupportedMessage("non-framed content is not supported (only framed)")
    if content_type != FRAMED_CONTENT:
        raise MessageFormatError(f"unknown content type 0x{content_type:02X}")


def _parse_edks(cursor: _Cursor, limits: Limits) -> tuple[EncryptedDataKey, ...]:
    count = cursor.u16()
    if count == 0:
        raise MessageFormatError("the header holds no encrypted data key")
    if count > limits.max_encrypted_data_keys:
        raise HeaderLimitExceeded(
            f"{count} encrypted data keys exceed the limit of {limits.max_encrypted_data_keys}"
        )
    edks = []
    for _ in range(count):
        provider_id, provider_info, ciphertext = (_edk_field(cursor, limits) for _ in range(3))
        try:
            provider = provider_id.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageFormatError("an encrypted data key's provider ID is not UTF-8") from exc
        edks.append(EncryptedDataKey(provider, provider_info, ciphertext))
    return tuple(edks)


def _edk_field(cursor: _Cursor, limits: Limits) -> bytes:
    length = cursor.u16()
    if length > limits.max_edk_field_length:
        raise HeaderLimitExceeded(
            f"an encrypted data key field of {length} bytes exceeds {limits.max_edk_field_length}"
        )
    return cursor.take(length)


class HeaderReader:
    """Accumulates the first bytes of a message until its header is complete.

    `feed` returns the `Header` once it has all of it (the bytes that followed are then in
    `remainder`), and `None` while it needs more. It re-parses only when enough bytes have
    arrived to get past the field that stopped it, so tiny chunks cost no more than big ones.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._needed = 1
        self.header: Header | None = None
        self.remainder = b""

    def feed(self, data: bytes | bytearray | memoryview) -> Header | None:
        if self.header is not None:
            raise StateError("the header is already complete")
        self._buffer += data
        if len(self._buffer) < self._needed:
            return None
        try:
            header = _parse(self._buffer, self._limits)
        except _NeedBytes as need:
            self._needed = need.total
            return None
        self.remainder = bytes(self._buffer[header.length :])
        self._buffer = bytearray()
        self.header = header
        return header


def parse_header(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse a header from the start of `data`; raises `TruncatedMessage` if it is cut short."""
    reader = HeaderReader(limits)
    header = reader.feed(data)
    if header is None:
        raise TruncatedMessage("the message ends inside its header")
    return header
