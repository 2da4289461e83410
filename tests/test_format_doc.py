"""docs/FORMAT.md is enough to read a message: an independent decoder, checked against envelope.

The decoder (everything down to the tests) was written from FORMAT.md alone and uses only
`cryptography`, `struct`, `base64` and `hmac`; `envelope` is imported solely to produce the
messages the tests feed it. The worked example's hex dump is parsed out of FORMAT.md itself,
so the document and this test cannot drift apart.
"""

import base64
import hmac
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mlkem
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from envelope import AesKeyring, Decryptor, Encryptor, MlKemKeyring  # tests only, not the decoder
from tests.support.data import flip_bit

# ---- the independent decoder (FORMAT.md §4–§8) ----

SUITES = (0x0478, 0x0578)  # unsigned, signed
PROVIDER = b"sealstream"
END = 0xFFFFFFFF
MlKemKey = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey
Edk = tuple[bytes, bytes, bytes]  # provider ID, provider info, ciphertext


class FormatError(Exception):
    """The bytes break a rule of FORMAT.md."""


@dataclass
class Decoded:
    message_id: bytes
    context: dict[str, str]
    frame_length: int
    header_length: int
    data_key: bytes
    frames: int
    plaintext: bytes


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError("truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")


def parse_context(raw: bytes) -> dict[str, str]:
    if not raw:
        return {}
    r, context, previous = Reader(raw), {}, b""
    count = r.uint(2)
    if count == 0:
        raise FormatError("non-empty context with zero pairs")
    for i in range(count):
        key, value = r.take(r.uint(2)), r.take(r.uint(2))
        if i and key <= previous:
            raise FormatError("context keys not strictly ascending")
        previous = key
        context[key.decode()] = value.decode()
    if r.pos != len(raw):
        raise FormatError("bytes after the last context pair")
    return context


def unwrap_aes(edks: list[Edk], name: bytes, key: bytes, aad: bytes) -> bytes | None:
    prefix = name + struct.pack(">II", 128, 12)
    for provider, info, ciphertext in edks:
        if provider == PROVIDER and len(info) == len(prefix) + 12 and info.startswith(prefix):
            try:
                return AESGCM(key).decrypt(info[-12:], ciphertext, aad)
            except InvalidTag:
                continue
    return None


def unwrap_mlkem(edks: list[Edk], name: bytes, key: MlKemKey, aad: bytes) -> bytes | None:
    is_768 = isinstance(key, mlkem.MLKEM768PrivateKey)
    alg, kem_len = (b"ML-KEM-768", 1088) if is_768 else (b"ML-KEM-1024", 1568)
    for provider, info, ciphertext in edks:
        if provider != PROVIDER or info != name or len(ciphertext) != kem_len + 48:
            continue
        kem_ct = ciphertext[:kem_len]
        hkdf_info = b"sealstream/mlkem-keyring/v1\x00" + struct.pack(">H", len(alg)) + alg
        hkdf_info += struct.pack(">H", len(name)) + name + kem_ct
        okm = HKDF(hashes.SHA256(), 44, None, hkdf_info).derive(key.decapsulate(kem_ct))
        try:
            return AESGCM(okm[:32]).decrypt(okm[32:], ciphertext[kem_len:], aad)
        except InvalidTag:
            continue
    return None


