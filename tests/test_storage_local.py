"""What only the local-directory backend has: key safety, its files on disk, its lock."""

import errno
import fcntl
import itertools
import os
import re
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import storage.local
from storage import (
    BucketNotFound,
    InvalidObjectKey,
    LocalStore,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    local_files,
)
from storage.commit_group import CommitGroup
from storage.local_files import UncachedFile


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "a\0b",
        "a\\b",
        "a//b",
        "a/",
        "a/./b",
        "a/../b",
        "..",
        ".kek",
        ".meta/x.json",
        "a/.tmp-123-b",
        "x" * 201,
        "a/\udcff",
    ],
)
def test_unsafe_keys_are_refused_by_every_operation(local: LocalStore, key: str) -> None:
    with pytest.raises(InvalidObjectKey):
        local.put(key, b"x")
    with pytest.raises(InvalidObjectKey):
        local.multipart(key)
    for operation in (local.get, local.head, local.read, local.delete):
        with pytest.raises(InvalidObjectKey):
            operation(key)


def test_a_key_through_a_symlink_out_of_the_root_is_refused(
    local: LocalStore, tmp_path: Path
) -> None:
    (tmp_path / "outside").mkdir()
    (local.root / "link").symlink_to(tmp_path / "outside")

    with pytest.raises(InvalidObjectKey):
        local.put("link/file", b"x")
    assert list((tmp_path / "outside").iterdir()) == []


def test_dot_names_below_the_first_level_are_ordinary_keys(local: LocalStore) -> None:
    local.put("a/.hidden", b"x")
    assert [info.key for info in local.list()] == ["a/.hidden"]


def test_store_files_and_uploads_in_progress_are_not_listed(local: LocalStore) -> None:
    (local.root / ".kek").write_bytes(b"not an object")
    local.put("visible", b"x")
    with local.multipart("top") as top, local.multipart("dir/nested") as nested:
        top.write(b"partial")
        nested.write(b"partial")

        assert [info.key for info in local.list()] == ["visible"]
        assert local.pending_uploads() == ["dir/nested", "top"]
        assert local.pending_uploads("dir/") == ["dir/nested"]
        assert local.pending_uploads("to") == ["top"]


def test_object_bytes_and_sidecar_live_where_documented(local: LocalStore) -> None:
    info = local.put("a/b.bin", b"content", metadata={"m": "1"})

    assert (local.root / "a" / "b.bin").read_bytes() == b"content"
    assert (local.root / ".meta" / "a" / "b.bin.json").is_file()
    assert re.fullmatch(r"[0-9a-f]{32}", info.etag)
    assert local.put("a/b.bin", b"content").etag != info.etag  # a new version, a new etag

    local.delete("a/b.bin")

    assert sorted(path.name for path in local.root.iterdir()) == [".meta"]
    assert [path.name for path in (local.root / ".meta").iterdir()] == [".lock"]


def test_an_object_cannot_also_be_a_prefix(local: LocalStore) -> None:
    local.put("a", b"object")
    with pytest.raises(InvalidObjectKey):
        local.put("a/b", b"below an object")

    local.delete("a")
    local.put("a/b", b"now fine")
    with pytest.raises(InvalidObjectKey):
        local.put("a", b"above other keys")

    local.delete("a/b")
    local.put("a", b"fine again: deleting pruned the empty directory")


