"""The algorithm table: generation of every type and size, keyrings that round-trip an
envelope message, public and export JWKs, strict import, and every invalid choice's code."""

import base64
import functools
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keystore import KeyParams, KeystoreError, supported_algorithms
from keystore.algorithms import b64url, import_jwk, key_type, resolve
from tests.support.envelope import decrypt_all, encrypt_all

PARAMS = [
    KeyParams("oct", "AES-256"),
    KeyParams("RSA", "RSA-OAEP-256", 2048),
    KeyParams("RSA", "RSA-OAEP-256", 3072),
    KeyParams("RSA", "RSA-OAEP-256", 4096),
    KeyParams("ML-KEM", "ML-KEM-768"),
    KeyParams("ML-KEM", "ML-KEM-1024"),
]
PLAINTEXT = b"sealstream keyring check " * 300


@functools.cache
def material(params: KeyParams) -> bytes:
    """One key per parameter set for the whole module (RSA-4096 takes seconds)."""
    return key_type(params.kty).generate(params)


def _id(params: KeyParams) -> str:
    return f"{params.alg}-{params.key_size}" if params.key_size else params.alg


@pytest.mark.parametrize("params", PARAMS, ids=_id)
def test_generated_material_makes_a_keyring_that_round_trips_a_message(params: KeyParams) -> None:
    keyring = key_type(params.kty).keyring("k#1", params, material(params))
    message = encrypt_all([keyring], PLAINTEXT)
    assert decrypt_all([keyring], message) == PLAINTEXT


@pytest.mark.parametrize("params", PARAMS, ids=_id)
def test_export_then_import_gives_back_the_same_key(params: KeyParams) -> None:
    exported = key_type(params.kty).export_jwk("k#3", params, material(params))
    assert exported["kid"] == "k#3" and exported["alg"] == key_type(params.kty).jwk_alg(params.alg)
    assert all("=" not in value for value in exported.values() if value != exported["kid"])
    assert import_jwk(exported) == (params, material(params))


def test_jwks_name_algorithms_as_the_standards_do() -> None:
    """JWKs carry RFC 7518's names (the JOSE draft's for ML-KEM); the key API keeps ours,
    and takes either."""
    oct_params, rsa_params, mlkem_params = PARAMS[0], PARAMS[1], PARAMS[4]
    assert key_type("oct").export_jwk("k#1", oct_params, material(oct_params))["alg"] == "A256GCM"
    assert key_type("RSA").export_jwk("k#1", rsa_params, material(rsa_params))["alg"] == (
        "RSA-OAEP-256"
    )
    assert key_type("AKP").export_jwk("k#1", mlkem_params, material(mlkem_params))["alg"] == (
        "ML-KEM-768"
    )
    k = b64url(material(oct_params))
    for alg in ("A256GCM", "A256GCMKW", "AES-256"):
        assert import_jwk({"kty": "oct", "alg": alg, "k": k}) == (oct_params, material(oct_params))
        assert resolve("oct", alg, None) == oct_params


