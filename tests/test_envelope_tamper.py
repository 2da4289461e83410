"""Tampered messages: every header field, every frame field, truncation, reordering, extra
bytes, wrong keys and key commitment. Each case must raise the one right error class and
release no plaintext but whole frames that precede the first changed byte.

Fields are located with `tests.support.envelope.byte_offsets`, which walks the format on its own.
"""

import functools
import random
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from envelope import (
    CommitmentMismatch,
    DataKeyUnavailable,
    Decryptor,
    EncryptionContextMismatch,
    EnvelopeError,
    FrameAuthenticationError,
    FrameSequenceError,
    HeaderAuthenticationError,
    HeaderLimitExceeded,
    Keyring,
    MessageFormatError,
    StateError,
    TrailingData,
    TruncatedMessage,
    UnsupportedMessage,
)
from envelope.context import serialize_context
from envelope.frames import FrameSealer
from envelope.header import serialize_header_body
from envelope.suite import derive_keys
from tests.support.data import flip_bit, overwrite
from tests.support.envelope import (
    KEYRING_KINDS,
    KeyringKind,
    Offsets,
    Outcome,
    assert_authentic_prefix,
    byte_offsets,
    chunked,
    decrypt_all,
    decrypt_outcome,
    encrypt_all,
    make_keyring,
    seal_frames,
)

FRAME_LENGTH = 4096
CONTEXT = {"purpose": "tamper-test", "tenant": "acme"}
LONG_PLAINTEXT = random.Random(20240601).randbytes(3 * FRAME_LENGTH + 1000)  # frames 1-3 + final 4
SHORT_PLAINTEXT = random.Random(7).randbytes(100)  # the final frame only
CHUNKINGS: list[int | None] = [None, 7, 1000]
CHUNK_IDS = ["one-chunk", "7-byte", "1000-byte"]

ErrorClass = type[EnvelopeError]
# A context change is bound into the AES and ML-KEM wraps (their AAD), so no key unwraps;
# the RSA wrap does not bind it, so the key unwraps and the header tag catches the change.
CONTEXT_BOUND: Mapping[KeyringKind, ErrorClass] = {
    "aes": DataKeyUnavailable,
    "rsa": HeaderAuthenticationError,
    "mlkem": DataKeyUnavailable,
}


@dataclass(frozen=True)
class Sample:
    kind: KeyringKind
    keyring: Keyring
    plaintext: bytes
    data: bytes
    offsets: Offsets


@functools.cache
def sample(kind: KeyringKind, short: bool = False) -> Sample:
    keyring = make_keyring(kind)
    plaintext = SHORT_PLAINTEXT if short else LONG_PLAINTEXT
    data = encrypt_all([keyring], plaintext, FRAME_LENGTH, CONTEXT)
    return Sample(kind, keyring, plaintext, data, byte_offsets(data))


def assert_rejected(
    outcome: Outcome,
    expected: ErrorClass,
    original: Sample,
    pieces: Sequence[bytes],
    sequence_number: int | None = None,
) -> None:
    """The exact error class, from the right call, and only whole untouched frames released."""
    assert type(outcome.error) is expected, f"expected {expected.__name__}, got {outcome.error!r}"
    assert outcome.raised_by == ("finish" if expected is TruncatedMessage else "update")
    if sequence_number is not None:
        assert isinstance(outcome.error, FrameAuthenticationError)
        assert outcome.error.sequence_number == sequence_number
    assert_authentic_prefix(outcome, original.data, original.plaintext, FRAME_LENGTH, pieces)


# --- changes by field name -----------------------------------------------------------------

Change = Callable[[bytes, Offsets], bytes]


def flip(field: str, bit: int = 0, at: int = 0) -> Change:
    """Flip `bit` of the field's byte `at` (negative: from its end)."""

    def change(data: bytes, offsets: Offsets) -> bytes:
        start, end = offsets[field]
        return flip_bit(data, (start if at >= 0 else end) + at, bit)

    return change


def put(field: str, value: bytes) -> Change:
    def change(data: bytes, offsets: Offsets) -> bytes:
        return overwrite(data, offsets[field][0], value)

    return change


