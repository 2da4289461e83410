"""Random access: plaintext ranges map to whole frames, which decrypt to exactly the range."""

import os
from collections.abc import Callable
from contextlib import suppress

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from envelope import (
    AesKeyring,
    AuthenticationError,
    Encryptor,
    FinalFrameCheck,
    FrameAuthenticationError,
    InvalidParameter,
    MessageFormatError,
    MessageLayout,
    RangeDecryptor,
    TruncatedMessage,
    open_message,
    parse_header,
)
from envelope.frames import FINAL_OVERHEAD, REGULAR_OVERHEAD
from tests.support.envelope import sealer_for

FRAME = 4096
KEYRING = AesKeyring("ranged#1", os.urandom(32))


def make_message(size: int, *, signed: bool = False) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    encryptor = Encryptor([KEYRING], frame_length=FRAME, signed=signed)
    return data, b"".join(encryptor.update(data) + encryptor.finish())


def read_range(
    message: bytes, first: int, last: int, chunk: int = 1000, layout: MessageLayout | None = None
) -> bytes:
    """What a ranged read does: header, layout from the total length, then only the span."""
    header = parse_header(message[:8192])
    layout = layout or MessageLayout.of(header, len(message))
    span = layout.span(first, last)
    decryptor = RangeDecryptor(open_message(header, [KEYRING]).cipher, layout, span)
    ciphertext = message[span.start : span.end]
    out = b"".join(
        p
        for i in range(0, len(ciphertext), chunk)
        for p in decryptor.update(ciphertext[i : i + chunk])
    )
    decryptor.finish()
    return out


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("size", [1, FRAME - 1, FRAME, FRAME + 1, 5 * FRAME, 5 * FRAME + 77])
def test_layout_matches_the_message(size: int, signed: bool) -> None:
    data, message = make_message(size, signed=signed)
    layout = MessageLayout.of(parse_header(message), len(message))
    assert layout.plaintext_length == size
    assert layout.message_length == len(message)
    assert read_range(message, 0, size - 1) == data
    assert read_range(message, size // 2, size - 1) == data[size // 2 :]


EDGES = [
    (0, 0),
    (0, FRAME - 1),
    (FRAME - 1, FRAME),
    (FRAME, FRAME),
    (FRAME, 2 * FRAME - 1),
    (2 * FRAME - 1, 3 * FRAME + 1),
    (5 * FRAME, 5 * FRAME + 76),
    (5 * FRAME + 76, 5 * FRAME + 76),
    (0, 5 * FRAME + 76),
]


@pytest.mark.parametrize(("first", "last"), EDGES)
def test_ranges_at_frame_edges(first: int, last: int) -> None:
    data, message = make_message(5 * FRAME + 77)
    assert read_range(message, first, last) == data[first : last + 1]


def test_a_whole_number_of_frames_ends_in_an_empty_final_frame() -> None:
    data, message = make_message(3 * FRAME)
    layout = MessageLayout.of(parse_header(message), len(message))
    assert (layout.regular_frames, layout.final_frame_length) == (3, 0)
    assert read_range(message, 2 * FRAME, 3 * FRAME - 1) == data[2 * FRAME :]


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_ranges(draw: st.DataObject) -> None:
    size = draw.draw(st.integers(1, 8 * FRAME))
    data, message = make_message(size)
    first = draw.draw(st.integers(0, size - 1))
    last = draw.draw(st.integers(first, size - 1))
    chunk = draw.draw(st.integers(1, 3 * FRAME))
    assert read_range(message, first, last, chunk) == data[first : last + 1]


def test_ranges_outside_the_plaintext_are_refused() -> None:
    _, message = make_message(FRAME)
    layout = MessageLayout.of(parse_header(message), len(message))
    for first, last in [(-1, 0), (5, 4), (0, FRAME), (FRAME, FRAME)]:
        with pytest.raises(InvalidParameter):
            layout.span(first, last)
    _, empty = make_message(0)
    with pytest.raises(InvalidParameter):
        MessageLayout.of(parse_header(empty), len(empty)).span(0, 0)


def test_impossible_lengths_are_refused() -> None:
    _, message = make_message(FRAME)
    header = parse_header(message)
    with pytest.raises(TruncatedMessage):
        MessageLayout.of(header, header.length + 10)
    with pytest.raises(MessageFormatError):
        MessageLayout.of(header, len(message) + FRAME + 20)  # a final frame longer than a frame


def test_a_tampered_frame_in_the_span_fails() -> None:
    _, message = make_message(4 * FRAME)
    header = parse_header(message)
    layout = MessageLayout.of(header, len(message))
    span = layout.span(FRAME + 10, 2 * FRAME + 10)
    tampered = bytearray(message)
    tampered[span.start + 100] ^= 1
    decryptor = RangeDecryptor(open_message(header, [KEYRING]).cipher, layout, span)
    with pytest.raises(FrameAuthenticationError):
        decryptor.update(bytes(tampered[span.start : span.end]))


def test_a_short_span_is_truncated() -> None:
    _, message = make_message(4 * FRAME)
    header = parse_header(message)
    layout = MessageLayout.of(header, len(message))
    span = layout.span(0, 2 * FRAME)
    decryptor = RangeDecryptor(open_message(header, [KEYRING]).cipher, layout, span)
    decryptor.update(message[span.start : span.end - 1])
    with pytest.raises(TruncatedMessage):
        decryptor.finish()


STRIDE = FRAME + REGULAR_OVERHEAD


def checked_layout(
    message: bytes, chunk: int = 1000, claimed: MessageLayout | None = None
) -> MessageLayout:
    """The layout `message`'s length claims (or `claimed`), once the final frame there has
    vouched for it."""
    header = parse_header(message)
    claimed = claimed or MessageLayout.of(header, len(message))
    check = FinalFrameCheck(open_message(header, [KEYRING]).cipher, claimed)
    start, end = claimed.tail
    for offset in range(start, end, chunk):
        check.update(message[offset : min(end, offset + chunk)])
    return check.layout()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("size", [0, 1, FRAME - 8, FRAME, 5 * FRAME, 5 * FRAME + 77])
@pytest.mark.parametrize("chunk", [1, 3, 1000, 2 * FRAME])
def test_the_final_frame_vouches_for_a_whole_message(size: int, chunk: int, signed: bool) -> None:
    _, message = make_message(size, signed=signed)
    layout = checked_layout(message, chunk)
    assert layout == MessageLayout.of(parse_header(message), len(message))
    assert (layout.plaintext_length, layout.message_length) == (size, len(message))


def _body(message: bytes) -> int:
    """Where the first frame starts."""
    return parse_header(message).length


def _final(message: bytes) -> int:
    """Where the final frame starts (the messages here end in one of 77 bytes)."""
    return len(message) - FINAL_OVERHEAD - 77


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    # A whole number of frames looks like a message whose final frame holds FRAME - 8.
    "cut-at-a-frame-boundary": lambda m: m[: _body(m) + 3 * STRIDE],
    "cut-before-the-final-frame": lambda m: m[: _final(m)],
    "cut-inside-a-frame": lambda m: m[: _body(m) + 3 * STRIDE + 200],
    "cut-inside-the-final-frame": lambda m: m[:-1],
    "a-byte-appended": lambda m: m + b"\0",
    "a-frame-appended": lambda m: m + m[_body(m) : _body(m) + STRIDE],
    "a-frame-dropped": lambda m: m[: _body(m) + STRIDE] + m[_body(m) + 2 * STRIDE :],
    "another-messages-final-frame": lambda m: m[: _final(m)] + make_message(len(m))[1][_final(m) :],
    "final-frame-tampered": lambda m: m[:-5] + bytes([m[-5] ^ 1]) + m[-4:],
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_length_that_is_not_the_messages_is_refused(damage: Callable[[bytes], bytes]) -> None:
    """Each of these has a layout of its own, or none: never one its final frame vouches for."""
    _, message = make_message(5 * FRAME + 77)
    with pytest.raises((MessageFormatError, AuthenticationError)):
        checked_layout(damage(message))


SIGNED_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "footer-cut": lambda m: m[:-1],
    "footer-dropped": lambda m: m[:-105],
    "a-byte-appended": lambda m: m + b"\0",
    # As long as before, but the footer says its signature is one byte shorter.
    "footer-length-off-by-one": lambda m: m[:-105] + (102).to_bytes(2, "big") + m[-103:],
    "footer-length-impossible": lambda m: m[:-105] + (0xFFFF).to_bytes(2, "big") + m[-103:],
}


