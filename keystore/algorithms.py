"""The table of supported key types (kty) and algorithms (alg), and per type: the
operations each algorithm serves, material generation and encoding, keyring or signing
key construction, public and export JWKs, import from JWK.

An algorithm either encrypts (`encrypt`, `decrypt`: AES-256, RSA-OAEP-256, ML-KEM) or
signs (`sign`, `verify`: ES256, ES384, PS256, PS384, Ed25519, ML-DSA); no key does both.
The key API names algorithms as the product always has (`AES-256`); JWKs name them as
RFC 7518 does (`A256GCM`), and an imported JWK may use either (docs/api.md has the table).

Material is what the store wraps under the KEK: 32 raw bytes for `oct`, PKCS#8 DER for
`RSA` and `EC`, the 64-byte seed for `ML-KEM`, the 32-byte seed for `ML-DSA`, the 32-byte
private key for `OKP`. JWK members are base64url without padding. Errors about imported
JWKs name members, never their values.
"""

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, mlkem, rsa

from envelope import AesKeyring, Keyring, MlKemKeyring, RsaKeyring, SigningKey, VerifyingKey
from envelope.jws import b64url as b64url
from envelope.jws import b64url_decode
from envelope.signing_keys import (
    EcdsaSigningKey,
    EcdsaVerifyingKey,
    MlDsaSigningKey,
    MlDsaVerifyingKey,
    PssSigningKey,
    PssVerifyingKey,
)
from keystore.errors import (
    AlgorithmMismatch,
    InvalidJwk,
    InvalidKeySize,
    NotForStreams,
    OperationNotPermitted,
    UnsupportedAlgorithm,
    UnsupportedKeyType,
)

Jwk = dict[str, str]
KeyOp = Literal["encrypt", "decrypt", "sign", "verify"]
ENCRYPTION_OPS: tuple[KeyOp, ...] = ("encrypt", "decrypt")
SIGNATURE_OPS: tuple[KeyOp, ...] = ("sign", "verify")
KEY_OPS: tuple[KeyOp, ...] = ENCRYPTION_OPS + SIGNATURE_OPS

