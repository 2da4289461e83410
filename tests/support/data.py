"""Data for the tests: reproducible pseudo-random bytes, whole or a chunk at a time,
plaintext marked so that its traces can be found, pieces and tallies of a stream, tar
archives made in memory, and copies of data with bits flipped or bytes overwritten."""

import hashlib
import io
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * KiB


def random_bytes(size: int, seed: int = 0) -> bytes:
    """`size` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def random_chunks(size: int, seed: int = 0, chunk_size: int = MiB) -> Iterator[bytes]:
    """`size` reproducible pseudo-random bytes, generated a chunk at a time."""
    rng = random.Random(seed)
    left = size
    while left:
        chunk = rng.randbytes(min(chunk_size, left))
        left -= len(chunk)
        yield chunk


MARKER_RECORD = 48  # bytes: a 16-byte marker then 32 random bytes


def marked_chunks(
    size: int,
    marker: bytes,
    seed: int = 0,
    chunk_size: int = MARKER_RECORD * (MiB // MARKER_RECORD),
) -> Iterator[bytes]:
    """`size` bytes of plaintext in which every 48-byte record starts with `marker`.

    Any 63-byte window of this plaintext holds the whole marker, so finding no marker in a
    file proves that no 64-byte window of the plaintext was written into it.
    """
    assert len(marker) == 16 and chunk_size % MARKER_RECORD == 0
    rng = random.Random(seed)
    left = size
    while left:
        records = -(-min(chunk_size, left) // MARKER_RECORD)
        noise = rng.randbytes(records * 32)
        chunk = b"".join(marker + noise[i : i + 32] for i in range(0, len(noise), 32))
        chunk = chunk[:left]
        left -= len(chunk)
        yield chunk


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    """`data` in pieces of `size` bytes."""
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


@dataclass
class Tally:
    """Counts and hashes the bytes of a stream as they go by."""

    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def through(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.size += len(chunk)
            self.digest.update(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        return str(self.digest.hexdigest())


def tar_archive(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar archive of `members`, made in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    """`data` with bit `bit` (0 = least significant) of byte `offset` inverted."""
    return overwrite(data, offset, bytes([data[offset] ^ (1 << bit)]))


def overwrite(data: bytes, offset: int, new: bytes) -> bytes:
    """`data` with `new` written over its bytes from `offset`."""
    return data[:offset] + new + data[offset + len(new) :]
