"""The plaintext digest of an object sealed by a resumable upload: a chain of SHA-256s
over its frames, since a resumed stream cannot carry one SHA-256 state from a request
(or a process) to the next, while a chain value of 32 bytes can (docs/FORMAT.md).

    c_0 = 32 zero bytes
    c_i = SHA-256(c_(i-1) || SHA-256(p_i))      for i = 1 .. n
    digest = hex(c_n)

where p_1 .. p_n are the plaintexts of the message's frames in order, the final frame's
included even when it is empty: n = length // frame length + 1. Anyone holding the
plaintext and the frame length recomputes it in one pass.
"""

import hashlib

CHAIN_START = bytes(32)


def chain_step(value: bytes, frame_digest: bytes) -> bytes:
    """The chain value once the frame whose plaintext's SHA-256 is `frame_digest` follows
    `value`."""
    return hashlib.sha256(value + frame_digest).digest()


class FrameChain:
    """The chain of a plaintext fed in chunks of any size, as `hashlib` objects are fed."""

    def __init__(self, frame_length: int) -> None:
        self._frame_length = frame_length
        self._value = CHAIN_START
        self._frame = hashlib.sha256()
        self._in_frame = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            taken = view[: self._frame_length - self._in_frame]
            self._frame.update(taken)
            self._in_frame += len(taken)
            view = view[len(taken) :]
            if self._in_frame == self._frame_length:
                self._fold()

    def hexdigest(self) -> str:
        """The digest of the plaintext so far, taken as whole: what is fed since the last
        full frame (perhaps nothing) is its final frame."""
        return chain_step(self._value, self._frame.digest()).hex()

    def _fold(self) -> None:
        self._value = chain_step(self._value, self._frame.digest())
        self._frame = hashlib.sha256()
        self._in_frame = 0