AES_KEY_LENGTH = 32
MLKEM_SEED_LENGTH = 64
MLDSA_SEED_LENGTH = 32
ED25519_KEY_LENGTH = 32
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
    # Whether its signatures can be made over a stream in one pass.
    streams: ClassVar[bool] = True

    def params(self, alg: str, key_size: int | None) -> KeyParams:
        """The parameters of a new key of algorithm `alg` (already one of ours)."""
        if key_size is not None:
            raise InvalidKeySize("keySize applies to RSA keys only")
        return KeyParams(self.kty, alg)

    def operations(self, alg: str) -> tuple[KeyOp, ...]:
        """What a key of algorithm `alg` may be allowed to do."""
        return ENCRYPTION_OPS

    def default_algorithm(self, signs: bool) -> str:
        """The algorithm a new key gets when none is named: the first that signs, if the
        key is to sign, else the first."""
        wanted = SIGNATURE_OPS if signs else self.operations(self.algorithms[0])
        return next(
            (a for a in self.algorithms if self.operations(a) == wanted), self.algorithms[0]
        )

    def describe(self) -> dict[str, Any]:
        """This type's entry in the supported-algorithms listing."""
        return {
            "kty": self.kty,
            "algorithms": list(self.algorithms),
            "default": self.algorithms[0],
            "operations": {alg: list(self.operations(alg)) for alg in self.algorithms},
            "streaming": self.streams,
        }

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

    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        """The envelope keyring of one key version, able to wrap and unwrap."""
        raise OperationNotPermitted(f"{params.alg} keys do not encrypt")

    def signing_key(self, params: KeyParams, material: bytes) -> SigningKey:
        """The key that signs streams with one key version."""
        raise OperationNotPermitted(f"{params.alg} keys do not sign")

    def recipient_keyring(self, key_name: str, public_jwk: Mapping[str, Any], alg: str) -> Keyring:
        """A keyring that wraps to a public JWK of this type, for a recipient the service
        does not hold; it cannot unwrap."""
        raise OperationNotPermitted(f"{alg} keys cannot take messages for a recipient")

    def thumbprint_members(self, public_jwk: Mapping[str, Any], alg: str) -> dict[str, str]:
        """The members an RFC 7638 thumbprint of a public JWK of this type covers, each
        written afresh from the key they make, so that one key has one thumbprint however
        its JWK spells it (an exponent's leading zeros, a `kty` alias)."""
        raise OperationNotPermitted(f"{self.kty} keys have no public key to name")

    def verifying_key(self, public_jwk: Mapping[str, Any], alg: str) -> VerifyingKey:
        """The key that checks `alg` signatures of a public JWK of this type."""
        raise OperationNotPermitted(f"{alg} keys do not verify")

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
    algorithms = ("RSA-OAEP-256", "PS256", "PS384")
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

    def operations(self, alg: str) -> tuple[KeyOp, ...]:
        return ENCRYPTION_OPS if alg == self.algorithms[0] else SIGNATURE_OPS

    def generate(self, params: KeyParams) -> bytes:
        key_size = params.key_size or self.default_key_size
        key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=key_size)
        return _pkcs8(key)

    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        if self.operations(params.alg) != ENCRYPTION_OPS:
            return super().keyring(key_name, params, material)
        return RsaKeyring(key_name, _load_rsa(material))

    def signing_key(self, params: KeyParams, material: bytes) -> SigningKey:
        if self.operations(params.alg) != SIGNATURE_OPS:
            return super().signing_key(params, material)
        return PssSigningKey(params.alg, _load_rsa(material))

    def recipient_keyring(self, key_name: str, public_jwk: Mapping[str, Any], alg: str) -> Keyring:
        if self.operations(alg) != ENCRYPTION_OPS:
            return super().recipient_keyring(key_name, public_jwk, alg)
        return RsaKeyring(key_name, self._public_key(public_jwk))

    def thumbprint_members(self, public_jwk: Mapping[str, Any], alg: str) -> dict[str, str]:
        numbers = self._public_key(public_jwk).public_numbers()
        return {"e": _b64url_uint(numbers.e), "kty": self.kty, "n": _b64url_uint(numbers.n)}

    def verifying_key(self, public_jwk: Mapping[str, Any], alg: str) -> VerifyingKey:
        if self.operations(alg) != SIGNATURE_OPS:
            return super().verifying_key(public_jwk, alg)
        return PssVerifyingKey(alg, self._public_key(public_jwk))

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
        modulus = self._checked_modulus(jwk)
        key_size = len(modulus) * 8
        d, p, q, dp, dq, qi = (_jwk_uint(jwk, name) for name in self._private_members)
        public = rsa.RSAPublicNumbers(_jwk_uint(jwk, "e"), int.from_bytes(modulus))
        try:
            key = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, public).private_key()
        except ValueError:
            raise InvalidJwk("the RSA members do not make a consistent private key") from None
        return KeyParams(self.kty, alg, key_size), _pkcs8(key)

    def _public_key(self, public_jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
        """A partner's public key, refused unless it can do its work: OpenSSL loads an
        even modulus or an exponent that is even or wider than 32 bits, and fails only
        once it encrypts, mid-request."""
        modulus = int.from_bytes(self._checked_modulus(public_jwk))
        exponent = _jwk_uint(public_jwk, "e")
        if modulus % 2 == 0 or exponent % 2 == 0 or not 3 <= exponent < 2**32:
            raise InvalidJwk("the RSA members do not make a usable public key")
        try:
            return rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError:
            raise InvalidJwk("the RSA members do not make a public key") from None

    def _checked_modulus(self, jwk: Mapping[str, Any]) -> bytes:
        modulus = jwk_bytes(jwk, "n")
        if len(modulus) * 8 not in self.key_sizes or not modulus[0] & 0x80:
            raise InvalidJwk(f"member 'n' must be an RSA modulus of {list(self.key_sizes)} bits")
        return modulus


class AkpKeyType(KeyType):
    """A key type whose JWKs are the JOSE draft's `AKP` ("algorithm key pair"): the
    private key as its seed (`priv`), the public key as raw bytes (`pub`), the parameter
    set named by `alg`."""

    jwk_kty = "AKP"  # the IETF JOSE draft's name, used in JWKs and accepted on input
    seed_length: ClassVar[int]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"aliases": [self.jwk_kty]}

    @abstractmethod
    def public_bytes(self, alg: str, seed: bytes) -> bytes:
        """The raw public key of the key made from `seed`."""

    def public_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        return {
            "kty": self.jwk_kty,
            "kid": key_name,
            "alg": self.jwk_alg(params.alg),
            "pub": b64url(self.public_bytes(params.alg, material)),
        }

    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        return self.public_jwk(key_name, params, material) | {"priv": b64url(material)}

    def thumbprint_members(self, public_jwk: Mapping[str, Any], alg: str) -> dict[str, str]:
        # The JOSE draft's members for AKP keys, `kty` always `AKP`, whatever alias came.
        if "alg" not in public_jwk:
            raise InvalidJwk("an AKP public JWK must name its parameter set in 'alg'")
        pub = b64url(jwk_bytes(public_jwk, "pub"))
        return {"alg": self.jwk_alg(alg), "kty": self.jwk_kty, "pub": pub}

    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        if "alg" not in jwk:
            raise InvalidJwk("an AKP JWK must name its parameter set in 'alg'")
        seed = jwk_bytes(jwk, "priv")
        if len(seed) != self.seed_length:
            raise InvalidJwk(f"member 'priv' must hold the {self.seed_length}-byte seed")
        if "pub" in jwk and jwk_bytes(jwk, "pub") != self.public_bytes(alg, seed):
            raise InvalidJwk(f"member 'pub' is not the {alg} public key of 'priv'")
        return KeyParams(self.kty, alg), seed


