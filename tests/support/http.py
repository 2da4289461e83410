"""Helpers for the streaming crypto tests: multipart bodies built from generators,
requests through the client's full-duplex transport, an S3 proxy that fails on demand,
and a server process whose file writes are reported by an audit hook.

The duplex transport (cli.transport) is used because httpx and requests send the whole
body before they read the response: against a bounded server they deadlock on a large
stream-back encrypt. `exchange` sends from one thread while another reads, as curl does.
"""

import hashlib
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from cli import transport
from envelope import parse_header
from envelope.frames import FINAL_OVERHEAD, REGULAR_OVERHEAD
from storage import ObjectStore
from storage.records import RECORDS_PREFIX
from tests.conftest import ADMIN_TOKEN
from tests.support.services import AWS_TEST_ENVIRONMENT, LOCALHOST, free_port, terminate

KiB = 1024
MiB = 1024 * KiB

ENCRYPT = "/api/crypto/stream/encrypt"
DECRYPT = "/api/crypto/stream/decrypt"
KEYS = "/api/key-management/keys"
DOCUMENTED_KEY: dict[str, Any] = {
    "kid": "mySymKey",
    "kty": "oct",
    "alg": "AES-256",
    "keyOps": ["encrypt", "decrypt"],
    "exportable": False,
}
BOUNDARY = "sealstream-test-7c2f0a"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()

# Generated data


