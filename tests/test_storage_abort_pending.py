"""`ObjectStore.abort_pending`: clearing the uploads a killed process left behind, on every
backend, without touching finished objects or uploads elsewhere, nor, in a local
directory, a live writer's."""

from pathlib import Path

import pytest

from storage import MIN_PART_SIZE, LocalStore, ObjectNotFound, ObjectStore, StorageError
from tests.conftest import S3StoreFactory
from tests.support.storage import leave_pending

# Over one part, so that S3 has really started a multipart upload (smaller objects are
# buffered until `complete` and sent as one PUT).
PART_AND_A_BIT = MIN_PART_SIZE + 1


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


def test_a_live_writer_whose_upload_was_aborted_cannot_complete(
    make_s3_store: S3StoreFactory,
) -> None:
    """S3 cannot tell a live upload from one a killed process left."""
    store = make_s3_store()
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


def test_a_live_local_writer_keeps_its_upload(tmp_path: Path) -> None:
    """Another writer of the same key (a user's encrypt begun after the worker that left
    an upload there was killed) holds its file: the rerun's abort removes only the dead
    one's, and the live writer completes."""
    store = LocalStore(tmp_path / "bucket")
    leave_pending(store, "out/a")
    writer = store.multipart("out/a")
    writer.write(b"live")

    assert store.abort_pending("out/a", exact=True) == 1

    assert store.pending_uploads() == ["out/a"]
    writer.complete()
    assert store.get("out/a") == b"live"
    assert store.pending_uploads() == []
