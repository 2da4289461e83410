"""Signing keys that sign a message streamed through them: ECDSA (ES256, ES384), RSA-PSS
(PS256, PS384) and ML-DSA (ML-DSA-44, -65, -87; FIPS 204), each with the hash the message
is fed into as it arrives and the signature JWS (RFC 7518, and the JOSE draft for ML-DSA)
expects over what was hashed.

- ECDSA: `cryptography` signs a prehashed digest and writes DER; JWS wants the raw
  `R || S`, each the curve's coordinate length (RFC 7518 §3.4), so it is converted.
- RSA-PSS: MGF1 with the same hash, and a salt the length of the hash (RFC 7518 §3.5).
- ML-DSA: the message representative μ (FIPS 204, Algorithm 7, line 6) is computed as
  the bytes stream, and `sign_mu` signs it. The result is a pure ML-DSA signature over
  the whole message only if μ was computed with the signing key's own public key and an
  empty context. `sign_mu` signs any 64 bytes, and `verify_mu` accepts that signature of
  that μ, so nothing downstream would notice a μ of another key: the digest is therefore
  only ever made by the key itself (`SigningKey.digest`). Each signature is still checked
  with `verify_mu` before it is handed out, so a faulty one is never answered.

The algorithm of a key is fixed when the key is made; nothing read from a message chooses
it.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from envelope.errors import (
    InvalidParameter,
    SignatureInvalid,
    SignatureLengthInvalid,
    SigningFailed,
)

Chunk = bytes | bytearray | memoryview


class Digest(Protocol):
    """What a message is fed into as it streams: a hash, or ML-DSA's μ."""

    def update(self, data: Chunk, /) -> None: ...

    def finalize(self) -> bytes: ...


MlDsaPrivateKey = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
MlDsaPublicKey = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey


class VerifyingKey(ABC):
    """A public key that checks signatures of one algorithm (`alg`, its JWS name)."""

    alg: str

    @abstractmethod
    def digest(self) -> Digest:
        """A fresh digest to feed the signed bytes into."""

    @abstractmethod
    def signature_length(self) -> int:
        """The length of every signature of this key."""

    @abstractmethod
    def verify(self, signature: bytes, digest: bytes) -> None:
        """Raise `SignatureInvalid` unless `signature` signs what made `digest`;
        `SignatureLengthInvalid` if it cannot be a signature of this key at all."""

    def check_length(self, signature: bytes) -> None:
        """Raise `SignatureLengthInvalid` unless `signature` has the length this key's
        signatures have."""
        expected = self.signature_length()
        if len(signature) != expected:
            raise SignatureLengthInvalid(
                f"an {self.alg} signature of this key has {expected} bytes, not {len(signature)}"
            )


class SigningKey(ABC):
    """A private key that signs with one algorithm; `public` checks what it signs."""

    public: VerifyingKey

    @property
    def alg(self) -> str:
        return self.public.alg

    def digest(self) -> Digest:
        """A fresh digest made by this key's own public key: what `sign` expects."""
        return self.public.digest()

    @abstractmethod
    def sign(self, digest: bytes) -> bytes:
        """The signature (in JWS's encoding) over what made `digest`."""


# ECDSA (RFC 7518 §3.4)


@dataclass(frozen=True)
class _EcdsaParams:
    curve: type[ec.EllipticCurve]
    hash: type[hashes.HashAlgorithm]
    coordinate_length: int


_ECDSA: dict[str, _EcdsaParams] = {
    "ES256": _EcdsaParams(ec.SECP256R1, hashes.SHA256, 32),
    "ES384": _EcdsaParams(ec.SECP384R1, hashes.SHA384, 48),
}


def _ecdsa_params(alg: str, curve: ec.EllipticCurve) -> _EcdsaParams:
    params = _ECDSA.get(alg)
    if params is None or not isinstance(curve, params.curve):
        raise InvalidParameter(f"an {alg} key must be on its own curve")
    return params


class EcdsaVerifyingKey(VerifyingKey):
    def __init__(self, alg: str, key: ec.EllipticCurvePublicKey) -> None:
        self.alg = alg
        self._params = _ecdsa_params(alg, key.curve)
        self._key = key

    def digest(self) -> Digest:
        return hashes.Hash(self._params.hash())

    def signature_length(self) -> int:
        return 2 * self._params.coordinate_length

    def verify(self, signature: bytes, digest: bytes) -> None:
        self.check_length(signature)
        size = self._params.coordinate_length
        r, s = int.from_bytes(signature[:size]), int.from_bytes(signature[size:])
        try:
            self._key.verify(
                encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(self._params.hash()))
            )
        except InvalidSignature:
            raise SignatureInvalid("the signature does not verify") from None


