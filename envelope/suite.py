"""The two algorithm suites of the AWS Encryption SDK (message format version 2) that
sealstream writes and reads.

Both: AES-256-GCM with a 12-byte IV and 16-byte tag; the frame key is derived from the
data key with HKDF-SHA512 (salt: the message ID, info: the suite ID and a label); a second
HKDF output, the commitment key, is stored in the header so that a message can open under
exactly one data key.

- 0x0478 is unsigned.
- 0x0578 adds an ECDSA P-384 signature, over the whole message, in a footer
  (`envelope.footer`). Its signing key is made for the message and thrown away; the
  public half travels in the encryption context, so no recipient, though it can unwrap
  the data key, can write a message that the footer check accepts.
"""

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from envelope.errors import UnsupportedMessage

MESSAGE_FORMAT_VERSION = 0x02
UNSIGNED_SUITE_ID = 0x0478
SIGNED_SUITE_ID = 0x0578
FRAMED_CONTENT = 0x02
NON_FRAMED_CONTENT = 0x01

DATA_KEY_LENGTH = 32
MESSAGE_ID_LENGTH = 32
COMMITMENT_LENGTH = 32
IV_LENGTH = 12
TAG_LENGTH = 16

_COMMIT_INFO = b"COMMITKEY"


@dataclass(frozen=True, repr=False)
class DerivedKeys:
    """The per-message keys derived from one data key."""

    encryption_key: bytes
    commitment: bytes


def check_suite(suite_id: int) -> None:
    """Refuse a suite this module does not implement."""
    if suite_id not in (UNSIGNED_SUITE_ID, SIGNED_SUITE_ID):
        raise UnsupportedMessage(
            f"algorithm suite 0x{suite_id:04X} is not supported (only 0x0478 and 0x0578)"
        )


def is_signed(suite_id: int) -> bool:
    return suite_id == SIGNED_SUITE_ID


def derive_keys(
    data_key: bytes, message_id: bytes, suite_id: int = UNSIGNED_SUITE_ID
) -> DerivedKeys:
    """HKDF-SHA512 of the data key into the frame key and the commitment value."""
    check_suite(suite_id)
    derive_info = struct.pack(">H", suite_id) + b"DERIVEKEY"
    return DerivedKeys(
        encryption_key=_hkdf_sha512(data_key, message_id, derive_info),
        commitment=_hkdf_sha512(data_key, message_id, _COMMIT_INFO),
    )


def _hkdf_sha512(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA512(), length=32, salt=salt, info=info).derive(key)
