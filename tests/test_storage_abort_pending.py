"""`ObjectStore.abort_pending`: clearing the uploads a killed process left behind, on every
backend, without touching finished objects or uploads elsewhere."""

import pytest

from storage import MIN_PART_SIZE, ObjectNotFound, ObjectStore, StorageError

# Over one part, so that S3 has really started a multipart upload (smaller objects are
# buffered until `complete` and sent as one PUT).
PART_AND_A_BIT = MIN_PART_SIZE + 1


def leave_pending(store: ObjectStore, key: str) -> None:
    """An upload of `key` that nobody will finish, as a killed worker leaves it."""
    writer = store.multipart(key)
    writer.write(b"x" * PART_AND_A_BIT)


def test_aborts_only_the_uploads_under_the_prefix(store: ObjectStore) -> None:
    leave_pending(store, "out/a")
    leave_pending(store, "out/deep/b")
    leave_pending(store, "other/c")
    store.put("out/done", b"finished")

    assert store.abort_pending("out/") == 2

    assert store.pending_uploads() == ["other/c"]
    assert store.get("out/done") == b"finished"
    with pytest.raises(ObjectNotFound):
        store.head("out/a")
    assert store.abort_pending("out/") == 0


def test_a_live_writer_whose_upload_was_aborted_cannot_complete(store: ObjectStore) -> None:
    writer = store.multipart("out/live")
    writer.write(b"x" * PART_AND_A_BIT)

    assert store.abort_pending("out/") == 1

    with pytest.raises(StorageError):
        writer.complete()
    assert store.pending_uploads() == []
    assert list(store.list("out/")) == []


def test_exact_aborts_the_uploads_of_one_key_only(store: ObjectStore) -> None:
    """A rerun clears what its killed predecessor left on the one object it was writing,
    not the uploads of keys that merely begin with that key's name."""
    leave_pending(store, "out/a")
    leave_pending(store, "out/a")
    leave_pending(store, "out/ab")
    store.put("out/a", b"finished")

    assert store.abort_pending("out/a", exact=True) == 2

    assert store.pending_uploads() == ["out/ab"]
    assert store.get("out/a") == b"finished"
    assert store.abort_pending("out/a", exact=True) == 0