def middle(field: str) -> Change:
    def change(data: bytes, offsets: Offsets) -> bytes:
        start, end = offsets[field]
        return flip_bit(data, (start + end) // 2, 3)

    return change


def _frame(data: bytes, offsets: Offsets, number: int) -> bytes:
    start, end = offsets[f"frame[{number}]"]
    return data[start:end]


def swap(a: int, b: int) -> Change:
    def change(data: bytes, offsets: Offsets) -> bytes:
        (a_start, a_end), (b_start, b_end) = offsets[f"frame[{a}]"], offsets[f"frame[{b}]"]
        assert a_end == b_start
        return data[:a_start] + data[b_start:b_end] + data[a_start:a_end] + data[b_end:]

    return change


def duplicate(number: int) -> Change:
    def change(data: bytes, offsets: Offsets) -> bytes:
        end = offsets[f"frame[{number}]"][1]
        return data[:end] + _frame(data, offsets, number) + data[end:]

    return change


def drop(number: int) -> Change:
    def change(data: bytes, offsets: Offsets) -> bytes:
        start, end = offsets[f"frame[{number}]"]
        return data[:start] + data[end:]

    return change


@dataclass(frozen=True)
class Tamper:
    name: str
    change: Change
    expected: ErrorClass | Mapping[KeyringKind, ErrorClass]
    sequence_number: int | None = None  # the frame a FrameAuthenticationError must name
    short: bool = False  # on the short message, so a length claim reaches past its end

    def expected_for(self, kind: KeyringKind) -> ErrorClass:
        return self.expected if isinstance(self.expected, type) else self.expected[kind]


def frame_tampers(number: int, field_prefix: str) -> list[Tamper]:
    """IV, body and tag flips in one frame: each fails that frame's authentication."""
    cases = [
        ("iv first byte", flip(f"{field_prefix}.iv")),
        ("iv last byte", flip(f"{field_prefix}.iv", at=-1)),
        ("body first byte", flip(f"{field_prefix}.body", 5)),
        ("body middle", middle(f"{field_prefix}.body")),
        ("body last byte", flip(f"{field_prefix}.body", 7, at=-1)),
        ("tag first byte", flip(f"{field_prefix}.tag")),
        ("tag last byte", flip(f"{field_prefix}.tag", 6, at=-1)),
    ]
    return [
        Tamper(f"frame {number} {name}", change, FrameAuthenticationError, number)
        for name, change in cases
    ]


EDK = "edk[0]"
HEADER_TAMPERS = [
    Tamper("version 2->3", flip("version"), MessageFormatError),
    Tamper("version 2->0", flip("version", 1), MessageFormatError),
    Tamper("version set to 1", put("version", b"\x01"), UnsupportedMessage),
    Tamper("suite id high byte", flip("suite_id", 2), UnsupportedMessage),
    Tamper("suite id low byte", flip("suite_id", 0, at=1), UnsupportedMessage),
    # The message ID salts the HKDF, so the derived commitment differs: checked before the tag.
    Tamper("message id first byte", flip("message_id"), CommitmentMismatch),
    Tamper("message id last byte", flip("message_id", 7, at=-1), CommitmentMismatch),
    # 38 -> 39: the context takes the EDK count's first byte, left over after its last pair.
    Tamper("context length +1", flip("context_length", 0, at=1), MessageFormatError),
    # 38 -> 36: the context ends inside its last value.
    Tamper("context length -2", flip("context_length", 1, at=1), MessageFormatError),
    # +32768 is over the 16384-byte context limit: refused as soon as the length is read.
    Tamper("context length +32768", flip("context_length", 7), HeaderLimitExceeded),
    # +4096 is within the limit but past the short message's end: the reader waits in vain.
    Tamper("context length +4096", flip("context_length", 4), TruncatedMessage, short=True),
    Tamper("context count 2->3", flip("context.count", 0, at=1), MessageFormatError),
    Tamper("context count 2->0", flip("context.count", 1, at=1), MessageFormatError),
    # 7 -> 6: the next length is read from "e\x00" = 25856, past the context's end.
    Tamper("context key length", flip("context[0].key_length", 0, at=1), MessageFormatError),
    Tamper("context key byte", flip("context[0].key"), CONTEXT_BOUND),
    # "purpose" -> "turpose" sorts after "tenant": not the canonical form.
    Tamper("context key order", flip("context[0].key", 2), MessageFormatError),
    Tamper("context key not utf-8", flip("context[0].key", 7), MessageFormatError),
    # 11 -> 10: the next key length is read from "t\x00" = 29696, past the context's end.
    Tamper("context value length", flip("context[0].value_length", 0, at=1), MessageFormatError),
    Tamper("context value byte", flip("context[0].value", 0, at=-1), CONTEXT_BOUND),
    Tamper("context last value byte", flip("context[1].value", 1, at=-1), CONTEXT_BOUND),
    Tamper("context value not utf-8", flip("context[1].value", 7), MessageFormatError),
    Tamper("edk count 1->0", flip("edk_count", 0, at=1), MessageFormatError),
    Tamper("edk count +32768", flip("edk_count", 7), HeaderLimitExceeded),
    # 17 is one over the limit of 16 encrypted data keys.
    Tamper("edk count 1->17", flip("edk_count", 4, at=1), HeaderLimitExceeded),
    # 10 -> 8: the provider-info length is then read from "am" = 24941 > 8192.
    Tamper(
        "provider id length 10->8", flip(f"{EDK}.provider_id_length", 1, at=1), HeaderLimitExceeded
    ),
    Tamper("provider id length +32768", flip(f"{EDK}.provider_id_length", 7), HeaderLimitExceeded),
    # +4096 is within the 8192-byte EDK field limit but past the short message's end.
    Tamper(
        "provider id length +4096",
        flip(f"{EDK}.provider_id_length", 4),
        TruncatedMessage,
        short=True,
    ),
    Tamper("provider id byte", flip(f"{EDK}.provider_id"), DataKeyUnavailable),
    Tamper("provider id not utf-8", flip(f"{EDK}.provider_id", 7, at=-1), MessageFormatError),
    Tamper(
        "provider info length +32768", flip(f"{EDK}.provider_info_length", 7), HeaderLimitExceeded
    ),
    Tamper(
        "provider info length +4096",
        flip(f"{EDK}.provider_info_length", 4),
        TruncatedMessage,
        short=True,
    ),
    Tamper("provider info first byte", flip(f"{EDK}.provider_info"), DataKeyUnavailable),
    Tamper("provider info last byte", flip(f"{EDK}.provider_info", 4, at=-1), DataKeyUnavailable),
    Tamper("ciphertext length +8192", flip(f"{EDK}.ciphertext_length", 5), HeaderLimitExceeded),
    Tamper(
        "ciphertext length +4096", flip(f"{EDK}.ciphertext_length", 4), TruncatedMessage, short=True
    ),
    Tamper("ciphertext first byte", flip(f"{EDK}.ciphertext"), DataKeyUnavailable),
    Tamper("ciphertext middle", middle(f"{EDK}.ciphertext"), DataKeyUnavailable),
    Tamper("ciphertext last byte", flip(f"{EDK}.ciphertext", 7, at=-1), DataKeyUnavailable),
    Tamper("content type 2->3", flip("content_type"), MessageFormatError),
    Tamper("content type set to 1", put("content_type", b"\x01"), UnsupportedMessage),
    # 4096 -> 4097 is within the limits, so only the header tag can catch it.
    Tamper("frame length 4096->4097", flip("frame_length", 0, at=-1), HeaderAuthenticationError),
    Tamper("frame length over 16 MiB", flip("frame_length", 0), HeaderLimitExceeded),
    Tamper("frame length 4096->0", flip("frame_length", 4, at=2), HeaderLimitExceeded),
    Tamper("commitment first byte", flip("commitment"), CommitmentMismatch),
    Tamper("commitment last byte", flip("commitment", 7, at=-1), CommitmentMismatch),
    Tamper("header tag first byte", flip("header_tag"), HeaderAuthenticationError),
    Tamper("header tag last byte", flip("header_tag", 7, at=-1), HeaderAuthenticationError),
]

FRAME_TAMPERS = [
    *(
        Tamper(
            f"frame {n} sequence number",
            flip(f"frame[{n}].sequence_number", 0, at=-1),
            FrameSequenceError,
        )
        for n in (1, 2, 3)
    ),
    *(tamper for n in (1, 2, 3) for tamper in frame_tampers(n, f"frame[{n}]")),
    # 0xFFFFFFFE is read as a regular frame's sequence number, which is not 4.
    Tamper("final end marker", flip("final_frame.end_marker", 0, at=-1), FrameSequenceError),
    Tamper("final end marker high bit", flip("final_frame.end_marker", 7), FrameSequenceError),
    Tamper(
        "final sequence number", flip("final_frame.sequence_number", 0, at=-1), FrameSequenceError
    ),
    # 1000 -> 1001: the reader waits for one byte that never comes.
    Tamper("final length +1", flip("final_frame.length", 0, at=-1), TruncatedMessage),
    # 1000 -> 992: the frame ends 8 bytes early, so its tag is read from the wrong bytes.
    Tamper("final length -8", flip("final_frame.length", 3, at=-1), FrameAuthenticationError, 4),
    # 1000 -> 5096 is more than the frame length: refused when the length is read.
    Tamper(
        "final length over frame length", flip("final_frame.length", 4, at=2), MessageFormatError
    ),
    Tamper("final length high bit", flip("final_frame.length", 7), MessageFormatError),
    *frame_tampers(4, "final_frame"),
]

STRUCTURE_TAMPERS = [
    Tamper("frames 1 and 2 swapped", swap(1, 2), FrameSequenceError),
    Tamper("frames 2 and 3 swapped", swap(2, 3), FrameSequenceError),
    Tamper("frame 3 and final swapped", swap(3, 4), FrameSequenceError),
    Tamper("frame 1 duplicated", duplicate(1), FrameSequenceError),
    Tamper("frame 3 duplicated", duplicate(3), FrameSequenceError),
    Tamper("final frame duplicated", duplicate(4), TrailingData),
    Tamper("frame 1 dropped", drop(1), FrameSequenceError),
    Tamper("frame 2 dropped", drop(2), FrameSequenceError),
    Tamper("frame 3 dropped", drop(3), FrameSequenceError),
    Tamper("final frame dropped", drop(4), TruncatedMessage),
]

TAMPERS = HEADER_TAMPERS + FRAME_TAMPERS + STRUCTURE_TAMPERS


@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("kind", KEYRING_KINDS)
@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.name for t in TAMPERS])
def test_tampered_message_is_rejected(
    tamper: Tamper, kind: KeyringKind, chunk_size: int | None
) -> None:
    original = sample(kind, tamper.short)
    tampered = tamper.change(original.data, original.offsets)
    assert tampered != original.data
    pieces = chunked(tampered, chunk_size)
    outcome = decrypt_outcome([original.keyring], pieces)
    assert_rejected(outcome, tamper.expected_for(kind), original, pieces, tamper.sequence_number)


