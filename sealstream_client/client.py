"""The Python client of the sealstream API: a call for every route (streaming encrypt,
decrypt, re-encrypt, sign and verify; keys, stored objects, tokens, jobs, the audit
trail), each answer a typed model (sealstream_client.models) and each refusal an
exception of its problem's family (sealstream_client.errors).

    client = SealstreamClient("http://127.0.0.1:8080", token)
    with open("big.bin", "rb") as source, open("big.enc", "wb") as sink:
        client.encrypt("mySymKey", source, sink)

A stream goes in as bytes, a binary file or an iterable of bytes, and comes out into a
file (`encrypt`, `decrypt`...) or as an iterator of pieces (`open_encrypt`...). Stream-back
calls are full duplex: the upload and the download run at the same time, so a file of
any size goes through in constant memory. Each call runs on its own connection
(sealstream_client.transport), its body a multipart form read from the source piece by
piece (sealstream_client.multipart).

A streamed response that ends without its terminating chunk (or short of its
Content-Length) is the server aborting a transfer that failed midway, such as a tampered
frame: it raises `TransferAborted` and is never reported as complete.
"""

from __future__ import annotations  # the models in annotations load only when called

import base64
import http.client
import importlib
import json
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from sealstream_client.errors import (
    ApiError,
    ClientError,
    TransferAborted,
    UploadLengthMismatch,
    UploadNotConfirmed,
    api_error_class,
)
from sealstream_client.multipart import MultipartBody, Source
from sealstream_client.transport import (
    DOWNLOAD_CHUNK,
    Channel,
    Exchange,
    TlsChannel,
    request_head,
)

if TYPE_CHECKING:
    from sealstream_client import models
    from sealstream_client.models import ApiModel
else:

    class _OnFirstUse:
        """A module imported when one of its names is first read: the answers' models,
        which take pydantic along, are loaded by the first call that answers JSON."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attribute: str) -> object:
            module: ModuleType = importlib.import_module(self._name)
            return getattr(module, attribute)

    models = _OnFirstUse("sealstream_client.models")

__all__ = ["ByteRange", "Download", "SealstreamClient", "Transfer", "Writable"]

DEFAULT_TIMEOUT = 60.0  # seconds a connect, a send or a read may wait
MAX_DOCUMENT = 1024 * 1024  # largest JSON response read
USER_AGENT = "sealstream-client/0.1"
ENCRYPT = "/api/crypto/stream/encrypt"
UPLOADS = "/api/uploads"
TUS = {"Tus-Resumable": "1.0.0"}
# Refusals of a PATCH that a HEAD and another PATCH get past: another request was
# writing the upload (one of this client's, cut off, still ending on the server).
RESUMABLE_REFUSALS = ("upload-offset-mismatch", "upload-locked")
DECRYPT = "/api/crypto/stream/decrypt"
REENCRYPT = "/api/crypto/stream/reencrypt"
ENCRYPT_ARCHIVE = "/api/crypto/stream/encrypt-archive"

M = TypeVar("M", bound="ApiModel")


Kids = str | Sequence[str]  # one key, or several: any one of them opens the message


@dataclass(frozen=True)
class Transfer:
    """What a completed streaming call did, as its response headers and byte counts tell."""

    key_requested: str | None  # X-Key-Requested: the kid asked for (or found)
    key_used: str | None  # X-Key-Used: `kid#version`
    algorithm: str | None  # X-Algorithm-Used
    bytes_sent: int  # bytes read from `source` and uploaded (0 when reading storage)
    bytes_received: int  # bytes of the response body
    status: int = 200  # 206 for a ranged read
    content_range: str | None = None  # Content-Range of a ranged read


@dataclass(frozen=True)
class ResumableResult:
    """A resumable upload that ended: its path, the bytes acknowledged (all of them),
    and the verify job the server started for the object (None where this client was
    not told it: the upload was completed by a request whose answer was lost)."""

    upload: str
    offset: int
    verify_job: str | None


@dataclass(frozen=True)
class _Acknowledged:
    """What a HEAD says of an upload: its acknowledged offset of its length, the verify
    job if this HEAD completed it, and whether it was completed already (the server's
    tombstone)."""

    offset: int
    length: int
    verify_job: str | None
    completed: bool

    def result(self, upload: str, length: int) -> ResumableResult | None:
        """The upload's end if this HEAD says the object is made, else None."""
        if not self.completed and self.verify_job is None:
            return None
        if self.offset != length:
            raise ClientError(
                f"the upload was completed with {self.offset} bytes, not this file's {length}"
            )
        return ResumableResult(upload, self.offset, self.verify_job)


