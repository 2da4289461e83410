"""The S3 backend: any S3-compatible service through one botocore client per store.

Credentials and region come from the AWS SDK's usual environment. Retries are botocore's
standard mode; whatever still fails is translated by `storage.s3_errors`.
"""

import builtins  # `list` names a store method inside the store classes
from collections.abc import Collection, Generator, Iterator, Sequence
from contextlib import closing, suppress
from datetime import UTC
from typing import TYPE_CHECKING, Any, cast

import botocore.loaders
import botocore.session
from botocore.config import Config

from storage.base import (
    MultipartWriter,
    ObjectInfo,
    ObjectStore,
    Part,
    PartUpload,
    SmallObject,
    UploadStarted,
    contiguous,
    encoded_key,
)
from storage.errors import (
    BucketNotFound,
    InvalidObjectKey,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
)
from storage.s3_errors import s3_errors
from storage.s3_multipart import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    PART_CHECKSUM,
    S3MultipartWriter,
    upload_part,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompleteMultipartUploadRequestTypeDef

DEFAULT_MAX_ATTEMPTS = 5
MAX_KEY_BYTES = 1024
MAX_PAGE_SIZE = 1000  # what S3 returns per listing page at most
# Connections beyond the part uploads, for heads, reads and listings running meanwhile.
SPARE_CONNECTIONS = 4

# botocore parses its S3 model (megabytes of JSON) once per loader, and each session makes
# its own: a store's client cost a quarter of a second of CPU, paid again by each bucket a
# process opens. Sessions are not safe to share across threads; a loader only reads its
# data files and caches what it read, so every store's session shares this one.
_LOADER = botocore.loaders.create_loader()


