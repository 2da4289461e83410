"""Streaming decryption: message bytes in chunks of any size in, verified plaintext out.

Nothing is returned before the tag that covers it has verified: the header must
authenticate (and the key commitment match) before any frame is read, and each frame's
plaintext is released only after its own tag verifies. A message is complete only when
its final frame has been read, and, if it is signed, its footer has verified over every
byte before it; `finish` raises otherwise. So the plaintext of a signed message is
handed out before its signature is checked, frame by frame as each tag verifies: a
stream is the message's only once it has ended cleanly.

`FrameReader` is the frame half on its own, so a ranged read can start at any frame.
`BodyReader` is the frames and the footer, for a message whose header was opened apart.
`start_decryption` takes over a message whose header was read apart, to find its keys.
"""

import struct
from collections.abc import Mapping, Sequence

from envelope.errors import (
    FrameSequenceError,
    MessageFormatError,
    StateError,
    TrailingData,
    TruncatedMessage,
)
from envelope.footer import FooterVerifier, public_key_from_context
from envelope.frames import (
    END_MARKER,
    FINAL_OVERHEAD,
    FINAL_PREFIX,
    MAX_SEQUENCE_NUMBER,
    REGULAR_OVERHEAD,
    REGULAR_PREFIX,
    FrameOpener,
    OpeningFrame,
)
from envelope.header import DEFAULT_LIMITS, PUBLIC_KEY_CONTEXT_KEY, Header, HeaderReader, Limits
from envelope.keyrings.base import Keyring
from envelope.message import OpenedMessage, open_message

_U32 = struct.Struct(">I")


