"""The keyring interface: one key version that wraps data keys and unwraps its own.

Every sealstream keyring writes provider ID `sealstream` and names its key in the
provider info, so a message can carry one encrypted data key per recipient key and a
reader tries only the keys that name themselves.
"""

from abc import ABC, abstractmethod

from envelope.errors import InvalidParameter
from envelope.header import EncryptedDataKey

PROVIDER_ID = "sealstream"
MAX_KEY_NAME_LENGTH = 1024


class Keyring(ABC):
    """Wraps a message's data key for one key; unwraps it again if it holds the secret part."""

    def __init__(self, key_name: str) -> None:
        encoded = key_name.encode("utf-8")
        if not 0 < len(encoded) <= MAX_KEY_NAME_LENGTH:
            raise InvalidParameter(f"a key name takes 1 to {MAX_KEY_NAME_LENGTH} bytes")
        self.key_name = key_name
        self._key_name_bytes = encoded

    @property
    def recipient(self) -> tuple[str, bytes]:
        """The provider ID and key name its EDKs carry, known before it wraps anything."""
        return PROVIDER_ID, self._key_name_bytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key_name!r})"

    @abstractmethod
    def wrap(self, data_key: bytes, context_bytes: bytes) -> EncryptedDataKey:
        """Encrypt `data_key` for this key; `context_bytes` is the serialized context."""

    @abstractmethod
    def unwrap(self, edk: EncryptedDataKey, context_bytes: bytes) -> bytes | None:
        """The data key inside `edk`, or None if `edk` is not this key's or does not open."""

    def _names_me(self, edk: EncryptedDataKey) -> bool:
        return edk.provider_id == PROVIDER_ID and edk.provider_info == self._key_name_bytes