@pytest.mark.parametrize("damage", SIGNED_DAMAGE.values(), ids=SIGNED_DAMAGE.keys())
def test_a_signed_message_without_a_whole_footer_has_no_layout(
    damage: Callable[[bytes], bytes],
) -> None:
    """A range cannot check the footer's signature, but a footer of another form than the
    ones written, or none, is refused."""
    _, message = make_message(2 * FRAME + 77, signed=True)
    with pytest.raises((MessageFormatError, AuthenticationError)):
        checked_layout(damage(message))


def test_a_span_that_ends_the_message_must_end_in_its_final_frame() -> None:
    """Read with the layout of its own length, a message cut at a frame boundary ends in a
    regular frame exactly where that layout puts a final one: only the frame's kind tells."""
    data, message = make_message(5 * FRAME + 77)
    cut = message[: _body(message) + 3 * STRIDE]
    header = parse_header(cut)
    layout = MessageLayout.of(header, len(cut))
    span = layout.span(0, layout.plaintext_length - 1)
    decryptor = RangeDecryptor(open_message(header, [KEYRING]).cipher, layout, span)
    assert b"".join(decryptor.update(cut[span.start : span.end])) == data[: 3 * FRAME - 8]
    with pytest.raises(MessageFormatError):
        decryptor.finish()