class Writable(Protocol):
    """A binary file opened for writing, or anything with its `write`."""

    def write(self, data: bytes, /) -> object: ...


# (first, last): plaintext bytes first to last inclusive; (first, None) from first to the
# end; (None, n) the last n bytes.
ByteRange = tuple[int | None, int | None]


class Download:
    """A streamed response, open: iterate over it for the pieces of its body (a
    `TransferAborted` if it breaks off), then `transfer` says what went through. Leaving
    it (or `close`) ends the exchange, whole or not."""

    def __init__(
        self, exchange: Exchange, response: http.client.HTTPResponse, body: MultipartBody
    ) -> None:
        self._exchange = exchange
        self._response = response
        self._body = body
        self._received = 0
        self._whole = False
        self.status = response.status
        self.length = response.length  # the body's bytes, when announced (Content-Length)
        self.key_requested = response.getheader("X-Key-Requested")
        self.key_used = response.getheader("X-Key-Used")
        self.algorithm = response.getheader("X-Algorithm-Used")
        self.content_range = response.getheader("Content-Range")

    def __enter__(self) -> Download:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._exchange.__exit__(None, None, None)

    def __iter__(self) -> Iterator[bytes]:
        while data := self._read():
            self._received += len(data)
            yield data
        if self._response.length:  # Content-Length bytes still missing
            self._exchange.raise_source_error()
            raise TransferAborted(
                f"{self._response.length} bytes short of its length", self._received
            )
        _finish(self._exchange)
        self._whole = True

    def copy_to(self, sink: Writable) -> Transfer:
        """Write the whole body to `sink`; what went through."""
        for data in self:
            sink.write(data)
        return self.transfer

    @property
    def transfer(self) -> Transfer:
        """What went through; only once the whole body has been read."""
        if not self._whole:
            raise ClientError("the transfer is not complete")
        return Transfer(
            key_requested=self.key_requested,
            key_used=self.key_used,
            algorithm=self.algorithm,
            bytes_sent=self._body.bytes_sent,
            bytes_received=self._received,
            status=self.status,
            content_range=self.content_range,
        )

    def _read(self) -> bytes:
        try:
            return self._response.read1(DOWNLOAD_CHUNK)
        except (http.client.HTTPException, OSError) as exc:
            self._exchange.raise_source_error()
            raise TransferAborted(_describe(exc), self._received) from exc


