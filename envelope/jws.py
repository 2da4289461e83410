"""Detached JWS over a streamed payload: RFC 7515's compact form with an empty payload
segment (`header..signature`), over the unencoded payload of RFC 7797.

The protected header is `{"alg", "b64": false, "crit": ["b64"], "kid"}`, and the signing
input is `BASE64URL(header) || "." || payload`, the payload's raw bytes: so the signer
and the verifier feed the header's segment and a dot into the key's digest, then each
chunk of the payload as it arrives, in constant memory.

A verifier takes its algorithm from the key it is given, never from the header: a header
naming another algorithm is refused (`JwsAlgorithmMismatch`), not followed. Every way a
JWS can be malformed has its own error (`envelope.errors`), raised before any payload
byte is read.
"""

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envelope.errors import (
    JwsAlgorithmMismatch,
    JwsCritMissing,
    JwsCritUnsupported,
    JwsExtraSegments,
    JwsPayloadAttached,
    JwsPayloadEncoded,
    MalformedJws,
)
from envelope.signing_keys import Chunk, SigningKey, VerifyingKey

UNENCODED = "b64"
# The header parameters this service understands when a JWS marks them critical.
UNDERSTOOD_CRITICAL = frozenset({UNENCODED})
# Parameters RFC 7515 defines: `crit` may not list them (§4.1.11).
_REGISTERED = frozenset(
    {"alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit"}
)


def b64url(data: bytes) -> str:
    """`data` in base64url without padding, as JOSE writes every binary member."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """The bytes of canonical, unpadded base64url `text`; ValueError if it is empty or
    anything else: re-encoding catches what the decoder forgives (other alphabets,
    padding, stray bits), so every value has one spelling."""
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded or b64url(decoded) != text:
        raise ValueError("not unpadded base64url")
    return decoded


def protected_header(alg: str, kid: str) -> str:
    """The header segment of a detached signature by key version `kid` with `alg`."""
    header = {"alg": alg, "b64": False, "crit": [UNENCODED], "kid": kid}
    return b64url(json.dumps(header, separators=(",", ":")).encode())


@dataclass(frozen=True)
class DetachedJws:
    """A detached JWS, read and checked for form: its header, as sent and as parsed, and
    its signature's bytes."""

    header_segment: str
    header: Mapping[str, Any]
    signature: bytes

    @property
    def alg(self) -> str:
        alg: str = self.header["alg"]
        return alg

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None


def parse_detached(compact: str) -> DetachedJws:
    """A detached JWS in compact form over an unencoded payload, checked for form only."""
    segments = compact.split(".")
    if len(segments) > 3:
        raise JwsExtraSegments(f"a detached JWS has 3 segments, not {len(segments)}")
    if len(segments) < 3:
        raise MalformedJws("a detached JWS has 3 segments: header..signature")
    header_segment, payload, signature = segments
    if payload:
        raise JwsPayloadAttached("the payload segment must be empty: send the payload as the file")
    header = _parse_header(header_segment)
    _check_unencoded(header)
    return DetachedJws(header_segment, header, _b64url_decode(signature, "signature"))


class DetachedSigner:
    """Signs one payload fed through `update`; `finish` gives the detached JWS."""

    def __init__(self, key: SigningKey, kid: str) -> None:
        self._key = key
        self._header = protected_header(key.alg, kid)
        self._digest = key.digest()
        self._digest.update(f"{self._header}.".encode("ascii"))

    def update(self, chunk: Chunk) -> None:
        self._digest.update(chunk)

    def finish(self) -> str:
        return f"{self._header}..{b64url(self._key.sign(self._digest.finalize()))}"


class DetachedVerifier:
    """Checks a detached JWS against `key` over a payload fed through `update`."""

    def __init__(self, jws: DetachedJws, key: VerifyingKey) -> None:
        if jws.alg != key.alg:
            raise JwsAlgorithmMismatch(
                f"the header names alg {jws.alg!r}; the key verifies {key.alg!r} only"
            )
        key.check_length(jws.signature)  # before a byte of the payload is read
        self._jws = jws
        self._key = key
        self._digest = key.digest()
        self._digest.update(f"{jws.header_segment}.".encode("ascii"))

    def update(self, chunk: Chunk) -> None:
        self._digest.update(chunk)

    def verify(self) -> None:
        """Raise `SignatureInvalid` unless the signature covers the payload fed."""
        self._key.verify(self._jws.signature, self._digest.finalize())


def _parse_header(segment: str) -> dict[str, Any]:
    raw = _b64url_decode(segment, "header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_members)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedJws("the protected header is not a JSON object") from None
    if not isinstance(header, dict):
        raise MalformedJws("the protected header is not a JSON object")
    if not isinstance(header.get("alg"), str):
        raise MalformedJws("the protected header must name its 'alg'")
    if "kid" in header and not isinstance(header["kid"], str):
        raise MalformedJws("the header's 'kid' must be a string")
    return header


def _check_unencoded(header: Mapping[str, Any]) -> None:
    crit = header.get("crit")
    if crit is not None:
        _check_crit(crit, header)
    if header.get(UNENCODED) is not False:
        raise JwsPayloadEncoded('the header must say "b64": false: the payload is signed unencoded')
    if crit is None or UNENCODED not in crit:
        raise JwsCritMissing('"b64" must be listed in the header\'s "crit" (RFC 7797)')


def _check_crit(crit: object, header: Mapping[str, Any]) -> None:
    if not isinstance(crit, list) or not crit or not all(isinstance(n, str) for n in crit):
        raise JwsCritUnsupported("'crit' must be a non-empty list of header parameter names")
    if len(set(crit)) != len(crit) or _REGISTERED & set(crit):
        raise JwsCritUnsupported("'crit' lists a name twice, or one RFC 7515 defines")
    unknown = sorted(set(crit) - UNDERSTOOD_CRITICAL)
    if unknown:
        raise JwsCritUnsupported(f"'crit' lists parameters not understood here: {unknown}")
    missing = sorted(name for name in crit if name not in header)
    if missing:
        raise JwsCritUnsupported(f"'crit' lists parameters the header lacks: {missing}")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("a member name occurs twice")
    return members


def _b64url_decode(segment: str, what: str) -> bytes:
    try:
        return b64url_decode(segment)
    except ValueError:
        raise MalformedJws(f"the {what} segment is not unpadded base64url") from None