MlKemPrivateKeyClass = type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]


class MlKemKeyType(AkpKeyType):
    kty = "ML-KEM"
    algorithms = ("ML-KEM-768", "ML-KEM-1024")
    seed_length = MLKEM_SEED_LENGTH
    _classes: ClassVar[dict[str, MlKemPrivateKeyClass]] = {
        "ML-KEM-768": mlkem.MLKEM768PrivateKey,
        "ML-KEM-1024": mlkem.MLKEM1024PrivateKey,
    }

    def generate(self, params: KeyParams) -> bytes:
        return self._classes[params.alg].generate().private_bytes_raw()

    def keyring(self, key_name: str, params: KeyParams, material: bytes) -> Keyring:
        return MlKemKeyring(key_name, self._classes[params.alg].from_seed_bytes(material))

    def public_bytes(self, alg: str, seed: bytes) -> bytes:
        return self._classes[alg].from_seed_bytes(seed).public_key().public_bytes_raw()

    def recipient_keyring(self, key_name: str, public_jwk: Mapping[str, Any], alg: str) -> Keyring:
        public = mlkem.MLKEM768PublicKey if alg == "ML-KEM-768" else mlkem.MLKEM1024PublicKey
        try:
            return MlKemKeyring(key_name, public.from_public_bytes(jwk_bytes(public_jwk, "pub")))
        except ValueError:
            raise InvalidJwk(f"member 'pub' is not an {alg} public key") from None