class SealstreamClient:
    """A client of one sealstream API at `url` (http or https), acting with `token`.

    Every call opens its own connection, so one client may serve many threads at once.
    `timeout` bounds each connect, send and read (an idle timeout, not a limit on a whole
    transfer). `ssl_context` overrides the default certificate checks for https.
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
        self.timeout = timeout
        self._ssl_context = ssl_context

    # Streaming

    def encrypt(
        self,
        kid: Kids,
        source: Source,
        sink: Writable,
        *,
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
        recipient_public_key: Mapping[str, Any] | None = None,
        signed: bool | None = None,
    ) -> Transfer:
        """Encrypt `source` under the key `kid` (or for each of several keys, and the
        public JWK `recipient_public_key` of a key the service does not hold; `signed`,
        by default for several recipients: a signed message), writing the ciphertext to
        `sink` as it streams back. Raises `TransferAborted` (and `sink` holds only the
        part that arrived) if the server aborts midway."""
        opened = self.open_encrypt(
            kid,
            source,
            encryption_context=encryption_context,
            frame_length=frame_length,
            recipient_public_key=recipient_public_key,
            signed=signed,
        )
        with opened as download:
            return download.copy_to(sink)

    def open_encrypt(
        self,
        kid: Kids,
        source: Source,
        *,
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
        recipient_public_key: Mapping[str, Any] | None = None,
        signed: bool | None = None,
    ) -> Download:
        """`encrypt`, its ciphertext as the pieces of a `Download` (use it with `with`)."""
        metadata = _metadata(
            kid=_kids(kid),
            encryptionContext=_context(encryption_context),
            frameLength=frame_length,
            recipientPublicKey=_jwk(recipient_public_key),
            signed=signed,
        )
        return self._open_stream(ENCRYPT, metadata, source)

    def encrypt_to_storage(
        self,
        kid: Kids,
        source: Source,
        *,
        key: str,
        bucket: str | None = None,
        overwrite: bool = False,
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
        recipient_public_key: Mapping[str, Any] | None = None,
        signed: bool | None = None,
    ) -> models.StoredObject:
        """Encrypt `source` into the object `key` of the tenant's storage (for the keys and
        recipient `encrypt` takes); what was stored."""
        metadata = _metadata(
            kid=_kids(kid),
            encryptionContext=_context(encryption_context),
            frameLength=frame_length,
            recipientPublicKey=_jwk(recipient_public_key),
            signed=signed,
            destination=_destination(key, bucket, overwrite),
        )
        return self._posted(ENCRYPT, metadata, source, models.StoredObject)

    def upload_resumable(
        self,
        kid: str,
        file: BinaryIO,
        length: int,
        *,
        key: str,
        bucket: str | None = None,
        overwrite: bool = False,
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
        upload: str | None = None,
        created: Callable[[str], object] = lambda _: None,
        attempts: int = 5,
    ) -> ResumableResult:
        """Encrypt the `length` bytes of `file` (seekable) into the object `key` through a
        resumable upload (tus, `/api/uploads`): the one at path `upload` if given (and
        still there), else a new one, whose path is handed to `created` first (keep it to
        go on after this process ends). A broken connection is followed by a HEAD and a
        PATCH from the offset the server acknowledged, up to `attempts` failures in a row
        (the HEAD's own included). A HEAD that finds every byte acknowledged ends it once
        the object is made: the HEAD completed it (the result names its verify job), or a
        request cut off before its answer is completing it, which is waited for (HEAD
        again, `attempts` times at most) until the upload is gone and the object listed
        at `key` (no verify job named); `UploadNotConfirmed` if that is not seen. An
        upload completed already (by a request whose answer was lost, or another run)
        ends at once while the server's tombstone says so (no verify job named)."""
        if upload is None or self._length_of(upload, length) is None:
            upload = self._create_upload(
                kid, length, key, bucket, overwrite, encryption_context, frame_length
            )
            created(upload)
        failures = 0
        while True:
            try:
                acknowledged = self._upload_offset(upload)
                if acknowledged is None:
                    break
                offset = acknowledged.offset
                if offset >= length:
                    ended = acknowledged.result(upload, length)
                    if ended is None:
                        return self._completed_elsewhere(upload, length, key, bucket, attempts)
                    return ended
                return self._patch_rest(upload, file, offset, length)
            except (ClientError, OSError) as exc:
                if isinstance(exc, ApiError) and exc.code not in RESUMABLE_REFUSALS:
                    raise
                failures += 1
                if failures >= attempts:
                    raise
                time.sleep(min(2.0, 0.2 * failures))
        raise ClientError(
            f"the upload is gone: expired, terminated, or completed by a request whose "
            f"answer was lost (see whether {key!r} is stored)"
        )

    def terminate_upload(self, upload: str) -> None:
        """Abort the resumable upload at path `upload` (tus termination): nothing of it
        stays in storage. One the server no longer has is gone already."""
        headers = TUS | {"Content-Length": "0"}
        with Exchange(self._connect(), self._head("DELETE", upload, headers)) as exchange:
            response = _response(exchange)
            if response.status not in (204, 404):
                raise _api_error(response)

    def _completed_elsewhere(
        self, upload: str, length: int, key: str, bucket: str | None, attempts: int
    ) -> ResumableResult:
        """The upload whose every byte is acknowledged, once the request completing it
        is seen to have made it: gone, its object listed at `key` (or once a HEAD of
        ours completes it, as it does one whose completion failed)."""
        for tries in range(1, attempts + 1):
            time.sleep(min(2.0, 0.2 * tries))
            acknowledged = self._upload_offset(upload)
            if acknowledged is None:
                listed = self.list_objects(prefix=key, bucket=bucket, limit=1).objects
                if listed and listed[0].key == key:
                    return ResumableResult(upload, length, None)
                break
            ended = acknowledged.result(upload, length)
            if ended is not None:
                return ended
        raise UploadNotConfirmed(
            f"every byte was acknowledged, but the request completing the upload was not "
            f"seen to finish: see whether {key!r} is stored"
        )

    def _create_upload(
        self,
        kid: str,
        length: int,
        key: str,
        bucket: str | None,
        overwrite: bool,
        context: Mapping[str, str] | None,
        frame_length: int | None,
    ) -> str:
        fields = _metadata(
            kid=kid,
            destination=key,
            bucket=bucket,
            overwrite="true" if overwrite else None,
            context=None if not context else json.dumps(dict(context)),
            frameLength=None if frame_length is None else str(frame_length),
        )
        metadata = ",".join(
            f"{name} {base64.b64encode(str(value).encode()).decode()}"
            for name, value in fields.items()
        )
        headers = TUS | {"Upload-Length": str(length), "Upload-Metadata": metadata}
        with Exchange(self._connect(), self._head("POST", UPLOADS, headers)) as exchange:
            response = _response(exchange)
            if response.status != 201:
                raise _api_error(response)
            location = response.getheader("Location") or ""
        return location.removeprefix(self._base_path)

    def _length_of(self, upload: str, length: int) -> int | None:
        """The length of the upload at `upload` (None if there is none any more), which
        must be `length`: one of another length is never gone on with (its offset
        reaching `length` would not make it done, nor would its object hold the file)."""
        acknowledged = self._upload_offset(upload)
        if acknowledged is None:
            return None
        if acknowledged.length != length:
            raise UploadLengthMismatch(upload, acknowledged.length, length)
        return length

    def _upload_offset(self, upload: str) -> _Acknowledged | None:
        """What a HEAD says of the upload; None if there is no such upload (any more)."""
        with Exchange(self._connect(), self._head("HEAD", upload, TUS)) as exchange:
            response = _response(exchange)
            if response.status == 404:
                return None
            if response.status != 200:
                raise _api_error(response)
            offset = int(response.getheader("Upload-Offset") or "0")
            length = int(response.getheader("Upload-Length") or "-1")
            completed = response.getheader("X-Upload-Completed") == "1"
            return _Acknowledged(offset, length, response.getheader("X-Verify-Job"), completed)

    def _patch_rest(self, upload: str, file: BinaryIO, offset: int, length: int) -> ResumableResult:
        """One PATCH of the bytes of `file` from `offset` to its end."""
        file.seek(offset)
        headers = TUS | {
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(length - offset),
        }
        body = iter(lambda: file.read(DOWNLOAD_CHUNK), b"")
        with Exchange(
            self._connect(), self._head("PATCH", upload, headers), body, chunked=False
        ) as exchange:
            response = _response(exchange)
            if response.status != 204:
                raise _api_error(response)
            reached = int(response.getheader("Upload-Offset") or "0")
            job = response.getheader("X-Verify-Job")
        if reached != length:
            raise ClientError(f"the upload stopped at {reached} of {length} bytes")
        if job is None:  # a HEAD tells whether it is completed
            raise ClientError("every byte was acknowledged, but no completion was answered")
        return ResumableResult(upload, reached, job)

    def encrypt_archive(
        self,
        kid: str,
        source: Source,
        *,
        prefix: str,
        bucket: str | None = None,
        overwrite: bool = False,
        archive_format: str = "auto",
        encryption_context: Mapping[str, str] | None = None,
        frame_length: int | None = None,
        names: str = "plain",
    ) -> Generator[dict[str, Any], None, None]:
        """Stream the archive `source` in, each member sealed into an object under
        `prefix` as it arrives: the job's progress lines as they come, the first
        `{"event": "started", "jobId"}`, the last `{"event": "finished", ...}`. With
        `names="encrypted"` the members' paths are hidden in their object keys."""
        metadata = _metadata(
            kid=kid,
            encryptionContext=_context(encryption_context),
            frameLength=frame_length,
            format=archive_format,
            names=None if names == "plain" else names,
            destination={"prefix": prefix, "overwrite": overwrite, **_metadata(bucket=bucket)},
        )
        with self._open_stream(ENCRYPT_ARCHIVE, metadata, source) as download:
            pending = b""
            for piece in download:
                *lines, pending = (pending + piece).split(b"\n")
                yield from (json.loads(line) for line in lines if line)

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
        opened = self.open_decrypt(source, kid=kid, encryption_context=encryption_context)
        with opened as download:
            return download.copy_to(sink)

    def open_decrypt(
        self,
        source: Source,
        *,
        kid: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Download:
        """`decrypt`, its plaintext as the pieces of a `Download` (use it with `with`)."""
        metadata = _metadata(kid=kid, encryptionContext=_context(encryption_context))
        return self._open_stream(DECRYPT, metadata, source)

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
        opened = self.open_object(
            key,
            bucket=bucket,
            byte_range=byte_range,
            kid=kid,
            encryption_context=encryption_context,
        )
        with opened as download:
            if on_length is not None:
                on_length(download.length)
            return download.copy_to(sink)

    def open_object(
        self,
        key: str,
        *,
        bucket: str | None = None,
        byte_range: ByteRange | None = None,
        kid: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Download:
        """`decrypt_object`, its plaintext as the pieces of a `Download` (with `with`)."""
        source = {"key": key, **_metadata(bucket=bucket)}
        metadata = _metadata(kid=kid, encryptionContext=_context(encryption_context), source=source)
        headers = {} if byte_range is None else {"Range": _range_header(byte_range)}
        return self._open_stream(DECRYPT, metadata, None, headers)

    def reencrypt(
        self,
        kid: str,
        source: Source,
        sink: Writable,
        *,
        source_kid: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Transfer:
        """Re-encrypt the message `source` for the key `kid` under a fresh data key,
        writing the new message to `sink` as it streams back (`source_kid`: the message
        must be sealed for that key)."""
        opened = self.open_reencrypt(
            kid, source, source_kid=source_kid, encryption_context=encryption_context
        )
        with opened as download:
            return download.copy_to(sink)

    def open_reencrypt(
        self,
        kid: str,
        source: Source,
        *,
        source_kid: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Download:
        """`reencrypt`, the new message as the pieces of a `Download` (with `with`)."""
        metadata = _metadata(
            kid=kid, sourceKid=source_kid, encryptionContext=_context(encryption_context)
        )
        return self._open_stream(REENCRYPT, metadata, source)

    def reencrypt_object(
        self,
        kid: str,
        key: str,
        *,
        bucket: str | None = None,
        source_kid: str | None = None,
        destination: str | None = None,
        destination_bucket: str | None = None,
        overwrite: bool = False,
        encryption_context: Mapping[str, str] | None = None,
    ) -> models.StoredObject:
        """Re-encrypt the stored object `key` (which must carry `encryption_context`'s
        pairs) for `kid`, in place or into the object `destination`; what was stored,
        with the job that verifies it."""
        metadata = _metadata(
            kid=kid,
            sourceKid=source_kid,
            encryptionContext=_context(encryption_context),
            source={"key": key, **_metadata(bucket=bucket)},
            destination=None
            if destination is None
            else _destination(destination, destination_bucket, overwrite),
        )
        return self._posted(REENCRYPT, metadata, None, models.StoredObject)

    # Signatures

    def sign(self, kid: str, source: Source) -> str:
        """A detached JWS (compact form) of `source`, by the primary version of `kid`."""
        return self._signature("/api/crypto/stream/sign", {"kid": kid}, source)

    def verify(
        self,
        source: Source,
        signature: str,
        *,
        kid: str | None = None,
        public_key: Mapping[str, Any] | None = None,
    ) -> models.Verdict:
        """Check the detached JWS `signature` over `source`: the verdict, or
        `SignatureRejected` (`signature-invalid`) if it does not verify."""
        metadata = _metadata(
            signature=signature,
            kid=kid,
            publicKey=None if public_key is None else dict(public_key),
        )
        return self._posted("/api/crypto/stream/verify", metadata, source, models.Verdict)

    def resign(
        self,
        kid: str,
        source: Source,
        signature: str,
        *,
        source_kid: str | None = None,
        source_public_key: Mapping[str, Any] | None = None,
    ) -> str:
        """Check `signature` over `source` with the old key, and sign it anew with `kid`."""
        metadata = _metadata(
            kid=kid,
            signature=signature,
            sourceKid=source_kid,
            sourcePublicKey=None if source_public_key is None else dict(source_public_key),
        )
        return self._signature("/api/crypto/stream/resign", metadata, source)

    # Keys

    def create_key(self, /, **fields: Any) -> models.Key:
        """Generate a key: the fields as the API names them (`kid`, `kty`, `alg`,
        `keyOps`, `exportable`...; those None are left out); the new key."""
        return self._json(models.Key, "POST", "/api/key-management/keys", _metadata(**fields))

    def import_key(self, /, **fields: Any) -> models.Key:
        """Import a key (BYOK): `kid`, `jwk` (a private JWK) and the policy fields of
        `create_key`; the new key."""
        return self._json(
            models.Key, "POST", "/api/key-management/keys/import", _metadata(**fields)
        )

    def list_keys(self, *, limit: int | None = None, after: str | None = None) -> models.KeyPage:
        """A page of keys: `keys`, and `next`, the `after` of the next page (or None)."""
        query = {"limit": limit, "after": after}
        return self._json(models.KeyPage, "GET", "/api/key-management/keys", query=query)

    def get_key(self, kid: str) -> models.Key:
        """A key's metadata (and public JWK for asymmetric keys)."""
        return self._json(models.Key, "GET", _key_path(kid))

    def rotate_key(self, kid: str) -> models.Key:
        """Add a version to the key and make it primary; the key."""
        return self._json(models.Key, "POST", _key_path(kid, "rotate"))

    def disable_key(self, kid: str) -> models.Key:
        return self._json(models.Key, "POST", _key_path(kid, "disable"))

    def enable_key(self, kid: str) -> models.Key:
        return self._json(models.Key, "POST", _key_path(kid, "enable"))

    def delete_key(self, kid: str, *, pending_window_days: int | None = None) -> models.Key:
        """Schedule the key's destruction after a pending window; the key."""
        query = {"pendingWindowDays": pending_window_days}
        return self._json(models.Key, "DELETE", _key_path(kid), query=query)

    def cancel_key_deletion(self, kid: str) -> models.Key:
        """Keep a key pending deletion; it comes back disabled."""
        return self._json(models.Key, "POST", _key_path(kid, "cancel-deletion"))

    def update_key(self, kid: str, /, **fields: Any) -> models.Key:
        """Change the key's policy (`exportable=False`, one-way); the key."""
        return self._json(models.Key, "PATCH", _key_path(kid), fields)

    def export_key(self, kid: str, *, version: int | None = None) -> models.Jwk:
        """One version of the key (the primary by default) as a private JWK."""
        return self._json(models.Jwk, "GET", _key_path(kid, "export"), query={"version": version})

    def supported_algorithms(self) -> models.Algorithms:
        return self._json(models.Algorithms, "GET", "/api/key-management/supported-algorithms")

    def list_key_version_objects(
        self, kid: str, version: int, *, limit: int | None = None, after: str | None = None
    ) -> models.IndexedObjectPage:
        """A page of the stored objects sealed under one version of the key."""
        query = {"version": version, "limit": limit, "after": after}
        return self._json(models.IndexedObjectPage, "GET", _key_path(kid, "objects"), query=query)

    def retire_key_version(
        self, kid: str, version: int, *, confirm: str, pending_window_days: int | None = None
    ) -> models.Key:
        """Retire a version no stored object uses; `confirm` is its name, `kid#version`."""
        body = _metadata(confirm=confirm, pendingWindowDays=pending_window_days)
        return self._json(models.Key, "POST", _key_path(kid, f"versions/{version}/retire"), body)

    def cancel_key_version_retirement(self, kid: str, version: int) -> models.Key:
        """Put a retired version back in use, within its pending window."""
        path = _key_path(kid, f"versions/{version}/cancel-retirement")
        return self._json(models.Key, "POST", path)

    # Stored objects

    def list_objects(
        self,
        *,
        prefix: str | None = None,
        after: str | None = None,
        limit: int | None = None,
        bucket: str | None = None,
    ) -> models.ObjectPage:
        """A page of the tenant's stored objects, in key order: `objects`, and `next`."""
        query = {"prefix": prefix, "after": after, "limit": limit, "bucket": bucket}
        return self._json(models.ObjectPage, "GET", "/api/objects", query=query)

    def delete_object(self, key: str, *, bucket: str | None = None) -> None:
        """Delete a stored object, with its record."""
        path = f"/api/objects/{quote(key, safe='/')}"
        self._call("DELETE", path, query={"bucket": bucket})

    # Tokens

    def create_token(self, /, **fields: Any) -> models.IssuedToken:
        """Issue a token (`tenant`, `scopes`, `name`, `expiresAt`); the only answer that
        shows the token string."""
        return self._json(models.IssuedToken, "POST", "/api/admin/tokens", _metadata(**fields))

    def list_tokens(self, *, tenant: str | None = None) -> models.TokenList:
        return self._json(models.TokenList, "GET", "/api/admin/tokens", query={"tenant": tenant})

    def revoke_token(self, token_id: str) -> models.Token:
        return self._json(models.Token, "DELETE", f"/api/admin/tokens/{quote(token_id, safe='')}")

    # The name key

    def name_key(self) -> models.NameKey:
        """The versions of the tenant's name key, the newest current."""
        return self._json(models.NameKey, "GET", "/api/admin/name-key")

    def rotate_name_key(self) -> models.NameKey:
        """Add a version of the tenant's name key, which new runs hide names under."""
        return self._json(models.NameKey, "POST", "/api/admin/name-key/rotate")

    # Jobs

    def start_job(self, kind: str, /, **fields: Any) -> models.Job:
        """Start a job of `kind` (`verify`, `batch-encrypt`, `reencrypt`) with the fields
        of its request; the queued job."""
        path = f"/api/jobs/{quote(kind, safe='')}"
        return self._json(models.Job, "POST", path, _metadata(**fields))

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> models.JobPage:
        """A page of jobs, newest first: `jobs`, and `next`, the `after` of the next page."""
        query = {"status": status, "kind": kind, "limit": limit, "after": after}
        return self._json(models.JobPage, "GET", "/api/jobs", query=query)

    def get_job(self, job_id: str) -> models.Job:
        return self._json(models.Job, "GET", f"/api/jobs/{quote(job_id, safe='')}")

    def cancel_job(self, job_id: str) -> models.Job:
        return self._json(models.Job, "POST", f"/api/jobs/{quote(job_id, safe='')}/cancel")

    # The audit trail, and the service's health

    def list_audit_events(self, /, **query: str | int | None) -> models.AuditPage:
        """A page of audit events, oldest first: the query as the API names it (`since`,
        `until` as RFC 3339 text, `kid`, `tokenId`, `outcome`, `operation`, `limit`,
        `after`)."""
        return self._json(models.AuditPage, "GET", "/api/audit", query=query)

    def health(self) -> dict[str, Any]:
        """`/healthz`: the process is up."""
        return self._call("GET", "/healthz")

    def readiness(self) -> dict[str, Any]:
        """`/readyz`: storage (and Redis, with jobs on it) answers; else `Unavailable`."""
        return self._call("GET", "/readyz")

    # Requests

    def _open_stream(
        self,
        path: str,
        metadata: dict[str, Any],
        source: Source | None,
        headers: Mapping[str, str] | None = None,
    ) -> Download:
        body = MultipartBody(metadata, source)
        exchange = self._upload(path, body, headers)
        try:
            response = _response(exchange)
            if response.status >= 400:
                raise _api_error(response)
            if response.status not in (200, 206):
                raise ClientError(f"unexpected response {response.status} {response.reason}")
            if not response.chunked and response.length is None:
                raise ClientError("the response has no length framing: cannot tell if it is whole")
            return Download(exchange, response, body)
        except BaseException:
            exchange.__exit__(None, None, None)
            raise

    def _posted(
        self, path: str, metadata: dict[str, Any], source: Source | None, model: type[M]
    ) -> M:
        """A multipart POST whose answer is a JSON document."""
        with self._upload(path, MultipartBody(metadata, source)) as exchange:
            document = _document(_response(exchange))
            _finish(exchange)
            return model.of(document)

    def _signature(self, path: str, metadata: dict[str, Any], source: Source) -> str:
        with self._upload(path, MultipartBody(metadata, source)) as exchange:
            response = _response(exchange)
            if response.status >= 400:
                raise _api_error(response)
            signature = response.read(MAX_DOCUMENT).decode("ascii", "replace").strip()
            _finish(exchange)
            return signature

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
        model: type[M],
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | int | None] | None = None,
    ) -> M:
        return model.of(self._call(method, path, body, query=query))

    def _call(
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
            sock = socket.create_connection((self._host, self._port), timeout=self.timeout)
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


def _finish(exchange: Exchange) -> None:
    """After a whole response: the upload must have ended too, or the server answered
    without reading all of it (and what it answered may not cover all of it)."""
    exchange.finish()
    if not exchange.sent_all:
        raise ClientError("the server answered before it had read the whole upload")


def _metadata(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _kids(kid: Kids) -> str | list[str]:
    return kid if isinstance(kid, str) else list(kid)


def _jwk(jwk: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if jwk is None else dict(jwk)


def _context(context: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if context is None else dict(context)


def _destination(key: str, bucket: str | None, overwrite: bool) -> dict[str, Any]:
    return {"key": key, "overwrite": overwrite, **_metadata(bucket=bucket)}


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
    code = code if isinstance(code, str) else f"http-{response.status}"
    return api_error_class(response.status, code, retry=retry_after is not None)(
        response.status,
        code,
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
