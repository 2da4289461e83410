"""The client's request bodies: a multipart/form-data encoder that reads its file part
from a source one piece at a time, so an upload of any size is never held whole.

A body whose source has a known size (bytes, or a regular file) has a known length, sent
as its Content-Length: the server then knows where the file ends and streams each
frame's ciphertext back as soon as it is sealed, where a chunked upload makes it hold
each frame until the next one starts. The source must then deliver exactly that many
bytes: a file that shrinks or grows while it is read fails the upload.

A regular file opened as Python opens one (`open(path, "rb")`) is handed to the
transport as a `FileSpan`, which it sends without reading it through the process; any
other source is read one piece at a time.
"""

import io
import json
import os
import stat
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, cast

from sealstream_client.errors import SourceChanged
from sealstream_client.transport import FileSpan

__all__ = ["MultipartBody", "Readable", "Source", "source_size"]

UPLOAD_CHUNK = 1024 * 1024  # bytes read from a source at a time


class Readable(Protocol):
    """A binary file opened for reading, or anything with its `read`."""

    def read(self, size: int = ..., /) -> bytes: ...


Source = Readable | Iterable[bytes] | bytes


class MultipartBody:
    """The pieces of a multipart/form-data body: `metadata` as JSON, then `source` (if
    any) as the `file` part, read one piece at a time. `bytes_sent` counts the bytes of
    `source` handed out so far; `length` is the whole body's, when `source`'s size is
    known (else None)."""

    def __init__(self, metadata: dict[str, Any], source: Source | None) -> None:
        self.boundary = uuid.uuid4().hex
        self._source = source
        self._source_size = None if source is None else source_size(source)
        self._opening = (
            (
                f"--{self.boundary}\r\n"
                'Content-Disposition: form-data; name="metadata"\r\n'
                "Content-Type: application/json\r\n\r\n"
            ).encode()
            + json.dumps(metadata).encode()
            + b"\r\n"
        )
        self._file_head = (
            f"--{self.boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="file"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self._closing = f"--{self.boundary}--\r\n".encode()
        self.bytes_sent = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def length(self) -> int | None:
        if self._source is None:
            return len(self._opening) + len(self._closing)
        if self._source_size is None:
            return None
        file_part = len(self._file_head) + self._source_size + len(b"\r\n")
        return len(self._opening) + file_part + len(self._closing)

    def __iter__(self) -> Iterator[bytes | FileSpan]:
        yield self._opening
        if self._source is not None:
            yield self._file_head
            yield from self._file_part(self._source)
            yield b"\r\n"
        yield self._closing

    def _file_part(self, source: Source) -> Iterator[bytes | FileSpan]:
        # Only a span of some bytes: sendfile refuses a count of 0 (an empty file, or
        # one read to its end), which then goes the way of any other source.
        if self._source_size and isinstance(source, _PLAIN_FILES):
            span = FileSpan(source, source.tell(), self._source_size)
            yield span
            self.bytes_sent += span.sent
            source.seek(span.offset + span.sent)
            _check_span(span)
            return
        pieces = _pieces(source)
        if self._source_size is not None:
            pieces = _exactly(pieces, self._source_size)
        for piece in pieces:
            self.bytes_sent += len(piece)
            yield piece


def source_size(source: Source) -> int | None:
    """The bytes `source` has left to read, if that is known: bytes, or a regular file
    (from its position); None for a pipe, a socket or an iterable."""
    if isinstance(source, bytes | bytearray):
        return len(source)
    if isinstance(source, memoryview):
        return source.nbytes
    try:
        descriptor = cast(Any, source).fileno()
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None
        position = os.lseek(descriptor, 0, os.SEEK_CUR)
    except (AttributeError, OSError, ValueError):
        return None
    if callable(getattr(source, "tell", None)):
        # A buffered file has read ahead of where its reader is.
        position = cast(Any, source).tell()
    return max(status.st_size - position, 0)


# Files as `open` makes them, whose bytes are those of the descriptor from their position:
# not a wrapper with a `read` of its own (which may transform or count what it reads).
_PLAIN_FILES = (io.BufferedReader, io.BufferedRandom, io.FileIO)


def _check_span(span: FileSpan) -> None:
    """The file held exactly the span's bytes: it neither ended early nor grew since."""
    if span.sent < span.count:
        raise SourceChanged(
            f"the input shrank while it was read ({span.sent} of {span.count} bytes)"
        )
    if os.fstat(span.file.fileno()).st_size > span.offset + span.count:
        raise SourceChanged(f"the input grew while it was read (past {span.count} bytes)")


def _exactly(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    """`pieces`, which must add up to `size` bytes: the length the body declared."""
    left = size
    for piece in pieces:
        if len(piece) > left:
            raise SourceChanged(f"the input grew while it was read (past {size} bytes)")
        left -= len(piece)
        yield piece
    if left:
        raise SourceChanged(f"the input shrank while it was read ({size - left} of {size} bytes)")


def _pieces(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        yield bytes(source)
        return
    if hasattr(source, "read"):
        readable = cast(Readable, source)
        read = getattr(readable, "read1", readable.read)
        while piece := read(UPLOAD_CHUNK):
            yield piece
        return
    for piece in source:
        if piece:
            yield bytes(piece)