@pytest.mark.parametrize("chunk_size", [7, 1000, FRAME_LENGTH + 31])
def test_a_frame_cut_across_chunks_releases_nothing_before_its_last_tag_byte(
    chunk_size: int,
) -> None:
    """Frames that straddle chunks are decrypted piece by piece as they arrive; none of
    their plaintext may come out until the last byte of their tag is in and verified."""
    keyring = make_keyring("aes")
    message = encrypt_all([keyring], LONG_PLAINTEXT, FRAME_LENGTH)
    offsets = byte_offsets(message)
    tag_ends = [offsets[f"frame[{n}].tag"][1] for n in range(1, 5)]
    decryptor = Decryptor([keyring])
    released = bytearray()
    for chunk_start in range(0, len(message), chunk_size):
        chunk_end = min(chunk_start + chunk_size, len(message))
        # Each piece ends one byte short of a tag's end, or at the chunk's end.
        cuts = sorted({end - 1 for end in tag_ends if chunk_start < end - 1 < chunk_end})
        start = chunk_start
        for end in [*cuts, chunk_end]:
            released += b"".join(decryptor.update(message[start:end]))
            whole = sum(1 for tag_end in tag_ends if tag_end <= end)
            assert len(released) == min(whole * FRAME_LENGTH, len(LONG_PLAINTEXT))
            start = end
    decryptor.finish()
    assert released == LONG_PLAINTEXT