def random_bytes(size: int, seed: int = 0) -> bytes:
    """`size` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


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


# Multipart bodies


def part_head(name: str, content_type: str | None = None, filename: str | None = None) -> bytes:
    """The delimiter and headers that open a part (the first part of a body included)."""
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    lines = [f"--{BOUNDARY}", f"Content-Disposition: {disposition}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def as_json(metadata: Mapping[str, Any] | bytes) -> bytes:
    return metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()


def form(
    metadata: Mapping[str, Any] | bytes,
    file: Iterable[bytes] | bytes | None = b"",
    *,
    terminated: bool = True,
) -> Iterator[bytes]:
    """A `metadata` part (JSON) then a `file` part (None: no file part) and, if
    `terminated`, the closing boundary; streamed, so `file` may be a generator."""
    yield part_head("metadata", "application/json") + as_json(metadata)
    if file is not None:
        yield b"\r\n" + part_head("file", "application/octet-stream", "data.bin")
        yield from [file] if isinstance(file, bytes) else file
    if terminated:
        yield CLOSE


def form_bytes(
    metadata: Mapping[str, Any] | bytes, file: bytes | None = b"", *, terminated: bool = True
) -> bytes:
    return b"".join(form(metadata, file, terminated=terminated))


# Small requests through httpx (half-duplex: fine for small bodies and destination mode)


def post_form(
    client: httpx.Client,
    path: str,
    metadata: Mapping[str, Any] | bytes,
    file: bytes | None = b"",
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    body = form_bytes(metadata, file)
    return client.post(path, content=body, headers={"Content-Type": FORM_TYPE, **(headers or {})})


def encrypt(client: httpx.Client, data: bytes, **metadata: Any) -> httpx.Response:
    return post_form(client, ENCRYPT, {"kid": "mySymKey", **metadata}, data)


def decrypt(client: httpx.Client, message: bytes | None, **metadata: Any) -> httpx.Response:
    return post_form(client, DECRYPT, metadata, message)


def read_object(
    client: httpx.Client, key: str, range_: str | None = None, **metadata: Any
) -> httpx.Response:
    headers = {"Range": range_} if range_ is not None else {}
    return post_form(client, DECRYPT, {"source": {"key": key}, **metadata}, None, headers)


def range_of(spec: str, size: int) -> tuple[int, int]:
    """The inclusive range a satisfiable `bytes=` spec selects (RFC 9110), computed apart."""
    first, last = spec.removeprefix("bytes=").split("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def sample_ranges(size: int, frame: int, seed: int) -> list[str]:
    """First and last bytes, frame edges ±1, suffix and open ranges, and random ones."""
    specs = ["bytes=0-0", f"bytes={size - 1}-{size - 1}", f"bytes=0-{size - 1}", "bytes=0-"]
    specs += [f"bytes={size - 1}-", f"bytes=5-{size + 1000}", "bytes=-1", f"bytes=-{size}"]
    specs += [f"bytes=-{size + 7}", f"bytes=-{frame}", f"bytes=-{frame + 1}"]
    for edge in (frame, 2 * frame, (size // frame) * frame, (size // frame // 2) * frame):
        if edge >= size:
            continue
        specs += [f"bytes={edge - 1}-{edge}", f"bytes={edge}-{edge}", f"bytes={edge - 1}-"]
        specs += [f"bytes={edge + 1}-{edge + frame - 1}", f"bytes={edge - frame}-{edge - 1}"]
        specs += [f"bytes={edge - 1}-{min(edge + 2 * frame, size - 1)}"]
    rng = random.Random(seed)
    for _ in range(15):
        first = rng.randrange(size)
        specs.append(f"bytes={first}-{rng.randrange(first, size)}")
    return specs


def read_back(client: httpx.Client, key: str, data: bytes, frame: int) -> list[httpx.Response]:
    """Read the stored object `key` whole and by `sample_ranges`, each answer checked
    against `data` (its length and range headers too); the answers."""
    whole = read_object(client, key)
    assert whole.status_code == 200 and whole.content == data, whole.text
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert whole.headers["Content-Length"] == str(len(data))
    answers = [whole]
    for spec in sample_ranges(len(data), frame, seed=len(data)):
        first, last = range_of(spec, len(data))
        part = read_object(client, key, spec)
        assert part.status_code == 206, (spec, part.text)
        assert part.headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}", spec
        assert part.content == data[first : last + 1], spec
        answers.append(part)
    return answers


def create_key(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post(KEYS, json={**DOCUMENTED_KEY, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def problem(response: "httpx.Response | Exchange", status: int, code: str) -> dict[str, Any]:
    """Assert `response` is a problem document with this status and code; return it."""
    if isinstance(response, Exchange):
        assert response.complete, response.error
        status_code, content_type, text = (
            response.status,
            response.headers["content-type"],
            (response.body.decode("utf-8", "replace")),
        )
    else:
        status_code, content_type, text = (
            response.status_code,
            response.headers["content-type"],
            response.text,
        )
    assert status_code == status, text
    assert content_type == "application/problem+json", text
    body: dict[str, Any] = json.loads(text)
    assert body["code"] == code, body
    assert body["status"] == status
    return body


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll `condition` until it holds; fail with `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def nothing_stored(store: ObjectStore, prefix: str = "tenants/") -> bool:
    """No object and no pending upload under `prefix`, and no object record at all."""
    records = list(store.list(RECORDS_PREFIX))
    return not list(store.list(prefix)) and not store.pending_uploads(prefix) and not records


# Where the frames of a message lie


def frame_offset(message: bytes, index: int) -> int:
    """Where regular frame `index` starts (the final frame, if `index` is the count)."""
    header = parse_header(message)
    return header.length + index * (header.frame_length + REGULAR_OVERHEAD)


def frame_count(message: bytes) -> int:
    """The number of regular frames (the final frame not counted)."""
    header = parse_header(message)
    body = len(message) - header.length - FINAL_OVERHEAD
    return body // (header.frame_length + REGULAR_OVERHEAD)


def flipped(data: bytes, offset: int) -> bytes:
    """`data` with one bit of the byte at `offset` flipped."""
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


# Requests through the client's full-duplex transport


@dataclass
class Exchange:
    """One request and its response as the duplex transport saw them."""

    status: int
    headers: Message
    body: bytes  # empty if the body was not kept
    size: int
    sha256: str
    complete: bool  # the response body ended properly (terminating chunk or full length)
    error: BaseException | None  # what ended the body early

    def json(self) -> Any:
        return json.loads(self.body)


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def request_head(url: str, path: str, headers: Mapping[str, str], method: str = "POST") -> bytes:
    host, port = _address(url)
    return transport.request_head(method, path, {"Host": f"{host}:{port}", **headers})


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def exchange(
    url: str,
    path: str,
    body: Iterable[bytes],
    *,
    token: str | None = ADMIN_TOKEN,
    headers: Mapping[str, str] | None = None,
    content_type: str = FORM_TYPE,
    keep_body: bool = True,
    read_pause: float = 0,
    timeout: float = 60,
    length: int | None = None,
) -> Exchange:
    """POST `body` through the client's transport (chunked, or as `length` declared
    bytes) while reading the response, pausing `read_pause` seconds between reads (a
    slow client). The upload stops once the response has been read, as a client's does
    once the server has answered."""
    framing = (
        {"Transfer-Encoding": "chunked"} if length is None else {"Content-Length": f"{length}"}
    )
    all_headers = {"Content-Type": content_type, **framing, **auth(token), **(headers or {})}
    channel = transport.Channel(socket.create_connection(_address(url), timeout=timeout))
    head = request_head(url, path, all_headers)
    with transport.Exchange(channel, head, body, chunked=length is None) as duplex:
        try:
            response = duplex.response()
        except (http.client.HTTPException, OSError):
            duplex.raise_source_error()  # the body's generator failed: a bug in the test
            raise
        answer = _read_answer(response, keep_body, read_pause)
    duplex.raise_source_error()
    return answer


def _read_answer(
    response: http.client.HTTPResponse, keep_body: bool, read_pause: float
) -> Exchange:
    tally = Tally()
    kept = bytearray()
    error: BaseException | None = None

    def received(chunk: bytes) -> None:
        tally.size += len(chunk)
        tally.digest.update(chunk)
        if keep_body:
            kept.extend(chunk)

    try:
        while chunk := response.read(256 * KiB):
            received(chunk)
            time.sleep(read_pause)
    except http.client.IncompleteRead as exc:
        received(exc.partial)
        error = exc
    except OSError as exc:
        error = exc
    if error is None and response.length:  # http.client does not check Content-Length
        error = http.client.IncompleteRead(b"", response.length)
    return Exchange(
        status=response.status,
        headers=response.headers,
        body=bytes(kept),
        size=tally.size,
        sha256=tally.sha256,
        complete=error is None,
        error=error,
    )


@contextmanager
def raw_upload(
    url: str, path: str, length: int, token: str = ADMIN_TOKEN
) -> Iterator[socket.socket]:
    """A socket on which a POST of `length` declared body bytes has begun; the test sends
    what it likes of the body, and the connection is dropped on the way out."""
    headers = {"Content-Type": FORM_TYPE, "Content-Length": str(length), **auth(token)}
    sock = socket.create_connection(_address(url), timeout=30)
    try:
        sock.sendall(request_head(url, path, headers))
        yield sock
    finally:
        sock.close()


# An S3 proxy that fails chosen requests


_HEAD_END = b"\r\n\r\n"
_UPLOAD_PART = re.compile(rb"^PUT \S*[?&]partNumber=\d+")
_S3_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected by the test proxy</Message></Error>"
)


Rule = Callable[[bytes, int], bool]  # (request head, body length) -> fail it?


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


def requests_matching(pattern: bytes) -> Rule:
    """Fails every request whose request line matches `pattern`."""
    compiled = re.compile(pattern)
    return lambda head, _: compiled.match(head) is not None


class FailingS3Proxy:
    """A proxy in front of an S3 server: it forwards every request but those `rule`
    picks, which it answers with `500 InternalError` (botocore retries them, then gives
    up). Other requests (aborts, listings) still pass, as they do when an S3 server is
    failing under load.
    """

    def __init__(self, upstream: str, rule: Rule) -> None:
        self._upstream = _address(upstream)
        self._rule = rule
        self.failed = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOCALHOST, 0))
        self.url = f"http://{LOCALHOST}:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> "FailingS3Proxy":
        threading.Thread(target=self._accept, name="s3-proxy", daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self._upstream)
        with self._lock:
            self._sockets += [client, upstream]
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        reader = client.makefile("rb")
        try:
            while head := _read_head(reader):
                length = _content_length(head)
                if self._fails(head, length):
                    if b"100-continue" not in head.lower():
                        reader.read(length)
                    client.sendall(_error_response())
                    return
                upstream.sendall(head)
                while length:
                    block = reader.read(min(length, 256 * KiB))
                    if not block:
                        return
                    upstream.sendall(block)
                    length -= len(block)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _fails(self, head: bytes, length: int) -> bool:
        if not self._rule(head, length):
            return False
        with self._lock:
            self.failed += 1
        return True


def _read_head(reader: Any) -> bytes:
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


def _error_response() -> bytes:
    head = (
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(_S3_ERROR)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + _S3_ERROR


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(256 * KiB):
            target.sendall(data)
    with suppress(OSError):
        target.shutdown(socket.SHUT_WR)


# A server process whose writes are reported by an audit hook


AUDIT_HOOK = r"""
import os, sys

