"""Stable machine codes for the service's errors, shared by API problems and job reports.

Key-store errors carry their own `code`; message-format errors get theirs from the table
below; anything else is named after its class (`ObjectNotFound` → `object-not-found`).
"""

import envelope

_ENVELOPE_CODES: dict[type[Exception], str] = {
    envelope.InvalidParameter: "invalid-parameter",
    envelope.UnsupportedMessage: "unsupported-message",
    envelope.HeaderLimitExceeded: "header-limit-exceeded",
    envelope.FrameSequenceError: "frame-out-of-order",
    envelope.TruncatedMessage: "truncated-message",
    envelope.TrailingData: "trailing-data",
    envelope.MessageFormatError: "malformed-message",
    envelope.HeaderAuthenticationError: "header-authentication-failed",
    envelope.FrameAuthenticationError: "frame-authentication-failed",
    envelope.CommitmentMismatch: "key-commitment-mismatch",
    envelope.AuthenticationError: "authentication-failed",
    envelope.DataKeyUnavailable: "data-key-unavailable",
    envelope.EncryptionContextMismatch: "encryption-context-mismatch",
    envelope.EnvelopeError: "invalid-message",
}


def error_code(error: Exception) -> str:
    code = getattr(error, "code", None)
    if isinstance(code, str):
        return code
    for cls in type(error).__mro__:
        if cls in _ENVELOPE_CODES:
            return _ENVELOPE_CODES[cls]
    name = type(error).__name__
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")
