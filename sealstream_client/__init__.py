"""The Python client of the sealstream API, synchronous (`SealstreamClient`) and asyncio
(`AsyncSealstreamClient`), with the same calls: typed answers (`models`), one exception
per family of problem codes (`errors`), and streams in and out in constant memory.
It imports nothing of the server, and pydantic only once a call answers JSON."""

from typing import TYPE_CHECKING

from sealstream_client.client import ByteRange, Download, SealstreamClient, Transfer, Writable
from sealstream_client.errors import (
    AlreadyExists,
    ApiError,
    ClientError,
    Conflict,
    InvalidRequest,
    KeyStateConflict,
    MessageRejected,
    NotFound,
    PermissionDenied,
    RangeNotSatisfiable,
    RateLimited,
    RequestTooLarge,
    RequestTooSlow,
    ServerError,
    SignatureRejected,
    SourceChanged,
    StoredDataDamaged,
    TransferAborted,
    Unauthenticated,
    Unavailable,
    UploadLengthMismatch,
    UploadNotConfirmed,
    api_error_class,
)
from sealstream_client.multipart import Readable, Source

if TYPE_CHECKING:
    from sealstream_client.aio import AsyncDownload, AsyncSealstreamClient

_ASYNC = ("AsyncDownload", "AsyncSealstreamClient")


def __getattr__(name: str) -> object:
    """The asyncio client, imported (with asyncio) only by those who use it."""
    if name in _ASYNC:
        from sealstream_client import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlreadyExists",
    "ApiError",
    "AsyncDownload",
    "AsyncSealstreamClient",
    "ByteRange",
    "ClientError",
    "Conflict",
    "Download",
    "InvalidRequest",
    "KeyStateConflict",
    "MessageRejected",
    "NotFound",
    "PermissionDenied",
    "RangeNotSatisfiable",
    "RateLimited",
    "Readable",
    "RequestTooLarge",
    "RequestTooSlow",
    "SealstreamClient",
    "ServerError",
    "SignatureRejected",
    "Source",
    "SourceChanged",
    "StoredDataDamaged",
    "Transfer",
    "TransferAborted",
    "Unauthenticated",
    "Unavailable",
    "UploadLengthMismatch",
    "UploadNotConfirmed",
    "Writable",
    "api_error_class",
]