@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_untampered_samples_decrypt(kind: KeyringKind) -> None:
    """The control: the samples the tamper tests start from are good messages."""
    for short in (False, True):
        original = sample(kind, short)
        for chunk_size in CHUNKINGS:
            assert decrypt_all([original.keyring], original.data, chunk_size) == original.plaintext


def flip_expectation(field: str, bit: int, kind: KeyringKind) -> ErrorClass | None:
    """The one right class for flipping `bit` anywhere in `field`, if the field fixes it."""
    fixed: dict[str, ErrorClass] = {
        "version": MessageFormatError,  # no one-bit flip of 0x02 gives 0x01 or 0x02
        "suite_id": UnsupportedMessage,
        "message_id": CommitmentMismatch,
        "content_type": MessageFormatError,  # as for the version byte
        "commitment": CommitmentMismatch,
        "header_tag": HeaderAuthenticationError,
        f"{EDK}.provider_info": DataKeyUnavailable,
        f"{EDK}.ciphertext": DataKeyUnavailable,
    }
    if field in fixed:
        return fixed[field]
    if field == f"{EDK}.provider_id":
        return MessageFormatError if bit == 7 else DataKeyUnavailable  # ASCII, or not UTF-8
    if field.startswith("context[") and field.endswith("].value"):
        return MessageFormatError if bit == 7 else CONTEXT_BOUND[kind]
    return None


