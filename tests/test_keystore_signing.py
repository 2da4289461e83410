"""Signing keys and detached JWS, below the API: every signing algorithm generated,
exported and imported, its public JWK read back into a verifying key; signatures made
while the payload streams, checked here and by independent implementations (joserfc for
ES and PS, `cryptography`'s plain ML-DSA `verify` over the whole signing input), theirs
checked here; and every malformed JWS refused with its own error before a payload byte."""

import base64
import functools
import json
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa
from joserfc import jws
from joserfc.jwk import import_key

from envelope import (
    DetachedSigner,
    DetachedVerifier,
    JwsAlgorithmMismatch,
    JwsCritMissing,
    JwsCritUnsupported,
    JwsExtraSegments,
    JwsPayloadAttached,
    JwsPayloadEncoded,
    MalformedJws,
    SignatureError,
    SignatureInvalid,
    SignatureLengthInvalid,
    SigningFailed,
    parse_detached,
)
from envelope.jws import b64url, protected_header
from envelope.signing_keys import MlDsaSigningKey
from keystore import KeyParams, KeystoreError, supported_algorithms
from keystore.algorithms import import_jwk, key_type, resolve, verifying_key_from_jwk

SIGNING = [
    KeyParams("EC", "ES256"),
    KeyParams("EC", "ES384"),
    KeyParams("RSA", "PS256", 2048),
    KeyParams("RSA", "PS384", 2048),
    KeyParams("ML-DSA", "ML-DSA-44"),
    KeyParams("ML-DSA", "ML-DSA-65"),
    KeyParams("ML-DSA", "ML-DSA-87"),
]
JOSE = SIGNING[:4]
MLDSA = SIGNING[4:]
ED25519 = KeyParams("OKP", "Ed25519")
PAYLOAD = [b"sealstream ", b"signs ", b"\x00\xff" * 5000, b"", b"streams"]


@functools.cache
def material(params: KeyParams) -> bytes:
    return key_type(params.kty).generate(params)


def public_jwk(params: KeyParams, kid: str = "signer#1") -> dict[str, Any]:
    jwk = key_type(params.kty).public_jwk(kid, params, material(params))
    assert jwk is not None
    return dict(jwk)


def sign(params: KeyParams, chunks: list[bytes] = PAYLOAD, kid: str = "signer#1") -> str:
    signer = DetachedSigner(key_type(params.kty).signing_key(params, material(params)), kid)
    for chunk in chunks:
        signer.update(memoryview(chunk))
    return signer.finish()


def verify(params: KeyParams, compact: str, chunks: list[bytes] = PAYLOAD) -> None:
    verifier = DetachedVerifier(
        parse_detached(compact), verifying_key_from_jwk(public_jwk(params))[0]
    )
    for chunk in chunks:
        verifier.update(chunk)
    verifier.verify()


PUBLIC_CLASSES: dict[str, Any] = {
    "ML-DSA-44": mldsa.MLDSA44PublicKey,
    "ML-DSA-65": mldsa.MLDSA65PublicKey,
    "ML-DSA-87": mldsa.MLDSA87PublicKey,
}
PRIVATE_CLASSES: dict[str, Any] = {
    "ML-DSA-44": mldsa.MLDSA44PrivateKey,
    "ML-DSA-65": mldsa.MLDSA65PrivateKey,
    "ML-DSA-87": mldsa.MLDSA87PrivateKey,
}


def _id(params: KeyParams) -> str:
    return params.alg


@pytest.mark.parametrize("params", SIGNING, ids=_id)
def test_a_streamed_signature_verifies_and_fails_on_any_other_payload(params: KeyParams) -> None:
    compact = sign(params)
    header, payload, _ = compact.split(".")
    assert payload == ""
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "alg": params.alg,
        "b64": False,
        "crit": ["b64"],
        "kid": "signer#1",
    }
    verify(params, compact)
    verify(params, compact, [b"".join(PAYLOAD)])  # chunking does not matter
    with pytest.raises(SignatureInvalid):
        verify(params, compact, [*PAYLOAD, b"!"])


