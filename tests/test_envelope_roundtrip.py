"""Round trips through Encryptor and Decryptor: sizes at frame edges, any chunking, any keyring."""

import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from envelope import (
    AesKeyring,
    DataKeyUnavailable,
    Decryptor,
    Encryptor,
    InvalidParameter,
    Keyring,
    MlKemKeyring,
    PlaintextTooShort,
    RsaKeyring,
    StateError,
)
from envelope.encrypt import FRAMES_AHEAD
from envelope.frames import (
    FINAL_OVERHEAD,
    REGULAR_OVERHEAD,
    REGULAR_PREFIX,
    FrameSealer,
    PendingFrame,
)
from tests.support.envelope import seal_frames, sealer_for

FRAME = 4096
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
AES_KEY = os.urandom(32)


def keyring_of(kind: str) -> Keyring:
    if kind == "aes":
        return AesKeyring("aes#1", AES_KEY)
    if kind == "rsa":
        return RsaKeyring("rsa#1", RSA_KEY)
    if kind == "mlkem768":
        return MlKemKeyring("pq#1", mlkem.MLKEM768PrivateKey.generate())
    return MlKemKeyring("pq#2", mlkem.MLKEM1024PrivateKey.generate())


def sealer_of(encryptor: Encryptor) -> FrameSealer:
    """A sealer under the key of the message `encryptor` writes."""
    return sealer_for(encryptor.header, keyring_of("aes"))


def pieces(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """`data` cut into pieces of the given sizes, cycling, then the rest."""
    offset, index = 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)] if sizes else len(data)
        yield data[offset : offset + size]
        offset += size
        index += 1


def encrypt(keyrings: list[Keyring], data: bytes, sizes: list[int], **options: object) -> bytes:
    encryptor = Encryptor(keyrings, frame_length=FRAME, **options)  # type: ignore[arg-type]
    return encrypt_with(encryptor, data, sizes)


def encrypt_with(
    encryptor: Encryptor, data: bytes, sizes: list[int], *, recycle: bool = False
) -> bytes:
    out = bytearray()
    for piece in pieces(data, sizes):
        for chunk in encryptor.update(piece):
            out += chunk
            if recycle:
                encryptor.recycle(chunk)
    for chunk in encryptor.finish():
        out += chunk
    return bytes(out)


def decrypt(keyrings: list[Keyring], message: bytes, sizes: list[int]) -> bytes:
    decryptor = Decryptor(keyrings)
    out = b"".join(p for piece in pieces(message, sizes) for p in decryptor.update(piece))
    decryptor.finish()
    return out


@pytest.mark.parametrize("kind", ["aes", "rsa", "mlkem768", "mlkem1024"])
@pytest.mark.parametrize("size", [0, 1, FRAME - 1, FRAME, FRAME + 1, 7 * FRAME, 7 * FRAME + 123])
def test_sizes_at_frame_edges_round_trip(kind: str, size: int) -> None:
    keyring = keyring_of(kind)
    data = os.urandom(size)
    message = encrypt([keyring], data, [1000])
    assert decrypt([keyring], message, [777]) == data


@pytest.mark.parametrize("size", [0, FRAME, 3 * FRAME, 3 * FRAME + 5])
def test_message_length_is_header_plus_frames(size: int) -> None:
    keyring = keyring_of("aes")
    encryptor = Encryptor([keyring], frame_length=FRAME)
    message = b"".join(encryptor.update(os.urandom(size)) + encryptor.finish())
    regular, final = divmod(size, FRAME)  # a whole number of frames ends with an empty final frame
    expected = encryptor.header.length + regular * (FRAME + REGULAR_OVERHEAD)
    assert len(message) == expected + FINAL_OVERHEAD + final


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=5 * FRAME + 300),
    encrypt_sizes=st.lists(st.integers(1, 3 * FRAME), max_size=6),
    decrypt_sizes=st.lists(st.integers(1, 3 * FRAME), max_size=6),
)
def test_any_chunking_round_trips(
    data: bytes, encrypt_sizes: list[int], decrypt_sizes: list[int]
) -> None:
    keyring = keyring_of("aes")
    message = encrypt([keyring], data, encrypt_sizes)
    assert decrypt([keyring], message, decrypt_sizes) == data


