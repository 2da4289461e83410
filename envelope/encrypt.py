"""Streaming encryption: plaintext chunks of any size in, message bytes out frame by frame.

Each chunk is encrypted as it comes, straight into the frame that will carry it
(`PendingFrame`), so the plaintext is read once and never copied; a whole frame found in
the caller's buffer is sealed from there in one call. A frame is handed over once full;
`finish` seals the final frame, which holds the last 0 to frame-length bytes (0 when the
plaintext is a whole number of frames, as the reference SDK writes it). A caller done
with a regular frame may `recycle` it: the next frame is sealed into that buffer.

A frame is held until full because only then is it known not to be the final one, whose
prefix differs. A caller that knows more may say so: after `expect_length(n)`, the frames
that end within `n` bytes go out as they are sealed, each chunk's ciphertext with the
prefixes and tags around it, and only the frames after them are held.

A signed message (`signed=True`, suite 0x0578) is hashed as it is handed out, every
byte of it, and `finish` ends it with the footer that signs them (`envelope.footer`).
"""

from collections import deque
from collections.abc import Sequence

from envelope.context import EncryptionContext
from envelope.errors import InvalidParameter, PlaintextTooShort, StateError
from envelope.footer import FooterSigner
from envelope.frames import (
    MAX_SEQUENCE_NUMBER,
    REGULAR_OVERHEAD,
    REGULAR_PREFIX,
    PendingFrame,
    StreamedFrame,
)
from envelope.header import Header
from envelope.keyrings.base import Keyring
from envelope.message import DEFAULT_FRAME_LENGTH, Endorse, new_message
from envelope.suite import TAG_LENGTH

Piece = bytearray | memoryview  # of the message, handed out by an `Encryptor`

# Streamed frames are started this many at a time, within the promised length. Made at
# each frame's edge, right after a chunk was sealed, an AES-GCM context finds the code and
# tables it needs evicted from the CPU's caches, and costs several times what it does when
# made in a row with others.
FRAMES_AHEAD = 16