_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {
    "tempfile.mkstemp", "tempfile.mkdtemp", "os.truncate", "os.mkdir",
    "shutil.copyfile", "shutil.copytree", "shutil.move",
}

def _report(event, args):
    if event == "open":
        path, _, flags = args
        if isinstance(path, int) or not flags & _WRITE:
            return
    elif event == "mmap.__new__":
        if args[0] == -1:
            return
        path = f"<fd {args[0]}>"
    elif event in ("os.rename", "os.link", "os.symlink"):
        path = args[1]
    elif event in _PATH_EVENTS:
        path = args[0]
    else:
        return
    if not isinstance(path, str):
        path = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else repr(path)
    sys.__stderr__.write(f"AUDIT\t{event}\t{path}\n")
    sys.__stderr__.flush()

sys.addaudithook(_report)
from cli.main import main
main()
"""


@dataclass
class AuditedServer:
    """A `sealstream serve` process with the audit hook; `writes()` is what it wrote."""

    url: str
    process: "subprocess.Popen[str]"
    output: list[str]
    started_at: int  # index in `output` of the line that says the server is up

    def writes(self) -> list[tuple[str, str]]:
        """(event, path) of every write-like event after start-up."""
        found = []
        for line in self.output[self.started_at :]:
            if line.startswith("AUDIT\t"):
                _, event, path = line.split("\t", 2)
                found.append((event, path))
        return found


@contextmanager
def audited_serve(cwd: Path, env: Mapping[str, str]) -> Iterator[AuditedServer]:
    """`sealstream serve` (cli.main.main in a fresh interpreter) with an audit hook that
    reports to stderr every open for writing, temp file, rename and link; the output is
    drained by a thread, complete once the block exits (the process is stopped there)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", AUDIT_HOOK, "serve", "--port", str(port)],
        cwd=cwd,
        env={
            **os.environ,
            **AWS_TEST_ENVIRONMENT,
            "PYTHONDONTWRITEBYTECODE": "1",
            "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    up = threading.Event()

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                up.set()

    reader = threading.Thread(target=drain, name="audited-serve", daemon=True)
    reader.start()
    server = AuditedServer(f"http://{LOCALHOST}:{port}", process, output, 0)
    try:
        wait_until(lambda: up.is_set() or process.poll() is not None, "the server to start")
        if not up.is_set():
            raise RuntimeError("sealstream serve exited:\n" + "\n".join(output))
        server.started_at = next(i for i, line in enumerate(output) if "Uvicorn running" in line)
        yield server
    finally:
        terminate(process)
        reader.join(timeout=10)
        process.stdout.close()