class EcdsaSigningKey(SigningKey):
    def __init__(self, alg: str, key: ec.EllipticCurvePrivateKey) -> None:
        self.public = EcdsaVerifyingKey(alg, key.public_key())
        self._params = _ecdsa_params(alg, key.curve)
        self._key = key

    def sign(self, digest: bytes) -> bytes:
        der = self._key.sign(digest, ec.ECDSA(Prehashed(self._params.hash())))
        r, s = decode_dss_signature(der)
        size = self._params.coordinate_length
        return r.to_bytes(size) + s.to_bytes(size)


# RSA-PSS (RFC 7518 §3.5)

_PSS_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "PS256": hashes.SHA256,
    "PS384": hashes.SHA384,
}


def _pss(alg: str) -> tuple[hashes.HashAlgorithm, padding.PSS]:
    hash_class = _PSS_HASHES.get(alg)
    if hash_class is None:
        raise InvalidParameter(f"{alg!r} is not an RSA-PSS algorithm")
    chosen = hash_class()
    return chosen, padding.PSS(mgf=padding.MGF1(hash_class()), salt_length=chosen.digest_size)


class PssVerifyingKey(VerifyingKey):
    def __init__(self, alg: str, key: rsa.RSAPublicKey) -> None:
        self.alg = alg
        self._hash, self._padding = _pss(alg)
        self._key = key

    def digest(self) -> Digest:
        return hashes.Hash(type(self._hash)())

    def signature_length(self) -> int:
        return (self._key.key_size + 7) // 8

    def verify(self, signature: bytes, digest: bytes) -> None:
        self.check_length(signature)
        try:
            self._key.verify(signature, digest, self._padding, Prehashed(self._hash))
        except InvalidSignature:
            raise SignatureInvalid("the signature does not verify") from None


class PssSigningKey(SigningKey):
    def __init__(self, alg: str, key: rsa.RSAPrivateKey) -> None:
        self.public = PssVerifyingKey(alg, key.public_key())
        self._hash, self._padding = _pss(alg)
        self._key = key

    def sign(self, digest: bytes) -> bytes:
        return self._key.sign(digest, self._padding, Prehashed(self._hash))


# ML-DSA (FIPS 204), signing μ


class MlDsaVerifyingKey(VerifyingKey):
    signature_lengths: ClassVar[dict[str, int]] = {
        "ML-DSA-44": 2420,
        "ML-DSA-65": 3309,
        "ML-DSA-87": 4627,
    }

    def __init__(self, alg: str, key: MlDsaPublicKey) -> None:
        if _mldsa_alg(key) != alg:
            raise InvalidParameter(f"the key is not an {alg} key")
        self.alg = alg
        self._key = key

    def digest(self) -> Digest:
        # This key's own public key and the empty context: only then is a signature of μ
        # a pure ML-DSA signature of the message.
        return mldsa.MLDSAMuHasher(self._key)

    def signature_length(self) -> int:
        return self.signature_lengths[self.alg]

    def verify(self, signature: bytes, digest: bytes) -> None:
        self.check_length(signature)
        try:
            self._key.verify_mu(signature, digest)
        except InvalidSignature:
            raise SignatureInvalid("the signature does not verify") from None


class MlDsaSigningKey(SigningKey):
    def __init__(self, alg: str, key: MlDsaPrivateKey) -> None:
        self.public = MlDsaVerifyingKey(alg, key.public_key())
        self._key = key

    def sign(self, digest: bytes) -> bytes:
        signature = self._key.sign_mu(digest)
        # A signature that does not verify (a fault while signing) is worse than none.
        try:
            self.public.verify(signature, digest)
        except SignatureInvalid:
            raise SigningFailed("an ML-DSA signature did not verify under its own key") from None
        return signature


def _mldsa_alg(key: MlDsaPublicKey) -> str:
    if isinstance(key, mldsa.MLDSA44PublicKey):
        return "ML-DSA-44"
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return "ML-DSA-65"
    return "ML-DSA-87"