class Encryptor:
    """Encrypts one message.

    `update` and `finish` return lists of buffers that the caller owns until it gives
    them back (`recycle`); written out in order, the header (in the first list) and then
    the frames make the whole message.
    """

    # Streamed, the encryptor's state is read for every chunk, by when it has gone cold in
    # the CPU's caches: slots keep it in the object itself rather than in a dict.
    __slots__ = (
        "_cipher",
        "_finished",
        "_frame",
        "_header_written",
        "_lent",
        "_ready",
        "_sequence_number",
        "_signer",
        "_spare",
        "_spare_stream",
        "_streamed",
        "_streamed_until",
        "frame_length",
        "header",
        "plaintext_length",
    )

    def __init__(
        self,
        keyrings: Sequence[Keyring],
        *,
        context: EncryptionContext | None = None,
        frame_length: int = DEFAULT_FRAME_LENGTH,
        signed: bool = False,
        endorse: Endorse | None = None,
    ) -> None:
        """`signed`: a signed message (suite 0x0578). `endorse`: see `new_message`."""
        self._signer = FooterSigner() if signed else None
        self.header: Header
        self.header, self._cipher = new_message(
            keyrings, context or {}, frame_length, signer=self._signer, endorse=endorse
        )
        self.frame_length = frame_length
        self.plaintext_length = 0
        self._frame: PendingFrame | None = None  # started when its first byte comes
        self._streamed: StreamedFrame | None = None  # likewise, while frames are streamed
        self._streamed_until = 0  # the end of the last frame streamed: a whole number of frames
        self._ready: deque[StreamedFrame] = deque()  # streamed frames started ahead
        self._spare: bytearray | None = None  # a recycled frame, for the next one
        self._lent: bytearray | None = None  # under the last streamed piece handed out
        self._spare_stream: bytearray | None = None  # that, given back, for the next one
        self._sequence_number = 1  # the pending frame's, or the next one's
        self._header_written = False
        self._finished = False

    def update(self, data: bytes | bytearray | memoryview) -> list[Piece]:
        """Take more plaintext; return the message bytes that are now complete (whole
        frames, or pieces of streamed ones: see `expect_length`)."""
        view = memoryview(data).cast("B")
        frame = self._streamed
        if frame is not None and 0 < len(view) < frame.room:
            # Inside a streamed frame, as most chunks are: the short way, since every
            # microsecond spent per chunk shows in a stream's speed.
            out = self._stream_buffer(len(view))
            frame.write_into(view, out)
            self.plaintext_length += len(view)
            if self._signer is not None:
                self._signer.update(out)
            return [out]
        return self._signed(self._update(view))

    def _signed(self, pieces: list[Piece]) -> list[Piece]:
        """`pieces`, hashed into the footer's digest if the message is signed."""
        if self._signer is not None:
            for piece in pieces:
                self._signer.update(piece)
        return pieces

    def _update(self, view: memoryview) -> list[Piece]:
        if self._finished:
            raise StateError("the encryptor has finished")
        out: list[Piece] = [*self._header_once()]
        if self.plaintext_length < self._streamed_until and view:
            streamed = self._streamed_until - self.plaintext_length
            if len(view) <= streamed:
                out.append(self._stream(view))
                return out
            out.append(self._stream(view[:streamed]))
            view = view[streamed:]
        self.plaintext_length += len(view)
        while view:
            if self._frame is None and len(view) >= self.frame_length:
                # A whole frame in the caller's buffer: sealed in one call, the cheapest way.
                out.append(self._seal_whole(view[: self.frame_length]))
                view = view[self.frame_length :]
                continue
            frame = self._frame or self._start_frame()
            view = frame.write(view)
            if frame.full:
                self._frame = None
                out.append(self._seal_regular(frame))
        return out

    def finish(self) -> list[Piece]:
        """Seal the final frame; return the last message bytes."""
        if self._finished:
            raise StateError("the encryptor has finished")
        if self._streamed is not None:
            self._finished = True
            self._streamed = None
            raise PlaintextTooShort(
                f"the plaintext ended after {self.plaintext_length} bytes, inside a frame "
                "already handed out as a regular one"
            )
        out: list[Piece] = [*self._header_once()]
        if self._frame is not None:
            # The pending frame's regular tag is never made: see `PendingFrame.seal_final`.
            out.append(self._frame.seal_final())
        else:
            # Ended at a streamed frame's edge: the frames started after it were never
            # written to, and the final frame takes the first of their sequence numbers.
            # Their contexts encrypted nothing and are never tagged, so the final frame is
            # the only sealing under that IV that anything comes out of.
            self._sequence_number -= len(self._ready)
            self._ready.clear()
            out.append(self._cipher.seal(self._sequence_number, memoryview(b""), final=True))
        self._frame = None
        self._finished = True
        self._signed(out)
        if self._signer is not None:
            out.append(bytearray(self._signer.footer()))
        return out

    def expect_length(self, at_least: int) -> None:
        """Say, before any plaintext, that it will be at least `at_least` bytes long.

        The regular frames that end within that length are then handed out as they are
        sealed (each `update` returns one buffer for them) rather than held until full;
        the frames after them are held as usual. If the plaintext ends inside one of the
        frames handed out, `finish` raises `PlaintextTooShort`: a frame announced as
        regular cannot become the final one, so what was handed out is no message, and a
        caller streaming it must abort. Ending anywhere else still makes a whole message.
        """
        if self.plaintext_length or self._finished:
            raise StateError("a length is promised before any plaintext")
        if at_least < 0:
            raise InvalidParameter("a promised length cannot be negative")
        self._streamed_until = at_least - at_least % self.frame_length

    def recycle(self, frame: bytearray | memoryview) -> None:
        """Give back a regular frame that `update` returned, once nothing will read it
        again (it has been copied or written out): the next regular frame is sealed into
        it, whether piece by piece or whole from the caller's buffer.
        Likewise a streamed piece (see `expect_length`): the next one is written into it.

        That saves allocating and zeroing a frame's worth of memory per frame, and the
        buffer is likely still in the CPU's cache, which matters where memory bandwidth
        bounds a stream. A buffer of another length (the header, a final frame) is ignored.
        """
        if isinstance(frame, memoryview):
            if self._lent is not None and frame.obj is self._lent:
                self._spare_stream, self._lent = self._lent, None
            return
        if self._frame is not None and self._frame.seals_into(frame):
            raise StateError("that buffer holds the frame being sealed: recycled twice?")
        if len(frame) == REGULAR_OVERHEAD + self.frame_length:
            self._spare = frame

    def _stream(self, plaintext: memoryview) -> memoryview:
        """`plaintext`, which lies within the streamed frames, encrypted in one buffer with
        the prefixes of the frames it starts and the tags of those it ends."""
        self.plaintext_length += len(plaintext)
        # Room for every prefix and tag a piece this long can meet.
        out = self._stream_buffer(
            len(plaintext) + REGULAR_OVERHEAD * (len(plaintext) // self.frame_length + 2)
        )
        written = 0
        while plaintext:
            frame = self._streamed
            if frame is None:
                frame = self._streamed = self._next_streamed_frame()
                out[written : written + REGULAR_PREFIX.size] = frame.prefix
                written += REGULAR_PREFIX.size
            took = frame.write_into(plaintext, out[written:])
            written += took
            plaintext = plaintext[took:]
            if not frame.room:
                out[written : written + TAG_LENGTH] = frame.tag()
                written += TAG_LENGTH
                self._streamed = None
        return out[:written]

    def _next_streamed_frame(self) -> StreamedFrame:
        """The next streamed frame, started in a batch of up to `FRAMES_AHEAD` with those
        after it, all within the promised length. They take their sequence numbers now,
        in order; a plaintext that ends early at a frame's edge gives back the unused ones
        (`finish`)."""
        if not self._ready:
            streamed_frames = self._streamed_until // self.frame_length
            count = min(FRAMES_AHEAD, streamed_frames - self._sequence_number + 1)
            self._ready.extend(
                StreamedFrame(self._cipher, self._next_regular_sequence_number(), self.frame_length)
                for _ in range(count)
            )
        return self._ready.popleft()

    def _stream_buffer(self, size: int) -> memoryview:
        """`size` bytes to write a streamed piece into: the last piece's buffer, if it was
        given back and is large enough (chunks of a stream tend to be alike in size)."""
        buffer, self._spare_stream = self._spare_stream, None
        if buffer is None or len(buffer) < size:
            buffer = bytearray(size)
        self._lent = buffer
        return memoryview(buffer)[:size]

    def _start_frame(self) -> PendingFrame:
        spare, self._spare = self._spare, None
        self._frame = PendingFrame(self._cipher, self._sequence_number, self.frame_length, spare)
        return self._frame

    def _seal_whole(self, plaintext: memoryview) -> bytearray:
        sequence_number = self._next_regular_sequence_number()
        spare, self._spare = self._spare, None
        return self._cipher.seal(sequence_number, plaintext, final=False, into=spare)

    def _seal_regular(self, frame: PendingFrame) -> bytearray:
        self._next_regular_sequence_number()
        return frame.seal_regular()

    def _next_regular_sequence_number(self) -> int:
        # Every regular frame's IV comes from here, once: numbers only rise.
        sequence_number = self._sequence_number
        # A regular frame may not take the last number: the final frame needs one.
        if sequence_number >= MAX_SEQUENCE_NUMBER:
            raise InvalidParameter("the plaintext is too long for one message at this frame length")
        self._sequence_number += 1
        return sequence_number

    def _header_once(self) -> list[bytearray]:
        if self._header_written:
            return []
        self._header_written = True
        return [bytearray(self.header.to_bytes())]