class FrameReader:
    """Opens consecutive frames, starting at `first_sequence_number`, from chunked bytes.

    A frame that lies whole inside a chunk is opened in place, in one call. One that
    straddles chunks is opened piece by piece as its bytes arrive (`OpeningFrame`), so only
    its prefix, a few bytes, is ever copied.
    """

    def __init__(self, cipher: FrameOpener, frame_length: int, first_sequence_number: int = 1):
        self._cipher = cipher
        self._frame_length = frame_length
        self._prefix = bytearray()  # of the next frame, while it arrives
        self._opening: OpeningFrame | None = None
        self.next_sequence_number = first_sequence_number
        self.final_frame_read = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Plaintexts of the frames `data` completes; raises on any bad frame, and on
        bytes after the final frame."""
        out, rest = self.feed_until_final(data)
        if rest:
            raise TrailingData("bytes follow the final frame")
        return out

    def feed_until_final(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[bytes], memoryview]:
        """Plaintexts of the frames `data` completes, and what of `data` follows the
        final frame (a signed message's footer); raises on any bad frame."""
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        while view and not self.final_frame_read:
            if self._opening is not None:
                view = self._opening.write(view)
                if self._opening.whole:
                    out.extend(self._opening.open())
                    self._advance(final=self._opening.final)
                    self._opening = None
            elif not self._prefix and len(view) >= (needed := self._unit_length(view)):
                out.append(self._open(view[:needed]))
                view = view[needed:]
            else:
                view = self._read_prefix(view)
        return out, view

    def _read_prefix(self, view: memoryview) -> memoryview:
        """Move bytes of the next frame's prefix from `view`; once it is whole, begin
        opening the frame. Returns what is left of `view`."""
        while view and len(self._prefix) < (size := self._prefix_size()):
            take = min(size - len(self._prefix), len(view))
            self._prefix += view[:take]
            view = view[take:]
        if len(self._prefix) == self._prefix_size():
            final = _is_final(self._prefix)
            overhead = FINAL_OVERHEAD if final else REGULAR_OVERHEAD
            length = self._unit_length(self._prefix) - overhead
            self._check_room(final)
            self._opening = self._cipher.begin_opening(
                self.next_sequence_number, bytes(self._prefix), length, final=final
            )
            self._prefix.clear()
        return view

    def _prefix_size(self) -> int:
        if len(self._prefix) < 4:
            return 4
        return FINAL_PREFIX.size if _is_final(self._prefix) else REGULAR_PREFIX.size

    def _unit_length(self, head: bytes | bytearray | memoryview) -> int:
        """The frame's full length once `head` holds enough of it to tell, else a lower bound.

        Sequence numbers and the final frame's length are checked here, as soon as they
        arrive, so a bad stream fails before a whole frame of it is read.
        """
        if len(head) < 4:
            return 4
        if not _is_final(head):
            self._check_sequence(_U32.unpack_from(head, 0)[0])
            return REGULAR_OVERHEAD + self._frame_length
        if len(head) < FINAL_PREFIX.size:
            return FINAL_PREFIX.size
        _, sequence_number, _, length = FINAL_PREFIX.unpack_from(head, 0)
        self._check_sequence(int(sequence_number))
        if length > self._frame_length:
            raise MessageFormatError(
                f"the final frame claims {length} bytes, more than the frame length"
            )
        return FINAL_OVERHEAD + int(length)

    def _check_sequence(self, sequence_number: int) -> None:
        if sequence_number != self.next_sequence_number:
            raise FrameSequenceError(
                f"expected frame {self.next_sequence_number}, found frame {sequence_number}"
            )

    def _check_room(self, final: bool) -> None:
        """Only the final frame may take the last sequence number the format has."""
        if not final and self.next_sequence_number >= MAX_SEQUENCE_NUMBER:
            raise FrameSequenceError("the message has more frames than the format allows")

    def _open(self, frame: memoryview) -> bytes:
        final = _is_final(frame)
        self._check_room(final)
        plaintext = self._cipher.open(self.next_sequence_number, frame, final=final)
        self._advance(final=final)
        return plaintext

    def _advance(self, *, final: bool) -> None:
        self.next_sequence_number += 1
        self.final_frame_read = final


def _is_final(head: bytes | bytearray | memoryview) -> bool:
    return bool(_U32.unpack_from(head, 0)[0] == END_MARKER)


class BodyReader:
    """The body of a message whose header has authenticated (`opened`): its frames, and,
    for a signed message, its footer, whose signature is checked over the header and
    every frame. Each plaintext handed out has passed its frame's tag; `finish` passes
    only once the final frame has been read and, if signed, the footer has verified."""

    def __init__(self, opened: OpenedMessage) -> None:
        header = opened.header
        self.frames = FrameReader(opened.cipher, header.frame_length)
        self._footer: FooterVerifier | None = None
        if header.signed:
            public_key = public_key_from_context(header.context[PUBLIC_KEY_CONTEXT_KEY])
            self._footer = FooterVerifier(public_key)
            self._footer.update(header.to_bytes())

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Plaintexts of the frames `data` completes; raises on any bad frame or footer."""
        footer = self._footer
        if footer is None:
            return self.frames.feed(data)
        view = memoryview(data).cast("B")
        out: list[bytes] = []
        if not self.frames.final_frame_read:
            out, rest = self.frames.feed_until_final(view)
            footer.update(view[: len(view) - len(rest)])
            view = rest
        if self.frames.final_frame_read:
            footer.feed_footer(view)
        return out

    def finish(self) -> None:
        """Raise unless the whole body, and its footer if signed, has been read."""
        if not self.frames.final_frame_read:
            raise TruncatedMessage("the message ended before its final frame")
        if self._footer is not None and not self._footer.verified:
            raise TruncatedMessage("the signed message ended before its footer was whole")


class Decryptor:
    """Decrypts one message with whichever of `keyrings` unwraps one of its data keys.

    `required_context` pairs must all be in the message's encryption context. After any
    error the decryptor is spent: further calls raise `StateError`.
    """

    def __init__(
        self,
        keyrings: Sequence[Keyring],
        *,
        required_context: Mapping[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._keyrings = tuple(keyrings)
        self._required_context = dict(required_context or {})
        self._header_reader = HeaderReader(limits)
        self._body: BodyReader | None = None
        self._failed = False
        self._finished = False
        self.plaintext_length = 0
        self.keyring: Keyring | None = None  # the keyring that opened the message

    @property
    def header(self) -> Header | None:
        """The authenticated header, once it has been read."""
        return self._header_reader.header if self._body is not None else None

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take more ciphertext; return the plaintext of every frame it completes."""
        if self._failed or self._finished:
            raise StateError("the decryptor has finished or failed")
        try:
            plaintexts = self._update(data)
        except BaseException:
            self._failed = True
            raise
        self.plaintext_length += sum(len(p) for p in plaintexts)
        return plaintexts

    def finish(self) -> None:
        """Declare the input complete; raises `TruncatedMessage` if the final frame is missing."""
        if self._failed or self._finished:
            raise StateError("the decryptor has finished or failed")
        self._finished = True
        if self._body is None:
            raise TruncatedMessage("the message ended before its final frame")
        self._body.finish()

    def _update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._body is None:
            header = self._header_reader.feed(data)
            if header is None:
                return []
            opened = open_message(header, self._keyrings, self._required_context)
            self.keyring = opened.keyring
            self._body = BodyReader(opened)
            data = self._header_reader.remainder
        return self._body.feed(data)


def start_decryption(
    header: Header,
    remainder: bytes,
    keyrings: Sequence[Keyring],
    *,
    required_context: Mapping[str, str] | None = None,
) -> tuple[Decryptor, list[bytes]]:
    """Decrypt a message whose header was read before its keys were known: a decryptor
    fed the header and `remainder`, the bytes read after it, and the plaintext of the
    frames those complete. The header is authenticated here, as any decryptor does."""
    decryptor = Decryptor(keyrings, required_context=required_context)
    return decryptor, decryptor.update(header.to_bytes() + remainder)