@pytest.mark.parametrize("params", JOSE, ids=_id)
def test_es_and_ps_signatures_interoperate_with_joserfc(params: KeyParams) -> None:
    payload = b"".join(PAYLOAD)
    ours = sign(params)
    theirs_key = import_key(public_jwk(params))
    jws.deserialize_compact(ours, theirs_key, algorithms=[params.alg], payload=payload)
    # joserfc signs text payloads only (it decodes them as UTF-8).
    text = "sealstream signs streams: ünïcode, dots. and spaces".encode()
    exported: dict[str, Any] = dict(
        key_type(params.kty).export_jwk("signer#1", params, material(params))
    )
    header = {"alg": params.alg, "b64": False, "crit": ["b64"], "kid": "signer#1"}
    theirs = jws.serialize_compact(header, text, import_key(exported), [params.alg])
    assert theirs.split(".")[1] == ""  # joserfc detaches a payload that is not URL-safe
    verify(params, theirs, [text[:7], text[7:]])


@pytest.mark.parametrize("params", MLDSA, ids=_id)
def test_ml_dsa_signatures_of_mu_are_pure_ml_dsa_signatures_of_the_signing_input(
    params: KeyParams,
) -> None:
    compact = sign(params)
    header, _, signature = compact.split(".")
    signing_input = f"{header}.".encode() + b"".join(PAYLOAD)
    public = base64.urlsafe_b64decode(public_jwk(params)["pub"] + "==")
    key = PUBLIC_CLASSES[params.alg].from_public_bytes(public)
    key.verify(base64.urlsafe_b64decode(signature + "=="), signing_input)
    # And a plain ML-DSA signature of the signing input, made elsewhere, verifies here.
    seed = material(params)
    private = PRIVATE_CLASSES[params.alg].from_seed_bytes(seed)
    theirs = f"{header}..{b64url(private.sign(signing_input))}"
    verify(params, theirs)


class _FaultySigner:
    """An ML-DSA private key whose signatures come out with one bit flipped."""

    def __init__(self, key: mldsa.MLDSA44PrivateKey) -> None:
        self._key = key

    def public_key(self) -> mldsa.MLDSA44PublicKey:
        return self._key.public_key()

    def sign_mu(self, mu: bytes) -> bytes:
        signature = bytearray(self._key.sign_mu(mu))
        signature[0] ^= 1
        return bytes(signature)


def test_ml_dsa_verifies_each_signature_before_handing_it_out() -> None:
    faulty = MlDsaSigningKey(
        "ML-DSA-44", cast(Any, _FaultySigner(mldsa.MLDSA44PrivateKey.generate()))
    )
    digest = faulty.digest()
    digest.update(b"payload")
    with pytest.raises(SigningFailed):
        faulty.sign(digest.finalize())


def test_the_ml_dsa_digest_is_made_by_the_signing_keys_own_public_key() -> None:
    params = MLDSA[0]
    ours = key_type(params.kty).signing_key(params, material(params))
    theirs = mldsa.MLDSAMuHasher(mldsa.MLDSA44PrivateKey.generate().public_key())
    own = mldsa.MLDSAMuHasher(
        mldsa.MLDSA44PublicKey.from_public_bytes(
            base64.urlsafe_b64decode(public_jwk(params)["pub"] + "==")
        )
    )
    digest = ours.digest()
    for hasher in (digest, theirs, own):
        hasher.update(b"payload")
    mu = digest.finalize()
    assert mu == own.finalize() and mu != theirs.finalize()


@pytest.mark.parametrize("params", [*SIGNING, ED25519], ids=_id)
def test_export_then_import_gives_back_the_same_key(params: KeyParams) -> None:
    exported = key_type(params.kty).export_jwk("k#3", params, material(params))
    assert exported["kid"] == "k#3" and exported["alg"] == params.alg
    assert import_jwk(exported) == (params, material(params))


def test_public_and_export_jwks_have_the_documented_members() -> None:
    expected = {
        "ES256": ({"kty", "kid", "alg", "crv", "x", "y"}, {"d"}),
        "PS256": ({"kty", "kid", "alg", "n", "e"}, {"d", "p", "q", "dp", "dq", "qi"}),
        "ML-DSA-65": ({"kty", "kid", "alg", "pub"}, {"priv"}),
        "Ed25519": ({"kty", "kid", "alg", "crv", "x"}, {"d"}),
    }
    for params in (SIGNING[0], SIGNING[2], SIGNING[5], ED25519):
        public, private = expected[params.alg]
        assert set(public_jwk(params)) == public
        exported = key_type(params.kty).export_jwk("k#1", params, material(params))
        assert set(exported) == public | private
    assert public_jwk(SIGNING[5])["kty"] == "AKP"
    assert public_jwk(SIGNING[0])["crv"] == "P-256"
    assert public_jwk(SIGNING[1])["crv"] == "P-384"


