"""An ML-KEM keyring for the `aws-encryption-sdk` package, so that sealstream messages
sealed for an ML-KEM key decrypt offline, with the key's exported JWK and the SDK alone.

The SDK has raw AES and raw RSA keyrings, which read sealstream's AES and RSA encrypted
data keys as they are; it has no ML-KEM keyring. This one implements the material
providers library's `IKeyring` and wraps and unwraps data keys exactly as sealstream's
ML-KEM keyring does (docs/FORMAT.md §7.4), with the same code (`envelope.keyrings`):

    from sealstream_client.esdk import MlKemSdkKeyring
    keyring = MlKemSdkKeyring.from_jwk(json.load(open("myPqKey.jwk")))
    plaintext, header = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    ).decrypt(source=message, keyring=keyring)

It needs `aws-encryption-sdk` and `aws-cryptographic-material-providers` (the
distribution's `esdk` extra); nothing else of sealstream, and no server.
"""

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from aws_cryptographic_material_providers.mpl.errors import (
    AwsCryptographicMaterialProvidersException,
)
from aws_cryptographic_material_providers.mpl.models import (
    EncryptedDataKey as SdkEncryptedDataKey,
)
from aws_cryptographic_material_providers.mpl.models import (
    OnDecryptInput,
    OnDecryptOutput,
    OnEncryptInput,
    OnEncryptOutput,
)
from aws_cryptographic_material_providers.mpl.references import IKeyring
from cryptography.hazmat.primitives.asymmetric import mlkem

from envelope import MlKemKeyring
from envelope.context import serialize_context
from envelope.header import EncryptedDataKey

_PRIVATE_KEYS: dict[str, type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]] = {
    "ML-KEM-768": mlkem.MLKEM768PrivateKey,
    "ML-KEM-1024": mlkem.MLKEM1024PrivateKey,
}
_PUBLIC_KEYS: dict[str, type[mlkem.MLKEM768PublicKey] | type[mlkem.MLKEM1024PublicKey]] = {
    "ML-KEM-768": mlkem.MLKEM768PublicKey,
    "ML-KEM-1024": mlkem.MLKEM1024PublicKey,
}


class MlKemSdkKeyring(IKeyring):  # type: ignore[misc]  # the library is untyped
    """Wraps data keys to one ML-KEM key version and, given its private key, unwraps them:
    sealstream's ML-KEM keyring, as the `aws-encryption-sdk` takes keyrings."""

    def __init__(self, key_name: str, key: Any) -> None:
        """`key_name`: as sealstream names the key version, `kid#version` (the exported
        JWK's `kid`); `key`: an ML-KEM-768 or ML-KEM-1024 private or public key."""
        self._keyring = MlKemKeyring(key_name, key)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> "MlKemSdkKeyring":
        """The keyring of an ML-KEM JWK as sealstream exports it (`kty` `AKP`, `alg`, `kid`,
        the 64-byte seed in `priv`), or of its public half (`pub` only: encrypts only)."""
        alg, kid = jwk.get("alg"), jwk.get("kid")
        if alg not in _PRIVATE_KEYS or not isinstance(kid, str):
            raise ValueError("an ML-KEM JWK names its 'alg' (ML-KEM-768 or -1024) and 'kid'")
        if "priv" in jwk:
            return cls(kid, _PRIVATE_KEYS[alg].from_seed_bytes(_member(jwk, "priv")))
        return cls(kid, _PUBLIC_KEYS[alg].from_public_bytes(_member(jwk, "pub")))

    def on_encrypt(self, param: OnEncryptInput) -> OnEncryptOutput:
        materials = param.materials
        if materials.plaintext_data_key is None:
            raise AwsCryptographicMaterialProvidersException(
                message="the ML-KEM keyring wraps a data key; put a generating keyring first"
            )
        edk = self._keyring.wrap(
            bytes(materials.plaintext_data_key), serialize_context(materials.encryption_context)
        )
        materials.encrypted_data_keys.append(
            SdkEncryptedDataKey(
                key_provider_id=edk.provider_id,
                key_provider_info=edk.provider_info,
                ciphertext=edk.ciphertext,
            )
        )
        return OnEncryptOutput(materials=materials)

    def on_decrypt(self, param: OnDecryptInput) -> OnDecryptOutput:
        materials = param.materials
        if materials.plaintext_data_key is not None:
            return OnDecryptOutput(materials=materials)
        context = serialize_context(materials.encryption_context)
        for sdk_edk in param.encrypted_data_keys:
            edk = EncryptedDataKey(
                sdk_edk.key_provider_id, bytes(sdk_edk.key_provider_info), bytes(sdk_edk.ciphertext)
            )
            data_key = self._keyring.unwrap(edk, context)
            if data_key is not None:
                materials.plaintext_data_key = data_key
                return OnDecryptOutput(materials=materials)
        raise AwsCryptographicMaterialProvidersException(
            message=f"no encrypted data key opens with ML-KEM key {self._keyring.key_name!r}"
        )


def _member(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"member {name!r} is missing")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"member {name!r} is not base64url") from None