@settings(max_examples=20, deadline=None)
@given(
    size=st.sampled_from([0, 1, FRAME - 1, FRAME, FRAME + 1, 4 * FRAME + 1]),
    decrypt_sizes=st.lists(st.integers(1, 64), min_size=1, max_size=4),
)
def test_tiny_chunks_round_trip(size: int, decrypt_sizes: list[int]) -> None:
    keyring = keyring_of("aes")
    data = os.urandom(size)
    assert decrypt([keyring], encrypt([keyring], data, [3]), decrypt_sizes) == data


def test_each_keyring_of_a_multi_key_message_decrypts_alone() -> None:
    keyrings = [keyring_of(kind) for kind in ("aes", "rsa", "mlkem768", "mlkem1024")]
    data = os.urandom(2 * FRAME + 9)
    message = encrypt(keyrings, data, [FRAME])
    for keyring in keyrings:
        assert decrypt([keyring], message, [5000]) == data
    assert decrypt([keyring_of("aes"), keyrings[2]], message, []) == data


def test_public_keys_encrypt_but_cannot_decrypt() -> None:
    private = mlkem.MLKEM768PrivateKey.generate()
    for public_only, private_keyring in [
        (RsaKeyring("r#1", RSA_KEY.public_key()), RsaKeyring("r#1", RSA_KEY)),
        (MlKemKeyring("m#1", private.public_key()), MlKemKeyring("m#1", private)),
    ]:
        message = encrypt([public_only], b"secret", [])
        with pytest.raises(DataKeyUnavailable):
            decrypt([public_only], message, [])
        assert decrypt([private_keyring], message, []) == b"secret"


def test_encryption_context_is_carried_and_required_pairs_checked() -> None:
    keyring = keyring_of("aes")
    message = encrypt([keyring], b"x" * 10, [], context={"tenant": "t1", "purpose": "test"})
    decryptor = Decryptor([keyring], required_context={"tenant": "t1"})
    assert b"".join(decryptor.update(message)) == b"x" * 10
    decryptor.finish()
    assert decryptor.header is not None
    assert decryptor.header.context == {"tenant": "t1", "purpose": "test"}


@pytest.mark.parametrize("frame_length", [0, 4095, 4096 + 1, 16 * 1024 * 1024 + 128])
def test_frame_lengths_the_format_refuses(frame_length: int) -> None:
    with pytest.raises(InvalidParameter):
        Encryptor([keyring_of("aes")], frame_length=frame_length)


def test_bad_encryptor_arguments_are_refused() -> None:
    with pytest.raises(InvalidParameter):
        Encryptor([])
    with pytest.raises(InvalidParameter):
        Encryptor([keyring_of("aes")], context={"aws-crypto-public-key": "x"})
    with pytest.raises(InvalidParameter):
        AesKeyring("k#1", b"short")
    with pytest.raises(InvalidParameter):
        RsaKeyring("k#1", rsa.generate_private_key(public_exponent=65537, key_size=1024))


def test_finished_encryptor_and_decryptor_refuse_more() -> None:
    keyring = keyring_of("aes")
    encryptor = Encryptor([keyring], frame_length=FRAME)
    message = b"".join(encryptor.update(b"abc") + encryptor.finish())
    with pytest.raises(StateError):
        encryptor.update(b"more")
    with pytest.raises(StateError):
        encryptor.finish()
    decryptor = Decryptor([keyring])
    decryptor.update(message)
    decryptor.finish()
    with pytest.raises(StateError):
        decryptor.update(b"")


