"""Frames: the body of a message, and AES-GCM under a message's derived key.

    regular frame:  seq(4)  iv(12)  ciphertext(frame_length)  tag(16)
    final frame:    0xFFFFFFFF(4)  seq(4)  iv(12)  length(4)  ciphertext(length)  tag(16)

Sequence numbers start at 1 and rise by one; the IV is the sequence number, big-endian,
left-padded with zeros. Each frame's AAD is the message ID, a string that says whether
the frame is the final one, the sequence number and the plaintext length, so frames
cannot be reordered, dropped, duplicated or moved to another message, and the final
frame cannot be cut off or passed off as a regular one. The header tag uses the same key
with an all-zero IV over the header body.

Nonces: the key is one message's own (derived from its fresh data key and message ID),
the header tag takes the IV 0 and each frame its sequence number, from 1: every (key, IV)
seals once, and each place below says why (docs/FORMAT.md §14). GCM cannot afford less:
two tags under one key and IV give away its hash key, and with it a forgery of any frame.

A message's writer seals through a `FrameSealer`; its reader opens through a `FrameOpener`,
which can neither seal nor tag. A reader that could tag could also open a frame whose tag
failed, by tagging its ciphertext anew.
"""

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    AEADEncryptionContext,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envelope.errors import (
    FrameAuthenticationError,
    HeaderAuthenticationError,
    InvalidParameter,
    StateError,
)
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


def checked_iv(sequence_number: int, prefix: bytes | memoryview, *, final: bool) -> bytes:
    """The IV a frame's `prefix` carries, which must be the one its sequence number gives."""
    offset = 8 if final else 4
    iv = bytes(prefix[offset : offset + IV_LENGTH])
    if iv != frame_iv(sequence_number):
        raise FrameAuthenticationError(sequence_number)
    return iv


class _FrameKey:
    """One message's encryption key and the AAD prefixes of its frames: what its sealer
    and its opener share. Neither hands out the key or a raw cipher under it."""

    def __init__(self, encryption_key: bytes, message_id: bytes) -> None:
        self._aead = AESGCM(encryption_key)
        self._aes = algorithms.AES(encryption_key)
        self._regular_aad = message_id + _FRAME_AAD
        self._final_aad = message_id + _FINAL_FRAME_AAD

    def _aad(self, sequence_number: int, length: int, *, final: bool) -> bytes:
        base = self._final_aad if final else self._regular_aad
        return base + _SEQ_AND_LENGTH.pack(sequence_number, length)


class FrameSealer(_FrameKey):
    """Seals the frames of one message being written, and makes its header tag.

    Only the writer of a message holds one (`new_message` makes it, with the message's
    fresh key); its reader holds a `FrameOpener`, which can neither seal nor tag.
    """

    def __init__(
        self, encryption_key: bytes, message_id: bytes, *, header_tagged: bool = False
    ) -> None:
        """`header_tagged`: the message's header was tagged before (`resume_message`)."""
        super().__init__(encryption_key, message_id)
        self._header_tagged = header_tagged

    def header_tag(self, header_body: bytes) -> bytes:
        """The tag of the message's header, under the IV 0, which no frame takes.

        A sealer makes one and refuses a second: two tags under one IV would give away
        GCM's hash key. `new_message`, which drew the data key and message ID this
        sealer's key comes from, makes it before it hands the sealer out."""
        if self._header_tagged:
            raise StateError("a message's header is tagged once")
        self._header_tagged = True
        return self._aead.encrypt(_HEADER_IV, b"", header_body)

    def seal(
        self,
        sequence_number: int,
        plaintext: memoryview,
        *,
        final: bool,
        into: bytearray | None = None,
    ) -> bytearray:
        """The serialized frame; a buffer the caller owns: `into`, a spent frame, if it is
        of the frame's length (every byte of it is written again), else a fresh one."""
        size = len(plaintext) + (FINAL_OVERHEAD if final else REGULAR_OVERHEAD)
        frame = into if into is not None and len(into) == size else bytearray(size)
        self.seal_into(sequence_number, plaintext, final=final, into=memoryview(frame))
        return frame

    def seal_into(
        self, sequence_number: int, plaintext: memoryview, *, final: bool, into: memoryview
    ) -> None:
        """Serialize the frame into `into`, exactly its length: a frame's place in a
        larger buffer, which then needs no copy."""
        # The IV is the sequence number, which the encryptor hands out once per message:
        # each regular frame takes the next, and the final frame the one after the last.
        iv = frame_iv(sequence_number)
        length = len(plaintext)
        if final:
            prefix = FINAL_PREFIX.pack(END_MARKER, sequence_number, iv, length)
        else:
            prefix = REGULAR_PREFIX.pack(sequence_number, iv)
        if len(into) != len(prefix) + length + TAG_LENGTH:
            raise ValueError("a frame is sealed into a buffer of exactly its length")
        into[: len(prefix)] = prefix
        aad = self._aad(sequence_number, length, final=final)
        self._aead.encrypt_into(iv, plaintext, aad, into[len(prefix) :])

    def begin_regular(self, sequence_number: int, length: int) -> AEADEncryptionContext:
        """An incremental sealing of a regular frame of `length` bytes: its ciphertext is
        what `seal` would write, and its tag follows `finalize()`.

        It takes the frame's sequence number as its IV, as `seal` does, so the two must
        never both tag one sequence number: `PendingFrame` and `Encryptor.finish` say why
        they do not."""
        context = Cipher(self._aes, modes.GCM(frame_iv(sequence_number))).encryptor()
        context.authenticate_additional_data(self._aad(sequence_number, length, final=False))
        return context

    def _reseal_final(self, sequence_number: int, ciphertext: memoryview) -> bytearray:
        """The final frame of the plaintext under `ciphertext`, which this sealer encrypted
        under `sequence_number`'s IV for a regular frame whose tag was never made; a fresh
        buffer.

        The same key and IV give the same keystream, so running that ciphertext through a
        decryption that is never finalized gives back its plaintext, sealed again at once.
        Handed any other ciphertext, this would decrypt it unauthenticated and tag it, so
        it is private to this module (a test fences it in): its one caller is
        `PendingFrame.seal_final`, on the ciphertext it wrote itself.
        """
        undo = _decrypt_unauthenticated(self._aes, frame_iv(sequence_number))
        plaintext = memoryview(undo.update(ciphertext))
        return self.seal(sequence_number, plaintext, final=True)


