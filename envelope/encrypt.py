"""Streaming encryption: plaintext chunks of any size in, message bytes out frame by frame.

Regular frames are sealed as soon as a full frame of plaintext is in hand, straight from
the caller's buffer when it holds one. Otherwise the plaintext is copied once, into the
payload area of the frame that will carry it, and sealed there in place. `finish` seals
the final frame, which holds the last 0 to frame-length bytes (0 when the plaintext is a
whole number of frames, as the reference SDK writes it).
"""

from collections.abc import Sequence

from envelope.context import EncryptionContext
from envelope.errors import InvalidParameter, StateError
from envelope.frames import MAX_SEQUENCE_NUMBER, REGULAR_OVERHEAD, REGULAR_PREFIX
from envelope.header import Header
from envelope.keyrings.base import Keyring
from envelope.message import DEFAULT_FRAME_LENGTH, new_message


class Encryptor:
    """Encrypts one message.

    `update` and `finish` return lists of fresh buffers that the caller owns; written out
    in order, the header (in the first list) and then the frames make the whole message.
    """

    def __init__(
        self,
        keyrings: Sequence[Keyring],
        *,
        context: EncryptionContext | None = None,
        frame_length: int = DEFAULT_FRAME_LENGTH,
    ) -> None:
        self.header: Header
        self.header, self._cipher = new_message(keyrings, context or {}, frame_length)
        self.frame_length = frame_length
        self.plaintext_length = 0
        self._frame = bytearray()  # the frame being filled, allocated when first needed
        self._filled = 0  # plaintext bytes already in `_frame`
        self._sequence_number = 1
        self._header_written = False
        self._finished = False

    def update(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        """Take more plaintext; return the message bytes that are now complete."""
        if self._finished:
            raise StateError("the encryptor has finished")
        out = self._header_once()
        view = memoryview(data).cast("B")
        self.plaintext_length += len(view)
        frame_length = self.frame_length
        if self._filled:
            view = self._fill(view)
            if self._filled < frame_length:
                return out
            out.append(self._seal_filled())
        while len(view) >= frame_length:
            out.append(self._seal(view[:frame_length], final=False))
            view = view[frame_length:]
        self._fill(view)
        return out

    def finish(self) -> list[bytearray]:
        """Seal the final frame; return the last message bytes."""
        if self._finished:
            raise StateError("the encryptor has finished")
        out = self._header_once()
        pending = memoryview(self._frame)[REGULAR_PREFIX.size : REGULAR_PREFIX.size + self._filled]
        out.append(self._seal(pending, final=True))
        self._frame = bytearray()
        self._finished = True
        return out

    def _fill(self, view: memoryview) -> memoryview:
        """Copy as much of `view` as the frame being filled takes; return the rest."""
        take = min(len(view), self.frame_length - self._filled)
        if take and not self._frame:
            self._frame = bytearray(REGULAR_OVERHEAD + self.frame_length)
        start = REGULAR_PREFIX.size + self._filled
        self._frame[start : start + take] = view[:take]
        self._filled += take
        return view[take:]

    def _seal_filled(self) -> bytearray:
        """Seal the full frame in place and hand it over; start the next one."""
        sequence_number = self._next_regular_sequence_number()
        frame, self._frame, self._filled = self._frame, bytearray(), 0
        return self._cipher.seal_in_place(sequence_number, frame)

    def _header_once(self) -> list[bytearray]:
        if self._header_written:
            return []
        self._header_written = True
        return [bytearray(self.header.to_bytes())]

    def _seal(self, plaintext: memoryview, *, final: bool) -> bytearray:
        if final:
            sequence_number = self._sequence_number
            self._sequence_number += 1
        else:
            sequence_number = self._next_regular_sequence_number()
        return self._cipher.seal(sequence_number, plaintext, final=final)

    def _next_regular_sequence_number(self) -> int:
        sequence_number = self._sequence_number
        # A regular frame may not take the last number: the final frame needs one.
        if sequence_number >= MAX_SEQUENCE_NUMBER:
            raise InvalidParameter("the plaintext is too long for one message at this frame length")
        self._sequence_number += 1
        return sequence_number