def field_at(offsets: Offsets, offset: int) -> str:
    """The innermost named header field holding byte `offset`."""
    names = [n for n, (s, e) in offsets.items() if s <= offset < e and not n.startswith("frame")]
    return min(names, key=lambda n: offsets[n][1] - offsets[n][0])


@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_every_header_byte_flipped(kind: KeyringKind) -> None:
    """One bit of every header byte (bit = offset mod 8): never a frame error, never output."""
    original = sample(kind)
    frame_errors = (FrameAuthenticationError, FrameSequenceError, TrailingData, StateError)
    for offset in range(original.offsets["header"][1]):
        bit = offset % 8
        field = field_at(original.offsets, offset)
        pieces = [flip_bit(original.data, offset, bit)]
        outcome = decrypt_outcome([original.keyring], pieces)
        where = f"{field} byte {offset} bit {bit}: {outcome.error!r}"
        assert isinstance(outcome.error, EnvelopeError), where
        assert not isinstance(outcome.error, frame_errors), where
        assert outcome.plaintext == b"", where
        expected = flip_expectation(field, bit, kind)
        if expected is not None:
            assert type(outcome.error) is expected, where


# --- truncation ---------------------------------------------------------------------------


def cut_points(offsets: Offsets) -> dict[str, int]:
    """Named truncation points: inside every header field, and around every frame."""
    header_end = offsets["header"][1]
    points = {"empty": 0}
    for name, (start, end) in offsets.items():
        if end <= header_end and name != "header":
            points[f"{name} start"] = start
            points[f"{name} middle"] = (start + end) // 2
    points["header end"] = header_end
    for name, (start, end) in offsets.items():
        if name.startswith("frame[") and "." not in name:
            points[f"{name} +1"] = start + 1
            points[f"{name} +4"] = start + 4
            points[f"{name} +24"] = start + 24
            points[f"{name} middle"] = (start + end) // 2
            points[f"{name} -1"] = end - 1
            points[f"{name} end"] = end
    return {name: cut for name, cut in points.items() if cut < offsets["final_frame"][1]}


@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_truncation_raises_at_finish(kind: KeyringKind, chunk_size: int | None) -> None:
    """Cut at every frame boundary, mid-frame and mid-header: `finish` raises, every whole
    frame before the cut (and nothing else) was released."""
    original = sample(kind)
    for name, cut in cut_points(original.offsets).items():
        pieces = chunked(original.data[:cut], chunk_size)
        outcome = decrypt_outcome([original.keyring], pieces)
        try:
            assert_rejected(outcome, TruncatedMessage, original, pieces)
        except AssertionError as exc:
            raise AssertionError(f"cut at {name} ({cut}): {exc}") from exc


def test_truncation_at_every_header_offset() -> None:
    original = sample("aes")
    for cut in range(original.offsets["header"][1] + 1):
        for chunk_size in (None, 1):
            pieces = chunked(original.data[:cut], chunk_size)
            outcome = decrypt_outcome([original.keyring], pieces)
            assert type(outcome.error) is TruncatedMessage, (cut, outcome)
            assert outcome.raised_by == "finish"
            assert outcome.plaintext == b""


# --- bytes after the final frame ----------------------------------------------------------

