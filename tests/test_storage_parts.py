"""Uploads written part by part across processes (`start_parts`, `put_part`,
`complete_parts`, `abort_parts`), on every backend: what resumable uploads stand on."""

import itertools

import pytest

from storage import (
    MIN_PART_SIZE,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    StorageError,
)
from tests.support.data import random_bytes

DATA = random_bytes(2 * MIN_PART_SIZE + 12_345, seed=24)
CUTS = (0, MIN_PART_SIZE, 2 * MIN_PART_SIZE, len(DATA))


def test_parts_make_the_object_once_completed(store: ObjectStore) -> None:
    upload = store.start_parts("d/obj", metadata={"kind": "parts"})
    parts = []
    for number, (start, end) in enumerate(itertools.pairwise(CUTS), start=1):
        parts.append(store.put_part(upload, number, start, DATA[start:end]))
        assert store.pending_uploads() == ["d/obj"]
        with pytest.raises(ObjectNotFound):
            store.head("d/obj")

    info = store.complete_parts(upload, parts, if_absent=True)

    assert store.get("d/obj") == DATA
    assert (info.size, info.metadata) == (len(DATA), {"kind": "parts"})
    assert store.pending_uploads() == []


def test_a_part_put_again_replaces_the_first(store: ObjectStore) -> None:
    upload = store.start_parts("obj")
    first = store.put_part(upload, 1, 0, b"x" * MIN_PART_SIZE)
    first = store.put_part(upload, 1, 0, DATA[:MIN_PART_SIZE])
    last = store.put_part(upload, 2, MIN_PART_SIZE, DATA[MIN_PART_SIZE:])

    store.complete_parts(upload, [first, last], if_absent=False)

    assert store.get("obj") == DATA


def test_aborted_parts_leave_nothing_and_take_no_more(store: ObjectStore) -> None:
    upload = store.start_parts("obj")
    store.put_part(upload, 1, 0, DATA[:MIN_PART_SIZE])

    store.abort_parts(upload)
    store.abort_parts(upload)

    assert store.pending_uploads() == []
    with pytest.raises(StorageError):
        store.put_part(upload, 2, MIN_PART_SIZE, DATA[MIN_PART_SIZE:])
    assert store.pending_uploads() == []


def test_completing_over_an_object_if_absent_is_refused(store: ObjectStore) -> None:
    store.put("obj", b"already there")
    upload = store.start_parts("obj")
    part = store.put_part(upload, 1, 0, b"new")

    with pytest.raises(ObjectExists):
        store.complete_parts(upload, [part], if_absent=True)

    assert store.get("obj") == b"already there"
    store.abort_parts(upload)
    assert store.pending_uploads() == []


def test_parts_with_a_gap_are_refused(store: ObjectStore) -> None:
    upload = store.start_parts("obj")
    first = store.put_part(upload, 1, 0, DATA[:MIN_PART_SIZE])
    third = store.put_part(upload, 3, 2 * MIN_PART_SIZE, DATA[2 * MIN_PART_SIZE :])

    with pytest.raises(StorageError):
        store.complete_parts(upload, [first, third], if_absent=True)

    store.abort_parts(upload)
    assert store.pending_uploads() == []
