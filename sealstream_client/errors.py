"""The client's exceptions: one class per family of problem `code`s the API answers with,
so that a caller catches what it can handle (`KeyStateConflict`, `MessageRejected`...)
without parsing a detail. A code this version does not know falls back on its status's
class (`NotFound` for any 404, `Conflict` for any 409...), so a newer server never breaks
an older client's `except` clauses.
"""

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AlreadyExists",
    "ApiError",
    "ClientError",
    "Conflict",
    "InvalidRequest",
    "KeyStateConflict",
    "MessageRejected",
    "NotFound",
    "PermissionDenied",
    "RangeNotSatisfiable",
    "RateLimited",
    "RequestTooLarge",
    "RequestTooSlow",
    "ServerError",
    "SignatureRejected",
    "SourceChanged",
    "StoredDataDamaged",
    "TransferAborted",
    "Unauthenticated",
    "Unavailable",
    "UploadLengthMismatch",
    "UploadNotConfirmed",
    "api_error_class",
]


class ClientError(Exception):
    """A call to the sealstream API failed."""


class SourceChanged(ClientError):
    """A source of known size delivered fewer or more bytes than that size."""


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


class UploadNotConfirmed(ClientError):
    """Every byte of a resumable upload was acknowledged, but another request was
    completing it and whether that completion made and recorded the object could not be
    confirmed: look at the destination (a run again goes on with the upload if it is
    still there)."""


class UploadLengthMismatch(ClientError):
    """The resumable upload given to go on with is of another length than the bytes
    given for it: going on would report an upload done that is not, or store an object
    of other bytes. Start a new upload (or give the length the upload was created with)."""

    def __init__(self, upload: str, upload_length: int, length: int) -> None:
        super().__init__(f"the upload {upload} is of {upload_length} bytes, not the {length} given")
        self.upload = upload
        self.upload_length = upload_length
        self.length = length


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
    """A 4xx the request itself caused: its body, a field, a name is not acceptable."""


class MessageRejected(InvalidRequest):
    """The message to decrypt is malformed, truncated, tampered with, or sealed for
    another key or context."""


class SignatureRejected(InvalidRequest):
    """The detached JWS is malformed, or does not verify over the data."""


class RangeNotSatisfiable(InvalidRequest):
    """416: the range lies outside the plaintext."""


class RequestTooLarge(InvalidRequest):
    """413 or 431: the body, the metadata part or the headers are over a limit."""


class RequestTooSlow(InvalidRequest):
    """408: the body stopped arriving, or arrived too slowly."""


class Unauthenticated(ApiError):
    """401: the token is missing, invalid, revoked or expired."""


class PermissionDenied(ApiError):
    """403: the token may not do this (scope, key operations, bucket, usage limit)."""


class NotFound(ApiError):
    """404: the key, job, token or object does not exist (or is another tenant's)."""


class Conflict(ApiError):
    """409 or 412: the state forbids it (finished, changed meanwhile, in use)."""


class AlreadyExists(Conflict):
    """The key or object exists already."""


class KeyStateConflict(Conflict):
    """The key (or the version) is disabled, pending deletion, expired, worn out or
    retired, or its policy cannot change that way."""


class RateLimited(ApiError):
    """429, or 503 with Retry-After: try again later (after `retry_after` seconds)."""


class ServerError(ApiError):
    """5xx: the service failed, or storage or a key service behind it did."""


class StoredDataDamaged(ServerError):
    """502: a stored object or record failed its checks, or storage answered wrongly."""


class Unavailable(ServerError):
    """503 without Retry-After: storage, Redis, the KEK or the audit trail is unavailable."""


_BY_CODE: dict[type[ApiError], tuple[str, ...]] = {
    MessageRejected: (
        "malformed-message",
        "unsupported-message",
        "header-limit-exceeded",
        "truncated-message",
        "trailing-data",
        "frame-out-of-order",
        "header-authentication-failed",
        "frame-authentication-failed",
        "key-commitment-mismatch",
        "key-mismatch",
        "encryption-context-mismatch",
        "data-key-unavailable",
    ),
    SignatureRejected: (
        "malformed-jws",
        "jws-extra-segments",
        "jws-payload-attached",
        "jws-payload-encoded",
        "jws-crit-missing",
        "jws-crit-unsupported",
        "signature-length-invalid",
        "signature-invalid",
        "jws-algorithm-mismatch",
    ),
    AlreadyExists: ("key-exists", "object-exists"),
    KeyStateConflict: (
        "key-disabled",
        "key-pending-deletion",
        "key-expired",
        "key-version-worn-out",
        "invalid-key-state",
        "exportability-is-one-way",
        "key-version-retired",
    ),
    StoredDataDamaged: (
        "object-damaged",
        "object-unrecorded",
        "record-tampered",
        "tampered",
        "storage-error",
    ),
}
_CODES: dict[str, type[ApiError]] = {
    code: family for family, codes in _BY_CODE.items() for code in codes
}

# The class of each status whose code is not one of a family above.
_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    408: RequestTooSlow,
    409: Conflict,
    412: Conflict,
    413: RequestTooLarge,
    416: RangeNotSatisfiable,
    429: RateLimited,
    431: RequestTooLarge,
    502: StoredDataDamaged,
    503: Unavailable,
}


def api_error_class(status: int, code: str | None = None, *, retry: bool = False) -> type[ApiError]:
    """The class of the refusal with HTTP `status` and problem `code` (`retry`: it said
    when to try again)."""
    if status == 503 and retry:
        return RateLimited
    family = _CODES.get(code or "")
    if family is not None:
        return family
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return InvalidRequest if 400 <= status < 500 else ApiError