@pytest.mark.parametrize(
    ("kty", "alg", "signs", "expected"),
    [
        ("EC", None, False, KeyParams("EC", "ES256")),
        ("RSA", None, True, KeyParams("RSA", "PS256", 3072)),
        ("RSA", None, False, KeyParams("RSA", "RSA-OAEP-256", 3072)),
        ("AKP", None, True, KeyParams("ML-DSA", "ML-DSA-65")),
        ("AKP", None, False, KeyParams("ML-KEM", "ML-KEM-768")),
        ("AKP", "ML-DSA-87", False, KeyParams("ML-DSA", "ML-DSA-87")),
        ("OKP", None, False, KeyParams("OKP", "Ed25519")),
    ],
)
def test_resolve_picks_the_signing_default_when_keyops_sign(
    kty: str, alg: str | None, signs: bool, expected: KeyParams
) -> None:
    assert resolve(kty, alg, signs=signs) == expected


def test_supported_algorithms_list_each_algs_operations_and_ed25519_as_not_for_streams() -> None:
    listing = {entry["kty"]: entry for entry in supported_algorithms()}
    assert listing["RSA"]["operations"] == {
        "RSA-OAEP-256": ["encrypt", "decrypt"],
        "PS256": ["sign", "verify"],
        "PS384": ["sign", "verify"],
    }
    assert listing["EC"]["operations"] == {"ES256": ["sign", "verify"], "ES384": ["sign", "verify"]}
    assert listing["ML-DSA"]["aliases"] == ["AKP"]
    assert set(listing["ML-DSA"]["operations"]) == {"ML-DSA-44", "ML-DSA-65", "ML-DSA-87"}
    assert listing["OKP"]["streaming"] is False and "small payloads" in listing["OKP"]["note"]
    assert all(entry["streaming"] for kty, entry in listing.items() if kty != "OKP")
    assert listing["oct"]["operations"] == {"AES-256": ["encrypt", "decrypt"]}


def test_keys_do_only_what_their_algorithm_does() -> None:
    with pytest.raises(KeystoreError) as caught:
        key_type("EC").keyring("k#1", SIGNING[0], material(SIGNING[0]))
    assert caught.value.code == "operation-not-permitted"
    with pytest.raises(KeystoreError) as caught:
        key_type("OKP").signing_key(ED25519, material(ED25519))
    assert caught.value.code == "not-for-streams"
    rsa_oaep = KeyParams("RSA", "RSA-OAEP-256", 2048)
    with pytest.raises(KeystoreError) as caught:
        key_type("RSA").signing_key(rsa_oaep, material(SIGNING[2]))
    assert caught.value.code == "operation-not-permitted"


BAD_PUBLIC_JWKS: dict[str, Any] = {
    "no alg": lambda: {k: v for k, v in public_jwk(SIGNING[0]).items() if k != "alg"},
    "private members": lambda: key_type("EC").export_jwk("k#1", SIGNING[0], material(SIGNING[0])),
    "EC off the curve": lambda: public_jwk(SIGNING[0]) | {"y": public_jwk(SIGNING[0])["x"]},
    "EC of the other curve": lambda: public_jwk(SIGNING[1]) | {"alg": "ES256"},
    "RSA of 1024 bits": lambda: public_jwk(SIGNING[2]) | {"n": b64url(b"\x80" * 128)},
    "ML-DSA pub of the wrong size": lambda: public_jwk(MLDSA[0]) | {"pub": b64url(bytes(100))},
}


@pytest.mark.parametrize("case", BAD_PUBLIC_JWKS)
def test_bad_public_jwks_are_refused(case: str) -> None:
    with pytest.raises(KeystoreError) as caught:
        verifying_key_from_jwk(BAD_PUBLIC_JWKS[case]())
    assert caught.value.code == "invalid-jwk"


def test_an_ed25519_public_jwk_does_not_verify_streams() -> None:
    with pytest.raises(KeystoreError) as caught:
        verifying_key_from_jwk(public_jwk(ED25519))
    assert caught.value.code == "not-for-streams"