def test_material_has_the_documented_encoding() -> None:
    assert len(material(PARAMS[0])) == 32
    rsa_key = serialization.load_der_private_key(material(PARAMS[2]), password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and rsa_key.key_size == 3072
    assert len(material(PARAMS[4])) == len(material(PARAMS[5])) == 64


def test_public_jwks_have_the_documented_shape() -> None:
    oct_params, rsa_params, mlkem_params = PARAMS[0], PARAMS[1], PARAMS[4]
    assert key_type("oct").public_jwk("k#1", oct_params, material(oct_params)) is None
    rsa_jwk = key_type("RSA").public_jwk("k#1", rsa_params, material(rsa_params))
    assert rsa_jwk is not None
    assert set(rsa_jwk) == {"kty", "kid", "alg", "n", "e"}
    assert (rsa_jwk["kty"], rsa_jwk["kid"], rsa_jwk["alg"], rsa_jwk["e"]) == (
        "RSA",
        "k#1",
        "RSA-OAEP-256",
        "AQAB",
    )
    mlkem_jwk = key_type("ML-KEM").public_jwk("k#1", mlkem_params, material(mlkem_params))
    assert mlkem_jwk is not None
    assert set(mlkem_jwk) == {"kty", "kid", "alg", "pub"}
    assert (mlkem_jwk["kty"], mlkem_jwk["alg"]) == ("AKP", "ML-KEM-768")
    assert len(base64.urlsafe_b64decode(mlkem_jwk["pub"] + "==")) == 1184


def test_export_jwks_have_the_documented_members() -> None:
    members = {
        "oct": {"kty", "kid", "alg", "k"},
        "RSA": {"kty", "kid", "alg", "n", "e", "d", "p", "q", "dp", "dq", "qi"},
        "ML-KEM": {"kty", "kid", "alg", "pub", "priv"},
    }
    for params in (PARAMS[0], PARAMS[1], PARAMS[4]):
        exported = key_type(params.kty).export_jwk("k#1", params, material(params))
        assert set(exported) == members[params.kty]


@pytest.mark.parametrize(
    ("kty", "alg", "key_size", "expected"),
    [
        ("oct", None, None, KeyParams("oct", "AES-256")),
        ("RSA", None, None, KeyParams("RSA", "RSA-OAEP-256", 3072)),
        ("RSA", "RSA-OAEP-256", 4096, KeyParams("RSA", "RSA-OAEP-256", 4096)),
        ("ML-KEM", None, None, KeyParams("ML-KEM", "ML-KEM-768")),
        ("AKP", "ML-KEM-1024", None, KeyParams("ML-KEM", "ML-KEM-1024")),
    ],
)
def test_resolve_fills_defaults_and_accepts_the_akp_alias(
    kty: str, alg: str | None, key_size: int | None, expected: KeyParams
) -> None:
    assert resolve(kty, alg, key_size) == expected


@pytest.mark.parametrize(
    ("kty", "alg", "key_size", "code"),
    [
        ("DSA", None, None, "unsupported-key-type"),
        ("aes", None, None, "unsupported-key-type"),
        ("oct", "AES-128", None, "unsupported-algorithm"),
        ("oct", "RSA-OAEP-256", None, "algorithm-mismatch"),
        ("RSA", "ML-KEM-768", None, "algorithm-mismatch"),
        ("RSA", None, 1024, "invalid-key-size"),
        ("RSA", None, 3000, "invalid-key-size"),
        ("oct", None, 256, "invalid-key-size"),
        ("ML-KEM", None, 768, "invalid-key-size"),
    ],
)
def test_invalid_choices_raise_their_codes(
    kty: str, alg: str | None, key_size: int | None, code: str
) -> None:
    with pytest.raises(KeystoreError) as caught:
        resolve(kty, alg, key_size)
    assert caught.value.code == code


def test_supported_algorithms_lists_every_type() -> None:
    listing = {entry["kty"]: entry for entry in supported_algorithms()}
    assert listing["oct"]["algorithms"] == ["AES-256"]
    assert listing["RSA"]["keySizes"] == [2048, 3072, 4096]
    assert listing["ML-KEM"]["default"] == "ML-KEM-768"
    assert listing["ML-KEM"]["aliases"] == ["AKP"]


def _exported(params: KeyParams) -> dict[str, Any]:
    return dict(key_type(params.kty).export_jwk("k#1", params, material(params)))


def _other_mlkem_pub() -> str:
    other = key_type("ML-KEM").generate(PARAMS[4])
    jwk = key_type("ML-KEM").public_jwk("x", PARAMS[4], other)
    assert jwk is not None
    return jwk["pub"]


def _rsa_with(**changes: Any) -> dict[str, Any]:
    return _exported(PARAMS[1]) | changes


def _small_rsa_jwk() -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    numbers = key.private_numbers()
    values = {
        "n": numbers.public_numbers.n,
        "e": numbers.public_numbers.e,
        "d": numbers.d,
        "p": numbers.p,
        "q": numbers.q,
        "dp": numbers.dmp1,
        "dq": numbers.dmq1,
        "qi": numbers.iqmp,
    }
    members = {
        name: b64url(value.to_bytes((value.bit_length() + 7) // 8))
        for name, value in values.items()
    }
    return {"kty": "RSA", **members}


BAD_JWKS: dict[str, Any] = {
    "oct k of 16 bytes": lambda: {"kty": "oct", "k": b64url(bytes(16))},
    "oct k padded": lambda: {"kty": "oct", "k": base64.urlsafe_b64encode(bytes(32)).decode()},
    "oct k in standard base64": lambda: {"kty": "oct", "k": "+/" + b64url(bytes(32))[2:]},
    "oct k not a string": lambda: {"kty": "oct", "k": 12},
    "oct without k": lambda: {"kty": "oct", "alg": "AES-256"},
    "RSA public only": lambda: {
        name: value for name, value in _exported(PARAMS[1]).items() if name in {"kty", "n", "e"}
    },
    "RSA of 1024 bits": _small_rsa_jwk,
    "RSA with another d": lambda: _rsa_with(d=_exported(PARAMS[2])["d"]),
    "RSA with swapped p and q members": lambda: _rsa_with(
        p=_exported(PARAMS[1])["q"], dp=_exported(PARAMS[1])["dq"]
    ),
    "RSA n with a leading zero": lambda: _rsa_with(
        n=b64url(b"\0" + base64.urlsafe_b64decode(_exported(PARAMS[1])["n"] + "=="))
    ),
    "ML-KEM without alg": lambda: {
        name: value for name, value in _exported(PARAMS[4]).items() if name != "alg"
    },
    "ML-KEM seed of 32 bytes": lambda: _exported(PARAMS[4]) | {"priv": b64url(bytes(32))},
    "ML-KEM pub of another key": lambda: _exported(PARAMS[4]) | {"pub": _other_mlkem_pub()},
    "ML-KEM pub of the other parameter set": lambda: _exported(PARAMS[4]) | {"alg": "ML-KEM-1024"},
    "kty not a string": lambda: {"kty": ["oct"], "k": b64url(bytes(32))},
}


@pytest.mark.parametrize("case", BAD_JWKS)
def test_bad_jwks_are_refused_as_invalid_jwk(case: str) -> None:
    with pytest.raises(KeystoreError) as caught:
        import_jwk(BAD_JWKS[case]())
    assert caught.value.code == "invalid-jwk"


def test_import_checks_kty_and_alg_like_generation() -> None:
    for jwk, code in [
        ({"kty": "DSA", "d": "AA"}, "unsupported-key-type"),
        ({"kty": "oct", "alg": "A128GCM", "k": b64url(bytes(32))}, "unsupported-algorithm"),
        ({"kty": "oct", "alg": "ML-KEM-768", "k": b64url(bytes(32))}, "algorithm-mismatch"),
    ]:
        with pytest.raises(KeystoreError) as caught:
            import_jwk(jwk)
        assert caught.value.code == code


def test_import_accepts_both_ml_kem_kty_names_and_a_jwk_without_pub() -> None:
    exported = _exported(PARAMS[5])
    without_pub = {name: value for name, value in exported.items() if name != "pub"}
    assert import_jwk(exported | {"kty": "ML-KEM"}) == (PARAMS[5], material(PARAMS[5]))
    assert import_jwk(without_pub) == (PARAMS[5], material(PARAMS[5]))


def test_bad_jwk_errors_name_members_not_values() -> None:
    jwk = _exported(PARAMS[1])
    secret = jwk["d"]
    with pytest.raises(KeystoreError) as caught:
        import_jwk(jwk | {"p": jwk["q"]})
    assert secret not in str(caught.value) and jwk["q"] not in repr(caught.value)
