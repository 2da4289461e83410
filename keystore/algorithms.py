"""The table of supported key types (kty) and algorithms (alg), and per type: material
generation and encoding, keyring construction, public and export JWKs, import from JWK.

The key API names algorithms as the product always has (`AES-256`); JWKs name them as
RFC 7518 does (`A256GCM`), and an imported JWK may use either (docs/api.md has the table).

Material is what the store wraps under the KEK: 32 raw bytes for `oct`, PKCS#8 DER for
`RSA`, the 64-byte seed for `ML-KEM`. JWK members are base64url without padding. Errors
about imported JWKs name members, never their values.
"""

import base64
import binascii
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, rsa

from envelope import AesKeyring, Keyring, MlKemKeyring, RsaKeyring
from keystore.errors import (
    AlgorithmMismatch,
    InvalidJwk,
    InvalidKeySize,
    UnsupportedAlgorithm,
    UnsupportedKeyType,
)

Jwk = dict[str, str]

AES_KEY_LENGTH = 32
MLKEM_SEED_LENGTH = 64
RSA_PUBLIC_EXPONENT = 65537


@dataclass(frozen=True)
class KeyParams:
    """A resolved key type: canonical kty, alg, and (RSA only) the key size in bits."""

    kty: str
    alg: str
    key_size: int | None = None


class KeyType(ABC):
    """One kty: its algorithms (the first is the default) and how its material behaves."""

    kty: ClassVar[str]
    algorithms: ClassVar[tuple[str, ...]]
    # JWKs name algorithms as RFC 7518 (or the JOSE draft for ML-KEM) does: our name of
    # each algorithm that a JWK writes differently, and every name a JWK may give it.
    jwk_names: ClassVar[Mapping[str, str]] = {}
    jwk_aliases: ClassVar[Mapping[str, str]] = {}
    # Material whose generation, or the checking of an imported one, takes long enough
    # (RSA: a good part of a second of CPU) to be kept off the threads requests share.
    costly: ClassVar[bool] = False

    def params(self, alg: str, key_size: int | None) -> KeyParams:
        """The parameters of a new key of algorithm `alg` (already one of ours)."""
        if key_size is not None:
            raise InvalidKeySize("keySize applies to RSA keys only")
        return KeyParams(self.kty, alg)

    def describe(self) -> dict[str, Any]:
        """This type's entry in the supported-algorithms listing."""
        return {"kty": self.kty, "algorithms": list(self.algorithms), "default": self.algorithms[0]}

    def jwk_alg(self, alg: str) -> str:
        """The `alg` a JWK of ours writes for our algorithm `alg`."""
        return self.jwk_names.get(alg, alg)

    def our_alg(self, alg: str) -> str:
        """Our name of the algorithm a JWK (or a request) names `alg`."""
        return self.jwk_aliases.get(alg, alg)

    def public_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk | None:
        """The public key as a JWK; None for symmetric keys."""
        return None

    @abstractmethod
    def generate(self, params: KeyParams) -> bytes:
        """Fresh material."""

    @abstractmethod
    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        """The envelope keyring of one key version, able to wrap and unwrap."""

    @abstractmethod
    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        """The material as a private JWK."""

    @abstractmethod
    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        """Parameters and material of a private JWK of this type, validated strictly."""


class OctKeyType(KeyType):
    kty = "oct"
    algorithms = ("AES-256",)
    # The key wraps data keys with AES-256-GCM: A256GCM, or as a key wrap A256GCMKW.
    jwk_names: ClassVar[Mapping[str, str]] = {"AES-256": "A256GCM"}
    jwk_aliases: ClassVar[Mapping[str, str]] = {"A256GCM": "AES-256", "A256GCMKW": "AES-256"}

    def generate(self, params: KeyParams) -> bytes:
        return os.urandom(AES_KEY_LENGTH)

    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        return AesKeyring(key_name, material)

    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        return {
            "kty": "oct",
            "kid": key_name,
            "alg": self.jwk_alg(params.alg),
            "k": b64url(material),
        }

    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        key = jwk_bytes(jwk, "k")
        if len(key) != AES_KEY_LENGTH:
            raise InvalidJwk(f"member 'k' of an {alg} key must hold {AES_KEY_LENGTH} bytes")
        return KeyParams(self.kty, alg), key


class RsaKeyType(KeyType):
    kty = "RSA"
    algorithms = ("RSA-OAEP-256",)
    costly = True
    key_sizes = (2048, 3072, 4096)
    default_key_size = 3072
    _private_members = ("d", "p", "q", "dp", "dq", "qi")

    def params(self, alg: str, key_size: int | None) -> KeyParams:
        size = self.default_key_size if key_size is None else key_size
        if size not in self.key_sizes:
            raise InvalidKeySize(f"RSA keySize must be one of {list(self.key_sizes)}")
        return KeyParams(self.kty, alg, size)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "keySizes": list(self.key_sizes),
            "defaultKeySize": self.default_key_size,
        }

    def generate(self, params: KeyParams) -> bytes:
        key_size = params.key_size or self.default_key_size
        key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=key_size)
        return _pkcs8(key)

    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        return RsaKeyring(key_name, _load_rsa(material))

    def public_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        numbers = _load_rsa(material).public_key().public_numbers()
        return {
            "kty": "RSA",
            "kid": key_name,
            "alg": self.jwk_alg(params.alg),
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }

    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        numbers = _load_rsa(material).private_numbers()
        private = {
            "d": numbers.d,
            "p": numbers.p,
            "q": numbers.q,
            "dp": numbers.dmp1,
            "dq": numbers.dmq1,
            "qi": numbers.iqmp,
        }
        members = {name: _b64url_uint(value) for name, value in private.items()}
        return self.public_jwk(key_name, params, material) | members

    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        modulus = jwk_bytes(jwk, "n")
        key_size = len(modulus) * 8
        if key_size not in self.key_sizes or not modulus[0] & 0x80:
            raise InvalidJwk(f"member 'n' must be an RSA modulus of {list(self.key_sizes)} bits")
        d, p, q, dp, dq, qi = (_jwk_uint(jwk, name) for name in self._private_members)
        public = rsa.RSAPublicNumbers(_jwk_uint(jwk, "e"), int.from_bytes(modulus))
        try:
            key = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, public).private_key()
        except ValueError:
            raise InvalidJwk("the RSA members do not make a consistent private key") from None
        return KeyParams(self.kty, alg, key_size), _pkcs8(key)


