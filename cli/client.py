"""The Python client of the sealstream API: streaming encrypt and decrypt, a few key calls.

    client = SealstreamClient("http://127.0.0.1:8080", token)
    with open("big.bin", "rb") as source, open("big.enc", "wb") as sink:
        client.encrypt("mySymKey", source, sink)

Stream-back calls are full duplex: the upload and the download run at the same time, so a
file of any size goes through in constant memory. The server is bounded: it reads the next
piece of the upload only once it has sent the ciphertext of the last one, so a client that
sends the whole body before reading the response (httpx, requests) deadlocks on a large
stream-back. Each call therefore runs on its own connection, with a writer thread sending
the request (the multipart body with chunked transfer-encoding, read from `source` piece by
piece) while the calling thread reads the response with the standard library's
`http.client.HTTPResponse` and writes it to `sink`. TLS for https URLs uses `ssl`'s memory
BIOs, so that the two threads never use one TLS object at the same time.

Why not a library: aiohttp's client does write the body in a task of its own while the
response is read, and a 1.5 GB async-generator upload did stream both ways against our
server; but with a file object as the body (aiohttp's own file payload) the same calls
stalled after 0-2 MiB of response in every run (aiohttp 3.14.5: the whole file was sent,
then the response was no longer read; not traced further), and it would need an event loop
per call behind this blocking API. httpx and requests are half duplex. So the transport is
this small module, over the parts of the standard library that do the hard work (HTTP
response parsing, TLS). It connects directly: proxy variables are not used.

A streamed response that ends without its terminating chunk (or short of its
Content-Length) is the server aborting a transfer that failed midway, such as a tampered
frame: it raises `TransferAborted` and is never reported as complete.
"""

import contextlib
import http.client
import io
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "ApiError",
    "ByteRange",
    "ClientError",
    "Readable",
    "SealstreamClient",
    "Source",
    "Transfer",
    "TransferAborted",
    "Writable",
]

DEFAULT_TIMEOUT = 60.0  # seconds a connect, a send or a read may wait
UPLOAD_CHUNK = 1024 * 1024  # bytes read from a source at a time
DOWNLOAD_CHUNK = 256 * 1024  # bytes read from a response at a time
MAX_DOCUMENT = 1024 * 1024  # largest JSON response read
WRITER_GRACE = 5.0  # seconds to wait for the writer thread after a failed call
USER_AGENT = "sealstream-client/0.1"


class ClientError(Exception):
    """A call to the sealstream API failed."""


class ApiError(ClientError):
    """The server refused the request: its problem document (RFC 9457)."""

    def __init__(self, status: int, code: str, detail: str, problem: Mapping[str, Any]) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = dict(problem)


class TransferAborted(ClientError):
    """A streamed response broke off before its end: the server aborted the transfer (a
    tampered or truncated frame, a storage error) or the connection was lost.

    The sink then holds only what arrived, `received` bytes: an incomplete result that
    must not be used as if it were whole.
    """

    def __init__(self, reason: str, received: int) -> None:
        super().__init__(f"transfer aborted after {received} bytes: {reason}")
        self.reason = reason
        self.received = received


@dataclass(frozen=True)
class Transfer:
    """What a completed streaming call did, as its response headers and byte counts tell."""

    key_requested: str | None  # X-Key-Requested: the kid asked for (or found)
    key_used: str | None  # X-Key-Used: `kid#version`
    algorithm: str | None  # X-Algorithm-Used
    bytes_sent: int  # bytes read from `source` and uploaded (0 when reading storage)
    bytes_received: int  # bytes written to `sink`
    status: int = 200  # 206 for a ranged read
    content_range: str | None = None  # Content-Range of a ranged read


class Readable(Protocol):
    """A binary file opened for reading, or anything with its `read`."""

    def read(self, size: int = ..., /) -> bytes: ...


class Writable(Protocol):
    """A binary file opened for writing, or anything with its `write`."""

    def write(self, data: bytes, /) -> object: ...


Source = Readable | Iterable[bytes] | bytes
ByteRange = tuple[int, int | None]