class EcKeyType(KeyType):
    kty = "EC"
    algorithms = ("ES256", "ES384")
    _curves: ClassVar[dict[str, tuple[str, ec.EllipticCurve]]] = {
        "ES256": ("P-256", ec.SECP256R1()),
        "ES384": ("P-384", ec.SECP384R1()),
    }

    def operations(self, alg: str) -> tuple[KeyOp, ...]:
        return SIGNATURE_OPS

    def generate(self, params: KeyParams) -> bytes:
        return _pkcs8(ec.generate_private_key(self._curves[params.alg][1]))

    def signing_key(self, params: KeyParams, material: bytes) -> SigningKey:
        return EcdsaSigningKey(params.alg, _load_ec(material))

    def verifying_key(self, public_jwk: Mapping[str, Any], alg: str) -> VerifyingKey:
        return EcdsaVerifyingKey(alg, self._public_numbers(public_jwk, alg).public_key())

    def public_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        numbers = _load_ec(material).public_key().public_numbers()
        size = self._coordinate_length(params.alg)
        return {
            "kty": self.kty,
            "kid": key_name,
            "alg": params.alg,
            "crv": self._curves[params.alg][0],
            "x": b64url(numbers.x.to_bytes(size)),
            "y": b64url(numbers.y.to_bytes(size)),
        }

    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        private = _load_ec(material).private_numbers().private_value
        size = self._coordinate_length(params.alg)
        return self.public_jwk(key_name, params, material) | {"d": b64url(private.to_bytes(size))}

    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        self._check_curve(jwk, alg)
        d = jwk_bytes(jwk, "d")
        if len(d) != self._coordinate_length(alg):
            raise InvalidJwk(
                f"member 'd' of an {alg} key must hold {self._coordinate_length(alg)} bytes"
            )
        try:
            key = ec.derive_private_key(int.from_bytes(d), self._curves[alg][1])
        except ValueError:
            raise InvalidJwk("member 'd' is not a private key of the curve") from None
        if ("x" in jwk or "y" in jwk) and self._public_numbers(
            jwk, alg
        ) != key.public_key().public_numbers():
            raise InvalidJwk("members 'x' and 'y' are not the public key of 'd'")
        return KeyParams(self.kty, alg), _pkcs8(key)

    def _public_numbers(self, jwk: Mapping[str, Any], alg: str) -> ec.EllipticCurvePublicNumbers:
        self._check_curve(jwk, alg)
        size = self._coordinate_length(alg)
        x, y = jwk_bytes(jwk, "x"), jwk_bytes(jwk, "y")
        if len(x) != size or len(y) != size:
            raise InvalidJwk(f"members 'x' and 'y' of an {alg} key hold {size} bytes each")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x), int.from_bytes(y), self._curves[alg][1]
        )
        try:
            numbers.public_key()
        except ValueError:
            raise InvalidJwk("members 'x' and 'y' are not a point of the curve") from None
        return numbers

    def thumbprint_members(self, public_jwk: Mapping[str, Any], alg: str) -> dict[str, str]:
        numbers = self._public_numbers(public_jwk, alg)
        size = self._coordinate_length(alg)
        x, y = (b64url(value.to_bytes(size)) for value in (numbers.x, numbers.y))
        return {"crv": self._curves[alg][0], "kty": self.kty, "x": x, "y": y}

    def _check_curve(self, jwk: Mapping[str, Any], alg: str) -> None:
        if jwk.get("crv") != self._curves[alg][0]:
            raise InvalidJwk(f"member 'crv' of an {alg} key must be {self._curves[alg][0]!r}")

    def _coordinate_length(self, alg: str) -> int:
        return (self._curves[alg][1].key_size + 7) // 8


class OkpKeyType(KeyType):
    """Ed25519 (RFC 8037; alg named as RFC 9864 has it): for small payloads only. Pure
    Ed25519 hashes the message twice, and `cryptography` offers no prehashed Ed25519ph,
    so it signs no stream."""

    kty = "OKP"
    algorithms = ("Ed25519",)
    streams = False
    _crv = "Ed25519"

    def operations(self, alg: str) -> tuple[KeyOp, ...]:
        return SIGNATURE_OPS

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "note": "for small payloads only: pure Ed25519 reads a message twice, so it "
            "signs and verifies no stream"
        }

    def generate(self, params: KeyParams) -> bytes:
        return ed25519.Ed25519PrivateKey.generate().private_bytes_raw()

    def signing_key(self, params: KeyParams, material: bytes) -> SigningKey:
        raise NotForStreams(f"{params.alg} keys sign small payloads, not streams")

    def verifying_key(self, public_jwk: Mapping[str, Any], alg: str) -> VerifyingKey:
        raise NotForStreams(f"{alg} keys verify small payloads, not streams")

    def public_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        public = ed25519.Ed25519PrivateKey.from_private_bytes(material).public_key()
        return {
            "kty": self.kty,
            "kid": key_name,
            "alg": params.alg,
            "crv": self._crv,
            "x": b64url(public.public_bytes_raw()),
        }

    def export_jwk(self, key_name: str, params: KeyParams, material: bytes) -> Jwk:
        return self.public_jwk(key_name, params, material) | {"d": b64url(material)}

    def import_jwk(self, jwk: Mapping[str, Any], alg: str) -> tuple[KeyParams, bytes]:
        if jwk.get("crv") != self._crv:
            raise InvalidJwk(f"member 'crv' of an {alg} key must be {self._crv!r}")
        d = jwk_bytes(jwk, "d")
        if len(d) != ED25519_KEY_LENGTH:
            raise InvalidJwk(f"member 'd' must hold {ED25519_KEY_LENGTH} bytes")
        public = ed25519.Ed25519PrivateKey.from_private_bytes(d).public_key().public_bytes_raw()
        if "x" in jwk and jwk_bytes(jwk, "x") != public:
            raise InvalidJwk("member 'x' is not the public key of 'd'")
        return KeyParams(self.kty, alg), d