GARBAGE = {"one zero byte": b"\x00", "100 random bytes": random.Random(3).randbytes(100)}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_trailing_data(kind: KeyringKind, chunk_size: int | None, garbage: bytes) -> None:
    original = sample(kind)
    # In the same chunk as (the end of) the final frame.
    same = chunked(original.data + garbage, chunk_size)
    assert_rejected(decrypt_outcome([original.keyring], same), TrailingData, original, same)
    # In an update call of its own, after the whole message was accepted.
    later = [*chunked(original.data, chunk_size), garbage]
    outcome = decrypt_outcome([original.keyring], later)
    assert_rejected(outcome, TrailingData, original, later)
    assert outcome.plaintext == original.plaintext
    assert outcome.failed_update == len(later) - 1


def test_trailing_data_when_message_and_garbage_share_one_update() -> None:
    """Every frame verified, yet nothing is returned: the error ends the call."""
    original = sample("aes")
    outcome = decrypt_outcome([original.keyring], [original.data + b"\x00"])
    assert type(outcome.error) is TrailingData
    assert outcome.plaintext == b""


# --- frames from elsewhere ----------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=CHUNK_IDS)
@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_frame_from_another_message(kind: KeyringKind, chunk_size: int | None) -> None:
    """Same key, same position, same plaintext: the frame is bound to its own message."""
    original = sample(kind)
    other = encrypt_all([original.keyring], original.plaintext, FRAME_LENGTH, CONTEXT)
    other_offsets = byte_offsets(other)
    start, end = original.offsets["frame[2]"]
    other_start, other_end = other_offsets["frame[2]"]
    spliced = original.data[:start] + other[other_start:other_end] + original.data[end:]
    pieces = chunked(spliced, chunk_size)
    outcome = decrypt_outcome([original.keyring], pieces)
    assert_rejected(outcome, FrameAuthenticationError, original, pieces, sequence_number=2)
    # The other message's header with this message's frames fails on frame 1.
    header_end = other_offsets["header"][1]
    mixed = other[:header_end] + original.data[original.offsets["header"][1] :]
    outcome = decrypt_outcome([original.keyring], chunked(mixed, chunk_size))
    assert type(outcome.error) is FrameAuthenticationError
    assert outcome.error.sequence_number == 1
    assert outcome.plaintext == b""


# --- keys and context ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_wrong_key_with_the_same_name(kind: KeyringKind) -> None:
    original = sample(kind)
    impostor = make_keyring(kind, original.keyring.key_name, seed=1)
    outcome = decrypt_outcome([impostor], [original.data])
    assert type(outcome.error) is DataKeyUnavailable
    assert outcome.plaintext == b""
    assert type(decrypt_outcome([], [original.data]).error) is DataKeyUnavailable


REQUIRED_CONTEXTS = {
    "other value": {"tenant": "other"},
    "missing key": {"region": "eu"},
    "one right, one missing": {"tenant": "acme", "region": "eu"},
}


@pytest.mark.parametrize("required", REQUIRED_CONTEXTS.values(), ids=REQUIRED_CONTEXTS.keys())
@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_required_context_mismatch(kind: KeyringKind, required: dict[str, str]) -> None:
    original = sample(kind)
    outcome = decrypt_outcome([original.keyring], [original.data], required_context=required)
    assert type(outcome.error) is EncryptionContextMismatch
    assert outcome.plaintext == b""
    matching = {"tenant": "acme"}
    assert decrypt_all([original.keyring], original.data, None, matching) == original.plaintext


@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_unused_edk_change_is_caught_by_the_header_tag(kind: KeyringKind) -> None:
    """A message for three keyrings; flip the first EDK, read with the third keyring."""
    keyrings = [make_keyring("aes", "first"), make_keyring("rsa", "second"), make_keyring(kind)]
    data = encrypt_all(keyrings, LONG_PLAINTEXT, FRAME_LENGTH, CONTEXT)
    offsets = byte_offsets(data)
    assert decrypt_all([keyrings[2]], data) == LONG_PLAINTEXT
    tampered = flip_bit(data, offsets["edk[0].ciphertext"][0])
    outcome = decrypt_outcome([keyrings[2]], [tampered])
    assert type(outcome.error) is HeaderAuthenticationError
    assert type(decrypt_outcome([keyrings[0]], [tampered]).error) is DataKeyUnavailable


# --- key commitment -----------------------------------------------------------------------


