"""`ObjectStore.abort_pending`: clearing the uploads a killed process left behind, on every
backend, without touching finished objects or uploads elsewhere, nor, in a local
directory, a live writer's; with `upload_ids`, only the uploads named, which a writer's
`on_upload` told before sending anything."""

from pathlib import Path

import pytest

from storage import (
    MIN_PART_SIZE,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    PartUpload,
    StorageError,
)
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


def test_upload_ids_abort_only_the_uploads_named(store: ObjectStore) -> None:
    """A rerun aborts what its own killed attempt left, as its journal names it: another
    dead writer's upload of the same key and a resumable upload between two of its parts
    (no writer holds its file then) stay, and the resumable one still completes."""
    own = leave_pending(store, "out/a")
    other = leave_pending(store, "out/a")
    resumable = store.start_parts("out/a")
    part = store.put_part(resumable, 1, 0, b"a resumable upload's first part")

    assert store.abort_pending("out/", upload_ids={own, "no-such-upload"}) == 1
    assert store.abort_pending("out/", upload_ids={own}) == 0  # gone: passed over

    assert store.pending_uploads() == ["out/a"]
    assert store.complete_parts(resumable, [part], if_absent=True).size == part.size
    assert store.abort_pending("out/a", exact=True, upload_ids={other}) == 1
    assert store.pending_uploads() == []


def test_a_writer_tells_of_its_upload_before_sending_any_of_it(store: ObjectStore) -> None:
    """On S3 once the object outgrows a part (a smaller one, sent whole, tells nothing);
    in a local directory as it opens, before its file exists."""
    told: list[tuple[str, str, bool]] = []

    def on_upload(key: str, upload_id: str) -> None:
        if isinstance(store, LocalStore):
            sent = bool(store.pending_uploads("out/"))
        else:
            sent = bool(store.listed_parts(PartUpload(key, upload_id, {})))
        told.append((key, upload_id, sent))

    with store.multipart("out/small", on_upload=on_upload) as small:
        small.write(b"sent whole")
        small.complete()
    with store.multipart("out/large", on_upload=on_upload) as large:
        large.write(bytes(PART_AND_A_BIT))
        large.complete()

    local = isinstance(store, LocalStore)
    assert [(key, sent) for key, _, sent in told] == [
        *([("out/small", False)] if local else []),
        ("out/large", False),
    ]
    assert len({upload_id for _, upload_id, _ in told}) == len(told)
    assert store.pending_uploads() == []


def test_an_upload_its_keeper_could_not_note_is_aborted(store: ObjectStore) -> None:
    def unkept(key: str, upload_id: str) -> None:
        raise StorageError("the journal is unavailable", key)

    with (
        pytest.raises(StorageError, match="journal"),
        store.multipart("out/large", on_upload=unkept) as writer,
    ):
        writer.write(bytes(PART_AND_A_BIT))
        writer.complete()

    assert store.pending_uploads() == []
    assert list(store.list("out/")) == []
