"""Frames: the body of a message, and AES-GCM under a message's derived key.

    regular frame:  seq(4)  iv(12)  ciphertext(frame_length)  tag(16)
    final frame:    0xFFFFFFFF(4)  seq(4)  iv(12)  length(4)  ciphertext(length)  tag(16)

Sequence numbers start at 1 and rise by one; the IV is the sequence number, big-endian,
left-padded with zeros. Each frame's AAD is the message ID, a string that says whether
the frame is the final one, the sequence number and the plaintext length, so frames
cannot be reordered, dropped, duplicated or moved to another message, and the final
frame cannot be cut off or passed off as a regular one. The header tag uses the same key
with an all-zero IV over the header body.
"""

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envelope.errors import FrameAuthenticationError, HeaderAuthenticationError
from envelope.suite import IV_LENGTH, TAG_LENGTH

END_MARKER = 0xFFFFFFFF
MAX_SEQUENCE_NUMBER = 0xFFFFFFFF

REGULAR_PREFIX = struct.Struct(">I12s")  # seq, iv
FINAL_PREFIX = struct.Struct(">II12sI")  # end marker, seq, iv, content length
REGULAR_OVERHEAD = REGULAR_PREFIX.size + TAG_LENGTH  # 32
FINAL_OVERHEAD = FINAL_PREFIX.size + TAG_LENGTH  # 40

_FRAME_AAD = b"AWSKMSEncryptionClient Frame"
_FINAL_FRAME_AAD = b"AWSKMSEncryptionClient Final Frame"
_SEQ_AND_LENGTH = struct.Struct(">IQ")
_HEADER_IV = bytes(IV_LENGTH)


def frame_iv(sequence_number: int) -> bytes:
    return sequence_number.to_bytes(IV_LENGTH, "big")


class FrameCipher:
    """Seals and opens the frames of one message, and makes or checks its header tag."""

    def __init__(self, encryption_key: bytes, message_id: bytes) -> None:
        self._aead = AESGCM(encryption_key)
        self._regular_aad = message_id + _FRAME_AAD
        self._final_aad = message_id + _FINAL_FRAME_AAD

    def header_tag(self, header_body: bytes) -> bytes:
        return self._aead.encrypt(_HEADER_IV, b"", header_body)

    def verify_header_tag(self, header_body: bytes, tag: bytes) -> None:
        try:
            self._aead.decrypt(_HEADER_IV, tag, header_body)
        except InvalidTag:
            raise HeaderAuthenticationError("the header failed authentication") from None

    def seal(self, sequence_number: int, plaintext: memoryview, *, final: bool) -> bytearray:
        """The serialized frame; a fresh buffer the caller owns."""
        iv = frame_iv(sequence_number)
        length = len(plaintext)
        if final:
            prefix = FINAL_PREFIX.pack(END_MARKER, sequence_number, iv, length)
        else:
            prefix = REGULAR_PREFIX.pack(sequence_number, iv)
        frame = bytearray(len(prefix) + length + TAG_LENGTH)
        frame[: len(prefix)] = prefix
        aad = self._aad(sequence_number, length, final=final)
        self._aead.encrypt_into(iv, plaintext, aad, memoryview(frame)[len(prefix) :])
        return frame

    def seal_in_place(self, sequence_number: int, frame: bytearray) -> bytearray:
        """Seal a regular frame whose plaintext already fills `frame` after its prefix:
        `frame` is `REGULAR_OVERHEAD + frame length` bytes and becomes the serialized frame."""
        iv = frame_iv(sequence_number)
        length = len(frame) - REGULAR_OVERHEAD
        REGULAR_PREFIX.pack_into(frame, 0, sequence_number, iv)
        body = memoryview(frame)[REGULAR_PREFIX.size :]
        aad = self._aad(sequence_number, length, final=False)
        self._aead.encrypt_into(iv, body[:length], aad, body)
        return frame

    def open(self, sequence_number: int, frame: memoryview, *, final: bool) -> bytes:
        """The plaintext of a whole serialized frame whose sequence number was checked."""
        iv_offset, prefix_size = (8, FINAL_PREFIX.size) if final else (4, REGULAR_PREFIX.size)
        iv = bytes(frame[iv_offset : iv_offset + IV_LENGTH])
        if iv != frame_iv(sequence_number):
            raise FrameAuthenticationError(sequence_number)
        sealed = frame[prefix_size:]
        aad = self._aad(sequence_number, len(sealed) - TAG_LENGTH, final=final)
        try:
            return self._aead.decrypt(iv, sealed, aad)
        except InvalidTag:
            raise FrameAuthenticationError(sequence_number) from None

    def _aad(self, sequence_number: int, length: int, *, final: bool) -> bytes:
        base = self._final_aad if final else self._regular_aad
        return base + _SEQ_AND_LENGTH.pack(sequence_number, length)
