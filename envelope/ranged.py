"""Random access: which ciphertext bytes hold plaintext bytes [first, last], and their decrypt.

Every regular frame has the same length, so a message of known total length has a layout
that is pure arithmetic: `n` regular frames of `frame_length + 32` bytes after the header,
then one final frame of `length + 40` bytes, then, in a signed message, a footer: two
bytes of length and a DER signature. The signature's length varies (this package and the
reference Python SDK pad theirs to 103 bytes; other writers do not), so a signed
message's length leaves its layout open by up to two candidates (`MessageLayout.claims`):
where the final frame starts, which then says by its own length where the footer starts.
A plaintext range maps to a run of whole frames; `RangeDecryptor` authenticates each of
them and returns just the bytes asked for.

A stored message's length is whatever its store says, which anyone who can write the store
controls: a message cut at a frame boundary has a perfectly regular layout of its own. So
a length only says where the final frame should be. `FinalFrameCheck` reads the frame
found there, and only an authentic final frame, with the sequence number and length the
layout expects, makes the layout (its plaintext length, every frame's place) trustworthy.

A range of a signed message is authenticated frame by frame, as any range is, but its
footer's signature is not checked: that takes every byte of the message. The footer's
form is checked, and only a whole read checks its signature.
"""

import struct
from dataclasses import dataclass

from envelope.decrypt import FrameReader
from envelope.errors import (
    FooterMalformed,
    InvalidParameter,
    MessageFormatError,
    TrailingData,
    TruncatedMessage,
)
from envelope.footer import FOOTER_LENGTH, MAX_SIGNATURE_LENGTH, footer_signature_length
from envelope.frames import END_MARKER, FINAL_OVERHEAD, REGULAR_OVERHEAD, FrameOpener
from envelope.header import Header

_FINAL_START = struct.Struct(">II")  # a final frame's end marker and sequence number
_FOOTER_LENGTHS = range(2 + 1, 2 + MAX_SIGNATURE_LENGTH + 1)  # of any valid footer


@dataclass(frozen=True)
class FrameSpan:
    """The frames covering a plaintext range: ciphertext bytes [start, end) and trimming."""

    first_sequence_number: int
    start: int
    end: int
    skip: int  # plaintext bytes of the first frame before the range
    length: int  # plaintext bytes in the range
    final: bool  # whether the span ends with the message's final frame