# Hostile JWS: each refused with its own error before a byte of the payload


def _header(**members: Any) -> str:
    return b64url(json.dumps(members).encode())


GOOD_HEADER = {"alg": "ES256", "b64": False, "crit": ["b64"], "kid": "signer#1"}
SIG = b64url(bytes(64))
DUPLICATE_ALG = b64url(b'{"alg":"ES256","alg":"none","b64":false,"crit":["b64"]}')
HOSTILE: list[tuple[str, str, type[SignatureError]]] = [
    ("extra segments", f"{_header(**GOOD_HEADER)}..{SIG}.x.y", JwsExtraSegments),
    ("four segments", f"{_header(**GOOD_HEADER)}..{SIG}.", JwsExtraSegments),
    ("two segments", f"{_header(**GOOD_HEADER)}.{SIG}", MalformedJws),
    ("attached payload", f"{_header(**GOOD_HEADER)}.cGF5bG9hZA.{SIG}", JwsPayloadAttached),
    ("header not base64url", f"e30=..{SIG}", MalformedJws),
    ("header not JSON", f"{b64url(b'{nope')}..{SIG}", MalformedJws),
    ("header an array", f"{b64url(b'[1]')}..{SIG}", MalformedJws),
    ("duplicate member", f"{DUPLICATE_ALG}..{SIG}", MalformedJws),
    ("no alg", f"{_header(b64=False, crit=['b64'])}..{SIG}", MalformedJws),
    ("empty signature", f"{_header(**GOOD_HEADER)}..", MalformedJws),
    ("signature with padding", f"{_header(**GOOD_HEADER)}..{SIG}==", MalformedJws),
    ("b64 missing", f"{_header(alg='ES256')}..{SIG}", JwsPayloadEncoded),
    ("b64 true", f"{_header(alg='ES256', b64=True, crit=['b64'])}..{SIG}", JwsPayloadEncoded),
    ("crit missing", f"{_header(alg='ES256', b64=False)}..{SIG}", JwsCritMissing),
    (
        "crit unknown",
        f"{_header(**GOOD_HEADER | {'crit': ['b64', 'x'], 'x': 1})}..{SIG}",
        JwsCritUnsupported,
    ),
    ("crit absent member", f"{_header(alg='ES256', crit=['b64'])}..{SIG}", JwsCritUnsupported),
    ("crit not a list", f"{_header(**GOOD_HEADER | {'crit': 'b64'})}..{SIG}", JwsCritUnsupported),
    ("crit empty", f"{_header(**GOOD_HEADER | {'crit': []})}..{SIG}", JwsCritUnsupported),
    (
        "crit lists alg",
        f"{_header(**GOOD_HEADER | {'crit': ['b64', 'alg']})}..{SIG}",
        JwsCritUnsupported,
    ),
]


@pytest.mark.parametrize(("case", "compact", "error"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_jws_is_refused_with_its_own_error(
    case: str, compact: str, error: type[SignatureError]
) -> None:
    with pytest.raises(error) as caught:
        parse_detached(compact)
    assert type(caught.value) is error


def test_the_keys_algorithm_decides_never_the_header() -> None:
    es256 = verifying_key_from_jwk(public_jwk(SIGNING[0]))[0]
    claims_none = f"{_header(**GOOD_HEADER | {'alg': 'none'})}..{SIG}"
    with pytest.raises(JwsAlgorithmMismatch):
        DetachedVerifier(parse_detached(claims_none), es256)
    claims_es384 = sign(SIGNING[1])
    with pytest.raises(JwsAlgorithmMismatch):
        DetachedVerifier(parse_detached(claims_es384), es256)


@pytest.mark.parametrize("params", SIGNING, ids=_id)
def test_a_signature_of_the_wrong_length_is_refused_before_the_payload(params: KeyParams) -> None:
    header = protected_header(params.alg, "signer#1")
    verifying = verifying_key_from_jwk(public_jwk(params))[0]
    for length in (1, verifying.signature_length() - 1, verifying.signature_length() + 1):
        with pytest.raises(SignatureLengthInvalid):
            DetachedVerifier(parse_detached(f"{header}..{b64url(bytes(length))}"), verifying)
