"""Fuzzing the reader: random bytes, mutated messages and hostile headers.

Whatever the input and however it is chunked, a decryptor raises nothing but
`EnvelopeError` subclasses, returns nothing but whole frames of the original plaintext
that precede the first changed byte, and refuses oversized claims as soon as it reads them.
"""

import functools
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from envelope import (
    Decryptor,
    EnvelopeError,
    Header,
    HeaderLimitExceeded,
    HeaderReader,
    Keyring,
    Limits,
    MessageFormatError,
    TruncatedMessage,
    parse_header,
)
from tests.support.data import overwrite
from tests.support.envelope import (
    KEYRING_KINDS,
    KeyringKind,
    Offsets,
    assert_authentic_prefix,
    byte_offsets,
    chunked,
    decrypt_outcome,
    encrypt_all,
    make_keyring,
)

pytestmark = pytest.mark.timeout(60)

FRAME_LENGTH = 4096
PLAINTEXT = random.Random(99).randbytes(2 * FRAME_LENGTH + 300)  # frames 1-2 + final 3
CONTEXT = {"purpose": "fuzz", "tenant": "acme"}

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
chunk_sizes = st.lists(st.integers(1, 3000), min_size=1, max_size=6)


@dataclass(frozen=True)
class Sample:
    keyring: Keyring
    data: bytes
    offsets: Offsets

    @property
    def header(self) -> bytes:
        return self.data[: self.offsets["header"][1]]


@functools.cache
def sample(kind: KeyringKind) -> Sample:
    keyring = make_keyring(kind, "fuzz-key")
    data = encrypt_all([keyring], PLAINTEXT, FRAME_LENGTH, CONTEXT)
    return Sample(keyring, data, byte_offsets(data))


# --- random input -------------------------------------------------------------------------


def random_inputs(header: bytes) -> st.SearchStrategy[bytes]:
    """Pure noise, noise behind a plausible start, and noise behind a valid header."""
    return st.one_of(
        st.binary(max_size=2000),
        st.binary(max_size=2000).map(lambda tail: b"\x02\x04\x78" + tail),
        st.binary(max_size=12000).map(lambda tail: header + tail),
        st.binary(min_size=12, max_size=5000).map(
            lambda tail: header + struct.pack(">I", 1) + tail  # a frame 1 of noise
        ),
        st.binary(max_size=300).map(
            lambda tail: header + struct.pack(">II", 0xFFFFFFFF, 1) + tail  # a final frame
        ),
    )


@pytest.mark.parametrize("kind", KEYRING_KINDS)
@FUZZ
@given(data=st.data(), sizes=chunk_sizes)
def test_random_bytes_raise_only_envelope_errors(
    kind: KeyringKind, data: st.DataObject, sizes: list[int]
) -> None:
    original = sample(kind)
    noise = data.draw(random_inputs(original.header), label="input")
    outcome = decrypt_outcome([original.keyring], chunked(noise, sizes))
    assert isinstance(outcome.error, EnvelopeError), repr(outcome.error)
    assert outcome.plaintext == b""  # noise never authenticates


# --- mutated messages ---------------------------------------------------------------------

OPERATIONS = ("flip", "insert", "delete", "overwrite")


def mutate(message: bytes, operation: str, position: int, payload: bytes) -> bytes:
    """One edit at `position` (0 to len): XOR with payload[0] | 1, insert, delete
    len(payload) bytes, or overwrite with payload."""
    if operation == "flip":
        position = min(position, len(message) - 1)
        return overwrite(message, position, bytes([message[position] ^ (payload[0] | 1)]))
    if operation == "insert":
        return message[:position] + payload + message[position:]
    if operation == "delete":
        return message[:position] + message[position + len(payload) :]
    return overwrite(message, position, payload)


def mutated(data: st.DataObject, message: bytes, header_length: int) -> bytes:
    """`message` after one to four random edits, many aimed at the header or the end."""
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        end = len(message)
        position = data.draw(
            st.one_of(
                st.integers(0, min(header_length, end)),
                st.integers(0, end),
                st.integers(max(0, end - 60), end),  # the final frame
                st.just(end),  # after it
            ),
            label="position",
        )
        operation = data.draw(st.sampled_from(OPERATIONS), label="operation")
        payload = data.draw(st.binary(min_size=1, max_size=40), label="payload")
        message = mutate(message, operation, position, payload)
        if not message:
            break
    return message


@pytest.mark.parametrize("kind", KEYRING_KINDS)
@FUZZ
@given(data=st.data(), sizes=st.one_of(st.none(), chunk_sizes))
def test_mutated_message_is_rejected_without_bad_plaintext(
    kind: KeyringKind, data: st.DataObject, sizes: list[int] | None
) -> None:
    original = sample(kind)
    changed = mutated(data, original.data, original.offsets["header"][1])
    assume(changed != original.data)
    pieces = chunked(changed, sizes)
    outcome = decrypt_outcome([original.keyring], pieces)
    assert isinstance(outcome.error, EnvelopeError), repr(outcome.error)
    assert_authentic_prefix(outcome, original.data, PLAINTEXT, FRAME_LENGTH, pieces)


