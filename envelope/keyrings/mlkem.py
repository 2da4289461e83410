"""ML-KEM keyring (FIPS 203, ML-KEM-768 and ML-KEM-1024): sealstream's own wrapping.

Wrap: encapsulate to the public key, giving a 32-byte shared secret and a KEM ciphertext;
HKDF-SHA256 (no salt) turns the secret into a 32-byte AES key and a 12-byte nonce, with
info binding the scheme, the parameter set, the key name and the KEM ciphertext:

    info = "sealstream/mlkem-keyring/v1" 0x00 || u16 len(alg) || alg
           || u16 len(key name) || key name || kem_ciphertext

then AES-256-GCM of the data key with the serialized encryption context as AAD.
EDK provider info: the key name. EDK ciphertext: kem_ciphertext || wrapped key || tag.
Each wrap encapsulates afresh, so every derived key and nonce is used exactly once.
"""

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from envelope.header import EncryptedDataKey
from envelope.keyrings.base import PROVIDER_ID, Keyring
from envelope.suite import DATA_KEY_LENGTH, IV_LENGTH, TAG_LENGTH

MlKemPrivateKey = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey
MlKemPublicKey = mlkem.MLKEM768PublicKey | mlkem.MLKEM1024PublicKey

_SCHEME = b"sealstream/mlkem-keyring/v1\x00"
_WRAPPED_LENGTH = DATA_KEY_LENGTH + TAG_LENGTH


def _parameter_set(public_key: MlKemPublicKey) -> tuple[bytes, int]:
    """The algorithm name and the KEM ciphertext length of a public key's parameter set."""
    if isinstance(public_key, mlkem.MLKEM768PublicKey):
        return b"ML-KEM-768", 1088
    return b"ML-KEM-1024", 1568


class MlKemKeyring(Keyring):
    """Wraps to an ML-KEM encapsulation key; unwraps when given the decapsulation key."""

    def __init__(self, key_name: str, key: MlKemPrivateKey | MlKemPublicKey) -> None:
        super().__init__(key_name)
        if isinstance(key, mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey):
            self._private: MlKemPrivateKey | None = key
            self._public: MlKemPublicKey = key.public_key()
        else:
            self._private = None
            self._public = key
        self._algorithm, self._kem_ciphertext_length = _parameter_set(self._public)

    def wrap(self, data_key: bytes, context_bytes: bytes) -> EncryptedDataKey:
        # A fresh encapsulation, so a fresh shared secret: the AES key and nonce derived
        # from it seal this one data key and nothing else.
        shared_secret, kem_ciphertext = self._public.encapsulate()
        key, nonce = self._wrapping_key(shared_secret, kem_ciphertext)
        wrapped = AESGCM(key).encrypt(nonce, data_key, context_bytes)
        return EncryptedDataKey(PROVIDER_ID, self._key_name_bytes, kem_ciphertext + wrapped)

    def unwrap(self, edk: EncryptedDataKey, context_bytes: bytes) -> bytes | None:
        expected_length = self._kem_ciphertext_length + _WRAPPED_LENGTH
        if (
            self._private is None
            or not self._names_me(edk)
            or len(edk.ciphertext) != expected_length
        ):
            return None
        kem_ciphertext = edk.ciphertext[: self._kem_ciphertext_length]
        # ML-KEM decapsulation never fails: a wrong key yields a wrong secret, caught by GCM.
        shared_secret = self._private.decapsulate(kem_ciphertext)
        key, nonce = self._wrapping_key(shared_secret, kem_ciphertext)
        try:
            return AESGCM(key).decrypt(
                nonce, edk.ciphertext[self._kem_ciphertext_length :], context_bytes
            )
        except InvalidTag:
            return None

    def _wrapping_key(self, shared_secret: bytes, kem_ciphertext: bytes) -> tuple[bytes, bytes]:
        info = b"".join(
            [
                _SCHEME,
                struct.pack(">H", len(self._algorithm)),
                self._algorithm,
                struct.pack(">H", len(self._key_name_bytes)),
                self._key_name_bytes,
                kem_ciphertext,
            ]
        )
        okm = HKDF(
            algorithm=hashes.SHA256(), length=DATA_KEY_LENGTH + IV_LENGTH, salt=None, info=info
        ).derive(shared_secret)
        return okm[:DATA_KEY_LENGTH], okm[DATA_KEY_LENGTH:]