class FrameOpener(_FrameKey):
    """Checks the header tag of one message being read, and opens its frames.

    It hands out only plaintext that a tag has vouched for, and it makes no tag: a reader
    cannot seal a frame or a header under the message's key (`open_message` makes one).
    """

    def verify_header_tag(self, header_body: bytes, tag: bytes) -> None:
        try:
            self._aead.decrypt(_HEADER_IV, tag, header_body)
        except InvalidTag:
            raise HeaderAuthenticationError("the header failed authentication") from None

    def open(self, sequence_number: int, frame: memoryview, *, final: bool) -> bytes:
        """The plaintext of a whole serialized frame whose sequence number was checked."""
        prefix_size = FINAL_PREFIX.size if final else REGULAR_PREFIX.size
        iv = checked_iv(sequence_number, frame[:prefix_size], final=final)
        sealed = frame[prefix_size:]
        aad = self._aad(sequence_number, len(sealed) - TAG_LENGTH, final=final)
        try:
            return self._aead.decrypt(iv, sealed, aad)
        except InvalidTag:
            raise FrameAuthenticationError(sequence_number) from None

    def begin_opening(
        self, sequence_number: int, prefix: bytes, length: int, *, final: bool
    ) -> "OpeningFrame":
        """An incremental opening of the frame `prefix` starts, of `length` ciphertext
        bytes: its plaintext is handed out only once the frame's tag has verified."""
        iv = checked_iv(sequence_number, prefix, final=final)
        context = _decrypt_unauthenticated(self._aes, iv)
        context.authenticate_additional_data(self._aad(sequence_number, length, final=final))
        return OpeningFrame(sequence_number, context, length, final=final)


def _decrypt_unauthenticated(aes: algorithms.AES, iv: bytes) -> AEADDecryptionContext:
    """A decryption under `iv` whose output is unauthenticated until `finalize_with_tag`
    passes. Only this module uses it, and hands out nothing of it unverified: a test
    checks that no code outside this module names it."""
    return Cipher(aes, modes.GCM(iv)).decryptor()


