"""The object-store contract, run against every backend (a local directory and S3 on moto),
and the `open_store` factory."""

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from storage import (
    MIN_PART_SIZE,
    BucketNotFound,
    InvalidMetadata,
    InvalidRange,
    LocalStore,
    ObjectExists,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    PreconditionFailed,
    S3Store,
    SmallObject,
    StorageError,
    open_store,
)
from tests.support.data import pieces, random_bytes

# Bigger than two minimum parts, and not a multiple of anything, so the last part is short.
MULTIPART_SIZE = 2 * MIN_PART_SIZE + 1_234_567
ODD_CHUNK = 1_000_003  # crosses part boundaries at a different offset every time


def write_multipart(store: ObjectStore, key: str, data: bytes, *, if_absent: bool = False) -> None:
    with store.multipart(key, if_absent=if_absent) as writer:
        for chunk in pieces(data, ODD_CHUNK):
            writer.write(chunk)
        writer.complete()


def test_put_then_get_head_and_delete(store: ObjectStore) -> None:
    info = store.put("docs/a.txt", b"hello", metadata={"content-kind": "greeting"})

    assert store.get("docs/a.txt") == b"hello"
    assert info == store.head("docs/a.txt")
    assert (info.key, info.size, info.metadata) == ("docs/a.txt", 5, {"content-kind": "greeting"})
    assert info.last_modified.utcoffset() is not None
    store.delete("docs/a.txt")
    with pytest.raises(ObjectNotFound):
        store.get("docs/a.txt")


def test_put_replaces_content_and_metadata(store: ObjectStore) -> None:
    first = store.put("k", b"one", metadata={"version": "1"})
    second = store.put("k", b"two!", metadata={"version": "2"})

    assert store.get("k") == b"two!"
    assert store.head("k") == second
    assert second.etag != first.etag


def test_a_small_object_is_read_with_the_etag_of_its_version_and_a_large_one_refused(
    store: ObjectStore,
) -> None:
    first = store.put("k", b"one")
    small = store.get_small("k", 3)
    assert (small.data, small.etag) == (b"one", first.etag)
    second = store.put("k", b"two!")
    assert store.get_small("k", 4) == SmallObject(b"two!", second.etag)
    with pytest.raises(ObjectTooLarge):
        store.get_small("k", 3)
    with pytest.raises(ObjectNotFound):
        store.get_small("missing", 3)


def test_missing_objects_raise_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("missing")
    with pytest.raises(ObjectNotFound):
        store.head("missing")
    with pytest.raises(ObjectNotFound):
        store.read("missing")


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put("k", b"x")
    store.delete("k")
    store.delete("k")
    store.delete("never/existed")
    assert list(store.list()) == []


def test_list_returns_keys_under_prefix_in_order_across_pages(store: ObjectStore) -> None:
    # "-" and "." sort before "/", and "0" after it: a naive directory walk gets this wrong.
    tricky = ["p/a-c", "p/a.b", "p/a/b", "p/a/c/d", "p/a0", "p/ab"]
    numbered = [f"p/n/{number:02d}" for number in range(25)]
    for key in tricky + numbered + ["other/x", "p.txt", "q/p/x"]:
        store.put(key, key.encode())

    listed = list(store.list("p/"))

    assert [info.key for info in listed] == sorted(tricky + numbered)
    assert all(info.size == len(info.key) and info.metadata == {} for info in listed)
    assert [info.key for info in store.list("p/a")] == tricky
    assert [info.key for info in store.list("p/n/1")] == [f"p/n/1{digit}" for digit in range(10)]
    assert [info.key for info in store.list("nothing/")] == []
    # A cursor: what follows it, on whichever page that starts.
    after = [info.key for info in store.list("p/", start_after="p/a0")]
    assert after == sorted(tricky + numbered)[5:]
    assert next(info.key for info in store.list("p/", start_after="p/n/20")) == "p/n/21"


def test_list_carries_size_and_etag_but_not_metadata(store: ObjectStore) -> None:
    info = store.put("k", b"data", metadata={"a": "1"})

    (listed,) = store.list()

    assert (listed.key, listed.size, listed.etag, listed.metadata) == ("k", 4, info.etag, {})


def test_put_if_absent_refuses_an_existing_key(store: ObjectStore) -> None:
    store.put("k", b"first", metadata={"owner": "first"}, if_absent=True)

    with pytest.raises(ObjectExists):
        store.put("k", b"second", metadata={"owner": "second"}, if_absent=True)

    assert store.get("k") == b"first"
    assert store.head("k").metadata == {"owner": "first"}


