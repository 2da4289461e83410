"""The client's request bodies: a multipart/form-data encoder that reads its file part
from a source one piece at a time, so an upload of any size is never held whole."""

import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, cast

__all__ = ["MultipartBody", "Readable", "Source"]

UPLOAD_CHUNK = 1024 * 1024  # bytes read from a source at a time


class Readable(Protocol):
    """A binary file opened for reading, or anything with its `read`."""

    def read(self, size: int = ..., /) -> bytes: ...


Source = Readable | Iterable[bytes] | bytes


class MultipartBody:
    """The pieces of a multipart/form-data body: `metadata` as JSON, then `source` (if
    any) as the `file` part, read one piece at a time. `bytes_sent` counts the bytes of
    `source` handed out so far."""

    def __init__(self, metadata: dict[str, Any], source: Source | None) -> None:
        self.boundary = uuid.uuid4().hex
        self._metadata = metadata
        self._source = source
        self.bytes_sent = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __iter__(self) -> Iterator[bytes]:
        boundary = self.boundary
        yield (
            (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="metadata"\r\n'
                "Content-Type: application/json\r\n\r\n"
            ).encode()
            + json.dumps(self._metadata).encode()
            + b"\r\n"
        )
        if self._source is not None:
            yield (
                f"--{boundary}\r\n"
                'Content-Disposition: form-data; name="file"; filename="file"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            for piece in _pieces(self._source):
                self.bytes_sent += len(piece)
                yield piece
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()


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
