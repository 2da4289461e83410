"""The Python client of the sealstream API: streaming encrypt and decrypt, and a call for
every other route (keys, tokens, jobs).

    client = SealstreamClient("http://127.0.0.1:8080", token)
    with open("big.bin", "rb") as source, open("big.enc", "wb") as sink:
        client.encrypt("mySymKey", source, sink)

Stream-back calls are full duplex: the upload and the download run at the same time, so a
file of any size goes through in constant memory. Each call runs on its own connection
(cli.transport), its body a multipart form read from `source` piece by piece
(cli.multipart).

A streamed response that ends without its terminating chunk (or short of its
Content-Length) is the server aborting a transfer that failed midway, such as a tampered
frame: it raises `TransferAborted` and is never reported as complete.
"""

import http.client
import json
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

from cli.multipart import MultipartBody, Readable, Source, SourceChanged
from cli.transport import DOWNLOAD_CHUNK, Channel, Exchange, TlsChannel, request_head

__all__ = [
    "ApiError",
    "ByteRange",
    "ClientError",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "Readable",
    "SealstreamClient",
    "ServerError",
    "Source",
    "SourceChanged",
    "Transfer",
    "TransferAborted",
    "Unauthenticated",
    "Writable",
    "api_error_class",
]

DEFAULT_TIMEOUT = 60.0  # seconds a connect, a send or a read may wait
MAX_DOCUMENT = 1024 * 1024  # largest JSON response read
USER_AGENT = "sealstream-client/0.1"


class ClientError(Exception):
    """A call to the sealstream API failed."""


class ApiError(ClientError):
    """The server refused the request: its problem document (RFC 9457)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        problem: Mapping[str, Any],
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = dict(problem)
        self.retry_after = retry_after  # seconds, when the answer said (Retry-After)


class InvalidRequest(ApiError):
    """400, 416 or 422: the request, its body or its message is not acceptable."""


class Unauthenticated(ApiError):
    """401: the token is missing, invalid, revoked or expired."""


class PermissionDenied(ApiError):
    """403: the token may not do this (scope, key operations, bucket)."""


class NotFound(ApiError):
    """404: the key, job, token or object does not exist (or is another tenant's)."""


class Conflict(ApiError):
    """409: the state forbids it (exists already, disabled, pending deletion, finished)."""


class RateLimited(ApiError):
    """429, or 503 with Retry-After: try again later (after `retry_after` seconds)."""


class ServerError(ApiError):
    """5xx: the service failed, or storage or a key service behind it did."""


# The exception each status raises; another 4xx raises ApiError itself.
_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    416: InvalidRequest,
    422: InvalidRequest,
    429: RateLimited,
}


def api_error_class(status: int, retry: bool = False) -> type[ApiError]:
    """The class of the refusal with HTTP `status` (`retry`: it said when to retry)."""
    if status == 503 and retry:
        return RateLimited
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, ApiError)


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


class Writable(Protocol):
    """A binary file opened for writing, or anything with its `write`."""

    def write(self, data: bytes, /) -> object: ...


