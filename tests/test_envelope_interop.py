"""Interoperability with the `aws-encryption-sdk` package, both ways, through its raw keyrings,
unsigned (suite 0x0478) and signed (0x0578, the SDK's default); and ML-KEM messages through
the SDK keyring the client distribution ships (`sealstream_client.esdk`), given the JWK
the key store exports.

sealstream's AES and RSA keyrings must be byte-compatible with the SDK's raw AES and raw RSA
(OAEP-SHA256) keyrings given the same key material, namespace `sealstream` and key name.
"""

import base64
import io
import os
from typing import Any, cast

import aws_encryption_sdk
import pytest
from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
from aws_cryptographic_material_providers.mpl.models import (
    AesWrappingAlg,
    CreateMultiKeyringInput,
    CreateRawAesKeyringInput,
    CreateRawRsaKeyringInput,
    PaddingScheme,
)
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from envelope import (
    PROVIDER_ID,
    AesKeyring,
    Decryptor,
    Encryptor,
    FooterAuthenticationError,
    FooterMalformed,
    Keyring,
    MessageFormatError,
    MlKemKeyring,
    RsaKeyring,
    TrailingData,
    TruncatedMessage,
    UnsupportedMessage,
)
from envelope.footer import public_key_from_context
from keystore.algorithms import KeyParams
from keystore.algorithms import key_type as keystore_key_type
from sealstream_client.esdk import MlKemSdkKeyring

MIB = 1024 * 1024
AES_KEY = os.urandom(32)
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=3072)
SDK = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
)
MPL = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())