def test_a_whole_object_completed_if_absent_waits_over_a_taken_key(store: ObjectStore) -> None:
    with store.multipart("free") as writer:
        writer.write(b"new")
        assert writer.send_whole({"v": "1"})
        written = writer.complete_if_absent()
    assert written is not None and store.head("free").etag == written.etag
    assert store.get("free") == b"new"

    store.put("taken", b"old", metadata={"v": "old"})
    with store.multipart("taken") as writer:
        writer.write(b"new")
        assert writer.send_whole({"v": "1"})
        assert writer.complete_if_absent() is None
        assert (store.get("taken"), store.head("taken").metadata) == (b"old", {"v": "old"})
        assert writer.send_whole({"v": "2"})
        writer.complete()  # as opened: over what is there
    assert (store.get("taken"), store.head("taken").metadata) == (b"new", {"v": "2"})
    assert store.pending_uploads() == []


def test_put_if_match_replaces_only_the_version_it_names(store: ObjectStore) -> None:
    first = store.put("k", b"one", metadata={"version": "1"})
    second = store.put("k", b"two", metadata={"version": "2"}, if_match=first.etag)

    with pytest.raises(PreconditionFailed):
        store.put("k", b"three", if_match=first.etag)
    with pytest.raises(ObjectNotFound):
        store.put("absent", b"x", if_match=first.etag)

    assert store.get("k") == b"two"
    assert store.head("k") == second
    assert list(store.list()) == [replace(second, metadata={})]


def test_a_multipart_upload_if_match_replaces_only_the_version_it_names(
    store: ObjectStore,
) -> None:
    """Over one part, so that S3 completes a multipart upload: the version named must
    still be there when it completes."""
    first = store.put("k", b"one")
    stale = store.multipart("k", if_match=first.etag)
    stale.write(random_bytes(MIN_PART_SIZE + 1))
    gone = store.multipart("absent-later", if_match=store.put("absent-later", b"x").etag)
    gone.write(random_bytes(MIN_PART_SIZE + 1))
    second = store.put("k", b"two")
    store.delete("absent-later")

    with pytest.raises(PreconditionFailed):
        stale.complete()
    with pytest.raises(ObjectNotFound):
        gone.complete()

    assert store.head("k") == second
    assert store.pending_uploads() == []


def test_if_absent_and_if_match_exclude_each_other(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="exclude"):
        store.multipart("k", if_absent=True, if_match="etag")


def test_racing_put_if_absent_has_exactly_one_winner(store: ObjectStore) -> None:
    contenders = 8
    start = threading.Barrier(contenders)
    outcomes: list[bytes | None] = [None] * contenders

    def contend(index: int) -> None:
        data = f"contender {index}".encode()
        start.wait()
        try:
            store.put("race", data, if_absent=True)
        except ObjectExists:
            return
        outcomes[index] = data

    threads = [threading.Thread(target=contend, args=(index,)) for index in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [data for data in outcomes if data is not None]
    assert len(winners) == 1
    assert store.get("race") == winners[0]


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, None), (0, 1000), (0, 1), (999, None), (999, 1000), (123, 457), (1000, None), (5, 5)],
)
def test_read_streams_the_requested_range(store: ObjectStore, start: int, end: int | None) -> None:
    data = random_bytes(1000)
    store.put("k", data)

    chunks = list(store.read("k", start, end, chunk_size=100))

    assert b"".join(chunks) == data[start:end]
    assert all(0 < len(chunk) <= 100 for chunk in chunks)


@pytest.mark.parametrize(
    ("start", "end"), [(0, 1001), (1001, None), (10, 9), (-1, 5), (2000, 3000)]
)
def test_read_outside_the_object_raises_invalid_range(
    store: ObjectStore, start: int, end: int | None
) -> None:
    store.put("k", random_bytes(1000))
    with pytest.raises(InvalidRange):
        store.read("k", start, end)