MlDsaPrivateKeyClass = (
    type[mldsa.MLDSA44PrivateKey] | type[mldsa.MLDSA65PrivateKey] | type[mldsa.MLDSA87PrivateKey]
)
MlDsaPublicKeyClass = (
    type[mldsa.MLDSA44PublicKey] | type[mldsa.MLDSA65PublicKey] | type[mldsa.MLDSA87PublicKey]
)


class MlDsaKeyType(AkpKeyType):
    kty = "ML-DSA"
    algorithms = ("ML-DSA-65", "ML-DSA-44", "ML-DSA-87")
    seed_length = MLDSA_SEED_LENGTH
    _classes: ClassVar[dict[str, tuple[MlDsaPrivateKeyClass, MlDsaPublicKeyClass]]] = {
        "ML-DSA-44": (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
        "ML-DSA-65": (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
        "ML-DSA-87": (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
    }

    def operations(self, alg: str) -> tuple[KeyOp, ...]:
        return SIGNATURE_OPS

    def generate(self, params: KeyParams) -> bytes:
        return self._classes[params.alg][0].generate().private_bytes_raw()

    def signing_key(self, params: KeyParams, material: bytes) -> SigningKey:
        return MlDsaSigningKey(params.alg, self._classes[params.alg][0].from_seed_bytes(material))

    def verifying_key(self, public_jwk: Mapping[str, Any], alg: str) -> VerifyingKey:
        try:
            public = self._classes[alg][1].from_public_bytes(jwk_bytes(public_jwk, "pub"))
        except ValueError:
            raise InvalidJwk(f"member 'pub' is not an {alg} public key") from None
        return MlDsaVerifyingKey(alg, public)

    def public_bytes(self, alg: str, seed: bytes) -> bytes:
        return self._classes[alg][0].from_seed_bytes(seed).public_key().public_bytes_raw()


KEY_TYPES: dict[str, KeyType] = {
    key_type.kty: key_type
    for key_type in (
        OctKeyType(),
        RsaKeyType(),
        MlKemKeyType(),
        EcKeyType(),
        OkpKeyType(),
        MlDsaKeyType(),
    )
}
# `AKP` names both ML-KEM and ML-DSA keys; the algorithm tells which (ML-KEM without one).
_KTY_ALIASES: dict[str, tuple[KeyType, ...]] = {
    "AKP": (KEY_TYPES[MlKemKeyType.kty], KEY_TYPES[MlDsaKeyType.kty])
}


def costly_material(kty: str) -> bool:
    """Whether material of the key type named `kty` is costly to make or check (False for
    a type that does not exist: it is refused at once)."""
    try:
        return key_type(kty).costly
    except UnsupportedKeyType:
        return False


def key_type(kty: str, alg: str | None = None, *, signs: bool = False) -> KeyType:
    """The key type named `kty`; for an alias, the one of its types that has `alg`, or
    (with no `alg`) the first that signs if `signs`, else the first."""
    if kty in KEY_TYPES:
        return KEY_TYPES[kty]
    candidates = _KTY_ALIASES.get(kty)
    if candidates is None:
        raise UnsupportedKeyType(f"unsupported kty {kty!r}; supported: {', '.join(KEY_TYPES)}")
    if alg is None and signs:
        return next(
            (c for c in candidates if c.operations(c.algorithms[0]) == SIGNATURE_OPS), candidates[0]
        )
    return next((c for c in candidates if alg in c.algorithms), candidates[0])


def resolve(
    kty: str, alg: str | None, key_size: int | None = None, *, signs: bool = False
) -> KeyParams:
    """The parameters of a new key; `alg` None means the type's default, the default
    signing algorithm if `signs`."""
    chosen = key_type(kty, alg, signs=signs)
    named = chosen.default_algorithm(signs) if alg is None else chosen.our_alg(alg)
    return chosen.params(_checked_algorithm(chosen, kty, named), key_size)


def import_jwk(jwk: Mapping[str, Any]) -> tuple[KeyParams, bytes]:
    """Parameters and material of a private JWK (the shapes `export_jwk` writes)."""
    kty, alg = _kty_and_alg(jwk)
    chosen = key_type(kty, alg)
    named = None if alg is None else chosen.our_alg(alg)
    return chosen.import_jwk(jwk, _checked_algorithm(chosen, kty, named))


def verifying_key_from_jwk(jwk: Mapping[str, Any]) -> tuple[VerifyingKey, str]:
    """The key that checks signatures of a public JWK given by a client, for a key the
    service does not hold, and its name: `jwk#` and its RFC 7638 thumbprint, never a name
    the JWK or a signature claims (their sender chooses those). The JWK must name its
    `alg`: the key decides the algorithm."""
    kty, alg = _kty_and_alg(jwk)
    if alg is None:
        raise InvalidJwk("a public JWK to verify with must name its 'alg'")
    if _PRIVATE_MEMBERS & set(jwk):
        raise InvalidJwk("send the public key only: the JWK holds private members")
    chosen = key_type(kty, alg)
    ours = _checked_algorithm(chosen, kty, chosen.our_alg(alg))
    verifying_key = chosen.verifying_key(jwk, ours)
    return verifying_key, _thumbprint_name(chosen.thumbprint_members(jwk, ours))


def recipient_keyring(public_jwk: Mapping[str, Any]) -> tuple[Keyring, str]:
    """A keyring that wraps to a public JWK (RSA or ML-KEM) a client gives for a recipient
    the service does not hold, named by the key's RFC 7638 thumbprint (SHA-256, base64url)
    as `jwk#<thumbprint>`, in the message and in the audit trail; and its algorithm. The
    name is what the writer binds into a message's proof and a reader takes from its
    header, so it is computed once, here, from the key's members written canonically."""
    kty, alg = _kty_and_alg(public_jwk)
    if _PRIVATE_MEMBERS & set(public_jwk):
        raise InvalidJwk("send the public key only: the JWK holds private members")
    chosen = key_type(kty, alg)
    ours = _checked_algorithm(chosen, kty, None if alg is None else chosen.our_alg(alg))
    if chosen.operations(ours) != ENCRYPTION_OPS:
        raise OperationNotPermitted(f"{ours} keys do not encrypt")
    name = _thumbprint_name(chosen.thumbprint_members(public_jwk, ours))
    return chosen.recipient_keyring(name, public_jwk, ours), ours


def _thumbprint_name(members: Mapping[str, str]) -> str:
    """`jwk#` and the RFC 7638 thumbprint (SHA-256, base64url) of a key's members."""
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":"))
    return "jwk#" + b64url(hashlib.sha256(canonical.encode()).digest())


def supported_algorithms() -> list[dict[str, Any]]:
    """What `kty`, `alg` and `keySize` accept, for the API's listing."""
    return [key_type.describe() for key_type in KEY_TYPES.values()]


def _kty_and_alg(jwk: Mapping[str, Any]) -> tuple[str, str | None]:
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if not isinstance(kty, str) or not isinstance(alg, str | None):
        raise InvalidJwk("members 'kty' and 'alg' must be strings")
    return kty, alg


_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k", "priv"})


def jwk_bytes(jwk: Mapping[str, Any], name: str) -> bytes:
    """Member `name`, required to be non-empty canonical base64url without padding."""
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidJwk(f"member {name!r} is missing or not a string")
    try:
        return b64url_decode(value)
    except ValueError:
        raise InvalidJwk(f"member {name!r} is not unpadded base64url") from None


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


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ec(material: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(material, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("stored EC material is not an EC private key")
    return key


def _load_rsa(material: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(material, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("stored RSA material is not an RSA private key")
    return key