def decode(message: bytes, key_name: str, key: bytes | MlKemKey) -> Decoded:
    r = Reader(message)
    if r.uint(1) != 2 or (suite := r.uint(2)) not in SUITES:
        raise FormatError("not a version 2, suite 0x0478 or 0x0578 message")
    message_id = r.take(32)
    context_bytes = r.take(r.uint(2))
    context = parse_context(context_bytes)
    if (suite == 0x0578) != ("aws-crypto-public-key" in context):
        raise FormatError("the public key pair is missing or out of place")
    count = r.uint(2)
    if count == 0:
        raise FormatError("no encrypted data key")
    edks = [(r.take(r.uint(2)), r.take(r.uint(2)), r.take(r.uint(2))) for _ in range(count)]
    if r.uint(1) != 2:
        raise FormatError("not framed")
    frame_length, commitment = r.uint(4), r.take(32)
    header_body, header_tag = message[: r.pos], r.take(16)
    name = key_name.encode()
    if isinstance(key, bytes):
        data_key = unwrap_aes(edks, name, key, context_bytes)
    else:
        data_key = unwrap_mlkem(edks, name, key, context_bytes)
    if data_key is None or len(data_key) != 32:
        raise FormatError("no EDK unwraps with this key")
    derive_info = struct.pack(">H", suite) + b"DERIVEKEY"
    encryption_key = HKDF(hashes.SHA512(), 32, message_id, derive_info).derive(data_key)
    commit = HKDF(hashes.SHA512(), 32, message_id, b"COMMITKEY").derive(data_key)
    if not hmac.compare_digest(commit, commitment):
        raise FormatError("key commitment mismatch")
    aead = AESGCM(encryption_key)
    aead.decrypt(bytes(12), header_tag, header_body)  # raises InvalidTag
    header_length, sequence, plaintext = r.pos, 1, bytearray()
    while True:
        first = r.uint(4)
        final = first == END
        number = r.uint(4) if final else first
        iv = r.take(12)
        if number != sequence or iv != sequence.to_bytes(12, "big"):
            raise FormatError(f"expected frame {sequence}")
        length = r.uint(4) if final else frame_length
        if length > frame_length:
            raise FormatError("final frame longer than the frame length")
        label = b"AWSKMSEncryptionClient Final Frame" if final else b"AWSKMSEncryptionClient Frame"
        aad = message_id + label + struct.pack(">IQ", sequence, length)
        plaintext += aead.decrypt(iv, r.take(length + 16), aad)
        if final:
            break
        sequence += 1
    if suite == 0x0578:  # §6.6
        signed = message[: r.pos]
        signature = r.take(r.uint(2))
        point = base64.b64decode(context["aws-crypto-public-key"], validate=True)
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point)
        public_key.verify(signature, signed, ec.ECDSA(hashes.SHA384()))  # raises
    if r.pos != len(message):
        raise FormatError("bytes after the end of the message")
    return Decoded(
        message_id, context, frame_length, header_length, data_key, sequence, bytes(plaintext)
    )


# ---- tests ----

F = 4096
FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
KEY_768 = mlkem.MLKEM768PrivateKey.generate()
KEY_1024 = mlkem.MLKEM1024PrivateKey.generate()
AES_KEY = bytes(range(100, 132))


def encrypt(
    keyrings: list[AesKeyring | MlKemKeyring],
    data: bytes,
    context: dict[str, str] | None = None,
    *,
    signed: bool = False,
) -> bytes:
    encryptor = Encryptor(keyrings, context=context, frame_length=F, signed=signed)
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]  # uneven feeding
    return b"".join([b for chunk in chunks for b in encryptor.update(chunk)] + encryptor.finish())


def keypair(kind: str) -> tuple[AesKeyring | MlKemKeyring, bytes | MlKemKey]:
    if kind == "aes":
        return AesKeyring("k-aes#1", AES_KEY), AES_KEY
    key = KEY_768 if kind == "mlkem768" else KEY_1024
    return MlKemKeyring(f"k-{kind}#2", key), key