def test_a_regular_frame_where_the_final_one_should_be_is_named_so() -> None:
    _, message = make_message(5 * FRAME + 77)
    with pytest.raises(MessageFormatError, match="no final frame where"):
        checked_layout(DAMAGE["cut-at-a-frame-boundary"](message))


def full_final_frame_message(frames: int) -> tuple[bytes, bytes]:
    """A message of whole frames that ends in a full final frame (L = F), as other ESDK
    writers may end one; sealstream and the Python ESDK end it in an empty one."""
    data, message = make_message(frames * FRAME)
    header = parse_header(message)
    final = sealer_for(header, KEYRING).seal(frames, memoryview(data[-FRAME:]), final=True)
    return data, message[: header.length + (frames - 1) * STRIDE] + bytes(final)


@pytest.mark.parametrize(
    ("first", "last"), [(0, 5 * FRAME - 1), (4 * FRAME, 5 * FRAME - 1), (4 * FRAME - 1, 4 * FRAME)]
)
def test_a_full_final_frame_vouches_for_its_layout_and_reads_by_range(
    first: int, last: int
) -> None:
    data, message = full_final_frame_message(5)
    layout = checked_layout(message)
    assert (layout.regular_frames, layout.final_frame_length) == (4, FRAME)
    header = parse_header(message)
    span = layout.span(first, last)
    decryptor = RangeDecryptor(open_message(header, [KEYRING]).cipher, layout, span)
    assert b"".join(decryptor.update(message[span.start : span.end])) == data[first : last + 1]
    decryptor.finish()


def signature_of_length(length: int) -> Callable[[ec.EllipticCurvePrivateKey, bytes], bytes]:
    """A footer signer that signs as other SDKs do, unpadded: a valid DER signature of
    `length` bytes, drawn until one comes out that long."""

    def sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
        while len(signature := key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA384())))) != length:
            pass
        return signature

    return sign


@pytest.mark.parametrize("length", [101, 102, 104])
@pytest.mark.parametrize("final", [0, 1, 77, FRAME - 1, FRAME])
def test_a_signed_message_of_any_footer_length_has_its_own_layout(
    monkeypatch: pytest.MonkeyPatch, length: int, final: int
) -> None:
    """Footers other than this package's (a signature of another length) move where the
    final frame ends, or starts; the final frame found says which, and ranges read true."""
    monkeypatch.setattr("envelope.footer._static_length_signature", signature_of_length(length))
    data, message = make_message(3 * FRAME + final, signed=True)
    assert int.from_bytes(message[-length - 2 : -length]) == length
    header = parse_header(message)
    layouts = []
    for claimed in MessageLayout.claims(header, len(message)):
        with suppress(MessageFormatError, AuthenticationError):
            layouts.append(checked_layout(message, claimed=claimed))
    assert [(x.plaintext_length, x.footer_length) for x in layouts] == [(len(data), length + 2)]
    for first, last in [(0, len(data) - 1), (len(data) - 1, len(data) - 1), (FRAME - 3, 2 * FRAME)]:
        if last < len(data):
            assert read_range(message, first, last, layout=layouts[0]) == data[first : last + 1]
