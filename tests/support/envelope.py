"""Small shared helpers for envelope tests: keyrings, whole-message encrypt and decrypt,
an independent map of where every field of a message lies, and where its frames lie.

`byte_offsets` walks the format on its own (it does not call `envelope.header`), so tests
that tamper with a field by name do not trust the parser they are testing.
"""

import functools
import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import mlkem, rsa

from envelope import (
    AesKeyring,
    Decryptor,
    Encryptor,
    Header,
    Keyring,
    MlKemKeyring,
    RsaKeyring,
    parse_header,
)
from envelope.frames import FINAL_OVERHEAD, REGULAR_OVERHEAD, FrameSealer
from envelope.suite import derive_keys

KeyringKind = Literal["aes", "rsa", "mlkem"]
KEYRING_KINDS: tuple[KeyringKind, ...] = ("aes", "rsa", "mlkem")

Offsets = dict[str, tuple[int, int]]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_END_MARKER = 0xFFFFFFFF


@functools.cache
def make_keyring(kind: KeyringKind, name: str = "test-key", seed: int = 0) -> Keyring:
    """A keyring of `kind` named `name`; the same (kind, name, seed) gives the same key.

    AES keys derive from name and seed, so another seed is the same name with other key
    material. RSA (2048 bits, to keep tests fast) and ML-KEM-768 keys are generated once.
    """
    if kind == "aes":
        return AesKeyring(name, hashlib.sha256(f"{name}/{seed}".encode()).digest())
    if kind == "rsa":
        return RsaKeyring(name, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return MlKemKeyring(name, mlkem.MLKEM768PrivateKey.generate())


def chunked(data: bytes, chunk_size: int | Sequence[int] | None = None) -> list[bytes]:
    """`data` split into chunks: one chunk (None), fixed-size ones, or sizes taken in turn."""
    if chunk_size is None:
        return [data]
    sizes = [chunk_size] if isinstance(chunk_size, int) else list(chunk_size)
    if not sizes or min(sizes) < 1:
        raise ValueError("chunk sizes must be positive")
    out = []
    offset = 0
    index = 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        out.append(data[offset : offset + size])
        offset += size
        index += 1
    return out


def encrypt_all(
    keyrings: Sequence[Keyring],
    data: bytes,
    frame_length: int = 4096,
    context: Mapping[str, str] | None = None,
) -> bytes:
    """The whole message for `data`, from one update and finish."""
    encryptor = Encryptor(keyrings, context=context, frame_length=frame_length)
    return b"".join([*encryptor.update(data), *encryptor.finish()])


def decrypt_all(
    keyrings: Sequence[Keyring],
    message: bytes,
    chunk_size: int | Sequence[int] | None = None,
    required_context: Mapping[str, str] | None = None,
) -> bytes:
    """The plaintext of `message` fed in chunks, after `finish` accepted it."""
    decryptor = Decryptor(keyrings, required_context=required_context)
    out = [p for chunk in chunked(message, chunk_size) for p in decryptor.update(chunk)]
    decryptor.finish()
    return b"".join(out)


@dataclass(frozen=True)
class Outcome:
    """What a decryptor did with some input: what it returned, and how it stopped."""

    plaintext: bytes  # everything `update` returned before the error (or in total)
    error: Exception | None
    raised_by: Literal["update", "finish"] | None
    failed_update: int | None  # index of the piece whose `update` raised


def decrypt_outcome(
    keyrings: Sequence[Keyring],
    pieces: Iterable[bytes],
    required_context: Mapping[str, str] | None = None,
) -> Outcome:
    """Feed `pieces` to one decryptor, then finish; catch (never hide) whatever it raises."""
    decryptor = Decryptor(keyrings, required_context=required_context)
    returned: list[bytes] = []
    for index, piece in enumerate(pieces):
        try:
            returned.extend(decryptor.update(piece))
        except Exception as exc:
            return Outcome(b"".join(returned), exc, "update", index)
    try:
        decryptor.finish()
    except Exception as exc:
        return Outcome(b"".join(returned), exc, "finish", None)
    return Outcome(b"".join(returned), None, None, None)


def frame_plaintexts(plaintext: bytes, frame_length: int) -> list[bytes]:
    """The plaintext of each frame the encryptor writes: whole frames, then the final one."""
    regular = len(plaintext) // frame_length
    frames = [plaintext[i * frame_length : (i + 1) * frame_length] for i in range(regular)]
    return [*frames, plaintext[regular * frame_length :]]


def released_frames(returned: bytes, plaintext: bytes, frame_length: int) -> int | None:
    """How many leading frames `returned` is exactly made of; None if it is not such a prefix."""
    frames = frame_plaintexts(plaintext, frame_length)
    length = 0
    for count in range(len(frames) + 1):
        if len(returned) == length and returned == plaintext[:length]:
            return count
        if count < len(frames):
            length += len(frames[count])
    return None


def piece_start(pieces: Sequence[bytes], offset: int) -> int:
    """Where the piece holding byte `offset` starts; `offset` itself if no piece holds it."""
    start = 0
    for piece in pieces:
        if start <= offset < start + len(piece):
            return start
        start += len(piece)
    return offset


def assert_authentic_prefix(
    outcome: Outcome,
    original: bytes,
    plaintext: bytes,
    frame_length: int,
    pieces: Sequence[bytes],
) -> None:
    """`outcome` of decrypting `pieces` (a changed `original`) released only whole, untouched
    frames: at most those wholly before the first changed byte, and at least those among
    them delivered in an earlier `update` call than that byte (all of them when `update`
    never raised).
    """
    offsets = byte_offsets(original)
    changed_at = first_difference(original, b"".join(pieces))
    released = released_frames(outcome.plaintext, plaintext, frame_length)
    assert released is not None, "the returned plaintext is not a prefix of whole frames"
    assert released <= frames_within(offsets, changed_at), "released a changed frame"
    delivered = changed_at if outcome.raised_by != "update" else piece_start(pieces, changed_at)
    assert released >= frames_within(offsets, delivered), "held back a verified frame"


def frame_names(offsets: Offsets) -> list[str]:
    """The names ("frame[1]", ...) of the frames in `offsets`, in order."""
    names = [name for name in offsets if name.startswith("frame[") and "." not in name]
    return sorted(names, key=lambda name: offsets[name][0])


def frames_within(offsets: Offsets, end: int) -> int:
    """How many frames lie wholly in the first `end` bytes of the message."""
    return sum(1 for name in frame_names(offsets) if offsets[name][1] <= end)


def first_difference(original: bytes, changed: bytes) -> int:
    """The first offset where the two differ (the shorter length if one prefixes the other)."""
    for offset, (a, b) in enumerate(zip(original, changed, strict=False)):
        if a != b:
            return offset
    return min(len(original), len(changed))


def frame_offset(message: bytes, index: int) -> int:
    """Where regular frame `index` starts (the final frame, if `index` is the count), as
    the header parser reads the message: for tests of the service, not of the format."""
    header = parse_header(message)
    return header.length + index * (header.frame_length + REGULAR_OVERHEAD)


def frame_count(message: bytes) -> int:
    """The number of regular frames (the final frame not counted)."""
    header = parse_header(message)
    body = len(message) - header.length - FINAL_OVERHEAD
    return body // (header.frame_length + REGULAR_OVERHEAD)


class _Walker:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0
        self.fields: Offsets = {}

    def field(self, name: str, size: int) -> bytes:
        start, end = self.offset, self.offset + size
        if end > len(self.data):
            raise ValueError(f"the message ends inside {name}")
        self.fields[name] = (start, end)
        self.offset = end
        return self.data[start:end]

    def u16(self, name: str) -> int:
        return int(_U16.unpack(self.field(name, 2))[0])

    def u32(self, name: str) -> int:
        return int(_U32.unpack(self.field(name, 4))[0])

    def span(self, name: str, start: int) -> None:
        self.fields[name] = (start, self.offset)


def byte_offsets(message: bytes) -> Offsets:
    """Field name -> (start, end) for every field of a well-formed message.

    Header: version, suite_id, message_id, context_length, context, context.count,
    context[i].key_length/.key/.value_length/.value, edk_count, edk[i].provider_id_length/
    .provider_id/.provider_info_length/.provider_info/.ciphertext_length/.ciphertext,
    content_type, frame_length, commitment, header_body, header_tag, header.
    Frames: frame[n] and frame[n].sequence_number/.iv/.body/.tag; the final frame also has
    .end_marker and .length, and is listed again as final_frame(.field).
    """
    walk = _Walker(message)
    walk.field("version", 1)
    walk.field("suite_id", 2)
    walk.field("message_id", 32)
    context_length = walk.u16("context_length")
    context_start = walk.offset
    if context_length:
        pairs = walk.u16("context.count")
        for i in range(pairs):
            for part in ("key", "value"):
                length = walk.u16(f"context[{i}].{part}_length")
                walk.field(f"context[{i}].{part}", length)
    walk.span("context", context_start)
    if walk.offset != context_start + context_length:
        raise ValueError("the context length does not match its pairs")
    for i in range(walk.u16("edk_count")):
        for part in ("provider_id", "provider_info", "ciphertext"):
            length = walk.u16(f"edk[{i}].{part}_length")
            walk.field(f"edk[{i}].{part}", length)
    walk.field("content_type", 1)
    frame_length = walk.u32("frame_length")
    walk.field("commitment", 32)
    walk.span("header_body", 0)
    walk.field("header_tag", 16)
    walk.span("header", 0)
    sequence_number = 1
    while True:
        start = walk.offset
        name = f"frame[{sequence_number}]"
        final = message[start : start + 4] == _U32.pack(_END_MARKER)
        if final:
            walk.field(f"{name}.end_marker", 4)
        walk.u32(f"{name}.sequence_number")
        walk.field(f"{name}.iv", 12)
        length = walk.u32(f"{name}.length") if final else frame_length
        walk.field(f"{name}.body", length)
        walk.field(f"{name}.tag", 16)
        walk.span(name, start)
        if final:
            break
        sequence_number += 1
    if walk.offset != len(message):
        raise ValueError("bytes follow the final frame")
    final_fields = {
        "final_frame" + key.removeprefix(name): span
        for key, span in walk.fields.items()
        if key == name or key.startswith(name + ".")
    }
    return walk.fields | final_fields


def sealer_for(header: Header, keyring: Keyring) -> FrameSealer:
    """A sealer under the key of the message `header` starts, from the data key `keyring`
    unwraps, as anyone holding that key could make one: a reader's own cipher cannot seal."""
    opened = (keyring.unwrap(edk, header.context_bytes) for edk in header.encrypted_data_keys)
    data_key = next(filter(None, opened), None)
    assert data_key is not None
    keys = derive_keys(data_key, header.message_id, header.suite_id)
    return FrameSealer(keys.encryption_key, header.message_id)


def seal_frames(cipher: FrameSealer, plaintext: bytes, frame_length: int) -> bytes:
    """The frames of `plaintext` sealed with `cipher`, laid out as the encryptor does."""
    frames = frame_plaintexts(plaintext, frame_length)
    return b"".join(
        cipher.seal(number, memoryview(frame), final=number == len(frames))
        for number, frame in enumerate(frames, start=1)
    )
