"""envelope: the sealstream message format, an AWS Encryption SDK message (version 2,
algorithm suite 0x0478, framed), written and read incrementally.

Pure: bytes in, bytes out; no I/O and no framework. See docs/FORMAT.md for the bytes.
Exported here is what other packages use; the rest is imported from its own module.
"""

from envelope.decrypt import Decryptor, FrameReader, start_decryption
from envelope.encrypt import Encryptor
from envelope.errors import (
    AuthenticationError,
    CommitmentMismatch,
    DataKeyUnavailable,
    EncryptionContextMismatch,
    EnvelopeError,
    FrameAuthenticationError,
    FrameSequenceError,
    HeaderAuthenticationError,
    HeaderLimitExceeded,
    InvalidParameter,
    MessageFormatError,
    PlaintextTooShort,
    StateError,
    TrailingData,
    TruncatedMessage,
    UnsupportedMessage,
)
from envelope.header import (
    DEFAULT_LIMITS,
    Header,
    HeaderReader,
    Limits,
    parse_header,
)
from envelope.keyrings import (
    PROVIDER_ID,
    AesKeyring,
    Keyring,
    MlKemKeyring,
    RsaKeyring,
    key_names,
)
from envelope.message import (
    DEFAULT_FRAME_LENGTH,
    OpenedMessage,
    check_frame_length,
    open_message,
)
from envelope.ranged import FinalFrameCheck, MessageLayout, RangeDecryptor

__all__ = [
    "DEFAULT_FRAME_LENGTH",
    "DEFAULT_LIMITS",
    "PROVIDER_ID",
    "AesKeyring",
    "AuthenticationError",
    "CommitmentMismatch",
    "DataKeyUnavailable",
    "Decryptor",
    "EncryptionContextMismatch",
    "Encryptor",
    "EnvelopeError",
    "FinalFrameCheck",
    "FrameAuthenticationError",
    "FrameReader",
    "FrameSequenceError",
    "Header",
    "HeaderAuthenticationError",
    "HeaderLimitExceeded",
    "HeaderReader",
    "InvalidParameter",
    "Keyring",
    "Limits",
    "MessageFormatError",
    "MessageLayout",
    "MlKemKeyring",
    "OpenedMessage",
    "PlaintextTooShort",
    "RangeDecryptor",
    "RsaKeyring",
    "StateError",
    "TrailingData",
    "TruncatedMessage",
    "UnsupportedMessage",
    "check_frame_length",
    "key_names",
    "open_message",
    "parse_header",
    "start_decryption",
]
