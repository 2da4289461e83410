"""How uvicorn serves the API: its options from the settings, and the guards on
connections that its HTTP/1.1 protocol lacks.

What the app enforces holds on any ASGI server: a request body that stalls or trickles,
a response the client stops reading (api/body.py, api/duplex.py). What happens before a
request reaches the app, or after its response has ended, only the server sees, and
uvicorn leaves it open: it waits for a request line and headers for ever (its keep-alive
timeout stops at the first byte), buffers headers of any length, keeps accepting
connections until the process runs out of file descriptors, and reads and discards the
rest of a body the app answered without reading for as long as it keeps coming. So each
connection here is guarded by `GuardedHttpProtocol`:

- the request line and headers must arrive within `header_timeout` seconds of the server
  starting to wait for them (the connection opened, or the last response ended), and
  within `MAX_HEAD_BYTES`; else the connection is closed, after a 408 or 431 problem if a
  request had begun;
- a body still arriving after its response has ended must keep up `min_body_rate`
  bytes a second over each `body_rate_window`, else the connection is closed;
- a connection past `max_connections` is answered 503 at once and closed;
- there are no WebSocket upgrades: the API has no WebSocket route.

Another ASGI server must be given the same guards through its own options.

It also reads request bodies with fewer copies and in larger pieces than uvicorn's own
protocol (`GuardedHttpProtocol.get_buffer`, `on_body`): a stream's HTTP intake cost more
server CPU than its encryption (docs/benchmarks.md).
"""

import asyncio
import json
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.problems import MEDIA_TYPE, Problem
from sealstream.settings import Settings
from sealstream.wiring import ConfigurationError

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
RETRY_AFTER_SECONDS = 1
# What one read from a socket may bring. The event loop's own reads bring at most
# 256,000 bytes (uvloop's; asyncio's 256 KiB), each then a request-body chunk that every
# layer above handles in Python: reads 16 times larger cut the server's CPU per GiB by
# about a quarter (docs/benchmarks.md). A connection holds at most one such read of its
# body at a time (uvicorn stops reading past 64 KiB unread).
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024