class S3Store(ObjectStore):
    """Objects in one S3 bucket.

    `part_size` is the first part size of multipart uploads (see `part_size_for`) and
    `max_in_flight` how many parts one writer uploads at once; `page_size` bounds each
    listing request (small values exercise pagination in tests).

    Request bodies are left out of SigV4 signatures (`UNSIGNED-PAYLOAD`) unless
    `sign_payloads`. Over HTTPS botocore already leaves out upload bodies that carry a
    checksum, as ours do; over plain HTTP it hashes every body, a SHA-256 pass over all
    that is stored. That pass buys nothing here: what this service stores in bulk is
    ciphertext that AES-GCM authenticates, every part still carries a CRC32C the
    signature covers, and over plain HTTP whatever is read back (object or record) comes
    unsigned anyway. `sign_payloads` is for buckets whose policy refuses unsigned payloads
    (`s3:x-amz-content-sha256`).
    """

    derives_etags = True

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        page_size: int = MAX_PAGE_SIZE,
        sign_payloads: bool = False,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be positive")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be in [1, {MAX_PAGE_SIZE}]")
        self.bucket = bucket
        self._part_size = part_size
        self._max_in_flight = max_in_flight
        self._page_size = page_size
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max_in_flight + SPARE_CONNECTIONS,
            s3={
                # S3-compatible servers (MinIO, moto) are addressed by path, not bucket host.
                "addressing_style": "path" if endpoint_url else "auto",
                "payload_signing_enabled": sign_payloads,
            },
        )
        self.client = _client(endpoint_url, config)

    def get(self, key: str) -> bytes:
        _check_key(key)
        with s3_errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def get_small(self, key: str, limit: int) -> SmallObject:
        _check_key(key)
        with s3_errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            with closing(response["Body"]) as body:
                size = response["ContentLength"]
                if size > limit:  # closed unread: its connection is dropped, not drained
                    raise ObjectTooLarge(f"{size} bytes, more than {limit}", key)
                data = body.read()
        return SmallObject(data, response["ETag"].strip('"'))

    def head(self, key: str) -> ObjectInfo:
        _check_key(key)
        with s3_errors(key):
            response = self.client.head_object(Bucket=self.bucket, Key=key)
        return ObjectInfo(
            key=key,
            size=response["ContentLength"],
            etag=response["ETag"].strip('"'),
            metadata=response.get("Metadata", {}),
            last_modified=response["LastModified"].astimezone(UTC),
        )

    def list(self, prefix: str = "", *, start_after: str = "") -> Iterator[ObjectInfo]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=prefix,
            StartAfter=start_after,
            PaginationConfig={"PageSize": self._page_size},
        )
        with s3_errors(prefix):
            for page in pages:
                for entry in page.get("Contents", []):
                    yield ObjectInfo(
                        key=entry["Key"],
                        size=entry["Size"],
                        etag=entry["ETag"].strip('"'),
                        metadata={},
                        last_modified=entry["LastModified"].astimezone(UTC),
                    )

    def delete(self, key: str) -> None:
        _check_key(key)
        with s3_errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def pending_uploads(self, prefix: str = "") -> builtins.list[str]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        with s3_errors(prefix):
            keys = {upload["Key"] for page in pages for upload in page.get("Uploads", [])}
        return sorted(keys)

    def abort_pending(
        self, prefix: str, *, exact: bool = False, upload_ids: Collection[str] | None = None
    ) -> int:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        with s3_errors(prefix):
            uploads = [
                upload
                for page in pages
                for upload in page.get("Uploads", [])
                if (not exact or upload["Key"] == prefix)
                and (upload_ids is None or upload["UploadId"] in upload_ids)
            ]
        for upload in uploads:
            # NoSuchUpload: finished or aborted meanwhile, which is what was wanted.
            with suppress(ObjectNotFound), s3_errors(upload["Key"]):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
        return len(uploads)

    def complete_parts(
        self, upload: PartUpload, parts: Sequence[Part], *, if_absent: bool
    ) -> ObjectInfo:
        contiguous(parts)
        request: CompleteMultipartUploadRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": upload.key,
            "UploadId": upload.upload_id,
            "MultipartUpload": {
                "Parts": [
                    {"PartNumber": p.number, "ETag": p.etag, "ChecksumCRC32C": p.checksum}
                    for p in parts
                ]
            },
        }
        if if_absent:
            request["IfNoneMatch"] = "*"
        with s3_errors(upload.key):
            self.client.complete_multipart_upload(**request)
        return self.head(upload.key)

    def abort_parts(self, upload: PartUpload) -> None:
        # NoSuchUpload: finished or aborted meanwhile, which is what was wanted.
        with suppress(ObjectNotFound), s3_errors(upload.key):
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
            )

    def sync_parts(self, upload: PartUpload) -> None:
        """Nothing: S3 stores a part durably before it answers its put."""

    def listed_parts(self, upload: PartUpload) -> builtins.list[Part]:
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
        )
        with s3_errors(upload.key):
            listed = [part for page in pages for part in page.get("Parts", [])]
        parts, offset = [], 0
        for part in listed:
            checksum = part.get("ChecksumCRC32C", "")
            parts.append(Part(part["PartNumber"], offset, part["Size"], part["ETag"], checksum))
            offset += part["Size"]
        return parts

    def _start_parts(self, key: str, metadata: dict[str, str]) -> PartUpload:
        _check_key(key)
        with s3_errors(key):
            response = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=metadata, ChecksumAlgorithm=PART_CHECKSUM
            )
        return PartUpload(key=key, upload_id=response["UploadId"], metadata=metadata)

    def _put_part(
        self, upload: PartUpload, number: int, offset: int, data: bytes | bytearray
    ) -> Part:
        etag, checksum = upload_part(
            self.client, self.bucket, upload.key, upload.upload_id, number, data
        )
        return Part(number, offset, len(data), etag, checksum)

    def check(self) -> None:
        with s3_errors(None, missing=BucketNotFound):
            self.client.head_bucket(Bucket=self.bucket)

    def _open_writer(
        self,
        key: str,
        metadata: dict[str, str],
        if_absent: bool,
        if_match: str | None,
        on_upload: UploadStarted | None,
    ) -> MultipartWriter:
        _check_key(key)
        return S3MultipartWriter(
            self.client,
            self.bucket,
            key,
            metadata=metadata,
            if_absent=if_absent,
            if_match=if_match,
            first_part_size=self._part_size,
            max_in_flight=self._max_in_flight,
            describe=self.head,
            on_upload=on_upload,
        )

    def _read_range(
        self, key: str, start: int, stop: int | None, chunk_size: int, if_match: str | None
    ) -> Generator[bytes, None, None]:
        # One GET: S3 streams the version it opened to the end, whatever replaces it.
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or stop is not None:
            request["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
        if if_match is not None:
            request["IfMatch"] = f'"{if_match}"'
        with s3_errors(key, conflict=PreconditionFailed):
            body = self.client.get_object(**request)["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()


def _check_key(key: str) -> None:
    if len(encoded_key(key)) > MAX_KEY_BYTES:
        raise InvalidObjectKey(f"the key is longer than S3's {MAX_KEY_BYTES} bytes", key)


def _client(endpoint_url: str | None, config: Config) -> "S3Client":
    """A client of a session of its own (boto3's default one is not safe to share across
    threads) that shares the process's loader."""
    session = botocore.session.get_session()
    session.register_component("data_loader", _LOADER)
    return cast("S3Client", session.create_client("s3", endpoint_url=endpoint_url, config=config))