MlKemPrivateKeyClass = type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]


class MlKemKeyType(KeyType):
    kty = "ML-KEM"
    jwk_kty = "AKP"  # the IETF JOSE draft's name, used in JWKs and accepted on input
    algorithms = ("ML-KEM-768", "ML-KEM-1024")
    _classes: ClassVar[dict[str, MlKemPrivateKeyClass]] = {
        "ML-KEM-768": mlkem.MLKEM768PrivateKey,
        "ML-KEM-1024": mlkem.MLKEM1024PrivateKey,
    }

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"aliases": [self.jwk_kty]}

    def generate(self, params: KeyParams) -> bytes:
        return self._classes[params.alg].generate().private_bytes_raw()

    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        return MlKemKeyring(key_name, self._classes[params.alg].from_seed_bytes(material))

    def public_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        return {
            "kty": self.jwk_kty,
            "kid": key_name,
            "alg": self.jwk_alg(params.alg),
            "pub": b64url(self._public_bytes(params.alg, material)),
        }

    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        return self.public_jwk(key_name, params, material) | {"priv": b64url(material)}

    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        if "alg" not in jwk:
            raise InvalidJwk("an AKP JWK must name its parameter set in 'alg'")
        seed = jwk_bytes(jwk, "priv")
        if len(seed) != MLKEM_SEED_LENGTH:
            raise InvalidJwk(f"member 'priv' must hold the {MLKEM_SEED_LENGTH}-byte seed")
        if "pub" in jwk and jwk_bytes(jwk, "pub") != self._public_bytes(alg, seed):
            raise InvalidJwk(f"member 'pub' is not the {alg} public key of 'priv'")
        return KeyParams(self.kty, alg), seed

    def _public_bytes(self, alg: str, seed: bytes) -> bytes:
        return self._classes[alg].from_seed_bytes(seed).public_key().public_bytes_raw()


KEY_TYPES: dict[str, KeyType] = {
    key_type.kty: key_type for key_type in (OctKeyType(), RsaKeyType(), MlKemKeyType())
}
_KTY_ALIASES = {MlKemKeyType.jwk_kty: MlKemKeyType.kty}


def costly_material(kty: str) -> bool:
    """Whether material of the key type named `kty` is costly to make or check (False for
    a type that does not exist: it is refused at once)."""
    try:
        return key_type(kty).costly
    except UnsupportedKeyType:
        return False


def key_type(kty: str) -> KeyType:
    """The key type named `kty` (or an alias of it)."""
    try:
        return KEY_TYPES[_KTY_ALIASES.get(kty, kty)]
    except KeyError:
        raise UnsupportedKeyType(
            f"unsupported kty {kty!r}; supported: {', '.join(KEY_TYPES)}"
        ) from None


def resolve(kty: str, alg: str | None, key_size: int | None = None) -> KeyParams:
    """The parameters of a new key; `alg` None means the type's default."""
    chosen = key_type(kty)
    named = None if alg is None else chosen.our_alg(alg)
    return chosen.params(_checked_algorithm(chosen, kty, named), key_size)


def import_jwk(jwk: Mapping[str, Any]) -> tuple[KeyParams, bytes]:
    """Parameters and material of a private JWK (the shapes `export_jwk` writes)."""
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if not isinstance(kty, str) or not isinstance(alg, str | None):
        raise InvalidJwk("members 'kty' and 'alg' must be strings")
    chosen = key_type(kty)
    named = None if alg is None else chosen.our_alg(alg)
    return chosen.import_jwk(jwk, _checked_algorithm(chosen, kty, named))


def supported_algorithms() -> list[dict[str, Any]]:
    """What `kty`, `alg` and `keySize` accept, for the API's listing."""
    return [key_type.describe() for key_type in KEY_TYPES.values()]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_bytes(jwk: Mapping[str, Any], name: str) -> bytes:
    """Member `name`, required to be non-empty canonical base64url without padding."""
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidJwk(f"member {name!r} is missing or not a string")
    try:
        decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        decoded = b""
    # Re-encoding catches what the decoder forgives: other alphabets, padding, stray bits.
    if not decoded or b64url(decoded) != value:
        raise InvalidJwk(f"member {name!r} is not unpadded base64url")
    return decoded


def _checked_algorithm(chosen: KeyType, kty: str, alg: str | None) -> str:
    if alg is None:
        return chosen.algorithms[0]
    if alg in chosen.algorithms:
        return alg
    owner = next((other for other in KEY_TYPES.values() if alg in other.algorithms), None)
    if owner is None:
        raise UnsupportedAlgorithm(f"unsupported alg {alg!r}")
    raise AlgorithmMismatch(f"alg {alg!r} belongs to kty {owner.kty!r}, not {kty!r}")


def _jwk_uint(jwk: Mapping[str, Any], name: str) -> int:
    return int.from_bytes(jwk_bytes(jwk, name))


def _b64url_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8))


def _pkcs8(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_rsa(material: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(material, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("stored RSA material is not an RSA private key")
    return key
