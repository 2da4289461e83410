"""storage: the object store sealstream writes ciphertext and key records into.

`open_store` turns a storage URL into a store: `file:///dir` (the embedded default, a
local directory) or `s3://bucket` (any S3-compatible service). Both behave the same
behind `ObjectStore`; errors come from one hierarchy rooted at `StorageError`.
"""

from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage.base import (
    MultipartWriter,
    ObjectInfo,
    ObjectStore,
    Part,
    PartUpload,
    SmallObject,
    UploadStarted,
)
from storage.errors import (
    BucketNotFound,
    InvalidMetadata,
    InvalidObjectKey,
    InvalidRange,
    ObjectExists,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from storage.local import LocalStore
from storage.s3 import S3Store
from storage.s3_multipart import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PART_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    part_size_for,
)

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PART_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "BucketNotFound",
    "InvalidMetadata",
    "InvalidObjectKey",
    "InvalidRange",
    "LocalStore",
    "MultipartWriter",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectTooLarge",
    "Part",
    "PartUpload",
    "PreconditionFailed",
    "S3Store",
    "SmallObject",
    "StorageError",
    "StorageUnavailable",
    "UploadStarted",
    "open_store",
    "part_size_for",
]


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    bucket: str | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    sign_payloads: bool = False,
) -> ObjectStore:
    """The store a storage URL names, bound to `bucket` if given.

    `s3://bucket` (`bucket` overrides the name; `endpoint_url` picks any S3-compatible
    server; `sign_payloads` is `S3Store`'s). `file:///abs/dir`, `file://./rel/dir` or a
    bare path (relative ones resolve against the working directory): one directory, one
    bucket named after it, so another `bucket` raises `BucketNotFound`; `part_size`,
    `max_in_flight` and `sign_payloads` do not apply there, as a local writer appends
    straight to its file.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if parts.path.strip("/") or not parts.netloc:
            raise ValueError("an S3 storage URL names one bucket and no path: s3://bucket")
        return S3Store(
            bucket or parts.netloc,
            endpoint_url=endpoint_url,
            part_size=part_size,
            max_in_flight=max_in_flight,
            sign_payloads=sign_payloads,
        )
    if parts.scheme not in ("file", ""):
        raise ValueError(f"unsupported storage URL scheme {parts.scheme!r}: use file:// or s3://")
    root = _local_path(url).resolve()
    if bucket is not None and bucket != root.name:
        raise BucketNotFound(f"the local store holds only the bucket {root.name!r}")
    return LocalStore(root)


def _local_path(url: str) -> Path:
    """The directory of a `file:` URL or bare path; `file://./x` is relative, as people mean."""
    parts = urlsplit(url)
    if not parts.scheme:
        return Path(url)
    host = "" if parts.netloc == "localhost" else parts.netloc
    return Path(unquote(host + parts.path))