def read_header(data: bytes, sizes: Sequence[int]) -> Header | EnvelopeError | None:
    """What a `HeaderReader` fed `data` in chunks makes of it: a header, an error, or None
    if it still waits for bytes."""
    reader = HeaderReader()
    pieces = chunked(data, sizes)
    for index, piece in enumerate(pieces):
        try:
            header = reader.feed(piece)
        except EnvelopeError as exc:
            return exc
        if header is not None:
            assert reader.remainder + b"".join(pieces[index + 1 :]) == data[header.length :]
            return header
    return None


@pytest.mark.parametrize("kind", KEYRING_KINDS)
@FUZZ
@given(data=st.data(), sizes=chunk_sizes)
def test_mutated_header_reads_the_same_in_any_chunking(
    kind: KeyringKind, data: st.DataObject, sizes: list[int]
) -> None:
    original = sample(kind)
    header_length = original.offsets["header"][1]
    changed = mutated(data, original.data[: header_length + 40], header_length)
    expected: Header | EnvelopeError
    try:
        expected = parse_header(changed)
    except EnvelopeError as exc:
        expected = exc
    got = read_header(changed, sizes)
    if isinstance(expected, TruncatedMessage):
        assert got is None
    elif isinstance(expected, Header):
        assert got == expected
    else:
        assert type(got) is type(expected), (got, expected)


# --- hostile headers ----------------------------------------------------------------------

U16_MAX = b"\xff\xff"
HOSTILE_CLAIMS = {
    "context length 65535": ("context_length", U16_MAX),
    "65535 EDKs": ("edk_count", U16_MAX),
    "provider id of 65535 bytes": ("edk[0].provider_id_length", U16_MAX),
    "provider info of 65535 bytes": ("edk[0].provider_info_length", U16_MAX),
    "EDK ciphertext of 65535 bytes": ("edk[0].ciphertext_length", U16_MAX),
    "frame length 2^32-1": ("frame_length", b"\xff\xff\xff\xff"),
}


def claim(original: Sample, field: str, value: bytes) -> bytes:
    """The message's bytes up to `field`, then `value` in its place: nothing after it."""
    return original.data[: original.offsets[field][0]] + value


@pytest.mark.parametrize(("field", "value"), HOSTILE_CLAIMS.values(), ids=HOSTILE_CLAIMS.keys())
def test_hostile_claim_is_refused_on_its_last_byte(field: str, value: bytes) -> None:
    original = sample("aes")
    prefix = claim(original, field, value)
    reader = HeaderReader()
    for offset in range(len(prefix) - 1):
        assert reader.feed(prefix[offset : offset + 1]) is None
    with pytest.raises(HeaderLimitExceeded):
        reader.feed(prefix[-1:])  # the claim is complete: refused before any byte it claims
    with pytest.raises(HeaderLimitExceeded):
        HeaderReader().feed(prefix)
    decryptor = Decryptor([original.keyring])
    assert decryptor.update(prefix[:-1]) == []
    with pytest.raises(HeaderLimitExceeded):
        decryptor.update(prefix[-1:])


LIMITED_FIELDS = {
    "context_length": "max_context_length",
    "edk_count": "max_encrypted_data_keys",
    "edk[0].provider_id_length": "max_edk_field_length",
    "edk[0].provider_info_length": "max_edk_field_length",
    "edk[0].ciphertext_length": "max_edk_field_length",
}


@pytest.mark.parametrize("field", LIMITED_FIELDS)
@settings(max_examples=60, deadline=None)
@given(claimed=st.integers(1, 0xFFFF), limit=st.integers(64, 0xFFFF), sizes=chunk_sizes)
def test_claims_over_a_limit_are_refused_at_once(
    field: str, claimed: int, limit: int, sizes: list[int]
) -> None:
    """Over the limit: refused as the claim completes. Within: the reader waits quietly."""
    original = sample("aes")
    limits = Limits(**{LIMITED_FIELDS[field]: limit})
    prefix = claim(original, field, struct.pack(">H", claimed))
    reader = HeaderReader(limits)
    pieces = chunked(prefix, sizes)
    for piece in pieces[:-1]:
        assert reader.feed(piece) is None
    if claimed > limit:
        with pytest.raises(HeaderLimitExceeded):
            reader.feed(pieces[-1])
    else:
        assert reader.feed(pieces[-1]) is None


@settings(max_examples=60, deadline=None)
@given(frame_length=st.integers(0, 0xFFFFFFFF), sizes=chunk_sizes)
def test_frame_length_outside_the_limits_is_refused_at_once(
    frame_length: int, sizes: list[int]
) -> None:
    original = sample("aes")
    prefix = claim(original, "frame_length", struct.pack(">I", frame_length))
    reader = HeaderReader()
    pieces = chunked(prefix, sizes)
    for piece in pieces[:-1]:
        assert reader.feed(piece) is None
    if 4096 <= frame_length <= 16 * 1024 * 1024:
        assert reader.feed(pieces[-1]) is None
    else:
        with pytest.raises(HeaderLimitExceeded):
            reader.feed(pieces[-1])


def test_final_frame_claiming_2_to_the_32_bytes_is_refused_at_once() -> None:
    original = sample("aes")
    prefix = claim(
        original, "frame[1]", struct.pack(">II12sI", 0xFFFFFFFF, 1, bytes(11) + b"\x01", 0xFFFFFFFF)
    )
    decryptor = Decryptor([original.keyring])
    assert decryptor.update(prefix[:-1]) == []
    with pytest.raises(MessageFormatError):
        decryptor.update(prefix[-1:])