@dataclass(frozen=True)
class MessageLayout:
    """Where every frame of a message lies."""

    header_length: int
    frame_length: int
    regular_frames: int
    final_frame_length: int
    footer_length: int = 0

    @classmethod
    def of(
        cls, header: Header, message_length: int, footer_length: int = FOOTER_LENGTH
    ) -> "MessageLayout":
        """The layout a message of `message_length` bytes that starts with `header` has,
        if that is its true length and, if signed, its footer is `footer_length` bytes
        long: only its final frame can say (`FinalFrameCheck`)."""
        footer_length = footer_length if header.signed else 0
        body = message_length - header.length - FINAL_OVERHEAD - footer_length
        if body < 0:
            raise TruncatedMessage("the message is too short to hold a final frame")
        stride = header.frame_length + REGULAR_OVERHEAD
        regular_frames, final_frame_length = divmod(body, stride)
        if final_frame_length > header.frame_length:
            raise MessageFormatError(f"no message with this header is {message_length} bytes long")
        return cls(
            header.length, header.frame_length, regular_frames, final_frame_length, footer_length
        )

    @classmethod
    def claims(cls, header: Header, message_length: int) -> list["MessageLayout"]:
        """The layouts a message of `message_length` bytes may have, one per place its
        final frame may start, the one with the footer this package writes first. For a
        signed message each footer length a P-384 signature allows gives one; they differ
        only in where the final frame starts (two places at most, frames being longer than
        any footer), and the final frame's own length says where the footer starts
        (`FinalFrameCheck`). Raises as `of` does with this package's footer if none fits."""
        footer_lengths = [FOOTER_LENGTH, *_FOOTER_LENGTHS] if header.signed else [0]
        claimed: list[MessageLayout] = []
        refusal: MessageFormatError | None = None
        for footer_length in footer_lengths:
            try:
                layout = cls.of(header, message_length, footer_length)
            except MessageFormatError as refused:
                refusal = refusal or refused
                continue
            if all(layout.final_frame[0] != other.final_frame[0] for other in claimed):
                claimed.append(layout)
        if not claimed:
            assert refusal is not None
            raise refusal
        return claimed

    @property
    def plaintext_length(self) -> int:
        return self.regular_frames * self.frame_length + self.final_frame_length

    @property
    def message_length(self) -> int:
        return self.final_frame[1] + self.footer_length

    @property
    def final_frame(self) -> tuple[int, int]:
        """The ciphertext bytes [start, end) of the final frame."""
        start = self._frame_start(self.regular_frames)
        return start, start + self._frame_size(self.regular_frames)

    @property
    def tail(self) -> tuple[int, int]:
        """The ciphertext bytes [start, end) of the final frame and the footer after it."""
        return self.final_frame[0], self.message_length

    def span(self, first: int, last: int) -> FrameSpan:
        """The frames that hold plaintext bytes `first` to `last`, both included."""
        if not 0 <= first <= last < self.plaintext_length:
            raise InvalidParameter(
                f"range {first}-{last} is outside the plaintext of {self.plaintext_length} bytes"
            )
        first_index = first // self.frame_length
        last_index = min(last // self.frame_length, self.regular_frames)
        return FrameSpan(
            first_sequence_number=first_index + 1,
            start=self._frame_start(first_index),
            end=self._frame_start(last_index) + self._frame_size(last_index),
            skip=first - first_index * self.frame_length,
            length=last - first + 1,
            final=last_index == self.regular_frames,
        )

    def _frame_start(self, index: int) -> int:
        return self.header_length + index * (self.frame_length + REGULAR_OVERHEAD)

    def _frame_size(self, index: int) -> int:
        if index < self.regular_frames:
            return self.frame_length + REGULAR_OVERHEAD
        return self.final_frame_length + FINAL_OVERHEAD


class FinalFrameCheck:
    """Authenticates the final frame of a message from the bytes where `claimed`, the
    layout its length gives, puts it and its footer if any (`claimed.tail`), fed in chunks
    of any size. A footer, whatever its length, must be as long as its signature length
    says; its signature is not checked (that takes the whole message).

    The frame's authenticated sequence number and length, with the authenticated header's
    frame length, fix the plaintext length and the message length; `layout()` gives that
    layout, and refuses unless the message length is the one claimed. Anything else where
    the final frame should be (a regular frame, part of one, a forged or foreign final
    frame, bytes after it) fails too: the message is not whole.
    """

    def __init__(self, cipher: FrameOpener, claimed: MessageLayout) -> None:
        self._cipher = cipher
        self._claimed = claimed
        self._start = bytearray()  # the frame's first bytes, until they hold its number
        self._frames: FrameReader | None = None
        self._plaintext_length = 0
        self._footer = bytearray()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        frames = self._frames
        if frames is None:
            take = _FINAL_START.size - len(self._start)
            self._start += data[:take]
            if len(self._start) < _FINAL_START.size:
                return
            frames = self._frames = self._reader(self._start)
            self._feed(frames, self._start)
            data = data[take:]
        self._feed(frames, data)

    def _feed(self, frames: FrameReader, data: bytes | bytearray | memoryview) -> None:
        plaintexts, rest = frames.feed_until_final(data)
        self._plaintext_length += sum(map(len, plaintexts))
        if rest and not self._claimed.footer_length:
            raise TrailingData("bytes follow the final frame")
        self._footer += rest
        if len(self._footer) > _FOOTER_LENGTHS[-1]:
            raise TrailingData("bytes follow the footer")

    def layout(self) -> MessageLayout:
        if self._frames is None or not self._frames.final_frame_read:
            raise TruncatedMessage("the message ends inside its final frame")
        claimed = self._claimed
        self._check_footer()
        regular_frames = self._frames.next_sequence_number - 2  # the final frame's, less one
        vouched = MessageLayout(
            claimed.header_length,
            claimed.frame_length,
            regular_frames,
            self._plaintext_length,
            len(self._footer),
        )
        if vouched.message_length != claimed.message_length:
            raise MessageFormatError(
                f"its final frame ends the message at byte {vouched.message_length}, "
                f"not at byte {claimed.message_length}"
            )
        return vouched

    def _check_footer(self) -> None:
        """A footer, if the message is signed, as long as its signature length says."""
        footer = self._footer
        if not self._claimed.footer_length:
            return
        if len(footer) < _FOOTER_LENGTHS[0]:
            raise TruncatedMessage("the message ends inside its footer")
        if 2 + footer_signature_length(footer) != len(footer):
            raise FooterMalformed("the footer is not as long as its signature length says")

    def _reader(self, start: bytes | bytearray) -> FrameReader:
        """A reader of the frame that `start` begins, if a final frame, by its own number:
        its tag authenticates that number, and `layout` compares what it implies."""
        marker, sequence_number = _FINAL_START.unpack_from(start)
        if marker != END_MARKER:
            raise MessageFormatError("no final frame where the message's length puts it")
        return FrameReader(self._cipher, self._claimed.frame_length, sequence_number)


class RangeDecryptor:
    """Decrypts the ciphertext bytes of one `FrameSpan`, returning only the range's plaintext.

    `cipher` comes from `open_message` on the message's header, so the header is
    authenticated too; every frame in the span is authenticated before its bytes return.
    A span that ends the message must end with its final frame, and one that does not
    must not: so `layout` should be one its final frame vouched for.
    """

    def __init__(self, cipher: FrameOpener, layout: MessageLayout, span: FrameSpan) -> None:
        self._frames = FrameReader(cipher, layout.frame_length, span.first_sequence_number)
        self._expected = span.end - span.start
        self._received = 0
        self._skip = span.skip
        self._remaining = span.length
        self._final = span.final

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._received += len(data)
        if self._received > self._expected:
            raise InvalidParameter("more bytes than the span holds")
        out = []
        for plaintext in self._frames.feed(data):
            piece = plaintext[self._skip : self._skip + self._remaining]
            self._skip = max(0, self._skip - len(plaintext))
            self._remaining -= len(piece)
            if piece:
                out.append(piece)
        return out

    def finish(self) -> None:
        if self._received != self._expected or self._remaining:
            raise TruncatedMessage("the span ended before its last frame")
        if self._frames.final_frame_read != self._final:
            raise MessageFormatError("the span's last frame is not where the message ends")