_receiving = threading.local()  # one buffer per thread: an event loop runs in one


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    min_body_rate: int
    body_rate_window: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> "ConnectionLimits":
        return cls(
            settings.header_timeout,
            settings.min_body_rate,
            settings.body_rate_window,
            settings.max_connections,
        )


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options (`uvicorn.Config`'s keywords) for serving the API as `settings`
    say; `ConfigurationError` if the TLS certificate and key do not load."""
    check_tls(settings)
    # A partial rather than a subclass made here: a server process started by the
    # supervisor gets its options pickled, and only a module's own class pickles.
    protocol = partial(guarded_connection, limits=ConnectionLimits.of(settings))
    return {
        "host": settings.host,
        "port": settings.port,
        "http": protocol,
        "ws": "none",
        "ssl_certfile": str(settings.tls_cert) if settings.tls_cert else None,
        "ssl_keyfile": str(settings.tls_key) if settings.tls_key else None,
    }


def check_tls(settings: Settings) -> None:
    """Load the certificate and key as the server will, so that a wrong file is one clear
    error at start rather than a traceback from inside the server."""
    if settings.tls_cert is None or settings.tls_key is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        reason = error.strerror or str(error)
        raise ConfigurationError(
            f"SEALSTREAM_TLS_CERT / SEALSTREAM_TLS_KEY: cannot load the certificate and its "
            f"key ({reason})"
        ) from None


def _receive_buffer() -> memoryview:
    """The calling thread's buffer for socket reads, made on first use."""
    buffer: memoryview | None = getattr(_receiving, "buffer", None)
    if buffer is None:
        buffer = _receiving.buffer = memoryview(bytearray(RECEIVE_BUFFER_BYTES))
    return buffer


def guarded_connection(*args: Any, limits: ConnectionLimits, **kwargs: Any) -> "BufferedReads":
    """A connection's protocol, as uvicorn makes one with its arguments."""
    return BufferedReads(GuardedHttpProtocol(*args, limits=limits, **kwargs))


class BufferedReads(asyncio.BufferedProtocol):
    """An HTTP protocol as the event loop sees it: the loop reads straight into one
    buffer, which all the connections of its thread share, and each read goes to the
    protocol's `data_received` (rather than first into bytes of its own).

    The parser copies out whatever it keeps (the head's fields, the body's pieces) before
    the next read can reuse the buffer. uvloop takes a protocol for buffered only if it
    is not also an `asyncio.Protocol`, as uvicorn's is: hence a wrapper, not a subclass.
    """

    def __init__(self, http: "GuardedHttpProtocol") -> None:
        self.http = http

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.http.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def eof_received(self) -> None:
        self.http.eof_received()  # which closes the connection

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.http.data_received(_receive_buffer()[:nbytes])


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with the guards of the module's docstring.

    A connection is at any moment in one of three phases: waiting for a request's head
    (timed by `header_timeout`), serving a request (the app times it), or discarding the
    rest of a body whose response has ended (timed by the body rate).
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._unsent_at_wait = 0  # of the last response, when the wait for a head began
        self._discarding = False
        self._discarded = 0

    # uvicorn's protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            logger.warning("refusing a connection: %d are open", len(self.connections) - 1)
            self._refuse(
                Problem(
                    503,
                    "too-many-connections",
                    "the server holds as many connections as it may; try again shortly",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            )
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes | memoryview) -> None:
        if self._awaiting_head:
            self._head_bytes += len(data)
        elif self._discarding:
            self._discarded += len(data)
        super().data_received(data)  # type: ignore[arg-type]  # httptools takes any buffer
        if self._awaiting_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(
                Problem(
                    431,
                    "header-too-large",
                    f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
                )
            )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1 (it writes plain text, even
        into a response under way): a problem document, or, once a response has begun,
        the connection cut, as any failure part-way through a stream is."""
        if self.cycle is not None and self.cycle.response_started:
            self.transport.abort()
            return
        self._refuse(Problem(400, "malformed-http", f"the request is not valid HTTP/1.1: {msg}"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._stop_timer()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """uvicorn's, less a copy or two: uvicorn appends each piece to a bytearray, which
        `receive()` copies out as bytes. A piece that finds none waiting is kept as the
        bytes it is, which `receive()` hands on as they are."""
        cycle = self.cycle
        if cycle.response_complete:
            return  # as uvicorn's: the rest of the body is discarded
        if not cycle.body:
            cycle.body = body  # type: ignore[assignment]  # read as bytes either way
        else:
            if isinstance(cycle.body, bytes):
                cycle.body = bytearray(cycle.body)  # appended to in place from now
            cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._discarding:
            self._discarding = False
            self._await_head()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # its head is in: it starts now
        super().on_response_complete()
        if pipelined or self.transport.is_closing():
            return
        if self.cycle.more_body:
            self._discard_body()
        else:
            self._await_head()

    # The phases

    def _await_head(self) -> None:
        self._awaiting_head = True
        self._head_begun = False
        self._head_bytes = 0
        self._unsent_at_wait = self.transport.get_write_buffer_size()
        self._start_timer(self.limits.header_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        unsent = self.transport.get_write_buffer_size()
        if 0 < unsent < self._unsent_at_wait:
            # The client is still reading the last response, if slowly: its turn to send
            # comes once it has it.
            self._await_head()
        elif self._head_begun:
            self._refuse(
                Problem(
                    408,
                    "header-timeout",
                    "the request line and headers did not arrive within "
                    f"{self.limits.header_timeout:g} seconds",
                )
            )
        else:
            self.transport.abort()  # nothing to say; anything unsent, nobody reads

    def _discard_body(self) -> None:
        if self.limits.min_body_rate == 0:
            return  # as uvicorn does: read and drop it for as long as it comes
        self._discarding = True
        self._discarded = 0
        self._start_timer(self.limits.body_rate_window, self._check_discarding)

    def _check_discarding(self) -> None:
        if self._discarded < self.limits.min_body_rate * self.limits.body_rate_window:
            self.transport.abort()
            return
        self._discarded = 0
        self._start_timer(self.limits.body_rate_window, self._check_discarding)

    # Helpers

    def _refuse(self, problem: Problem) -> None:
        """Answer `problem` in place of any request, then close the connection."""
        self._awaiting_head = False
        if self.transport.is_closing():
            return  # uvicorn has answered already (a malformed request: 400)
        self._stop_timer()
        body = json.dumps(problem.document()).encode()
        headers = {
            "content-type": MEDIA_TYPE,
            "content-length": str(len(body)),
            "connection": "close",
            **problem.headers,
        }
        lines = [f"HTTP/1.1 {problem.status} {problem.document()['title']}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.transport.close()

    def _start_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._stop_timer()
        self._timer = self.loop.call_later(delay, callback)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
