"""The Python client of the sealstream API, synchronous (`SealstreamClient`) and asyncio
(`AsyncSealstreamClient`), with the same calls: typed answers (`models`), one exception
per family of problem codes (`errors`), and streams in and out in constant memory.
It imports nothing of the server."""

from sealstream_client.aio import AsyncDownload, AsyncSealstreamClient
from sealstream_client.client import ByteRange, Download, SealstreamClient, Writable
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
    api_error_class,
)
from sealstream_client.models import StoredObject, Transfer
from sealstream_client.multipart import Readable, Source

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
    "StoredObject",
    "Transfer",
    "TransferAborted",
    "Unauthenticated",
    "Unavailable",
    "Writable",
    "api_error_class",
]
