"""Reading ahead: produce the next chunks on a thread while the current one is worked on.

A verify reads, decrypts and hashes every byte of an object; done one after the other,
the network and the CPU wait for each other. Socket reads and hashlib on large buffers
release the GIL, so a thread that reads (and decrypts) a few chunks ahead of the one
that hashes lets them overlap. Memory stays bounded: at most `depth` chunks wait in the
queue.
"""

import queue
import threading
from collections.abc import Iterator
from contextlib import suppress

from storage.base import Scoped

_DONE = object()


class ReadAhead(Scoped):
    """Iterates `chunks` on a thread of its own, at most `depth` chunks ahead of its reader.

    Use it as a context manager: leaving the block (also early, on an error) stops the
    thread and closes `chunks`. An error raised by `chunks` is raised to the reader, in
    order, after the chunks that came before it.
    """

    def __init__(self, chunks: Iterator[bytes], depth: int = 4) -> None:
        self._chunks = chunks
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._fetch, name="sealstream-read-ahead")
        self._thread.start()

    def __iter__(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            yield item

    def _leave(self) -> None:
        self._stopping.set()
        while self._thread.is_alive():
            with suppress(queue.Empty):  # unblock a fetcher waiting for room in the queue
                self._queue.get(timeout=0.1)
        self._thread.join()

    def _fetch(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(chunk):
                    return
            self._put(_DONE)
        except BaseException as error:  # handed to the reader, not lost on this thread
            self._put(error)
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        """Queue `item` unless the reader has gone; False once it has."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
