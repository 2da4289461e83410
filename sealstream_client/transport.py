"""The full-duplex HTTP/1.1 transport under the client: one request on a connection of its
own, its body sent by a writer thread while the calling thread reads the response.

The server is bounded: it reads the next piece of an upload only once it has sent the
ciphertext of the last one, so a client that sends the whole body before reading the
response (httpx, requests) deadlocks on a large stream-back. Here the writer thread sends
the request (the body chunked, or as the bytes a declared Content-Length announces) while
the caller reads the response with the standard library's `http.client.HTTPResponse`.
A piece of the body that is a `FileSpan` (a stretch of a regular file) goes out with
`sendfile` over plain TCP: the kernel sends the file's pages without copying them through
the process, which halves the client's work on an upload.
TLS uses `ssl`'s memory BIOs, so that the two threads never use one TLS object at the same
time.

Why not a library: aiohttp's client does write the body in a task of its own while the
response is read, and a 1.5 GB async-generator upload did stream both ways against our
server; but with a file object as the body (aiohttp's own file payload) the same calls
stalled after 0-2 MiB of response in every run (aiohttp 3.14.5: the whole file was sent,
then the response was no longer read; not traced further), and it would need an event loop
per call behind a blocking API. httpx and requests are half duplex. So the transport is
this small module, over the parts of the standard library that do the hard work (HTTP
response parsing, TLS). It connects directly: proxy variables are not used.

An exchange started while a `Cancellation` is current (a context variable) is aborted,
its connection shut, when that is cancelled from any thread: the asyncio client cancels a
call running in a worker thread so.

Errors come as the standard library raises them (`OSError`, `ssl.SSLError`,
`http.client.HTTPException`); the caller says what they mean. A failure to produce the
body is kept apart, for `raise_source_error`: that, not what it did to the exchange, is
the error.
"""

import contextlib
import http.client
import io
import os
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, cast

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "CURRENT_CANCELLATION",
    "DOWNLOAD_CHUNK",
    "Cancellation",
    "Channel",
    "Exchange",
    "FileSpan",
    "TlsChannel",
    "request_head",
]

DOWNLOAD_CHUNK = 256 * 1024  # bytes read from a connection at a time
WRITER_GRACE = 5.0  # seconds to wait for the writer thread after a failed call


@dataclass
class FileSpan:
    """`count` bytes of the regular file `file` from `offset`, a piece of a request body
    that the channel sends straight from the file; `sent` is how many it sent (fewer if
    the file ended first)."""

    file: BinaryIO
    offset: int
    count: int
    sent: int = 0


def request_head(method: str, target: str, headers: Mapping[str, str]) -> bytes:
    """The request line and the headers of an HTTP/1.1 request, up to the blank line."""
    lines = [
        f"{method} {target} HTTP/1.1",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Cancellation:
    """Aborts, from any thread, the exchanges started while it is current, and any started
    after it is cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exchanges: set[Exchange] = set()
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            exchanges = list(self._exchanges)
        for exchange in exchanges:
            exchange.abort()

    def track(self, exchange: "Exchange") -> None:
        with self._lock:
            self._exchanges.add(exchange)
            cancelled = self.cancelled
        if cancelled:
            exchange.abort()

    def forget(self, exchange: "Exchange") -> None:
        with self._lock:
            self._exchanges.discard(exchange)


CURRENT_CANCELLATION: ContextVar[Cancellation | None] = ContextVar(
    "sealstream_cancellation", default=None
)


class Channel:
    """A connection's bytes: `sendall` from one thread while another calls `recv_into`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_into(self, buffer: memoryview) -> int:
        return self.sock.recv_into(buffer)

    def sendfile(self, span: FileSpan) -> int:
        """Send `span`; the bytes sent."""
        return self.sock.sendfile(span.file, span.offset, span.count)


class TlsChannel(Channel):
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

    def sendfile(self, span: FileSpan) -> int:
        """Send `span` read through the process, since its bytes must be encrypted here."""
        sent = 0
        descriptor = span.file.fileno()
        while sent < span.count:
            data = os.pread(descriptor, min(DOWNLOAD_CHUNK, span.count - sent), span.offset + sent)
            if not data:
                break
            self.sendall(data)
            sent += len(data)
        return sent

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
    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        return self._channel.recv_into(memoryview(buffer).cast("B"))


class _ResponseSocket:
    """What `http.client.HTTPResponse` needs of a socket: `makefile`."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_ChannelReader(self._channel), DOWNLOAD_CHUNK)


class Exchange:
    """One request on `channel`, which it closes on the way out: `head` (`request_head`),
    then with a `body` (sent chunked, or as is when `head` declares its Content-Length,
    which a `FileSpan` piece needs) a
    writer thread sends the request while the caller reads the response: full duplex.
    The writer stops at the next piece once the exchange is left."""

    def __init__(
        self,
        channel: Channel,
        head: bytes,
        body: "Iterable[bytes | FileSpan] | None" = None,
        *,
        chunked: bool = True,
    ) -> None:
        self._channel = channel
        self._head = head
        self._body = body
        self._chunked = chunked
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._source_error: BaseException | None = None
        self.sent_all = False  # the whole body went out (a request without one: never)
        self._cancellation = CURRENT_CANCELLATION.get()

    def __enter__(self) -> "Exchange":
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
        if self._cancellation is not None:
            self._cancellation.forget(self)

    def abort(self) -> None:
        """Break the exchange off, from any thread: its reads and writes fail."""
        self._stop.set()
        self._shutdown()

    def response(self) -> http.client.HTTPResponse:
        """Send the request and read the response's status and headers."""
        if self._cancellation is not None:
            self._cancellation.track(self)
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
        return response

    def finish(self) -> None:
        """After a whole response: wait for the writer, and raise what the source raised."""
        if self._writer is not None:
            self._writer.join(WRITER_GRACE)
        self.raise_source_error()

    def raise_source_error(self) -> None:
        """Reading the source failed: that, not what it did to the exchange, is the error."""
        if self._source_error is not None:
            raise self._source_error

    def _send(self) -> None:
        try:
            self._send_body()
        except OSError:
            pass  # the server closed or stopped reading: the response says why
        except BaseException as exc:
            # Anything else is ours, not the server's: fail the exchange now, rather than
            # leave it waiting for the server's idle timeout on a body that stopped.
            self._abandon(exc)

    def _send_body(self) -> None:
        assert self._body is not None
        pieces = iter(self._body)
        self._channel.sendall(self._head)
        while not self._stop.is_set():
            try:
                piece = next(pieces, None)
            except BaseException as exc:
                self._abandon(exc)
                return
            if piece is None:
                if self._chunked:
                    self._channel.sendall(b"0\r\n\r\n")
                self.sent_all = True
                return
            if isinstance(piece, FileSpan):
                piece.sent = self._channel.sendfile(piece)
            elif piece:
                self._channel.sendall(self._framed(piece))

    def _abandon(self, exc: BaseException) -> None:
        # Never end the body cleanly after a failure: break the connection, and let the
        # failure, not what it did to the exchange, be the caller's error.
        self._source_error = exc
        self._stop.set()
        self._shutdown()

    def _framed(self, piece: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(piece), piece) if self._chunked else piece

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._channel.sock.shutdown(socket.SHUT_RDWR)
