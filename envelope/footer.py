"""The footer of a signed message (suite 0x0578): an ECDSA P-384 signature over the whole
message before it, and the ephemeral key that makes it.

    footer = u16(len(signature)) || signature          -- DER ECDSA over SHA-384

The signed bytes are the header (its body and tag) and every frame, in order; the
signature is over their SHA-384 digest. The writer makes a fresh P-384 key per message,
puts its public point in the encryption context (`aws-crypto-public-key`: the compressed
point, SEC 1 §2.3.3, in standard base64) and throws the private key away once the footer
is written. Like the reference SDK, the writer makes its signatures 103 bytes long (a DER
signature with one integer 49 bytes long and the other 48, negating s where that gives
the length: s is then the high one of s and n - s about half the time), so a
signed message's length follows from its plaintext's; a reader accepts any DER signature
up to the 104 bytes a P-384 signature can take.
"""

import base64
import binascii
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from envelope.errors import (
    FooterAuthenticationError,
    FooterMalformed,
    MessageFormatError,
    StateError,
    TrailingData,
)
from envelope.header import PUBLIC_KEY_CONTEXT_KEY

SIGNATURE_LENGTH = 103  # what a writer writes (the reference SDK's fixed length)
MAX_SIGNATURE_LENGTH = 104  # the longest DER ECDSA P-384 signature
FOOTER_LENGTH = 2 + SIGNATURE_LENGTH  # of every footer this package writes

_CURVE = ec.SECP384R1()
_COMPRESSED_POINT_LENGTH = 1 + 48  # the sign of y, then x
_ORDER = int(  # the order of P-384's base point
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)
_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA384()))
_U16 = struct.Struct(">H")


class FooterSigner:
    """Hashes a message as it is written and signs it at the end, with a key of its own
    that nothing else ever sees."""

    def __init__(self) -> None:
        self._key: ec.EllipticCurvePrivateKey | None = ec.generate_private_key(_CURVE)
        self._digest = hashes.Hash(hashes.SHA384())
        point = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        self.public_key = base64.b64encode(point).decode("ascii")

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._digest.update(data)

    def footer(self) -> bytes:
        """The footer over everything hashed; the key is dropped, so it signs once."""
        key, self._key = self._key, None
        if key is None:
            raise StateError("a message's footer is signed once")
        signature = _static_length_signature(key, self._digest.finalize())
        return _U16.pack(len(signature)) + signature


def _static_length_signature(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """A DER signature of exactly `SIGNATURE_LENGTH` bytes: (r, s) and (r, n - s) are both
    valid, and one of them has the length nearly always; a fresh signature otherwise."""
    while True:
        signature = key.sign(digest, _PREHASHED)
        if len(signature) != SIGNATURE_LENGTH:
            r, s = decode_dss_signature(signature)
            signature = encode_dss_signature(r, _ORDER - s)
        if len(signature) == SIGNATURE_LENGTH:
            return signature


def public_key_from_context(value: str) -> ec.EllipticCurvePublicKey:
    """The P-384 public key an `aws-crypto-public-key` value encodes."""
    try:
        point = base64.b64decode(value.encode("ascii"), validate=True)
        # Compressed only, as the format writes it: one encoding per key, so the context
        # (and the header hashed under the signature) has one form for one signer.
        if len(point) != _COMPRESSED_POINT_LENGTH or point[0] not in (2, 3):
            raise ValueError("not a compressed point")
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, point)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MessageFormatError(
            f"the {PUBLIC_KEY_CONTEXT_KEY!r} pair is not a P-384 public key"
        ) from None


class FooterVerifier:
    """Hashes a message as it is read; then reads its footer, in chunks of any size, and
    checks the signature. `verified` is true only once a whole footer has come and its
    signature has verified over every byte hashed before it."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey) -> None:
        self._public_key = public_key
        self._digest = hashes.Hash(hashes.SHA384())
        self._footer: bytearray | None = None  # once the footer has begun
        self.verified = False

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash message bytes that precede the footer."""
        if self._footer is not None:
            raise StateError("the footer has begun: no more message bytes are hashed")
        self._digest.update(data)

    def feed_footer(self, data: bytes | bytearray | memoryview) -> None:
        """Take footer bytes; once the footer is whole, check its signature (raising if it
        fails). Bytes after the footer are `TrailingData`."""
        if self._footer is None:
            self._footer = bytearray()
        if self.verified:
            if data:
                raise TrailingData("bytes follow the footer")
            return
        self._footer += data
        if len(self._footer) < _U16.size:
            return
        end = _U16.size + footer_signature_length(self._footer)
        if len(self._footer) > end:
            raise TrailingData("bytes follow the footer")
        if len(self._footer) == end:
            self._verify(bytes(self._footer[_U16.size :]))

    def _verify(self, signature: bytes) -> None:
        try:
            self._public_key.verify(signature, self._digest.finalize(), _PREHASHED)
        except InvalidSignature:
            raise FooterAuthenticationError("the message's signature does not verify") from None
        self.verified = True


def footer_signature_length(footer: bytes | bytearray | memoryview) -> int:
    """The signature length a footer's first two bytes claim, refused past what a P-384
    signature can take: checked before the signature's bytes are waited for."""
    (length,) = _U16.unpack_from(footer)
    if not 0 < length <= MAX_SIGNATURE_LENGTH:
        raise FooterMalformed(
            f"the footer claims a {length}-byte signature; a P-384 signature takes "
            f"1 to {MAX_SIGNATURE_LENGTH}"
        )
    return int(length)
