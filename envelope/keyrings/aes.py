"""Raw AES-256 keyring, byte-compatible with the AWS Encryption SDK's raw AES keyring.

EDK provider info: key name, tag length in bits (4 bytes, 128), IV length (4 bytes, 12),
IV. EDK ciphertext: AES-256-GCM of the data key with the serialized encryption context
as AAD, then its tag.
"""

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envelope.errors import InvalidParameter
from envelope.header import EncryptedDataKey
from envelope.keyrings.base import PROVIDER_ID, Keyring
from envelope.suite import IV_LENGTH, TAG_LENGTH

AES_KEY_LENGTH = 32


class AesKeyring(Keyring):
    """Wraps data keys under a 32-byte AES key."""

    def __init__(self, key_name: str, key: bytes) -> None:
        super().__init__(key_name)
        if len(key) != AES_KEY_LENGTH:
            raise InvalidParameter("an AES keyring takes a 32-byte key")
        self._aead = AESGCM(key)
        self._info_prefix = self._key_name_bytes + struct.pack(">II", TAG_LENGTH * 8, IV_LENGTH)

    def wrap(self, data_key: bytes, context_bytes: bytes) -> EncryptedDataKey:
        # A random 96-bit IV under a long-lived key: unique with overwhelming probability
        # only while the key wraps at most 2^32 data keys (NIST SP 800-38D, 8.3), one per
        # message sealed for it. The key store counts a version's wraps and refuses to
        # seal past half that: docs/FORMAT.md §14.
        iv = os.urandom(IV_LENGTH)
        wrapped = self._aead.encrypt(iv, data_key, context_bytes)
        return EncryptedDataKey(PROVIDER_ID, self._info_prefix + iv, wrapped)

    def unwrap(self, edk: EncryptedDataKey, context_bytes: bytes) -> bytes | None:
        info = edk.provider_info
        if (
            edk.provider_id != PROVIDER_ID
            or len(info) != len(self._info_prefix) + IV_LENGTH
            or not info.startswith(self._info_prefix)
        ):
            return None
        try:
            return self._aead.decrypt(info[-IV_LENGTH:], edk.ciphertext, context_bytes)
        except InvalidTag:
            return None