@pytest.mark.parametrize("kind", ["aes", "mlkem768", "mlkem1024"])
@pytest.mark.parametrize("context", [None, {"tenant": "t1", "sealstream:kid": "k", "ä": ""}])
@pytest.mark.parametrize("size", [0, 1, F - 1, F, F + 1, 3 * F, 3 * F + 5])
def test_encryptor_output_decodes(kind: str, context: dict[str, str] | None, size: int) -> None:
    keyring, key = keypair(kind)
    data = bytes(i * 7 % 251 for i in range(size))
    message = encrypt([keyring], data, context=context)
    decoded = decode(message, keyring.key_name, key)
    assert decoded.plaintext == data
    assert decoded.context == (context or {})
    assert decoded.frames == size // F + 1  # an exact multiple ends with an empty final frame
    regular, final = divmod(len(message) - decoded.header_length - 40, F + 32)  # FORMAT §10
    assert (regular, final) == (size // F, size % F)


@pytest.mark.parametrize("size", [0, F, 3 * F + 5])
def test_signed_output_decodes(size: int) -> None:
    keyring, key = keypair("aes")
    data = bytes(i * 7 % 251 for i in range(size))
    message = encrypt([keyring], data, context={"k": "v"}, signed=True)
    decoded = decode(message, keyring.key_name, key)
    assert decoded.plaintext == data
    # FORMAT §6.6 and §10: a 105-byte footer, always
    regular, final = divmod(len(message) - decoded.header_length - 40 - 105, F + 32)
    assert (regular, final) == (size // F, size % F)
    for spoiled in (flip_bit(message, len(message) - 1), message[:-1], message + b"\x00"):
        with pytest.raises((FormatError, InvalidSignature)):
            decode(spoiled, keyring.key_name, key)


def test_two_edks_each_key_decodes() -> None:
    (aes, aes_key), (kem, kem_key) = keypair("aes"), keypair("mlkem768")
    data = bytes(range(256)) * 40
    message = encrypt([aes, kem], data, context={"a": "b"})
    first, second = decode(message, aes.key_name, aes_key), decode(message, kem.key_name, kem_key)
    assert first.plaintext == second.plaintext == data
    assert first.data_key == second.data_key


DAMAGE: dict[str, Callable[[bytes, int], bytes]] = {  # (message, header length) -> damaged
    "context value": lambda m, h: flip_bit(m, 44),  # the AES wrap binds the context
    "frame length": lambda m, h: flip_bit(m, h - 49),  # header tag
    "commitment": lambda m, h: flip_bit(m, h - 17),
    "header tag": lambda m, h: flip_bit(m, h - 1),
    "frame content": lambda m, h: flip_bit(m, h + 40),
    "final frame content": lambda m, h: flip_bit(m, len(m) - 20),
    "final frame dropped": lambda m, h: m[: -(40 + 5)],
    "trailing byte": lambda m, h: m + b"\x00",
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_decoder_rejects_damage(damage: str) -> None:
    keyring, key = keypair("aes")
    message = encrypt([keyring], b"x" * (F + 5), context={"k": "v"})
    header_length = decode(message, keyring.key_name, key).header_length
    with pytest.raises((FormatError, InvalidTag)):
        decode(DAMAGE[damage](message, header_length), keyring.key_name, key)


def test_format_md_hex_example_decodes() -> None:
    text = FORMAT_MD.read_text(encoding="utf-8")
    block = re.search(r"```hexdump\n(.*?)```", text, re.S)
    assert block is not None
    message = bytearray()
    for line in block.group(1).splitlines():
        offset, hex_bytes = re.split(r" {2,}", line)[:2]
        assert int(offset, 16) == len(message), line
        message += bytes.fromhex(hex_bytes)
    wrapping_key, data_key = bytes(range(0x00, 0x20)), bytes(range(0xA0, 0xC0))
    assert wrapping_key.hex() in text and data_key.hex() in text
    decoded = decode(bytes(message), "demo#1", wrapping_key)
    assert decoded.plaintext == b"Hello, sealstream!\n"
    assert decoded.data_key == data_key
    assert decoded.message_id == bytes(range(0x40, 0x60))
    assert decoded.context == {"purpose": "example"}
    assert (decoded.frame_length, decoded.header_length, len(message)) == (4096, 202, 261)
    decryptor = Decryptor([AesKeyring("demo#1", wrapping_key)])  # and envelope agrees
    assert b"".join(decryptor.update(bytes(message))) == decoded.plaintext
    decryptor.finish()
