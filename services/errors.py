"""Stable machine codes for the service's errors, and the words a client may read about
them, shared by API problems and job reports.

Key-store errors carry their own `code`; message-format errors get theirs from the table
below; anything else is named after its class (`ObjectNotFound` → `object-not-found`).

A storage error's own message is for the server's logs: it names storage keys, and a
backend's words. A client reads `public_detail`: the object named as the client named it,
and nothing of where or how the service keeps it.
"""

import envelope
import storage
from keystore import KekError, StoreNeedsUpgrade
from services.placement import client_key
from storage.integrity import RecordTampered

_ENVELOPE_CODES: dict[type[Exception], str] = {
    envelope.InvalidParameter: "invalid-parameter",
    envelope.UnsupportedMessage: "unsupported-message",
    envelope.HeaderLimitExceeded: "header-limit-exceeded",
    envelope.FrameSequenceError: "frame-out-of-order",
    envelope.TruncatedMessage: "truncated-message",
    envelope.TrailingData: "trailing-data",
    envelope.FooterMalformed: "malformed-footer",
    envelope.MessageFormatError: "malformed-message",
    envelope.HeaderAuthenticationError: "header-authentication-failed",
    envelope.FrameAuthenticationError: "frame-authentication-failed",
    envelope.FooterAuthenticationError: "footer-signature-invalid",
    envelope.CommitmentMismatch: "key-commitment-mismatch",
    envelope.AuthenticationError: "authentication-failed",
    envelope.DataKeyUnavailable: "data-key-unavailable",
    envelope.EncryptionContextMismatch: "encryption-context-mismatch",
    envelope.JwsExtraSegments: "jws-extra-segments",
    envelope.JwsPayloadAttached: "jws-payload-attached",
    envelope.JwsPayloadEncoded: "jws-payload-encoded",
    envelope.JwsCritMissing: "jws-crit-missing",
    envelope.JwsCritUnsupported: "jws-crit-unsupported",
    envelope.SignatureLengthInvalid: "signature-length-invalid",
    envelope.MalformedJws: "malformed-jws",
    envelope.JwsAlgorithmMismatch: "jws-algorithm-mismatch",
    envelope.SignatureInvalid: "signature-invalid",
    envelope.SigningFailed: "signing-failed",
    envelope.SignatureError: "signature-error",
    envelope.EnvelopeError: "invalid-message",
}

# What a client reads about each storage failure, of `{subject}`; the most specific class
# listed wins. A backend's own words (S3's message, an OS error) are never among them.
_STORAGE_DETAILS: dict[type[storage.StorageError], str] = {
    storage.ObjectExists: "{subject} already exists",
    storage.PreconditionFailed: "{subject} was changed by another request meanwhile",
    storage.ObjectNotFound: "{subject} does not exist",
    RecordTampered: "{subject} failed authentication and was refused",
    storage.BucketNotFound: "the bucket does not exist",
    storage.StorageUnavailable: "object storage is unavailable; try again later",
    storage.StorageError: "object storage could not serve {subject}",
}
# Failures the storage layer words itself about what it was asked: the reason is shown.
_OWN_REASONS = (storage.InvalidObjectKey, storage.InvalidMetadata, storage.InvalidRange)


def error_code(error: Exception) -> str:
    code = getattr(error, "code", None)
    if isinstance(code, str):
        return code
    for cls in type(error).__mro__:
        if cls in _ENVELOPE_CODES:
            return _ENVELOPE_CODES[cls]
    name = type(error).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


def public_detail(error: Exception) -> str:
    """What a client may read about `error`: never a server path, a storage key or a
    credential."""
    if isinstance(error, KekError | StoreNeedsUpgrade):
        # About the service's own set-up (store names, key ids, its documents): the log's.
        return "the service's keys cannot serve now; its operator has been told why"
    if not isinstance(error, storage.StorageError):
        return str(error) or type(error).__name__
    subject = _subject(error.key)
    if isinstance(error, _OWN_REASONS):
        return error.reason if error.key is None else f"{subject}: {error.reason}"
    template = next(_STORAGE_DETAILS[cls] for cls in type(error).__mro__ if cls in _STORAGE_DETAILS)
    return template.format(subject=subject)


def _subject(storage_key: str | None) -> str:
    if storage_key is None:
        return "the object"
    key = client_key(storage_key)
    if key is None:
        return "a record the service keeps"
    return f"object {key!r}" if key else "the tenant's objects"
