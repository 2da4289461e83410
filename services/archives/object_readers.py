"""An object in storage read as a file, never downloaded whole: front to back through
ranged reads of a few MiB each (`ObjectReader`), or seekably, each read fetching just the
range it asks for (`RangedObject`)."""

import io
from collections.abc import Generator
from typing import TYPE_CHECKING

from storage import ObjectStore

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

WINDOW = 8 << 20  # bytes per ranged read of a front-to-back read
READ_AHEAD = 64 << 10  # zip headers are small: fetch this much around each


class ObjectReader(io.RawIOBase):
    """An object's bytes front to back, one ranged read per window, so that no request
    stays open for the whole of a long job."""

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        self.position = 0
        self._chunks = _windows(store, key, size)
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(self._chunk))
        view[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        self.position += count
        return count

    def close(self) -> None:
        self._chunks.close()  # releases the connection of a read cut short
        super().close()


def _windows(store: ObjectStore, key: str, size: int) -> Generator[bytes, None, None]:
    for start in range(0, size, WINDOW):
        yield from store.read(key, start, min(start + WINDOW, size))


class RangedObject(io.RawIOBase):
    """A seekable view of an object: each read fetches just the range it asks for."""

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        self._store, self._key, self.size = store, key, size
        self._position = 0
        self.furthest = 0  # the end of the furthest range fetched

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: "WriteableBuffer") -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._position + len(view), self.size)
        if end <= self._position:
            return 0
        data = b"".join(self._store.read(self._key, self._position, end))
        view[: len(data)] = data
        self._position = end
        self.furthest = max(self.furthest, end)
        return len(data)