def hand_built(
    wraps: Sequence[tuple[Keyring, bytes]],
    message_id: bytes,
    *,
    commit_to: bytes,
    tag_with: bytes,
    frames_with: bytes,
    plaintext: bytes,
) -> bytes:
    """A message whose EDKs wrap the given data keys, with its commitment, header tag and
    frames each made from a data key of the builder's choice."""
    context_bytes = serialize_context(CONTEXT)
    body = serialize_header_body(
        message_id=message_id,
        context_bytes=context_bytes,
        encrypted_data_keys=tuple(keyring.wrap(key, context_bytes) for keyring, key in wraps),
        frame_length=FRAME_LENGTH,
        commitment=derive_keys(commit_to, message_id).commitment,
    )
    tag = FrameSealer(derive_keys(tag_with, message_id).encryption_key, message_id)
    frames = FrameSealer(derive_keys(frames_with, message_id).encryption_key, message_id)
    return body + tag.header_tag(body) + seal_frames(frames, plaintext, FRAME_LENGTH)


@pytest.mark.parametrize("kind", KEYRING_KINDS)
def test_two_data_keys_in_one_header(kind: KeyringKind) -> None:
    keyring_a, keyring_b = make_keyring(kind, "key-a"), make_keyring(kind, "key-b")
    rng = random.Random(kind)
    key_a, key_b, message_id = rng.randbytes(32), rng.randbytes(32), rng.randbytes(32)
    plaintext_a, plaintext_b = LONG_PLAINTEXT, LONG_PLAINTEXT[::-1]
    wraps = [(keyring_a, key_a), (keyring_b, key_b)]

    def build(commit_to: bytes, tag_with: bytes, plaintext: bytes) -> bytes:
        return hand_built(
            wraps,
            message_id,
            commit_to=commit_to,
            tag_with=tag_with,
            frames_with=tag_with,
            plaintext=plaintext,
        )

    def error(keyring: Keyring, data: bytes) -> Exception | None:
        outcome = decrypt_outcome([keyring], chunked(data, 1000))
        assert outcome.plaintext == b""
        return outcome.error

    # Made for A: A reads it; B unwraps its own data key, which the commitment refuses.
    for_a = build(key_a, key_a, plaintext_a)
    assert decrypt_all([keyring_a], for_a) == plaintext_a
    assert type(error(keyring_b, for_a)) is CommitmentMismatch
    # An attacker re-tags the header and re-seals the frames under B but keeps A's commitment.
    forged = build(key_a, key_b, plaintext_b)
    assert type(error(keyring_b, forged)) is CommitmentMismatch
    assert type(error(keyring_a, forged)) is HeaderAuthenticationError
    # The control: committed to B as well, it opens for B (to B's plaintext) and not for A.
    for_b = build(key_b, key_b, plaintext_b)
    assert decrypt_all([keyring_b], for_b) == plaintext_b
    assert type(error(keyring_a, for_b)) is CommitmentMismatch


# --- frame IVs ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=CHUNK_IDS)
def test_a_frame_sealed_under_another_iv_is_refused(chunk_size: int | None) -> None:
    """The format fixes each frame's IV to its sequence number. A frame whose IV field
    says otherwise, with a tag that is valid for that IV (a writer that does not follow
    the format, or one reusing IVs), is refused, though AES-GCM alone would accept it."""
    keyring = make_keyring("aes")
    rng = random.Random(99)
    data_key, message_id = rng.randbytes(32), rng.randbytes(32)
    message = hand_built(
        [(keyring, data_key)],
        message_id,
        commit_to=data_key,
        tag_with=data_key,
        frames_with=data_key,
        plaintext=LONG_PLAINTEXT,
    )
    first = byte_offsets(message)["frame[1]"][0]
    other_iv = (7).to_bytes(12, "big")
    aad = message_id + b"AWSKMSEncryptionClient Frame" + struct.pack(">IQ", 1, FRAME_LENGTH)
    sealed = AESGCM(derive_keys(data_key, message_id).encryption_key).encrypt(
        other_iv, LONG_PLAINTEXT[:FRAME_LENGTH], aad
    )
    frame = struct.pack(">I", 1) + other_iv + sealed
    forged = message[:first] + frame + message[first + len(frame) :]
    outcome = decrypt_outcome([keyring], chunked(forged, chunk_size))
    assert type(outcome.error) is FrameAuthenticationError
    assert outcome.plaintext == b""
