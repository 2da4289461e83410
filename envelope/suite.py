"""Algorithm suite 0x0478 of the AWS Encryption SDK, message format version 2.

AES-256-GCM with a 12-byte IV and 16-byte tag; the frame key is derived from the data key
with HKDF-SHA512 (salt: the message ID); a second HKDF output, the commitment key, is
stored in the header so that a message can open under exactly one data key. No signature.
"""

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MESSAGE_FORMAT_VERSION = 0x02
ALGORITHM_SUITE_ID = 0x0478
FRAMED_CONTENT = 0x02
NON_FRAMED_CONTENT = 0x01

DATA_KEY_LENGTH = 32
MESSAGE_ID_LENGTH = 32
COMMITMENT_LENGTH = 32
IV_LENGTH = 12
TAG_LENGTH = 16

_DERIVE_INFO = struct.pack(">H", ALGORITHM_SUITE_ID) + b"DERIVEKEY"
_COMMIT_INFO = b"COMMITKEY"


@dataclass(frozen=True, repr=False)
class DerivedKeys:
    """The per-message keys derived from one data key."""

    encryption_key: bytes
    commitment: bytes


def derive_keys(data_key: bytes, message_id: bytes) -> DerivedKeys:
    """HKDF-SHA512 of the data key into the frame key and the commitment value."""
    return DerivedKeys(
        encryption_key=_hkdf_sha512(data_key, message_id, _DERIVE_INFO),
        commitment=_hkdf_sha512(data_key, message_id, _COMMIT_INFO),
    )


def _hkdf_sha512(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA512(), length=32, salt=salt, info=info).derive(key)
