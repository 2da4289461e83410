"""No (key, IV) seals twice within a message: every tag an `Encryptor` makes, across
messages that end at every kind of frame boundary, with and without a declared length.

Two places begin a sealing under an IV that may then be sealed again: a frame sealed
piece by piece that turns out to be the final one (`PendingFrame.seal_final`), and
streamed frames started ahead that the message never reaches. Both are safe only while
the first sealing's tag is never made. These tests watch every tag made.
"""

import ast
from collections import Counter
from pathlib import Path

import pytest

from envelope import AesKeyring, Encryptor, PlaintextTooShort, parse_header
from envelope.encrypt import FRAMES_AHEAD
from tests.support.data import random_bytes
from tests.support.envelope import chunked, decrypt_all, frame_count, frame_offset
from tests.support.project import REPO, wheel_packages
from tests.support.seals import SEALING_MODULES, SealRecorder

F = 4096
KEY_NAME, KEY = "nonce-test#1", bytes(range(32))

# Lengths that end a message at each kind of boundary: nothing, inside the first frame, at
# a frame's edge, inside a later frame, at the edge of a batch of streamed frames started
# ahead, and past it.
SIZES = [
    0,
    1,
    F - 1,
    F,
    F + 1,
    3 * F,
    3 * F + 100,
    FRAMES_AHEAD * F,
    (FRAMES_AHEAD + 2) * F,
    (FRAMES_AHEAD + 2) * F + 7,
]
CHUNKINGS = {"whole": None, "small": 1000, "frames": F, "ragged": [1, F + 3, 17, 2 * F - 5]}


def promised_lengths(size: int) -> dict[str, int | None]:
    """None: held frames only. Otherwise the declared length: the whole plaintext, less
    than it (frames after it are held), nothing, or, for a plaintext that ends at a
    frame's edge, more (the frames started ahead past its end go unused)."""
    promises = {"none": None, "exact": size, "less": max(0, size - F - 1), "zero": 0}
    return promises | ({"more": size + 2 * F} if size % F == 0 else {})


def seal_message(
    recorder: SealRecorder, data: bytes, chunking: int | list[int] | None, promise: int | None
) -> tuple[bytes, bytes]:
    """The whole message for `data` fed in `chunking`, each buffer copied and handed back
    as a caller does; and its encryption key."""
    encryptor = Encryptor([AesKeyring(KEY_NAME, KEY)], frame_length=F)  # made watched
    if promise is not None:
        encryptor.expect_length(promise)
    out = []
    for chunk in chunked(data, chunking) if data else []:
        for piece in encryptor.update(chunk):
            out.append(bytes(piece))
            encryptor.recycle(piece)
    out += [bytes(piece) for piece in encryptor.finish()]
    ((_, _, key),) = recorder.derivations
    return b"".join(out), key


def tagged_ivs(recorder: SealRecorder, key: bytes) -> list[int]:
    return sorted(int.from_bytes(seal.iv, "big") for seal in recorder.seals if seal.key == key)


def stored_ivs(message: bytes) -> list[int]:
    """The IV each frame of the message carries, in order."""
    ivs = []
    for index in range(frame_count(message) + 1):  # the regular frames and the final one
        at = frame_offset(message, index)
        final = message[at : at + 4] == b"\xff\xff\xff\xff"
        start = at + (8 if final else 4)
        ivs.append(int.from_bytes(message[start : start + 12], "big"))
    return ivs


@pytest.mark.parametrize("chunking", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("size", SIZES)
def test_each_iv_is_tagged_once_per_message(
    size: int, chunking: int | list[int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(size, seed=size)
    for name, promise in promised_lengths(size).items():
        recorder = SealRecorder()
        recorder.install(monkeypatch)

        message, key = seal_message(recorder, data, chunking, promise)

        frames = size // F + 1  # the regular frames, then the final one
        assert recorder.repeated() == [], name
        assert tagged_ivs(recorder, key) == list(range(frames + 1)), name  # header: IV 0
        assert stored_ivs(message) == list(range(1, frames + 1)), name
        assert decrypt_all([AesKeyring(KEY_NAME, KEY)], message) == data, name
        wraps = [seal for seal in recorder.seals if seal.key != key]
        assert [seal.where for seal in wraps] == ["envelope.keyrings.aes"], name


@pytest.mark.parametrize("size", [1, F - 1, F + 5, (FRAMES_AHEAD + 1) * F + 5])
def test_a_message_cut_short_inside_a_streamed_frame_tags_nothing_twice(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plaintext that ends inside a frame already handed out as regular: no final frame
    is sealed, and no IV is tagged twice."""
    recorder = SealRecorder()
    recorder.install(monkeypatch)
    encryptor = Encryptor([AesKeyring(KEY_NAME, KEY)], frame_length=F)
    encryptor.expect_length(size - size % F + 2 * F)
    for chunk in chunked(random_bytes(size), 1000):
        encryptor.update(chunk)

    with pytest.raises(PlaintextTooShort):
        encryptor.finish()

    ((_, _, key),) = recorder.derivations
    assert recorder.repeated() == []
    assert tagged_ivs(recorder, key) == list(range(size // F + 1))  # header, full frames


@pytest.mark.parametrize("size", [0, F, 3 * F + 100])
def test_a_signed_message_tags_each_iv_once(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signing adds a footer and no sealing: the same IVs, each tagged once."""
    recorder = SealRecorder()
    recorder.install(monkeypatch)
    encryptor = Encryptor([AesKeyring(KEY_NAME, KEY)], frame_length=F, signed=True)
    pieces = [bytes(p) for c in chunked(random_bytes(size), 1000) for p in encryptor.update(c)]
    message = b"".join(pieces + [bytes(p) for p in encryptor.finish()])

    ((_, _, key),) = recorder.derivations
    assert recorder.repeated() == []
    assert tagged_ivs(recorder, key) == list(range(size // F + 2))  # header, frames, final
    assert decrypt_all([AesKeyring(KEY_NAME, KEY)], message) == random_bytes(size)


def test_messages_never_share_a_key() -> None:
    """Each message draws its own data key and message ID: no header is tagged under a
    key another message used."""
    recorder = SealRecorder()
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder.install(monkeypatch)
        keyring = AesKeyring(KEY_NAME, KEY)
        headers = [Encryptor([keyring], frame_length=F).header for _ in range(50)]

    messages = recorder.messages()
    assert len(messages) == len(set(messages)) == 50
    assert len({header.message_id for header in headers}) == 50
    assert all(parse_header(header.to_bytes()) == header for header in headers)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
    return names


def test_every_module_that_seals_is_watched() -> None:
    """A module that imports AES-GCM or `Cipher` seals with it, and must be watched by
    the recorder the nonce tests rely on. Every package the wheel ships is searched: the
    list comes from pyproject.toml, so a new package cannot be missed."""
    sealing = Counter[str]()
    for package in wheel_packages():
        for path in (REPO / package).rglob("*.py"):
            imported = _imports(path) & {"AESGCM", "Cipher", "AESGCMSIV", "AESOCB3", "AESCCM"}
            if imported:
                module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                sealing[module] += len(imported)
    watched = {module.__name__: len(names) for module, names in SEALING_MODULES.items()}
    assert dict(sealing) == watched
