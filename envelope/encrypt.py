"""Streaming encryption: plaintext chunks of any size in, message bytes out frame by frame.

Regular frames are sealed as soon as a full frame of plaintext is in hand, straight from
the caller's buffer when it holds one; only the tail of a chunk is copied. `finish` seals
the final frame, which holds the last 0 to frame-length bytes (0 when the plaintext is a
whole number of frames, as the reference SDK writes it).
"""

from collections.abc import Sequence

from envelope.context import EncryptionContext
from envelope.errors import InvalidParameter, StateError
from envelope.frames import MAX_SEQUENCE_NUMBER
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
        self._pending = bytearray()
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
        if self._pending:
            fill = frame_length - len(self._pending)
            self._pending += view[:fill]
            view = view[fill:]
            if len(self._pending) < frame_length:
                return out
            out.append(self._seal(memoryview(self._pending), final=False))
            self._pending = bytearray()
        while len(view) >= frame_length:
            out.append(self._seal(view[:frame_length], final=False))
            view = view[frame_length:]
        self._pending += view
        return out

    def finish(self) -> list[bytearray]:
        """Seal the final frame; return the last message bytes."""
        if self._finished:
            raise StateError("the encryptor has finished")
        out = self._header_once()
        out.append(self._seal(memoryview(self._pending), final=True))
        self._pending = bytearray()
        self._finished = True
        return out

    def _header_once(self) -> list[bytearray]:
        if self._header_written:
            return []
        self._header_written = True
        return [bytearray(self.header.to_bytes())]

    def _seal(self, plaintext: memoryview, *, final: bool) -> bytearray:
        sequence_number = self._sequence_number
        # A regular frame may not take the last number: the final frame needs one.
        if sequence_number >= MAX_SEQUENCE_NUMBER and not final:
            raise InvalidParameter("the plaintext is too long for one message at this frame length")
        self._sequence_number += 1
        return self._cipher.seal(sequence_number, plaintext, final=final)