# (first, last): plaintext bytes first to last inclusive; (first, None) from first to the
# end; (None, n) the last n bytes.
ByteRange = tuple[int | None, int | None]


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
        with self._upload(
            "/api/crypto/stream/encrypt", MultipartBody(metadata, source)
        ) as exchange:
            document = _document(_response(exchange))
            _finish(exchange)
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
        on_length: Callable[[int | None], object] | None = None,
    ) -> Transfer:
        """Decrypt the stored object `key` to `sink`; `byte_range` (first, last) reads
        plaintext bytes first to last inclusive, (first, None) from first to the end,
        (None, n) the last n bytes. `on_length` is told the plaintext's length (None if
        not announced) once the response begins, before any byte reaches `sink`.
        Raises `TransferAborted` (`sink` then holds only what arrived) if the server
        aborts midway."""
        source = {"key": key, **_metadata(bucket=bucket)}
        metadata = _metadata(kid=kid, encryptionContext=_context(encryption_context), source=source)
        headers = {} if byte_range is None else {"Range": _range_header(byte_range)}
        path = "/api/crypto/stream/decrypt"
        return self._stream(path, metadata, None, sink, headers, on_length=on_length)

    # Signatures

    def sign(self, kid: str, source: Source) -> str:
        """A detached JWS (compact form) of `source`, by the primary version of `kid`."""
        with self._upload(
            "/api/crypto/stream/sign", MultipartBody({"kid": kid}, source)
        ) as exchange:
            response = _response(exchange)
            if response.status >= 400:
                raise _api_error(response)
            signature = response.read(MAX_DOCUMENT).decode("ascii", "replace").strip()
            _finish(exchange)
            return signature

    def verify(
        self,
        source: Source,
        signature: str,
        *,
        kid: str | None = None,
        public_key: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Check the detached JWS `signature` over `source`: the verdict, or `InvalidRequest`
        (`signature-invalid`) if it does not verify."""
        metadata = _metadata(
            signature=signature,
            kid=kid,
            publicKey=None if public_key is None else dict(public_key),
        )
        body = MultipartBody(metadata, source)
        with self._upload("/api/crypto/stream/verify", body) as exchange:
            document = _document(_response(exchange))
            _finish(exchange)
            return document

    # Keys

    def create_key(self, **fields: Any) -> dict[str, Any]:
        """Generate a key: the fields as the API names them (`kid`, `kty`, `alg`,
        `keyOps`, `exportable`...; those None are left out); the new key's metadata."""
        return self._json("POST", "/api/key-management/keys", _metadata(**fields))

    def import_key(self, **fields: Any) -> dict[str, Any]:
        """Import a key (BYOK): `jwk`, a private JWK, and the policy fields of
        `create_key`; the new key's metadata."""
        return self._json("POST", "/api/key-management/keys/import", _metadata(**fields))

    def list_keys(self, *, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """A page of keys: `keys`, and `next`, the `after` of the next page (or None)."""
        return self._json("GET", "/api/key-management/keys", query={"limit": limit, "after": after})

    def get_key(self, kid: str) -> dict[str, Any]:
        """A key's metadata (and public JWK for asymmetric keys)."""
        return self._json("GET", _key_path(kid))

    def rotate_key(self, kid: str) -> dict[str, Any]:
        """Add a version to the key and make it primary; the key."""
        return self._json("POST", _key_path(kid, "rotate"))

    def disable_key(self, kid: str) -> dict[str, Any]:
        return self._json("POST", _key_path(kid, "disable"))

    def enable_key(self, kid: str) -> dict[str, Any]:
        return self._json("POST", _key_path(kid, "enable"))

    def delete_key(self, kid: str, *, pending_window_days: int | None = None) -> dict[str, Any]:
        """Schedule the key's destruction after a pending window; the key."""
        query = {"pendingWindowDays": pending_window_days}
        return self._json("DELETE", _key_path(kid), query=query)

    def cancel_key_deletion(self, kid: str) -> dict[str, Any]:
        """Keep a key pending deletion; it comes back disabled."""
        return self._json("POST", _key_path(kid, "cancel-deletion"))

    def update_key(self, kid: str, **fields: Any) -> dict[str, Any]:
        """Change the key's policy (`exportable=False`, one-way); the key."""
        return self._json("PATCH", _key_path(kid), fields)

    def export_key(self, kid: str, *, version: int | None = None) -> dict[str, Any]:
        """One version of the key (the primary by default) as a private JWK."""
        return self._json("GET", _key_path(kid, "export"), query={"version": version})

    def supported_algorithms(self) -> dict[str, Any]:
        return self._json("GET", "/api/key-management/supported-algorithms")

    def list_key_version_objects(
        self, kid: str, version: int, *, limit: int | None = None, after: str | None = None
    ) -> dict[str, Any]:
        """A page of the stored objects sealed under one version of the key."""
        query = {"version": version, "limit": limit, "after": after}
        return self._json("GET", _key_path(kid, "objects"), query=query)

    def retire_key_version(
        self, kid: str, version: int, *, confirm: str, pending_window_days: int | None = None
    ) -> dict[str, Any]:
        """Retire a version no stored object uses; `confirm` is its name, `kid#version`."""
        body = _metadata(confirm=confirm, pendingWindowDays=pending_window_days)
        return self._json("POST", _key_path(kid, f"versions/{version}/retire"), body)

    # Stored objects

    def list_objects(
        self,
        *,
        prefix: str | None = None,
        after: str | None = None,
        limit: int | None = None,
        bucket: str | None = None,
    ) -> dict[str, Any]:
        """A page of the tenant's stored objects, in key order: `objects`, and `next`."""
        query = {"prefix": prefix, "after": after, "limit": limit, "bucket": bucket}
        return self._json("GET", "/api/objects", query=query)

    def delete_object(self, key: str, *, bucket: str | None = None) -> None:
        """Delete a stored object, with its record."""
        path = f"/api/objects/{quote(key, safe='/')}"
        self._json("DELETE", path, query={"bucket": bucket})

    # Tokens

    def create_token(self, **fields: Any) -> dict[str, Any]:
        """Issue a token (`tenant`, `scopes`, `name`, `expiresAt`); the only response
        that shows the token string."""
        return self._json("POST", "/api/admin/tokens", _metadata(**fields))

    def list_tokens(self, *, tenant: str | None = None) -> dict[str, Any]:
        return self._json("GET", "/api/admin/tokens", query={"tenant": tenant})

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/admin/tokens/{quote(token_id, safe='')}")

    # Jobs

    def start_job(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Start a job of `kind` (`verify`, `batch-encrypt`, `reencrypt`) with the fields
        of its request; the queued job."""
        return self._json("POST", f"/api/jobs/{quote(kind, safe='')}", _metadata(**fields))

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> dict[str, Any]:
        """A page of jobs, newest first: `jobs`, and `next`, the `after` of the next page."""
        query = {"status": status, "kind": kind, "limit": limit, "after": after}
        return self._json("GET", "/api/jobs", query=query)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/jobs/{quote(job_id, safe='')}")

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/jobs/{quote(job_id, safe='')}/cancel")

    # Requests

    def _stream(
        self,
        path: str,
        metadata: dict[str, Any],
        source: Source | None,
        sink: Writable,
        headers: Mapping[str, str] | None = None,
        *,
        on_length: Callable[[int | None], object] | None = None,
    ) -> Transfer:
        body = MultipartBody(metadata, source)
        with self._upload(path, body, headers) as exchange:
            response = _response(exchange)
            if response.status >= 400:
                raise _api_error(response)
            if response.status not in (200, 206):
                raise ClientError(f"unexpected response {response.status} {response.reason}")
            if not response.chunked and response.length is None:
                raise ClientError("the response has no length framing: cannot tell if it is whole")
            if on_length is not None:
                on_length(response.length)
            received = _receive(exchange, response, sink)
            _finish(exchange)
            return Transfer(
                key_requested=response.getheader("X-Key-Requested"),
                key_used=response.getheader("X-Key-Used"),
                algorithm=response.getheader("X-Algorithm-Used"),
                bytes_sent=body.bytes_sent,
                bytes_received=received,
                status=response.status,
                content_range=response.getheader("Content-Range"),
            )

    def _upload(
        self, path: str, body: MultipartBody, headers: Mapping[str, str] | None = None
    ) -> Exchange:
        """A POST of the multipart `body`, sent while the response is read: with its
        Content-Length when its length is known, else chunked."""
        length = body.length
        framing = {"Content-Type": body.content_type} | (
            {"Transfer-Encoding": "chunked"} if length is None else {"Content-Length": str(length)}
        )
        return Exchange(
            self._connect(),
            self._head("POST", path, framing | dict(headers or {})),
            body,
            chunked=length is None,
        )

    def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | int | None] | None = None,
    ) -> dict[str, Any]:
        """A JSON request's answer (`{}` for a 204, which has no body)."""
        given = _metadata(**(query or {}))
        if given:
            path = f"{path}?{urlencode(given)}"
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Length": str(len(content))}
        if body is not None:
            headers["Content-Type"] = "application/json"
        with Exchange(self._connect(), self._head(method, path, headers) + content) as exchange:
            response = _response(exchange)
            if response.status == 204:
                return {}
            return _document(response)

    def _head(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        fixed = {
            "Host": self._host_header,
            "Authorization": f"Bearer {self._token}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json, application/octet-stream, application/problem+json",
        }
        return request_head(method, f"{self._base_path}{path}", fixed | dict(headers))

    def _connect(self) -> Channel:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except OSError as exc:
            raise ClientError(f"cannot connect to {self._host_header}: {_describe(exc)}") from exc
        if not self._tls:
            return Channel(sock)
        try:
            context = self._ssl_context or ssl.create_default_context()
            return TlsChannel(sock, context, self._host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ClientError(f"TLS with {self._host_header} failed: {_describe(exc)}") from exc


def _response(exchange: Exchange) -> http.client.HTTPResponse:
    """Send the request and read the response's status and headers."""
    try:
        return exchange.response()
    except (http.client.HTTPException, OSError) as exc:
        exchange.raise_source_error()
        raise ClientError(f"no response from the server: {_describe(exc)}") from exc


def _receive(exchange: Exchange, response: http.client.HTTPResponse, sink: Writable) -> int:
    """Write the streamed response's body to `sink`; the bytes written. Raises
    `TransferAborted` if it breaks off before its end."""
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
    return received


def _finish(exchange: Exchange) -> None:
    """After a whole response: the upload must have ended too, or the server answered
    without reading all of it (and what it answered may not cover all of it)."""
    exchange.finish()
    if not exchange.sent_all:
        raise ClientError("the server answered before it had read the whole upload")


def _metadata(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _context(context: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if context is None else dict(context)


def _key_path(kid: str, action: str | None = None) -> str:
    path = f"/api/key-management/keys/{quote(kid, safe='')}"
    return path if action is None else f"{path}/{action}"


def _range_header(byte_range: ByteRange) -> str:
    first, last = byte_range
    if first is None:
        if last is None or last < 1:
            raise ValueError(f"not a byte range: {byte_range!r}")
        return f"bytes=-{last}"
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
    retry_after = _seconds(response.getheader("Retry-After"))
    return api_error_class(response.status, retry_after is not None)(
        response.status,
        code if isinstance(code, str) else f"http-{response.status}",
        detail
        if isinstance(detail, str)
        else raw.decode("utf-8", "replace")[:500] or response.reason,
        problem,
        retry_after,
    )


def _seconds(value: str | None) -> float | None:
    """Retry-After as seconds (its HTTP-date form is left unread)."""
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


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
