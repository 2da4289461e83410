"""Raw RSA keyring, compatible with the AWS Encryption SDK's raw RSA keyring (OAEP-SHA256).

EDK provider info: the key name. EDK ciphertext: RSA-OAEP with SHA-256 and MGF1-SHA256
of the data key. The encryption context is bound by the header tag, not by the wrap.
"""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from envelope.errors import InvalidParameter
from envelope.header import EncryptedDataKey
from envelope.keyrings.base import PROVIDER_ID, Keyring

MIN_RSA_KEY_SIZE = 2048

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class RsaKeyring(Keyring):
    """Wraps to an RSA public key; unwraps when given the private key."""

    def __init__(self, key_name: str, key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> None:
        super().__init__(key_name)
        if key.key_size < MIN_RSA_KEY_SIZE:
            raise InvalidParameter(f"RSA keys must have at least {MIN_RSA_KEY_SIZE} bits")
        self._private = key if isinstance(key, rsa.RSAPrivateKey) else None
        self._public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key

    def wrap(self, data_key: bytes, context_bytes: bytes) -> EncryptedDataKey:
        return EncryptedDataKey(
            PROVIDER_ID, self._key_name_bytes, self._public.encrypt(data_key, _OAEP)
        )

    def unwrap(self, edk: EncryptedDataKey, context_bytes: bytes) -> bytes | None:
        if self._private is None or not self._names_me(edk):
            return None
        try:
            return self._private.decrypt(edk.ciphertext, _OAEP)
        except ValueError:
            return None