def test_regular_frames_leave_the_encryptor_as_soon_as_they_are_whole() -> None:
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    first = encryptor.update(b"a" * (FRAME - 1))
    assert len(first) == 1  # the header only
    assert len(encryptor.update(b"a")) == 1  # one whole frame
    assert len(encryptor.update(b"a" * (2 * FRAME))) == 2


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 3 * FRAME + 7),
    sizes=st.lists(st.integers(1, 2 * FRAME), min_size=1, max_size=5),
)
@pytest.mark.parametrize("recycle", [False, True])
def test_frames_sealed_piece_by_piece_are_those_sealed_whole(
    size: int, sizes: list[int], recycle: bool
) -> None:
    # The encryptor seals each piece into its frame as it comes, and re-seals a pending
    # frame as the final one when the message ends inside it: the bytes must be exactly
    # the frames sealed in one go, also when each frame is sealed into a spent one.
    plaintext = os.urandom(size)
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    message = encrypt_with(encryptor, plaintext, sizes, recycle=recycle)
    header = encryptor.header.to_bytes()
    assert message[: len(header)] == header
    assert message[len(header) :] == seal_frames(sealer_of(encryptor), plaintext, FRAME)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 3 * FRAME + 7),
    shortfall=st.integers(0, FRAME + 3),
    sizes=st.lists(st.integers(1, 2 * FRAME), min_size=1, max_size=5),
)
@pytest.mark.parametrize("recycle", [False, True])
def test_streamed_frames_are_those_sealed_whole(
    size: int, shortfall: int, sizes: list[int], recycle: bool
) -> None:
    # With a length promised, the frames within it leave piece by piece, prefix first and
    # tag last, and the rest are held: whatever the promise (up to the plaintext's
    # length) and the pieces, the bytes must be exactly the frames sealed in one go.
    plaintext = os.urandom(size)
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    encryptor.expect_length(max(0, size - shortfall))
    message = encrypt_with(encryptor, plaintext, sizes, recycle=recycle)
    header = encryptor.header.to_bytes()
    assert message[: len(header)] == header
    assert message[len(header) :] == seal_frames(sealer_of(encryptor), plaintext, FRAME)


def test_streamed_frames_leave_as_their_plaintext_comes() -> None:
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    encryptor.expect_length(2 * FRAME + 1)
    plaintext = os.urandom(2 * FRAME + 1)
    [header, first] = encryptor.update(plaintext[:100])
    assert len(first) == REGULAR_PREFIX.size + 100  # the first frame's prefix and 100 bytes
    assert encryptor.update(b"") == []
    [second] = encryptor.update(plaintext[100 : FRAME + 50])
    # The first frame's rest and tag, the second's prefix and first 50 bytes.
    assert len(second) == FRAME - 100 + REGULAR_OVERHEAD + 50
    [third] = encryptor.update(plaintext[FRAME + 50 :])  # the second frame's rest and tag
    message = b"".join([header, first, second, third, *encryptor.finish()])
    assert message[len(header) :] == seal_frames(sealer_of(encryptor), plaintext, FRAME)


def test_a_recycled_piece_carries_the_next() -> None:
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    encryptor.expect_length(3 * FRAME)
    [header, first] = encryptor.update(b"a" * 100)
    assert isinstance(first, memoryview)
    encryptor.recycle(header)  # not a streamed piece: ignored
    encryptor.recycle(first)
    [second] = encryptor.update(b"a" * 50)
    assert isinstance(second, memoryview) and second.obj is first.obj
    [third] = encryptor.update(b"a" * 50)
    assert isinstance(third, memoryview) and third.obj is not first.obj  # not given back


