"""An S3 proxy that injects faults: it fails the requests a rule picks, delays the others,
and paces or holds the responses it passes back.

Failing requests (`500 InternalError`, which botocore retries and then gives up on) makes
an S3 server that breaks down under load; other requests (aborts, listings) still pass,
as they do then. Pacing and holding responses makes the job fault tests deterministic
without huge objects: a verify job's download reports progress for a few seconds, and a
held one lets a test kill a worker, restart Redis or cancel a job at a point it has seen
(a running job with some bytes done), never at a point it hopes for.
"""

import re
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

from tests.support.data import KiB
from tests.support.ports import LOCALHOST

_HEAD_END = b"\r\n\r\n"
_UPLOAD_PART = re.compile(rb"^PUT \S*[?&]partNumber=\d+")
_S3_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)
SLICE = 16 * KiB  # the unit responses are paced in

Rule = Callable[[bytes, int], bool]  # (request head, body length) -> fail it?


def no_request(head: bytes, length: int) -> bool:
    """Fails nothing."""
    return False


@dataclass
class PartsAfter:
    """Fails every part upload (UploadPart) once `limit` bytes of parts went through."""

    limit: int
    passed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, head: bytes, length: int) -> bool:
        if not _UPLOAD_PART.match(head):
            return False
        with self._lock:
            if self.passed + length > self.limit:
                return True
            self.passed += length
            return False


@dataclass
class HeldParts:
    """Holds every part upload (UploadPart) until `release()`, then lets them all through:
    an S3 server that has stopped taking data without failing."""

    held: int = 0
    _released: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, head: bytes, length: int) -> bool:
        if _UPLOAD_PART.match(head):
            with self._lock:
                self.held += 1
            self._released.wait(timeout=120)
        return False

    def release(self) -> None:
        self._released.set()


@dataclass
class HeldFirst:
    """Once `arm()`ed, lets `skip` requests whose request line matches `pattern` pass,
    then holds the next until `release()`, then lets it through, or fails it (`fail`: the
    write never reaches the store, as for a server killed before it sent it); `held` is
    set meanwhile. The others pass: one write of a server that stalls, while the rest of
    the service goes on."""

    pattern: bytes
    skip: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    _armed: bool = False
    _fail: bool = False
    _released: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, head: bytes, length: int) -> bool:
        with self._lock:
            hold = self._armed and re.match(self.pattern, head) is not None
            if hold and self.skip:
                self.skip -= 1
                return False
            self._armed = self._armed and not hold
        if not hold:
            return False
        self.held.set()
        self._released.wait(timeout=120)
        return self._fail

    def arm(self) -> None:
        with self._lock:
            self._armed = True

    def release(self, *, fail: bool = False) -> None:
        self._fail = fail
        self._released.set()


@dataclass
class HeldEach:
    """Once `arm()`ed, holds each request whose request line matches `pattern`, up to
    `count` of them, until `release(i)` lets the i-th (from 0) through; `held[i]` is set
    once it is held. The others pass: the writes of requests that race, landed in the
    order a test picks."""

    pattern: bytes
    count: int
    held: list[threading.Event] = field(default_factory=list)
    _released: list[threading.Event] = field(default_factory=list)
    _armed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.held = [threading.Event() for _ in range(self.count)]
        self._released = [threading.Event() for _ in range(self.count)]

    def __call__(self, head: bytes, length: int) -> bool:
        with self._lock:
            if not self._armed or re.match(self.pattern, head) is None:
                return False
            turn = sum(event.is_set() for event in self.held)
            self._armed = turn + 1 < self.count
            self.held[turn].set()
        self._released[turn].wait(timeout=120)
        return False

    def arm(self) -> None:
        with self._lock:
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def release(self, turn: int) -> None:
        self._released[turn].set()


def requests_matching(pattern: bytes) -> Rule:
    """Fails every request whose request line matches `pattern`."""
    compiled = re.compile(pattern)
    return lambda head, _: compiled.match(head) is not None


