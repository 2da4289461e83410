"""Hostile input over real HTTP: JSON built to break a parser, in every route that reads
JSON (request bodies and the crypto routes' `metadata` part), and requests written byte by
byte to a socket with broken framing, forms, headers and ranges. Each gets a 4xx problem
(or, once a stream has begun, an aborted one), never a 5xx, and the server stays whole."""

import http.client
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, Api, live_api, local_settings
from tests.support.http import (
    BOUNDARY,
    CLOSE,
    DECRYPT,
    ENCRYPT,
    FORM_TYPE,
    KEYS,
    connect,
    create_key,
    form_bytes,
    post_form,
    problem,
)

JSON_ROUTES = [
    KEYS,
    f"{KEYS}/import",
    f"{KEYS}/mySymKey",  # PATCH
    "/api/admin/tokens",
    "/api/jobs/verify",
    "/api/jobs/batch-encrypt",
    "/api/jobs/rewrap",
]

# JSON that the standard library's parser fails on with something other than a JSON error,
# or lets through as strings that cannot be encoded again.
HOSTILE_JSON: dict[str, bytes] = {
    "deep-array": b"[" * 20_000 + b"]" * 20_000,
    "deep-object": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "deep-in-a-field": b'{"kid": "mySymKey", "encryptionContext": ' + b"[" * 5_000 + b"}",
    "integer-of-5000-digits": b'{"kid": "mySymKey", "frameLength": ' + b"9" * 5_000 + b"}",
    "lone-surrogate-in-a-value": b'{"kid": "mySymKey", "prefix": "\\ud800/", "key": "\\udc00",'
    b' "tenant": "t", "scopes": ["\\ud800"]}',
    "lone-surrogate-in-a-name": b'{"\\udfff": 1}',
    "nan": b'{"kid": "mySymKey", "frameLength": NaN}',
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One server on the local backend (parsing does not depend on it) with `mySymKey`,
    which gives up on a stalled request after two seconds."""
    settings = local_settings(tmp_path_factory.mktemp("hostile"))
    # Short waits, so that a request cut short is answered (408) within the test.
    quick = settings.model_copy(update={"idle_timeout": 2.0, "header_timeout": 2.0})
    with live_api(quick) as api:
        with api.client() as client:
            create_key(client)
        yield api


@pytest.mark.parametrize("body", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_bodies_are_refused(served: Api, body: bytes) -> None:
    with served.client() as client:
        for path in JSON_ROUTES:
            method = "PATCH" if path.endswith("mySymKey") else "POST"
            response = client.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
            detail = problem(response, 400, "invalid-json")["detail"]
            assert detail.startswith("the body is not valid JSON: "), detail
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("metadata", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_json_metadata_is_refused(served: Api, metadata: bytes) -> None:
    with served.client() as client:
        for path in (ENCRYPT, DECRYPT):
            detail = problem(post_form(client, path, metadata, b"x"), 400, "invalid-metadata")
            assert detail["detail"].startswith("the metadata part is not valid JSON: ")
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        (KEYS, "GET, POST"),  # two routes
        (f"{KEYS}/import", "POST"),  # not the kid 'import' of /keys/{kid}
        (f"{KEYS}/mySymKey", "DELETE, GET, PATCH"),
        ("/api/jobs/verify", "POST"),
        ("/healthz", "GET"),
    ],
)
def test_a_wrong_method_is_told_every_method_the_resource_takes(
    served: Api, path: str, allowed: str
) -> None:
    with served.client() as client:
        response = client.request("OPTIONS", path)
        problem(response, 405, "method-not-allowed")
        assert response.headers["Allow"] == allowed


# Hostile requests written byte by byte to a socket: no HTTP client would send them.


@dataclass
class RawAnswer:
    """What came back for a raw request: a status (None: the connection closed without
    one), the response's headers and body, and whether the body ended properly."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    complete: bool


def raw_request(url: str, data: bytes) -> RawAnswer:
    """Send `data` as is, keep the connection open, and read whatever answer comes."""
    with connect(url) as sock:
        with suppress(OSError):  # the server may answer and close before it has read it all
            sock.sendall(data)
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return RawAnswer(None, {}, b"", complete=False)
        headers = {name.lower(): value for name, value in response.getheaders()}
        try:
            return RawAnswer(response.status, headers, response.read(), complete=True)
        except (http.client.IncompleteRead, OSError) as exc:
            partial = exc.partial if isinstance(exc, http.client.IncompleteRead) else b""
            return RawAnswer(response.status, headers, partial, complete=False)


def head(
    path: str = ENCRYPT,
    *,
    method: str = "POST",
    content_type: bytes = FORM_TYPE.encode(),
    length: int | bytes | None = None,
    extra: Iterable[bytes] = (),
    token: bytes = ADMIN_TOKEN.encode(),
) -> bytes:
    """A request head; `length` None means chunked. Raw bytes, so that any header may hold
    anything."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    if token:
        lines.append(b"Authorization: Bearer " + token)
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
    else:
        lines.append(
            b"Content-Length: " + (length if isinstance(length, bytes) else b"%d" % length)
        )
    lines += list(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def sized(body: bytes, **options: Any) -> bytes:
    """A request with `body` and its true Content-Length."""
    return head(length=len(body), **options) + body


def chunked(*chunks: bytes, end: bool = True, **options: Any) -> bytes:
    framed = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in chunks if chunk)
    return head(**options) + framed + (b"0\r\n\r\n" if end else b"")


META = b'{"kid": "mySymKey"}'
GOOD_FORM = form_bytes(META, b"hello")
D = f"--{BOUNDARY}".encode()


def part(name: bytes, data: bytes, *extra_headers: bytes) -> bytes:
    lines = [D, b'Content-Disposition: form-data; name="' + name + b'"', *extra_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + data + b"\r\n"


MESSAGE_HEADER_CASES: dict[str, bytes] = {
    # The HTTP framing itself
    "not-http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "nul-in-the-request-line": b"POST /api/crypto/\x00stream/encrypt HTTP/1.1\r\n\r\n",
    "nul-in-a-header-value": head(extra=[b"X-Test: a\x00b"], length=0),
    "nul-in-a-header-name": head(extra=[b"X-\x00Test: ab"], length=0),
    "header-without-colon": head(extra=[b"this is no header"], length=0),
    "obs-fold-header": head(extra=[b"X-Test: a", b"  folded"], length=0),
    "non-utf8-header-value": head(extra=[b"X-Test: \xff\xfe\xc3\x28"], length=0),
    "huge-header-line": head(extra=[b"X-Test: " + b"a" * 100_000], length=0),
    "thousands-of-headers": head(extra=[b"X-%d: y" % i for i in range(5_000)], length=0),
    "content-length-not-a-number": head(length=b"12abc") + b"x" * 12,
    "content-length-negative": head(length=b"-5"),
    "content-length-of-5000-digits": head(length=b"9" * 5_000),
    "content-length-twice-differing": head(length=10, extra=[b"Content-Length: 20"]) + b"x" * 20,
    "content-length-and-chunked": head(length=5, extra=[b"Transfer-Encoding: chunked"])
    + b"5\r\nhello\r\n0\r\n\r\n",
    "chunk-size-not-hex": head() + b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk-size-of-5000-digits": head() + b"f" * 5_000 + b"\r\nx\r\n",
    "http-version-absurd": b"POST /api/crypto/stream/encrypt HTTP/9.9\r\nHost: x\r\n\r\n",
    "method-absurd": b"P\x01ST /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "path-with-spaces": b"GET /api/key management/keys HTTP/1.1\r\nHost: x\r\n\r\n",
}

FORM_CASES: dict[str, bytes] = {
    # Content-Type and boundary
    "no-content-type": sized(GOOD_FORM, content_type=b""),
    "boundary-empty": sized(GOOD_FORM, content_type=b"multipart/form-data; boundary="),
    "boundary-of-5000-bytes": sized(
        GOOD_FORM, content_type=b"multipart/form-data; boundary=" + b"b" * 5000
    ),
    "boundary-not-in-body": sized(GOOD_FORM, content_type=b"multipart/form-data; boundary=other"),
    "boundary-with-nul": sized(GOOD_FORM, content_type=b"multipart/form-data; boundary=a\x00b"),
    "boundary-non-utf8": sized(GOOD_FORM, content_type=b"multipart/form-data; boundary=\xff\xfe"),
    "boundary-quoted-oddly": sized(GOOD_FORM, content_type=b'multipart/form-data; boundary="a'),
    "content-type-only-parameters": sized(GOOD_FORM, content_type=b";;;=;=="),
    "content-type-huge": sized(GOOD_FORM, content_type=b"multipart/" + b"x" * 60_000),
    "content-type-json": sized(META, content_type=b"application/json"),
    # Parts missing, duplicated, out of order, oversized
    "empty-body": sized(b""),
    "only-the-closing-boundary": sized(CLOSE),
    "preamble-of-garbage": sized(b"\x00\xff" * 1000 + b"\r\n" + GOOD_FORM),
    "metadata-twice": sized(part(b"metadata", META) + part(b"metadata", META) + CLOSE[2:]),
    "file-twice": sized(
        part(b"metadata", META) + part(b"file", b"a") + part(b"file", b"b") + CLOSE[2:]
    ),
    "file-then-metadata": sized(part(b"file", b"a") + part(b"metadata", META) + CLOSE[2:]),
    "metadata-without-a-name": sized(
        D + b"\r\nContent-Disposition: form-data\r\n\r\n" + META + CLOSE
    ),
    "part-name-nul": sized(part(b"meta\x00data", META) + CLOSE[2:]),
    "part-name-non-utf8": sized(part(b"\xff\xfe", META) + CLOSE[2:]),
    "part-name-of-60000-bytes": sized(part(b"m" * 60_000, META) + CLOSE[2:]),
    "part-header-of-100000-bytes": sized(
        part(b"metadata", META, b"X-Pad: " + b"p" * 100_000) + CLOSE[2:]
    ),
    "ten-thousand-part-headers": sized(
        part(b"metadata", META, *(b"X-%d: v" % i for i in range(10_000))) + CLOSE[2:]
    ),
    "part-header-without-colon": sized(part(b"metadata", META, b"no colon here") + CLOSE[2:]),
    "part-content-disposition-not-form-data": sized(
        D + b'\r\nContent-Disposition: attachment; name="metadata"\r\n\r\n' + META + CLOSE
    ),
    "metadata-over-the-limit": sized(part(b"metadata", b" " * 200_000 + META) + CLOSE[2:]),
    "thousand-empty-parts-first": sized(
        b"".join(part(b"x%d" % i, b"") for i in range(1000)) + CLOSE[2:]
    ),
    # Bodies cut short or longer than declared
    "truncated-in-the-metadata": head(length=len(GOOD_FORM)) + GOOD_FORM[:40],
    "truncated-in-the-file": head(length=len(GOOD_FORM)) + GOOD_FORM[: len(GOOD_FORM) - 20],
    "truncated-chunked": chunked(GOOD_FORM[:-20], end=False),
    "no-closing-boundary": sized(GOOD_FORM[: -len(CLOSE)]),
    "content-length-larger-than-body": head(length=len(GOOD_FORM) + 1000) + GOOD_FORM,
    "content-length-smaller-than-body": head(length=10) + GOOD_FORM,
    "chunk-size-overstated": head() + b"ffffff\r\n" + GOOD_FORM,
    # Absurd Authorization and Range values
    "authorization-huge": sized(GOOD_FORM, token=b"a" * 60_000),
    "authorization-nul": sized(GOOD_FORM, token=b"sst_abc\x00def"),
    "authorization-non-utf8": sized(GOOD_FORM, token=b"\xff\xfe\xfd"),
    "authorization-lookalike": sized(
        GOOD_FORM, token=b"sst_" + b"a" * 16 + b"_" + b"\xc3\xa9" * 43
    ),
}

RANGE_CASES: list[bytes] = [
    b"bytes=" + b"9" * 5_000 + b"-",
    b"bytes=-" + b"9" * 5_000,
    b"bytes=0-" + b"9" * 5_000,
    b"bytes=\xff-\xfe",
    b"bytes=1-2,3-4," * 1000,
    b"bytes=--",
    b"pages=0-1",
    b"bytes=\x00",
]


def is_clean_refusal(answer: RawAnswer) -> bool:
    """A 4xx problem document."""
    return (
        answer.status is not None
        and 400 <= answer.status < 500
        and answer.headers.get("content-type") == "application/problem+json"
        and json.loads(answer.body)["status"] == answer.status
    )


@pytest.mark.parametrize("data", MESSAGE_HEADER_CASES.values(), ids=MESSAGE_HEADER_CASES.keys())
def test_malformed_http_gets_a_problem_or_nothing(served: Api, data: bytes) -> None:
    answer = raw_request(served.url, data)
    assert is_clean_refusal(answer), answer


@pytest.mark.parametrize("data", FORM_CASES.values(), ids=FORM_CASES.keys())
@pytest.mark.parametrize("path", [ENCRYPT, DECRYPT], ids=["encrypt", "decrypt"])
def test_hostile_forms_get_a_4xx_or_an_aborted_stream(served: Api, path: str, data: bytes) -> None:
    answer = raw_request(served.url, data.replace(ENCRYPT.encode(), path.encode(), 1))
    if answer.status != 200:
        assert is_clean_refusal(answer), answer
    elif answer.complete:
        # The form ended (its closing boundary came) though the HTTP body had not: what
        # was sealed must be the file part exactly.
        assert path == ENCRYPT, answer
        with served.client() as client:
            assert post_form(client, DECRYPT, {}, answer.body).content == b"hello"


@pytest.mark.parametrize("range_", RANGE_CASES)
def test_absurd_ranges_never_give_a_5xx(served: Api, range_: bytes) -> None:
    with served.client() as client:
        stored = post_form(
            client, ENCRYPT, {"kid": "mySymKey", "destination": {"key": "r"}}, b"x" * 100
        )
        assert stored.status_code in (201, 409), stored.text
    metadata = b'{"source": {"key": "r"}}'
    body = part(b"metadata", metadata) + CLOSE[2:]
    answer = raw_request(
        served.url, head(DECRYPT, length=len(body), extra=[b"Range: " + range_]) + body
    )
    assert answer.status is not None and answer.status < 500, answer
    if answer.status >= 400:
        assert is_clean_refusal(answer), answer


def test_the_server_is_whole_after_every_hostile_request_at_once(served: Api) -> None:
    cases = [*MESSAGE_HEADER_CASES.values(), *FORM_CASES.values()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda data: raw_request(served.url, data), cases))
    assert all(answer.status is None or answer.status < 500 for answer in answers)
    with served.client() as client:
        assert client.get("/readyz").status_code == 200
        encrypted = post_form(client, ENCRYPT, {"kid": "mySymKey"}, b"still works")
        assert encrypted.status_code == 200, encrypted.text
        decrypted = post_form(client, DECRYPT, {}, encrypted.content)
        assert decrypted.status_code == 200 and decrypted.content == b"still works"