@pytest.mark.parametrize("size", [0, FRAME - 1, FRAME, FRAME + 1, 2 * FRAME - 1, 2 * FRAME])
def test_a_plaintext_shorter_than_promised_fails_only_inside_a_streamed_frame(size: int) -> None:
    # Frames 1 and 2 are streamed; the third, which the promise ends inside, is held.
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    encryptor.expect_length(2 * FRAME + 1)
    plaintext = os.urandom(size)
    message = b"".join(encryptor.update(plaintext))
    if size % FRAME:
        with pytest.raises(PlaintextTooShort):
            encryptor.finish()
        with pytest.raises(StateError):
            encryptor.update(b"a")
    else:  # ended at a frame's edge: a whole message, with an empty final frame
        message += b"".join(encryptor.finish())
        assert message == encryptor.header.to_bytes() + seal_frames(
            sealer_of(encryptor), plaintext, FRAME
        )


PROMISED_FRAMES = 2 * FRAMES_AHEAD + 3  # three batches of streamed frames started ahead


@pytest.mark.parametrize(
    "frames", [0, 1, FRAMES_AHEAD - 1, FRAMES_AHEAD, FRAMES_AHEAD + 1, PROMISED_FRAMES]
)
def test_a_plaintext_ending_at_any_frame_edge_within_the_promise_is_a_whole_message(
    frames: int,
) -> None:
    # Streamed frames are started several at a time, each taking its sequence number
    # then: ending at an earlier frame's edge, the final frame must take the next one.
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    encryptor.expect_length(PROMISED_FRAMES * FRAME)
    plaintext = os.urandom(frames * FRAME)
    message = encrypt_with(encryptor, plaintext, [FRAME // 3 + 1, 2 * FRAME + 5], recycle=True)
    header = encryptor.header.to_bytes()
    assert message[len(header) :] == seal_frames(sealer_of(encryptor), plaintext, FRAME)
    assert decrypt([keyring_of("aes")], message, [1000]) == plaintext


def test_a_length_is_promised_before_any_plaintext() -> None:
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    encryptor.update(b"a")
    with pytest.raises(StateError):
        encryptor.expect_length(FRAME)
    with pytest.raises(InvalidParameter):
        Encryptor([keyring_of("aes")], frame_length=FRAME).expect_length(-1)


def test_a_recycled_frame_carries_a_later_one() -> None:
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    half = b"a" * (FRAME // 2)
    [header] = encryptor.update(half)
    [first] = encryptor.update(half)
    encryptor.recycle(header)  # not a frame: ignored
    encryptor.recycle(first)
    assert encryptor.update(half) == []
    [second] = encryptor.update(half)
    assert second is first
    [third] = encryptor.update(half) + encryptor.update(half)
    assert third is not first  # nothing was given back this time


def test_a_frame_still_being_sealed_cannot_be_given_back() -> None:
    encryptor = Encryptor([keyring_of("aes")], frame_length=FRAME)
    [_, frame] = encryptor.update(b"a" * (FRAME - 1)) + encryptor.update(b"a")
    encryptor.recycle(frame)
    encryptor.update(b"a")  # the next frame is now being sealed into it
    with pytest.raises(StateError):
        encryptor.recycle(frame)


def test_a_pending_frame_takes_only_a_buffer_of_its_size() -> None:
    cipher = FrameSealer(os.urandom(32), os.urandom(32))
    with pytest.raises(InvalidParameter):
        PendingFrame(cipher, 1, FRAME, bytearray(FRAME))


@pytest.mark.parametrize("second", ["regular", "final"])
@pytest.mark.parametrize("first", ["regular", "final"])
def test_a_pending_frame_is_sealed_once(first: str, second: str) -> None:
    """Either way of sealing a pending frame tags its IV: a second sealing, either way,
    would make a second tag under that IV."""
    frame = PendingFrame(FrameSealer(os.urandom(32), os.urandom(32)), 1, FRAME)
    frame.write(memoryview(bytes(FRAME)))
    seal = {"regular": frame.seal_regular, "final": frame.seal_final}
    seal[first]()
    with pytest.raises(StateError):
        seal[second]()