class S3FaultProxy:
    """A proxy in front of the S3 server at `upstream`, serving from `url` once entered.
    Requests that `rule` picks are answered `500 InternalError` (`failed` counts them);
    the others are forwarded, each `delay` seconds late (a distant or congested store).
    Response bytes are paced at `rate` bytes a second (None: as fast as they come) and
    stop altogether while the proxy is held; `held_streams` counts the responses waiting
    at the hold. `drop_answer` has the store's answer to one request lost on its way
    back (the write made, its client told nothing)."""

    def __init__(self, upstream: str, rule: Rule = no_request, rate: float | None = None) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None
        self._upstream = (parts.hostname, parts.port)
        self._rule = rule
        self.rate = rate
        self.delay = 0.0
        self.failed = 0
        self.held_streams = 0
        self._gate = threading.Condition()
        self._held = False
        self._closed = False
        self._next_slot = 0.0
        self._sockets: list[socket.socket] = []
        self._unanswered: re.Pattern[bytes] | None = None
        self._listener = socket.create_server((LOCALHOST, 0))
        self.url = f"http://{LOCALHOST}:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name="s3-proxy", daemon=True)

    def __enter__(self) -> "S3FaultProxy":
        self._acceptor.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def pace(self, rate: float | None) -> None:
        with self._gate:
            self.rate = rate

    def slow_down(self, delay: float) -> None:
        """Forward each request from now on `delay` seconds late (0: at once)."""
        with self._gate:
            self.delay = delay

    def hold(self) -> None:
        with self._gate:
            self._held = True

    def release(self, rate: float | None = None) -> None:
        """Let responses flow again, at `rate` (None: unpaced)."""
        with self._gate:
            self._held = False
            self.rate = rate
            self._gate.notify_all()

    def drop_answer(self, pattern: bytes) -> None:
        """Forward the next request whose request line matches `pattern`, then cut its
        connection once the store answers, the answer unsent."""
        with self._gate:
            self._unanswered = re.compile(pattern)

    def _unanswer(self, head: bytes) -> bool:
        """Whether the answer to the request `head` is to be lost (at most once)."""
        with self._gate:
            matched = self._unanswered is not None and self._unanswered.match(head) is not None
            if matched:
                self._unanswered = None
            return matched

    def holding(self) -> bool:
        """Held, with a response waiting at the hold."""
        with self._gate:
            return self._held and self.held_streams > 0

    def close(self) -> None:
        with self._gate:
            self._closed = True
            self._gate.notify_all()
            sockets, self._sockets = self._sockets, []
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=30)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._gate:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            lost = threading.Event()  # the answer now on its way is not to be sent
            threading.Thread(
                target=self._forward_requests, args=(client, upstream, lost), daemon=True
            ).start()
            threading.Thread(
                target=self._pass_responses, args=(upstream, client, lost), daemon=True
            ).start()

    def _forward_requests(
        self, client: socket.socket, upstream: socket.socket, lost: threading.Event
    ) -> None:
        reader = client.makefile("rb")
        try:
            while head := _read_head(reader):
                length = _content_length(head)
                if self._fails(head, length):
                    if b"100-continue" not in head.lower():
                        reader.read(length)
                    client.sendall(_error_response())
                    return
                with self._gate:
                    delay = self.delay
                time.sleep(delay)  # latency injected on purpose, not a wait for a condition
                if self._unanswer(head):  # a client sends the next request once answered
                    lost.set()
                upstream.sendall(head)
                if not _copy(reader, upstream, length):
                    return
        except OSError:
            return
        finally:
            _shut_down(client, upstream)

    def _fails(self, head: bytes, length: int) -> bool:
        if not self._rule(head, length):
            return False
        with self._gate:
            self.failed += 1
        return True

    def _pass_responses(
        self, upstream: socket.socket, client: socket.socket, lost: threading.Event
    ) -> None:
        try:
            while (data := upstream.recv(64 * KiB)) and not lost.is_set():
                for offset in range(0, len(data), SLICE):
                    piece = data[offset : offset + SLICE]
                    if not self._admit(len(piece)):
                        return
                    client.sendall(piece)
        except OSError:
            pass
        finally:
            _shut_down(upstream, client)

    def _admit(self, size: int) -> bool:
        """Wait while held, then for a slot at the pace; False once the proxy is closed."""
        with self._gate:
            while self._held and not self._closed:
                self.held_streams += 1
                self._gate.wait()
                self.held_streams -= 1
            if self._closed:
                return False
            if self.rate is None:
                return True
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + size / self.rate
        time.sleep(max(0.0, start - now))  # pacing a simulated slow link, not timing a test
        return True


def _read_head(reader: BinaryIO) -> bytes:
    head = b""
    while not head.endswith(_HEAD_END):
        line = reader.readline(64 * KiB)
        if not line:
            return b""
        head += line
    return head


def _content_length(head: bytes) -> int:
    found = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    assert b"chunked" not in head.lower(), "the proxy forwards Content-Length bodies only"
    return int(found.group(1)) if found else 0


def _copy(reader: BinaryIO, target: socket.socket, length: int) -> bool:
    """Forward `length` bytes from `reader`; False if it ends before them."""
    while length:
        block = reader.read(min(length, 256 * KiB))
        if not block:
            return False
        target.sendall(block)
        length -= len(block)
    return True


def _error_response() -> bytes:
    head = (
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(_S3_ERROR)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + _S3_ERROR


def _shut_down(*sockets: socket.socket) -> None:
    for sock in sockets:
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