def test_concurrent_overwrites_keep_each_object_with_its_own_sidecar(local: LocalStore) -> None:
    writers = 6
    start = threading.Barrier(writers)

    def overwrite(index: int) -> None:
        start.wait()
        for round_number in range(10):
            content = f"{index}:{round_number}".encode() * (index + 1)
            local.put("k", content, metadata={"length": str(len(content))})

    threads = [threading.Thread(target=overwrite, args=(index,)) for index in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert local.head("k").metadata == {"length": str(len(local.get("k")))}


def test_a_key_taken_after_the_first_look_is_still_refused_under_the_lock(
    local: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that may not replace (if_absent) looks at its key before it syncs a
    sidecar; a key taken after that look is refused by the commit's own check."""
    local.put("d/taken", b"first", metadata={"v": "1"})
    mode = storage.local._mode
    looks: list[Path] = []

    def free_at_first(path: Path) -> int | None:
        looks.append(path)
        return None if len(looks) == 1 else mode(path)

    monkeypatch.setattr(storage.local, "_mode", free_at_first)
    with pytest.raises(ObjectExists):
        local.put("d/taken", b"second", metadata={"v": "2"}, if_absent=True)
    assert len(looks) == 2  # the first look, then the commit's under the lock
    assert (local.get("d/taken"), local.head("d/taken").metadata) == (b"first", {"v": "1"})
    assert sorted(path.name for path in (local.root / ".meta").iterdir()) == [".lock", "d"]


def test_a_removed_directory_is_a_missing_bucket(local: LocalStore) -> None:
    shutil.rmtree(local.root)

    with pytest.raises(BucketNotFound):
        local.check()
    with pytest.raises(BucketNotFound):
        local.head("k")
    with pytest.raises(BucketNotFound):
        local.put("k", b"x")


def test_a_lock_that_cannot_be_taken_fails_a_write_as_a_storage_error(
    local: LocalStore,
) -> None:
    """A commit whose batch cannot take the lock fails with a storage error (answered as
    one), not an OSError that names the store's own path."""
    local.put("k", b"x")
    lock = local.root / ".meta" / ".lock"
    lock.unlink()
    lock.symlink_to(lock.name)  # opening it loops: ELOOP

    with pytest.raises(StorageUnavailable) as refused:
        local.put("k2", b"y")
    assert str(local.root) not in str(refused.value)


# Only its owner can read the store


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The usual umask (022): files 0644 and directories 0755 unless asked otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
def test_the_store_is_its_owners_alone(tmp_path: Path) -> None:
    """Directories 0700 and files 0600: objects, sidecars, the lock, uploads under way."""
    root = tmp_path / "parent" / "bucket"
    store = LocalStore(root)
    store.put("a/b/c", b"sealed", metadata={"sealstream-kid": "k"})
    store.put("top", b"sealed")
    with store.multipart("a/pending/d") as writer:
        writer.write(b"half")
        during_upload = _modes(root)
    assert any(path.name.startswith(".tmp-") for path in during_upload)
    for modes in (during_upload, _modes(root)):
        assert {mode for path, mode in modes.items() if path.is_dir()} == {0o700}
        files = {path.name: mode for path, mode in modes.items() if path.is_file()}
        assert {"c", "top", "c.json", "top.json", ".lock"} <= files.keys()
        assert set(files.values()) == {0o600}


@pytest.mark.usefixtures("open_umask")
def test_an_open_store_directory_is_closed_when_opened(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    root.mkdir(mode=0o755)
    LocalStore(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def _modes(root: Path) -> dict[Path, int]:
    """The permission bits of the root and of everything under it."""
    return {path: stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


STAGE = 8192


def _refuse_o_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make O_DIRECT refused, as tmpfs before Linux 6.6 and some network filesystems do."""
    real_fcntl = fcntl.fcntl

    def refusing_o_direct(descriptor: int, command: int, argument: int = 0) -> int:
        if command == fcntl.F_SETFL and argument & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT is not supported")
        return int(real_fcntl(descriptor, command, argument))

    monkeypatch.setattr(fcntl, "fcntl", refusing_o_direct)


@pytest.mark.parametrize("size", [0, 1, 4095, STAGE, STAGE + 1, 3 * STAGE + 4097])
@pytest.mark.parametrize("direct", [True, False], ids=["uncached", "no-o-direct"])
def test_an_uncached_file_holds_every_byte_written_whatever_the_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, direct: bool
) -> None:
    """Written around the page cache (O_DIRECT) a staged buffer at a time, with a tail of
    any length; or, on a filesystem that refuses O_DIRECT, through the cache."""
    if not direct:
        _refuse_o_direct(monkeypatch)
    data = os.urandom(size)
    file = UncachedFile(tmp_path / "object", stage_bytes=STAGE)
    try:
        for start in range(0, size, 3001):  # pieces that straddle the stage's edges
            file.write(memoryview(data)[start : start + 3001])
        assert file.sync().st_size == size
    finally:
        file.close()
    assert (tmp_path / "object").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "object").stat().st_mode) == 0o600


@pytest.mark.parametrize("direct", [True, False], ids=["uncached", "no-o-direct"])
def test_an_uncached_file_written_from_offsets_holds_each_piece_beside_its_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Pieces of an existing file written from offsets inside blocks (as parts of an
    upload follow a header), out of order: each piece's edges go through the cache, and
    no piece spoils the bytes of the blocks it shares with its neighbours."""
    if not direct:
        _refuse_o_direct(monkeypatch)
    data = os.urandom(5 * STAGE + 3 * 4096 + 1234)
    cuts = [0, 100, 4096, 4097, STAGE + 5000, 3 * STAGE + 1, len(data)]
    path = tmp_path / "object"
    path.touch(mode=0o600)
    for start, end in reversed(list(itertools.pairwise(cuts))):
        file = UncachedFile(path, stage_bytes=STAGE, at=start)
        try:
            for piece in range(start, end, 3001):
                file.write(memoryview(data)[piece : min(end, piece + 3001)])
            file.sync()
        finally:
            file.close()
    assert path.read_bytes() == data


def test_a_file_written_after_another_holds_only_its_own_bytes(tmp_path: Path) -> None:
    """Stages go from a closed file to the next (their pages already faulted in): what
    one held never reaches the next, whose stages and tail are written to its length."""
    for name, size, byte in (("long", 3 * STAGE + 5000, b"\xaa"), ("short", STAGE + 100, b"\x55")):
        file = UncachedFile(tmp_path / name, stage_bytes=STAGE)
        try:
            file.write(memoryview(byte * size))
            file.sync()
        finally:
            file.close()
    assert (tmp_path / "short").read_bytes() == b"\x55" * (STAGE + 100)


def test_a_staged_buffer_goes_to_disk_while_the_next_fills_and_its_failure_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full buffer is written out on a disk thread: `write` returns while the disk
    still has it, the next buffer fills meanwhile, and a write that failed there is
    raised by the next `write` that needs its buffer (or by `sync`)."""
    entered, released = threading.Event(), threading.Event()

    def held_then_full(descriptor: int, data: memoryview, position: int) -> None:
        entered.set()
        assert released.wait(timeout=60)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_files, "_write_all", held_then_full)
    file = UncachedFile(tmp_path / "object", stage_bytes=STAGE)
    try:
        file.write(memoryview(os.urandom(STAGE)))  # returns with its buffer in flight
        assert entered.wait(timeout=60)
        file.write(memoryview(os.urandom(STAGE - 1)))  # fills the other buffer meanwhile
        released.set()
        with pytest.raises(OSError) as failed:
            file.write(memoryview(os.urandom(1)))  # needs the buffer that failed
        assert failed.value.errno == errno.ENOSPC
    finally:
        released.set()
        file.close()


def test_an_object_larger_than_the_stage_is_stored_whole(local: LocalStore) -> None:
    data = os.urandom(9 * 1024 * 1024 + 7)
    with local.multipart("big", metadata={}) as writer:
        for start in range(0, len(data), 1_000_003):
            writer.write(data[start : start + 1_000_003])
        writer.complete()
    assert local.get("big") == data


def test_a_file_copied_in_by_hand_is_left_out_of_listings_without_a_path(
    local: LocalStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A file put into the directory by hand has no sidecar: it is no object of the
    store's, and neither fails the listing nor has its path told to anyone."""
    local.put("docs/a", b"a")
    (local.root / "docs" / "b").write_bytes(b"copied in by hand")
    local.put("docs/c", b"c")
    with caplog.at_level("WARNING"):
        assert [info.key for info in local.list("docs/")] == ["docs/a", "docs/c"]
    assert "docs/b" in caplog.text
    with pytest.raises(StorageError) as refused:
        local.head("docs/b")
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    assert str(local.root) not in caplog.text + str(refused.value)


@pytest.mark.parametrize(
    "sidecar",
    [b'{"metadata": {}}', b"[]", b'{"etag": 7, "metadata": {}}', b'{"etag": "e", "metadata": []}'],
)
def test_a_sidecar_not_as_the_store_writes_them_counts_as_missing(
    local: LocalStore, sidecar: bytes
) -> None:
    local.put("docs/a", b"a")
    local.put("docs/b", b"b")
    (local.root / ".meta" / "docs" / "b.json").write_bytes(sidecar)
    assert [info.key for info in local.list("docs/")] == ["docs/a"]
    assert local.unlisted("docs/") == 1
    with pytest.raises(StorageError):
        local.head("docs/b")


def test_commits_made_at_once_share_the_lock_and_their_directories_fsyncs(
    local: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    local.put("d/taken", b"first", metadata={"v": "1"})
    writers = 8
    synced: list[Path] = []
    first_batch, others_waiting = threading.Event(), threading.Event()
    # Told by the commits themselves rather than read off other threads' stacks, which
    # CPython does not make safe to walk while they run (a full run crashed doing so).
    entered = threading.Semaphore(0)
    commit = CommitGroup.commit

    def fsync_held(directory: Path) -> None:
        # The first batch holds on until every other commit waits for the next.
        if not synced:
            first_batch.set()
            others_waiting.wait(timeout=60)
        synced.append(directory)
        local_files.fsync_directory(directory)

    def counted(self: CommitGroup[object], item: object) -> None:
        entered.release()
        commit(self, item)

    monkeypatch.setattr(storage.local, "fsync_directory", fsync_held)
    monkeypatch.setattr(CommitGroup, "commit", counted)
    failures: dict[str, BaseException] = {}

    def put(index: int) -> None:
        key = "d/taken" if index == writers - 1 else f"d/k{index}"
        try:
            local.put(key, f"v{index}".encode(), metadata={"v": str(index)}, if_absent=True)
        except StorageError as error:
            failures[key] = error

    first = threading.Thread(target=put, args=(0,))
    first.start()
    assert first_batch.wait(timeout=60)  # the first batch is under way
    rest = [threading.Thread(target=put, args=(index,)) for index in range(1, writers)]
    for thread in rest:
        thread.start()
    for _ in range(writers - 1):  # the write of the taken key is refused before its commit
        assert entered.acquire(timeout=60)
    others_waiting.set()
    for thread in [first, *rest]:
        thread.join()

    # Two batches (the first commit alone, then the other six), each one fsync of the
    # sidecars' directory and one of the objects': 14 when each commit syncs its own.
    assert synced == [local.root / ".meta" / "d", local.root / "d"] * 2
    assert list(failures) == ["d/taken"] and isinstance(failures["d/taken"], ObjectExists)
    assert (local.get("d/taken"), local.head("d/taken").metadata) == (b"first", {"v": "1"})
    for index in range(writers - 1):
        assert local.get(f"d/k{index}") == f"v{index}".encode()
        assert local.head(f"d/k{index}").metadata == {"v": str(index)}
    # No sidecar staged for the refused commit is left behind.
    assert sorted(path.name for path in (local.root / ".meta").iterdir()) == [".lock", "d"]


def test_each_directory_a_write_creates_is_synced_into_its_parent(
    local: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit's fsyncs make its renames durable in their directories, not those
    directories' own entries: each one the store creates must be synced into its parent
    once it exists (what a crash does cannot be staged here: this observes the syncs)."""
    synced: list[tuple[Path, set[str]]] = []  # each directory synced, with what it held
    fsync_directory = local_files.fsync_directory

    def observed(directory: Path) -> None:
        synced.append((directory, {entry.name for entry in directory.iterdir()}))
        fsync_directory(directory)

    monkeypatch.setattr(local_files, "fsync_directory", observed)
    local.put("a/b/c/key", b"data")
    created = [Path("a"), Path("a/b"), Path("a/b/c")]
    for base in (local.root, local.root / ".meta"):
        for directory in created:
            parent = base / directory.parent
            assert any(at == parent and directory.name in held for at, held in synced), synced
    synced.clear()
    local.put("a/b/c/other", b"data")  # into directories that exist: none synced again
    assert [directory for directory, _ in synced] == []


def test_syncing_the_parts_of_an_aborted_upload_brings_none_back(local: LocalStore) -> None:
    upload = local.start_parts("obj")
    local.put_part(upload, 1, 0, b"x" * 10_000)
    local.sync_parts(upload)
    local.abort_parts(upload)

    with pytest.raises(ObjectNotFound):
        local.sync_parts(upload)
    assert local.pending_uploads() == []