class PendingFrame:
    """A regular frame sealed piece by piece as its plaintext arrives, in the buffer that
    will carry it.

    Each piece is encrypted on arrival, while it is still in the CPU's cache, instead of
    being copied into the frame and encrypted there once the frame is full. AES-GCM's
    ciphertext depends on the key and IV only; the AAD, which says whether a frame is the
    final one, enters the tag alone. So pieces are encrypted under the regular frame's AAD,
    the likely case; if the message ends before the frame is full, `seal_final` re-seals
    what was written as the final frame, whose ciphertext is the same and whose tag is not.
    """

    def __init__(
        self,
        cipher: FrameSealer,
        sequence_number: int,
        frame_length: int,
        buffer: bytearray | None = None,
    ) -> None:
        """`buffer`, if given, is a spent frame of the same length to seal into instead
        of a new one; every byte of it is written again before it is handed out."""
        size = REGULAR_OVERHEAD + frame_length
        if buffer is not None and len(buffer) != size:
            raise InvalidParameter(f"a frame buffer of {len(buffer)} bytes, not {size}")
        self.sequence_number = sequence_number
        self.frame_length = frame_length
        self.filled = 0
        self._cipher = cipher
        self._buffer = buffer if buffer is not None else bytearray(size)
        self._context = cipher.begin_regular(sequence_number, frame_length)
        self._sealed = False

    @property
    def full(self) -> bool:
        return self.filled == self.frame_length

    def seals_into(self, buffer: bytearray) -> bool:
        return buffer is self._buffer

    def write(self, plaintext: memoryview) -> memoryview:
        """Encrypt as much of `plaintext` as the frame takes into place; return the rest."""
        take = min(len(plaintext), self.frame_length - self.filled)
        start = REGULAR_PREFIX.size + self.filled
        self._context.update_into(plaintext[:take], memoryview(self._buffer)[start : start + take])
        self.filled += take
        return plaintext[take:]

    def seal_regular(self) -> bytearray:
        """The full frame, serialized; a buffer the caller now owns."""
        if not self.full:
            raise StateError("a regular frame is sealed only when full")
        self._seal_once()
        self._context.finalize()
        frame = self._buffer
        REGULAR_PREFIX.pack_into(frame, 0, self.sequence_number, frame_iv(self.sequence_number))
        frame[-TAG_LENGTH:] = self._context.tag
        return frame

    def seal_final(self) -> bytearray:
        """The final frame holding what was written, serialized; a fresh buffer.

        This seals a second time under the key and IV the regular frame's context took,
        and that is safe only because the regular frame's tag is never made: its context
        is never finalized, and its buffer (whose ciphertext is the same bytes as the
        final frame's) is never handed out. One tag leaves under this IV. Were the regular
        one released too, the two tags over different AAD would give away GCM's hash key.
        A pending frame therefore ends either in `seal_regular` or here, never both.
        """
        self._seal_once()
        end = REGULAR_PREFIX.size + self.filled
        ciphertext = memoryview(self._buffer)[REGULAR_PREFIX.size : end]
        # This module's own fenced re-seal, on the ciphertext this frame wrote itself.
        return self._cipher._reseal_final(self.sequence_number, ciphertext)  # noqa: SLF001

    def _seal_once(self) -> None:
        # Both ways of sealing tag this frame's IV: whichever comes second would make a
        # second tag under it.
        if self._sealed:
            raise StateError("a pending frame is sealed once, as a regular or a final frame")
        self._sealed = True


class StreamedFrame:
    """A regular frame handed out as it is sealed: its prefix first, then each piece's
    ciphertext as it comes, then its tag.

    Only for a frame known to be regular before its first byte is read: the prefix, which
    a final frame's differs from, goes out ahead of the ciphertext. A holder of that
    knowledge is `Encryptor.expect_length`.

    Its sequence number (the IV) is taken when it is made, possibly ahead of use; one made
    but never written to gives its number back to the final frame, which is safe because
    it encrypted nothing and was never tagged (`Encryptor.finish`).
    """

    __slots__ = ("_context", "prefix", "room")  # read per chunk, like the Encryptor's

    def __init__(self, cipher: FrameSealer, sequence_number: int, frame_length: int) -> None:
        self.prefix = REGULAR_PREFIX.pack(sequence_number, frame_iv(sequence_number))
        self.room = frame_length  # plaintext bytes it still takes
        self._context = cipher.begin_regular(sequence_number, frame_length)

    def write_into(self, plaintext: memoryview, target: memoryview) -> int:
        """Encrypt as much of `plaintext` as the frame takes into `target`; return how much."""
        take = min(len(plaintext), self.room)
        self._context.update_into(plaintext[:take], target[:take])
        self.room -= take
        return take

    def tag(self) -> bytes:
        if self.room:
            raise StateError("a regular frame is tagged only when full")
        self._context.finalize()
        return self._context.tag


class OpeningFrame:
    """A frame opened piece by piece as its bytes arrive, for one that straddles chunks.

    Each piece of ciphertext is decrypted on arrival, instead of being copied into a frame
    buffer to be opened in one call once whole. The plaintext pieces are held back, and
    handed out only once the tag that ends the frame has verified: before that, they are
    unauthenticated.
    """

    def __init__(
        self, sequence_number: int, context: AEADDecryptionContext, length: int, *, final: bool
    ) -> None:
        """`context` decrypts the frame's `length` bytes of ciphertext, its AAD given;
        `FrameOpener.begin_opening` makes one."""
        self.sequence_number = sequence_number
        self.final = final
        self._context = context
        self._ciphertext_left = length
        self._plaintext: list[bytes] = []
        self._tag = bytearray()

    @property
    def whole(self) -> bool:
        """Whether every byte of the frame, its tag included, has arrived."""
        return len(self._tag) == TAG_LENGTH

    def write(self, data: memoryview) -> memoryview:
        """Take as much of `data` as the frame still lacks; return the rest."""
        take = min(self._ciphertext_left, len(data))
        if take:
            self._plaintext.append(self._context.update(data[:take]))
            self._ciphertext_left -= take
            data = data[take:]
        take = min(TAG_LENGTH - len(self._tag), len(data))
        self._tag += data[:take]
        return data[take:]

    def open(self) -> list[bytes]:
        """The frame's plaintext, in pieces, once its tag has verified."""
        if not self.whole:
            raise StateError("a frame is opened only once all of it has arrived")
        try:
            self._context.finalize_with_tag(bytes(self._tag))
        except InvalidTag:
            raise FrameAuthenticationError(self.sequence_number) from None
        return self._plaintext
