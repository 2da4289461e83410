"""The frame chain resumable uploads record in place of a SHA-256 (docs/FORMAT.md §17):
fed in any chunks, it is the documented formula over the plaintext cut in frames."""

import hashlib

import pytest

from services.frame_chain import FrameChain
from tests.support.data import random_bytes

F = 4096


def documented(data: bytes, frame_length: int) -> str:
    chain = bytes(32)
    for i in range(len(data) // frame_length + 1):
        frame = data[i * frame_length : (i + 1) * frame_length]
        chain = hashlib.sha256(chain + hashlib.sha256(frame).digest()).digest()
    return chain.hex()


@pytest.mark.parametrize("size", [0, 1, F - 1, F, F + 1, 3 * F, 3 * F + 77])
@pytest.mark.parametrize("chunk", [1000, F, 3 * F + 5])
def test_the_chain_is_the_documented_formula_however_it_is_fed(size: int, chunk: int) -> None:
    data = random_bytes(size, seed=size)
    chain = FrameChain(F)
    for start in range(0, size, chunk):
        chain.update(data[start : start + chunk])

    assert chain.hexdigest() == documented(data, F)
    assert chain.hexdigest() != hashlib.sha256(data).hexdigest()