class SealstreamClient:
    """A client of one sealstream API at `url` (http or https), acting with `token`.

    Every call opens its own connection. `timeout` bounds each connect, send and read
    (an idle timeout, not a limit on a whole transfer). `ssl_context` overrides the
    default certificate checks for https.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if not token or any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("the token must be a non-empty string without whitespace")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._base_path = parts.path.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._ssl_context = ssl_context

    # Streaming

    def encrypt(
        self,
        kid: str,
        source: Source,
        sink: Writable,
        *,
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
    ) -> Transfer:
        """Encrypt `source` under the key `kid`, writing the ciphertext to `sink` as it
        streams back. Raises `TransferAborted` (and `sink` holds only the part that
        arrived) if the server aborts midway."""
        metadata = _metadata(
            kid=kid, encryptionContext=_context(encryption_context), frameLength=frame_length
        )
        return self._stream("/api/crypto/stream/encrypt", metadata, source, sink)

    def encrypt_to_storage(
        self,
        kid: str,
        source: Source,
        *,
        key: str,
        bucket: str | None = None,
        overwrite: bool = False,
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
    ) -> dict[str, Any]:
        """Encrypt `source` into the object `key` of the tenant's storage; what was stored."""
        destination = {"key": key, "overwrite": overwrite, **_metadata(bucket=bucket)}
        metadata = _metadata(
            kid=kid,
            encryptionContext=_context(encryption_context),
            frameLength=frame_length,
            destination=destination,
        )
        with self._form("/api/crypto/stream/encrypt", metadata, source) as exchange:
            response = exchange.response()
            document = _document(response)
            exchange.finish()
            return document

    def decrypt(
        self,
        source: Source,
        sink: Writable,
        *,
        kid: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Transfer:
        """Decrypt the message `source`, writing the plaintext to `sink` as it streams
        back. With `kid`, the message must be sealed for that key; with
        `encryption_context`, it must carry those pairs. A frame that fails
        authentication aborts the transfer: `TransferAborted`, and `sink` holds only
        the plaintext of the frames before it."""
        metadata = _metadata(kid=kid, encryptionContext=_context(encryption_context))
        return self._stream("/api/crypto/stream/decrypt", metadata, source, sink)

    def decrypt_object(
        self,
        key: str,
        sink: Writable,
        *,
        bucket: str | None = None,
        byte_range: ByteRange | None = None,
        kid: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Transfer:
        """Decrypt the stored object `key` to `sink`; `byte_range` (first, last) reads
        plaintext bytes first to last inclusive, (first, None) from first to the end.
        Raises `TransferAborted` (`sink` then holds only what arrived) if the server
        aborts midway."""
        source = {"key": key, **_metadata(bucket=bucket)}
        metadata = _metadata(kid=kid, encryptionContext=_context(encryption_context), source=source)
        headers = {} if byte_range is None else {"Range": _range_header(byte_range)}
        return self._stream("/api/crypto/stream/decrypt", metadata, None, sink, headers)

    # Keys

    def create_key(self, **fields: Any) -> dict[str, Any]:
        """Generate a key: the fields as the API names them (`kid`, `kty`, `alg`,
        `keyOps`, `exportable`...); the new key's metadata."""
        return self._json("POST", "/api/key-management/keys", fields)

    def get_key(self, kid: str) -> dict[str, Any]:
        """A key's metadata (and public JWK for asymmetric keys)."""
        return self._json("GET", f"/api/key-management/keys/{quote(kid, safe='')}")

    # Transport

    def _stream(
        self,
        path: str,
        metadata: dict[str, Any],
        source: Source | None,
        sink: Writable,
        headers: Mapping[str, str] | None = None,
    ) -> Transfer:
        with self._form(path, metadata, source, headers) as exchange:
            response = exchange.response()
            if response.status >= 400:
                raise _api_error(response)
            if response.status not in (200, 206):
                raise ClientError(f"unexpected response {response.status} {response.reason}")
            if not response.chunked and response.length is None:
                raise ClientError("the response has no length framing: cannot tell if it is whole")
            received = 0
            while True:
                try:
                    data = response.read1(DOWNLOAD_CHUNK)
                except (http.client.HTTPException, OSError) as exc:
                    exchange.raise_source_error()
                    raise TransferAborted(_describe(exc), received) from exc
                if not data:
                    break
                sink.write(data)
                received += len(data)
            if response.length:  # Content-Length bytes still missing
                exchange.raise_source_error()
                raise TransferAborted(f"{response.length} bytes short of its length", received)
            exchange.finish()
            return Transfer(
                key_requested=response.getheader("X-Key-Requested"),
                key_used=response.getheader("X-Key-Used"),
                algorithm=response.getheader("X-Algorithm-Used"),
                bytes_sent=exchange.bytes_sent,
                bytes_received=received,
                status=response.status,
                content_range=response.getheader("Content-Range"),
            )

    def _form(
        self,
        path: str,
        metadata: dict[str, Any],
        source: Source | None,
        headers: Mapping[str, str] | None = None,
    ) -> "_Exchange":
        """A multipart request: `metadata` as JSON, then `source` as the `file` part."""
        boundary = uuid.uuid4().hex
        head = self._head(
            "POST",
            path,
            {
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Transfer-Encoding": "chunked",
                **(headers or {}),
            },
        )
        return _Exchange(self._connect(), head, _MultipartBody(boundary, metadata, source))

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Length": str(len(content))}
        if body is not None:
            headers["Content-Type"] = "application/json"
        with _Exchange(self._connect(), self._head(method, path, headers) + content) as exchange:
            return _document(exchange.response())

    def _head(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        lines = [
            f"{method} {self._base_path}{path} HTTP/1.1",
            f"Host: {self._host_header}",
            f"Authorization: Bearer {self._token}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json, application/octet-stream, application/problem+json",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _connect(self) -> "_Channel":
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except OSError as exc:
            raise ClientError(f"cannot connect to {self._host_header}: {_describe(exc)}") from exc
        if not self._tls:
            return _Channel(sock)
        try:
            context = self._ssl_context or ssl.create_default_context()
            return _TlsChannel(sock, context, self._host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ClientError(f"TLS with {self._host_header} failed: {_describe(exc)}") from exc


def _metadata(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _context(context: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if context is None else dict(context)


def _range_header(byte_range: ByteRange) -> str:
    first, last = byte_range
    if first < 0 or (last is not None and last < first):
        raise ValueError(f"not a byte range: {byte_range!r}")
    return f"bytes={first}-{'' if last is None else last}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _api_error(response: http.client.HTTPResponse) -> ApiError:
    try:
        raw = response.read(MAX_DOCUMENT)
        problem = json.loads(raw)
    except (http.client.HTTPException, OSError, ValueError):
        raw, problem = b"", None
    if not isinstance(problem, dict):
        problem = {}
    code = problem.get("code")
    detail = problem.get("detail")
    return ApiError(
        response.status,
        code if isinstance(code, str) else f"http-{response.status}",
        detail
        if isinstance(detail, str)
        else raw.decode("utf-8", "replace")[:500] or response.reason,
        problem,
    )


def _document(response: http.client.HTTPResponse) -> dict[str, Any]:
    """A whole JSON object response; the problem of a refusal as `ApiError`."""
    if response.status >= 400:
        raise _api_error(response)
    try:
        raw = response.read(MAX_DOCUMENT + 1)
    except (http.client.HTTPException, OSError) as exc:
        raise ClientError(f"the response broke off: {_describe(exc)}") from exc
    if len(raw) > MAX_DOCUMENT or response.length:
        raise ClientError("the JSON response is too large or incomplete")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ClientError(f"the response is not JSON ({response.status})") from exc
    if not isinstance(document, dict):
        raise ClientError("the response is not a JSON object")
    return document


class _MultipartBody:
    """The pieces of a multipart/form-data body, `source` read one piece at a time."""

    def __init__(self, boundary: str, metadata: dict[str, Any], source: Source | None) -> None:
        self._boundary = boundary
        self._metadata = metadata
        self._source = source
        self.bytes_sent = 0

    def __iter__(self) -> Iterator[bytes]:
        boundary = self._boundary
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


class _Channel:
    """A connection's bytes: `sendall` from one thread while another calls `recv_into`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_into(self, buffer: memoryview) -> int:
        return self.sock.recv_into(buffer)


class _TlsChannel(_Channel):
    """TLS over a socket through memory BIOs: the TLS object is only used under a lock and
    never while blocked on the socket, so one thread can send while another receives."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, hostname: str) -> None:
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=hostname)
        self._lock = threading.Lock()
        while not self._handshake_done():
            self.sock.sendall(self._outgoing.read())
            data = self.sock.recv(DOWNLOAD_CHUNK)
            if not data:
                raise ConnectionError("the server closed the connection during the handshake")
            self._incoming.write(data)
        self.sock.sendall(self._outgoing.read())

    def _handshake_done(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            while view:
                view = view[self._tls.write(view) :]
            # Also carries anything the reading side produced (a key update, say).
            records = self._outgoing.read()
        self.sock.sendall(records)

    def recv_into(self, buffer: memoryview) -> int:
        while True:
            with self._lock:
                try:
                    # With a buffer, read() returns a count (typeshed says bytes).
                    return cast(int, self._tls.read(len(buffer), buffer))
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0  # the HTTP framing tells whether the response was whole
            data = self.sock.recv(DOWNLOAD_CHUNK)
            with self._lock:
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()


class _ChannelReader(io.RawIOBase):
    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        return self._channel.recv_into(memoryview(buffer).cast("B"))


class _ResponseSocket:
    """What `http.client.HTTPResponse` needs of a socket: `makefile`."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_ChannelReader(self._channel), DOWNLOAD_CHUNK)


class _Exchange:
    """One request on its own connection. With a body, a writer thread sends the request
    (chunked) while the caller reads the response: full duplex."""

    def __init__(self, channel: _Channel, head: bytes, body: _MultipartBody | None = None) -> None:
        self._channel = channel
        self._head = head
        self._body = body
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._source_error: BaseException | None = None
        self._sent_all = False

    @property
    def bytes_sent(self) -> int:
        return 0 if self._body is None else self._body.bytes_sent

    def __enter__(self) -> "_Exchange":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._writer is not None and self._writer.is_alive():
            self._shutdown()  # wakes a writer blocked on a server that stopped reading
            self._writer.join(WRITER_GRACE)
        self._channel.sock.close()

    def response(self) -> http.client.HTTPResponse:
        """Send the request and read the response's status and headers."""
        try:
            if self._body is None:
                self._channel.sendall(self._head)
            else:
                self._writer = threading.Thread(
                    target=self._send, name="sealstream-upload", daemon=True
                )
                self._writer.start()
            fake_socket = cast(socket.socket, _ResponseSocket(self._channel))
            response = http.client.HTTPResponse(fake_socket, method="POST")
            response.begin()
        except (http.client.HTTPException, OSError) as exc:
            self.raise_source_error()
            raise ClientError(f"no response from the server: {_describe(exc)}") from exc
        return response

    def finish(self) -> None:
        """After a whole response: the upload must have ended too, or the server answered
        without reading all of it (and what it answered may not cover all of it)."""
        if self._writer is not None:
            self._writer.join(WRITER_GRACE)
        self.raise_source_error()
        if self._body is not None and not self._sent_all:
            raise ClientError("the server answered before it had read the whole upload")

    def raise_source_error(self) -> None:
        """Reading the source failed: that, not what it did to the exchange, is the error."""
        if self._source_error is not None:
            raise self._source_error

    def _send(self) -> None:
        assert self._body is not None
        pieces = iter(self._body)
        try:
            self._channel.sendall(self._head)
            while not self._stop.is_set():
                try:
                    piece = next(pieces, None)
                except BaseException as exc:
                    # Never end the body cleanly after a failed read: break the connection.
                    self._source_error = exc
                    self._stop.set()
                    self._shutdown()
                    return
                if piece is None:
                    self._channel.sendall(b"0\r\n\r\n")
                    self._sent_all = True
                    return
                self._channel.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
        except OSError:
            pass  # the server closed or stopped reading: the response says why

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._channel.sock.shutdown(socket.SHUT_RDWR)
