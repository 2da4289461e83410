"""The exceptions the envelope raises: one hierarchy, rooted at `EnvelopeError`.

Decrypting hostile bytes raises nothing else: parsing, limit, authentication and key
failures each have their own class so that callers can map them to distinct answers
(a malformed upload is the client's fault; a failed tag may be tampering).
"""


class EnvelopeError(Exception):
    """Base class of every error raised by the `envelope` package."""


class InvalidParameter(EnvelopeError, ValueError):
    """A caller passed an argument the format cannot honour (frame length, context, keys)."""


class MessageFormatError(EnvelopeError):
    """The bytes are not a well-formed message of the supported format."""


class UnsupportedMessage(MessageFormatError):
    """A well-formed field names a version, algorithm suite or content type we do not read."""


class HeaderLimitExceeded(MessageFormatError):
    """The header claims more (keys, bytes, frame length) than the configured limits allow."""


class FrameSequenceError(MessageFormatError):
    """A frame arrived out of order: reordered, duplicated or dropped frames."""


class TruncatedMessage(MessageFormatError):
    """The stream ended before the final frame: the message is incomplete."""


class TrailingData(MessageFormatError):
    """Bytes follow the final frame (or, in a signed message, the footer)."""


class FooterMalformed(MessageFormatError):
    """A signed message's footer claims a signature no P-384 key makes."""


class AuthenticationError(EnvelopeError):
    """An authentication tag did not verify: the bytes were changed or the key is wrong."""


class HeaderAuthenticationError(AuthenticationError):
    """The header authentication tag did not verify."""


class FrameAuthenticationError(AuthenticationError):
    """A frame's authentication tag did not verify."""

    def __init__(self, sequence_number: int) -> None:
        super().__init__(f"frame {sequence_number} failed authentication")
        self.sequence_number = sequence_number


class FooterAuthenticationError(AuthenticationError):
    """A signed message's footer signature does not verify over the message."""


class CommitmentMismatch(AuthenticationError):
    """The data key does not match the header's key commitment."""


class DataKeyUnavailable(EnvelopeError):
    """None of the message's encrypted data keys could be unwrapped by the given keyrings."""


class EncryptionContextMismatch(EnvelopeError):
    """A required encryption-context pair is missing from the message or has another value."""


class StateError(EnvelopeError):
    """An encryptor or decryptor was used after it finished or failed."""


class PlaintextTooShort(EnvelopeError):
    """The plaintext ended inside a frame that `Encryptor.expect_length` let out as a
    regular one: the bytes handed out so far are no message, and must not be kept as one."""


class SignatureError(EnvelopeError):
    """A detached signature could not be made, read or checked."""


class MalformedJws(SignatureError):
    """The bytes are not a detached JWS this service reads (RFC 7515 compact form, over an
    unencoded payload as RFC 7797 has it)."""


class JwsExtraSegments(MalformedJws):
    """The compact form has more than three segments (a JWE has five, for one)."""


class JwsPayloadAttached(MalformedJws):
    """The payload segment is not empty: the payload travels apart, as the file part."""


class JwsPayloadEncoded(MalformedJws):
    """The header does not say `"b64": false`: the signature is not over the raw bytes."""


class JwsCritMissing(MalformedJws):
    """`b64` is used but `crit` does not list it, as RFC 7797 requires."""


class JwsCritUnsupported(MalformedJws):
    """`crit` lists a header parameter this service does not understand, or is malformed."""


class SignatureLengthInvalid(MalformedJws):
    """The signature has a length no signature of the key can have."""


class JwsAlgorithmMismatch(SignatureError):
    """The header's `alg` is not the key's algorithm; the key's own algorithm decides."""


class SignatureInvalid(SignatureError):
    """The signature does not verify: the bytes, the header or the key differ."""


class SigningFailed(SignatureError):
    """A signature just made did not verify under its own key; it was not handed out."""
