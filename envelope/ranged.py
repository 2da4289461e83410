"""Random access: which ciphertext bytes hold plaintext bytes [first, last], and their decrypt.

Every regular frame has the same length, so a message of known total length has a layout
that is pure arithmetic: `n` regular frames of `frame_length + 32` bytes after the header,
then one final frame of `length + 40` bytes. A plaintext range maps to a run of whole
frames; `RangeDecryptor` authenticates each of them and returns just the bytes asked for.
"""

from dataclasses import dataclass

from envelope.decrypt import FrameReader
from envelope.errors import InvalidParameter, MessageFormatError, TruncatedMessage
from envelope.frames import FINAL_OVERHEAD, REGULAR_OVERHEAD, FrameCipher
from envelope.header import Header


@dataclass(frozen=True)
class FrameSpan:
    """The frames covering a plaintext range: ciphertext bytes [start, end) and trimming."""

    first_sequence_number: int
    start: int
    end: int
    skip: int  # plaintext bytes of the first frame before the range
    length: int  # plaintext bytes in the range


@dataclass(frozen=True)
class MessageLayout:
    """Where every frame of a message lies."""

    header_length: int
    frame_length: int
    regular_frames: int
    final_frame_length: int

    @classmethod
    def of(cls, header: Header, message_length: int) -> "MessageLayout":
        """The layout of a message of `message_length` bytes that starts with `header`."""
        body = message_length - header.length - FINAL_OVERHEAD
        if body < 0:
            raise TruncatedMessage("the message is too short to hold a final frame")
        stride = header.frame_length + REGULAR_OVERHEAD
        regular_frames, final_frame_length = divmod(body, stride)
        if final_frame_length > header.frame_length:
            raise MessageFormatError(f"no message with this header is {message_length} bytes long")
        return cls(header.length, header.frame_length, regular_frames, final_frame_length)

    @property
    def plaintext_length(self) -> int:
        return self.regular_frames * self.frame_length + self.final_frame_length

    @property
    def message_length(self) -> int:
        stride = self.frame_length + REGULAR_OVERHEAD
        return (
            self.header_length
            + self.regular_frames * stride
            + FINAL_OVERHEAD
            + (self.final_frame_length)
        )

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
        )

    def _frame_start(self, index: int) -> int:
        return self.header_length + index * (self.frame_length + REGULAR_OVERHEAD)

    def _frame_size(self, index: int) -> int:
        if index < self.regular_frames:
            return self.frame_length + REGULAR_OVERHEAD
        return self.final_frame_length + FINAL_OVERHEAD


class RangeDecryptor:
    """Decrypts the ciphertext bytes of one `FrameSpan`, returning only the range's plaintext.

    `cipher` comes from `open_message` on the message's header, so the header is
    authenticated too; every frame in the span is authenticated before its bytes return.
    """

    def __init__(self, cipher: FrameCipher, layout: MessageLayout, span: FrameSpan) -> None:
        self._frames = FrameReader(cipher, layout.frame_length, span.first_sequence_number)
        self._expected = span.end - span.start
        self._received = 0
        self._skip = span.skip
        self._remaining = span.length

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