def sdk_keyring(kind: str) -> Any:
    """The SDK's own raw keyring for the same key material as `our_keyring(kind)`."""
    if kind == "aes":
        return MPL.create_raw_aes_keyring(
            input=CreateRawAesKeyringInput(
                key_namespace=PROVIDER_ID,
                key_name="data-key#1",
                wrapping_key=AES_KEY,
                wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
            )
        )
    return MPL.create_raw_rsa_keyring(
        input=CreateRawRsaKeyringInput(
            key_namespace=PROVIDER_ID,
            key_name="rsa-key#3",
            padding_scheme=PaddingScheme.OAEP_SHA256_MGF1,
            public_key=RSA_KEY.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            private_key=RSA_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    )


def our_keyring(kind: str) -> Keyring:
    if kind == "aes":
        return AesKeyring("data-key#1", AES_KEY)
    return RsaKeyring("rsa-key#3", RSA_KEY)


def our_encrypt(
    kind: str, data: bytes, frame_length: int, context: dict[str, str], *, signed: bool = False
) -> bytes:
    encryptor = Encryptor(
        [our_keyring(kind)], frame_length=frame_length, context=context, signed=signed
    )
    out = bytearray()
    for offset in range(0, len(data), 100_000):
        for chunk in encryptor.update(data[offset : offset + 100_000]):
            out += chunk
    for chunk in encryptor.finish():
        out += chunk
    return bytes(out)


def our_decrypt(kind: str, message: bytes, required: dict[str, str]) -> bytes:
    decryptor = Decryptor([our_keyring(kind)], required_context=required)
    out = b"".join(
        p
        for offset in range(0, len(message), 65_536)
        for p in decryptor.update(message[offset : offset + 65_536])
    )
    decryptor.finish()
    return out


CASES = [
    pytest.param(
        kind, frame, context, size, id=f"{kind}-{frame}-{'ctx' if context else 'noctx'}-{size}"
    )
    for kind in ("aes", "rsa")
    for frame in (4096, MIB)
    for context in ({}, {"department": "finance", "purpose": "interop"})
    for size in (0, 4096, 3 * MIB + 17)
]


@pytest.mark.parametrize(("kind", "frame_length", "context", "size"), CASES)
def test_the_sdk_decrypts_what_sealstream_writes(
    kind: str, frame_length: int, context: dict[str, str], size: int
) -> None:
    data = os.urandom(size)
    message = our_encrypt(kind, data, frame_length, context)
    plaintext, header = SDK.decrypt(source=message, keyring=sdk_keyring(kind))
    assert plaintext == data
    assert dict(header.encryption_context) == context
    assert header.frame_length == frame_length


@pytest.mark.parametrize(("kind", "frame_length", "context", "size"), CASES)
def test_sealstream_decrypts_what_the_sdk_writes(
    kind: str, frame_length: int, context: dict[str, str], size: int
) -> None:
    data = os.urandom(size)
    message, _ = SDK.encrypt(
        source=data,
        keyring=sdk_keyring(kind),
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=frame_length,
        encryption_context=context,
    )
    assert our_decrypt(kind, message, required=context) == data


def test_sixteen_mib_frames_interoperate() -> None:
    data = os.urandom(17 * MIB)
    message = our_encrypt("aes", data, 16 * MIB, {})
    plaintext, _ = SDK.decrypt(source=message, keyring=sdk_keyring("aes"))
    assert plaintext == data
    sdk_message, _ = SDK.encrypt(
        source=data,
        keyring=sdk_keyring("aes"),
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=16 * MIB,
    )
    assert our_decrypt("aes", sdk_message, {}) == data


def test_sdk_streaming_output_decrypts() -> None:
    data = os.urandom(2 * MIB + 3)
    with SDK.stream(
        mode="e",
        source=io.BytesIO(data),
        keyring=sdk_keyring("aes"),
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
        frame_length=65_536,
    ) as stream:
        message = b"".join(stream)
    assert our_decrypt("aes", message, {}) == data


SIGNED_CASES = [
    pytest.param(kind, size, id=f"{kind}-{size}")
    for kind in ("aes", "rsa")
    for size in (0, 4096, 3 * 4096 + 17)
]


@pytest.mark.parametrize(("kind", "size"), SIGNED_CASES)
def test_the_sdk_decrypts_signed_messages_sealstream_writes(kind: str, size: int) -> None:
    data = os.urandom(size)
    message = our_encrypt(kind, data, 4096, {"purpose": "signed"}, signed=True)
    assert message[1:3] == b"\x05\x78"
    plaintext, header = SDK.decrypt(source=message, keyring=sdk_keyring(kind))
    assert plaintext == data
    assert header.algorithm == Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384
    assert dict(header.encryption_context)["purpose"] == "signed"


@pytest.mark.parametrize(("kind", "size"), SIGNED_CASES)
def test_sealstream_decrypts_signed_messages_the_sdk_writes(kind: str, size: int) -> None:
    data = os.urandom(size)
    message, _ = SDK.encrypt(
        source=data,
        keyring=sdk_keyring(kind),
        algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY_ECDSA_P384,
        frame_length=4096,
        encryption_context={"purpose": "signed"},
    )
    assert our_decrypt(kind, message, required={"purpose": "signed"}) == data


def sdk_signed_message(data: bytes) -> bytes:
    message, _ = SDK.encrypt(source=data, keyring=sdk_keyring("aes"), frame_length=4096)
    assert message[1:3] == b"\x05\x78"  # the SDK's default suite
    return bytes(message)


def test_a_signed_message_with_another_signature_is_refused() -> None:
    message = sdk_signed_message(os.urandom(5000))
    spoiled = message[:-1] + bytes([message[-1] ^ 1])
    with pytest.raises(FooterAuthenticationError):
        our_decrypt("aes", spoiled, {})


def test_a_signed_message_cut_inside_its_footer_is_truncated() -> None:
    message = sdk_signed_message(os.urandom(5000))
    for cut in (1, 2, 50, 105):
        with pytest.raises(TruncatedMessage):
            our_decrypt("aes", message[:-cut], {})
    with pytest.raises(TrailingData):
        our_decrypt("aes", message + b"\x00", {})


def test_a_footer_claiming_an_impossible_signature_length_is_refused_at_once() -> None:
    message = sdk_signed_message(b"short")
    footer_at = len(message) - 2 - int.from_bytes(message[-105:-103], "big")
    for claimed in (0, 105, 0xFFFF):
        spoiled = message[:footer_at] + claimed.to_bytes(2, "big")  # no signature bytes yet
        decryptor = Decryptor([our_keyring("aes")])
        with pytest.raises(FooterMalformed):
            decryptor.update(spoiled)


def test_a_signed_message_relabelled_unsigned_is_refused() -> None:
    message = sdk_signed_message(b"relabelled")
    with pytest.raises(MessageFormatError, match="aws-crypto-public-key"):
        our_decrypt("aes", message[:1] + b"\x04\x78" + message[3:], {})


def test_the_signers_public_key_is_read_compressed_only() -> None:
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    compressed = public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    uncompressed = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert public_key_from_context(base64.b64encode(compressed).decode()) == public
    with pytest.raises(MessageFormatError, match="aws-crypto-public-key"):
        public_key_from_context(base64.b64encode(uncompressed).decode())


def test_an_unknown_suite_is_refused_clearly() -> None:
    message = sdk_signed_message(b"unknown")
    with pytest.raises(UnsupportedMessage, match="0x0378"):
        our_decrypt("aes", message[:1] + b"\x03\x78" + message[3:], {})


def exported_mlkem_jwk(alg: str) -> tuple[dict[str, Any], MlKemKeyring]:
    """An ML-KEM key version's JWK as the key store exports it, and sealstream's keyring."""
    key_type = keystore_key_type("ML-KEM")
    params = KeyParams("ML-KEM", alg)
    seed = key_type.generate(params)
    return dict(key_type.export_jwk("pq-key#2", params, seed)), cast(
        MlKemKeyring, key_type.keyring("pq-key#2", params, seed)
    )


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("alg", ["ML-KEM-768", "ML-KEM-1024"])
def test_the_sdk_decrypts_mlkem_messages_with_the_exported_jwk(alg: str, signed: bool) -> None:
    jwk, ours = exported_mlkem_jwk(alg)
    data = os.urandom(3 * 4096 + 5)
    encryptor = Encryptor([ours], context={"purpose": "offline"}, frame_length=4096, signed=signed)
    message = b"".join(bytes(p) for p in encryptor.update(data) + encryptor.finish())
    plaintext, header = SDK.decrypt(source=message, keyring=MlKemSdkKeyring.from_jwk(jwk))
    assert plaintext == data and dict(header.encryption_context)["purpose"] == "offline"
    other, _ = exported_mlkem_jwk(alg)
    with pytest.raises(Exception, match="no encrypted data key opens"):
        SDK.decrypt(source=message, keyring=MlKemSdkKeyring.from_jwk(other))


def test_sealstream_decrypts_what_the_sdk_writes_with_the_mlkem_keyring() -> None:
    jwk, ours = exported_mlkem_jwk("ML-KEM-768")
    public = {name: jwk[name] for name in ("kty", "alg", "kid", "pub")}
    aes = MPL.create_raw_aes_keyring(  # the generator: the ML-KEM keyring only wraps
        input=CreateRawAesKeyringInput(
            key_namespace="elsewhere",
            key_name="gen",
            wrapping_key=os.urandom(32),
            wrapping_alg=AesWrappingAlg.ALG_AES256_GCM_IV12_TAG16,
        )
    )
    multi = MPL.create_multi_keyring(
        input=CreateMultiKeyringInput(
            generator=aes, child_keyrings=[MlKemSdkKeyring.from_jwk(public)]
        )
    )
    data = os.urandom(10_000)
    message, _ = SDK.encrypt(
        source=data, keyring=multi, frame_length=4096, encryption_context={"a": "b"}
    )
    assert our_decrypt_with([ours], message) == data


def our_decrypt_with(keyrings: list[Keyring], message: bytes) -> bytes:
    decryptor = Decryptor(keyrings)
    out = b"".join(decryptor.update(message))
    decryptor.finish()
    return out
