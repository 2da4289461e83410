"""Talking HTTP to a live API in the tests: its routes and the documented key, multipart
bodies built from generators (well formed or not), small requests through httpx, the
checks of a problem document and of ranged reads, and requests through the client's
full-duplex transport or a raw socket.

The duplex transport (sealstream_client.transport) is used because httpx and requests send the whole
body before they read the response: against a bounded server they deadlock on a large
stream-back encrypt. `exchange` sends from one thread while another reads, as curl does.
"""

import hashlib
import http.client
import io
import json
import os
import random
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import httpx

from sealstream_client import SealstreamClient, transport
from tests.conftest import ADMIN_TOKEN
from tests.support.data import KiB, Tally

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


def connect(url: str, timeout: float = 30) -> socket.socket:
    """A plain TCP connection to the server at `url`, for the test to speak HTTP on."""
    return socket.create_connection(_address(url), timeout=timeout)


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
    channel = transport.Channel(connect(url, timeout))
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
    sock = connect(url)
    try:
        sock.sendall(request_head(url, path, headers))
        yield sock
    finally:
        sock.close()


def dechunked(response: bytes) -> bytes:
    """The body of a raw HTTP/1.1 response sent with chunked transfer coding."""
    rest = response[response.index(b"\r\n\r\n") + 4 :]
    body = bytearray()
    while (size := int(rest[: rest.index(b"\r\n")], 16)) > 0:
        start = rest.index(b"\r\n") + 2
        body += rest[start : start + size]
        rest = rest[start + size + 2 :]
    return bytes(body)


def read_response(sock: socket.socket, received: bytes = b"") -> bytes:
    """The rest of a chunked response on `sock`, after what was `received` of it."""
    response = bytearray(received)
    while not response.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection mid-response"
        response += chunk
    return bytes(response)


def assert_round_trip(client: SealstreamClient, kid: str, size: int) -> None:
    """`size` random bytes encrypted under `kid` and decrypted again by `client`'s streams
    come back whole."""
    plaintext = os.urandom(size)
    sealed, opened = io.BytesIO(), io.BytesIO()
    client.encrypt(kid, io.BytesIO(plaintext), sealed)
    client.decrypt(sealed.getvalue(), opened)
    assert hashlib.sha256(opened.getvalue()).digest() == hashlib.sha256(plaintext).digest()