def test_read_of_an_empty_object_is_empty(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert list(store.read("empty")) == []
    with pytest.raises(InvalidRange):
        store.read("empty", 0, 1)


def test_multipart_round_trip_of_several_parts(store: ObjectStore) -> None:
    data = random_bytes(MULTIPART_SIZE)

    with store.multipart("big", metadata={"parts": "many"}) as writer:
        for chunk in pieces(data, ODD_CHUNK):
            writer.write(memoryview(chunk))
        assert writer.bytes_written == len(data)
        info = writer.complete()

    assert (info.size, info.metadata) == (len(data), {"parts": "many"})
    assert store.head("big") == info
    assert b"".join(store.read("big")) == data
    assert (
        b"".join(store.read("big", MIN_PART_SIZE - 10, MIN_PART_SIZE + 10))
        == (data[MIN_PART_SIZE - 10 : MIN_PART_SIZE + 10])
    )
    assert store.pending_uploads() == []


def test_multipart_if_absent_loses_to_an_existing_object(store: ObjectStore) -> None:
    store.put("big", b"already here")

    with pytest.raises(ObjectExists):
        write_multipart(store, "big", random_bytes(MULTIPART_SIZE), if_absent=True)

    assert store.get("big") == b"already here"
    assert store.pending_uploads() == []


def test_abort_leaves_no_object_and_no_pending_upload(store: ObjectStore) -> None:
    writer = store.multipart("dir/big")
    writer.write(random_bytes(MIN_PART_SIZE + 1))
    assert store.pending_uploads() == ["dir/big"]

    writer.abort()
    writer.abort()

    assert store.pending_uploads() == []
    with pytest.raises(ObjectNotFound):
        store.head("dir/big")
    with pytest.raises(StorageError):
        writer.write(b"more")


def test_an_exception_inside_the_block_aborts(store: ObjectStore) -> None:
    with pytest.raises(RuntimeError), store.multipart("big") as writer:
        writer.write(random_bytes(MIN_PART_SIZE + 1))
        raise RuntimeError("the client went away")

    assert store.pending_uploads() == []
    assert list(store.list()) == []


def test_leaving_the_block_without_complete_aborts(store: ObjectStore) -> None:
    with store.multipart("big") as writer:
        writer.write(b"never completed")

    assert store.pending_uploads() == []
    assert list(store.list()) == []


def test_empty_multipart_object(store: ObjectStore) -> None:
    with store.multipart("empty", metadata={"kind": "nothing"}) as writer:
        info = writer.complete()

    assert (info.size, info.metadata) == (0, {"kind": "nothing"})
    assert store.get("empty") == b""
    with pytest.raises(ObjectExists), store.multipart("empty", if_absent=True) as writer:
        writer.complete()


def test_a_completed_writer_takes_no_more_writes(store: ObjectStore) -> None:
    with store.multipart("k") as writer:
        writer.write(b"done")
        writer.complete()
        with pytest.raises(StorageError):
            writer.write(b"more")
        with pytest.raises(StorageError):
            writer.complete()

    assert store.get("k") == b"done"


@pytest.mark.parametrize(
    "metadata",
    [{"Upper": "x"}, {"under_score": "x"}, {"": "x"}, {"k": "caf\u00e9"}, {"k": " padded"}],
)
def test_metadata_that_s3_would_alter_is_refused(
    store: ObjectStore, metadata: dict[str, str]
) -> None:
    with pytest.raises(InvalidMetadata):
        store.put("k", b"x", metadata=metadata)
    assert list(store.list()) == []


def test_check_passes_on_a_usable_store(store: ObjectStore) -> None:
    store.check()


def test_open_store_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    absolute = open_store(f"file://{tmp_path}/abs")
    relative = open_store("file://./rel/dir")
    bare = open_store("bare", bucket="bare")

    assert isinstance(absolute, LocalStore)
    assert (absolute.root, absolute.bucket) == (tmp_path / "abs", "abs")
    assert isinstance(relative, LocalStore) and relative.root == tmp_path / "rel" / "dir"
    assert isinstance(bare, LocalStore) and bare.root == tmp_path / "bare"
    with pytest.raises(BucketNotFound):
        open_store(f"file://{tmp_path}/abs", bucket="another")


def test_open_store_s3_urls(moto_endpoint: str) -> None:
    store = open_store("s3://named", endpoint_url=moto_endpoint)
    overridden = open_store("s3://named", endpoint_url=moto_endpoint, bucket="other")

    assert isinstance(store, S3Store) and store.bucket == "named"
    assert overridden.bucket == "other"


@pytest.mark.parametrize("url", ["ftp://host/dir", "s3://bucket/prefix", "s3:///"])
def test_open_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        open_store(url)
