"""Streaming multipart/form-data: a `metadata` JSON part, then a `file` part read chunk by chunk.

The body is parsed incrementally from the ASGI receive stream with python-multipart's
low-level parser. It never goes through Starlette's form parsing (`Request.form`) or its
upload-file objects, which spool uploads over 1 MiB to a temporary file: that would put
plaintext on disk.

A form is complete only when its closing boundary has been seen: python-multipart's
`finalize()` accepts a body that stops without one, which would make a truncated upload
look like a short, valid file.

When the body's length is declared (Content-Length, as curl sends a file), the file
part's length follows from it once the part's first byte is placed: the rest of the body
is the file, then the closing boundary and its line break, as every client we know ends
a body. RFC 2046 lets a body end otherwise: without that line break (the file is then two
bytes longer) or with an epilogue after it (the file is shorter). So the length worked out
is `UploadForm.expected_file_length`, what a reader may plan on, not a fact.
"""

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.body import body_chunks, parse_json
from api.problems import Problem
from sealstream.settings import Settings

METADATA_PART = "metadata"
FILE_PART = "file"


class FormError(Problem):
    """The body is not the form the route expects: a 4xx with its own code."""

    def __init__(self, code: str, detail: str, status: int = 400) -> None:
        super().__init__(status, code, detail)


@dataclass(frozen=True)
class PartStarted:
    name: str
    filename: str | None
    content_type: str | None


@dataclass(frozen=True)
class PartData:
    data: memoryview
    offset: int | None  # of its first byte in the body; None for bytes the parser held back


@dataclass(frozen=True)
class PartEnded:
    pass


@dataclass(frozen=True)
class FormEnded:
    pass


Event = PartStarted | PartData | PartEnded | FormEnded


class FormParser:
    """Turns body chunks into part events; knows nothing of what the parts mean."""

    def __init__(self, content_type: str | None) -> None:
        media_type, options = parse_options_header(content_type or "")
        if media_type != b"multipart/form-data":
            raise FormError("not-multipart", "send the body as multipart/form-data", status=415)
        boundary = options.get(b"boundary")
        if not boundary:
            raise FormError("missing-boundary", "the Content-Type has no multipart boundary")
        if len(boundary) > MAX_BOUNDARY_LENGTH:  # RFC 2046 allows 70; the parser takes no more
            raise FormError(
                "invalid-boundary", f"the multipart boundary is over {MAX_BOUNDARY_LENGTH} bytes"
            )
        self.closing_length = len(b"\r\n--" + boundary + b"--\r\n")  # as clients end a body
        self._events: list[Event] = []
        self._fed = 0  # body bytes before the chunk being parsed
        self._chunk = b""
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_data": self._on_part_data,
                "on_part_end": lambda: self._events.append(PartEnded()),
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_end": lambda: self._events.append(FormEnded()),
            },
        )

    def feed(self, chunk: bytes) -> list[Event]:
        self._chunk = chunk
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise FormError("malformed-multipart", "the multipart body is malformed") from None
        self._fed += len(chunk)
        events, self._events = self._events, []
        return events

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        # Bytes that might have begun a boundary are held back, and handed over later from
        # the parser's own copy: only bytes from the chunk itself have a known place.
        offset = self._fed + start if data is self._chunk else None
        self._events.append(PartData(memoryview(data)[start:end], offset))

    def _on_header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise FormError("malformed-multipart", "a part lacks a form-data name")
        content_type = self._headers.get(b"content-type")
        filename = options.get(b"filename")
        self._events.append(
            PartStarted(
                name=options[b"name"].decode("utf-8", "replace"),
                filename=filename.decode("utf-8", "replace") if filename is not None else None,
                content_type=content_type.decode("latin-1") if content_type else None,
            )
        )
        self._headers = {}


class UploadForm:
    """The request as the crypto routes read it: `metadata` first, then the `file` part.

    `metadata()` reads just far enough to return the parsed metadata (which is what lets a
    route answer a clean 4xx, or the Expect: 100-continue handshake proceed, before any
    response starts). `file_chunks()` then streams the file part and checks that the
    form ends properly after it.
    """

    def __init__(self, request: Request, settings: Settings) -> None:
        self._parser = FormParser(request.headers.get("content-type"))
        declared = request.headers.get("content-length", "")
        self._body_length = int(declared) if declared.isdigit() else None
        self.expected_file_length: int | None = None
        self._chunks = body_chunks(request, settings)
        self._metadata_limit = settings.max_json_body
        self._pending: deque[Event] = deque()
        self._ended = False

    async def metadata(self) -> dict[str, Any]:
        started = await self._next_event()
        if isinstance(started, FormEnded):
            raise FormError("missing-metadata", "the form has no metadata part")
        if not isinstance(started, PartStarted) or started.name != METADATA_PART:
            name = started.name if isinstance(started, PartStarted) else "?"
            code = "file-before-metadata" if name == FILE_PART else "unexpected-part"
            raise FormError(code, f"the first part must be 'metadata', not {name!r}")
        raw = bytearray()
        while not isinstance(event := await self._next_event(), PartEnded):
            assert isinstance(event, PartData)
            raw += event.data
            if len(raw) > self._metadata_limit:
                raise FormError(
                    "metadata-too-large",
                    f"the metadata part exceeds {self._metadata_limit} bytes",
                    status=413,
                )
        try:
            metadata = parse_json(raw)
        except ValueError as exc:
            raise FormError(
                "invalid-metadata", f"the metadata part is not valid JSON: {exc}"
            ) from None
        if not isinstance(metadata, dict):
            raise FormError("invalid-metadata", "the metadata part must be a JSON object")
        return metadata

    async def start_file(self) -> None:
        """Read up to the start of the `file` part's data, and its first bytes, which set
        `expected_file_length`."""
        event = await self._next_event()
        if isinstance(event, FormEnded):
            raise FormError("missing-file", "the form has no file part")
        if not isinstance(event, PartStarted) or event.name != FILE_PART:
            raise FormError("unexpected-part", "the part after 'metadata' must be 'file'")
        first = await self._next_event()
        self._pending.appendleft(first)
        if isinstance(first, PartData):
            self.expected_file_length = self._file_length_from(first)

    def _file_length_from(self, first: PartData) -> int | None:
        """The file part's length if the body ends as clients end one (see the module's
        docstring); None without a Content-Length, or if the first byte's place is not
        known."""
        if self._body_length is None or first.offset is None:
            return None
        length = self._body_length - first.offset - self._parser.closing_length
        return length if length >= 0 else None

    async def file_chunks(self) -> AsyncIterator[memoryview]:
        """The `file` part's bytes as they arrive; raises if the form is cut short."""
        while not isinstance(event := await self._next_event(), PartEnded):
            assert isinstance(event, PartData)
            if event.data:
                yield event.data
        await self.expect_end()

    async def expect_end(self) -> None:
        """Require the closing boundary next: no further parts."""
        if not isinstance(await self._next_event(), FormEnded):
            raise FormError("unexpected-part", "the form has parts after the ones expected")

    async def _next_event(self) -> Event:
        while not self._pending:
            if self._ended:
                raise FormError(
                    "unterminated-multipart", "the body ended before the closing boundary"
                )
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._ended = True
                continue
            except ClientDisconnect:
                raise FormError("client-disconnected", "the client went away") from None
            self._pending.extend(self._parser.feed(chunk))
        return self._pending.popleft()
