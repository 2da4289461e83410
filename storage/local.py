"""The local-directory backend, the embedded default: one directory is one bucket.

Layout under the root directory:

    <key>                          the object's bytes (key segments are path segments)
    .meta/<key>.json               its sidecar: {"etag": a random version token, "metadata"}
    .meta/.lock                    flock'd: exclusive while names change, shared while an
                                   object and its sidecar are read together
    .meta/.tmp-<uuid>.json         a sidecar written, not yet renamed into place
    <dir>/.tmp-<uuid>-<basename>   an upload in progress (a "pending upload"), whose
                                   uuid is its upload id; a part upload writes each
                                   part at its offset in that one file

Names starting with "." at the first level belong to the store and its neighbours (the
keystore keeps its `.kek` there), so keys may not start with ".". Every write goes to a
temporary file that is fsync'd and renamed into place, sidecar first (and its directory
fsync'd before the object's rename), so a visible object is always complete and always
has its metadata. The lock is an flock, so it also holds between processes sharing the
directory on one machine; the files are written and synced before it is taken, and
commits made at once by several threads share it and their directories' fsyncs
(`storage.commit_group`).

The store is its owner's alone: the root and every directory in it are created 0700 and
every file 0600 (the umask can only take more away), and a root that others can enter
is closed to them when the store is opened.
"""

import builtins  # `list` names a store method inside the store classes
import errno
import fcntl
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, BinaryIO, TypeVar

from storage.base import (
    MultipartWriter,
    ObjectInfo,
    ObjectStore,
    Part,
    PartUpload,
    SmallObject,
    UploadStarted,
    contiguous,
    encoded_key,
)
from storage.commit_group import CommitGroup, Ticket
from storage.errors import (
    BucketNotFound,
    InvalidObjectKey,
    ObjectExists,
    ObjectNotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from storage.local_files import (
    TEMP_NAME_OVERHEAD,
    TEMP_PREFIX,
    UncachedFile,
    fsync_directory,
    make_private,
    new_private_file,
    private_directories,
    prune_empty,
    remove_abandoned,
    write_synced,
)

logger = logging.getLogger(__name__)

META_DIR = ".meta"
# A temporary name adds TEMP_NAME_OVERHEAD bytes (and a sidecar ".json") to a segment;
# this keeps every such name under the 255-byte limit of common filesystems.
MAX_SEGMENT_BYTES = 200
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")  # the uuid of a temporary name
# Tries at creating a file whose new directory deletes of its neighbours keep pruning.
CREATE_ATTEMPTS = 8
Created = TypeVar("Created")


class LocalStore(ObjectStore):
    """Objects as files under `root`; the bucket is named after the directory.

    The directory is created if it is missing, as the embedded default expects.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.bucket = self.root.name
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            private_directories(self.root / META_DIR, self.root.parent)
        except OSError as error:
            reason = f"the store directory cannot be created: {error.strerror}"
            raise StorageUnavailable(reason) from error
        make_private(self.root)
        self._commits = CommitGroup(self._commit_batch, key=lambda commit: commit.key)

    def get(self, key: str) -> bytes:
        path = self._object_path(key)
        with self._os_errors(key):
            return path.read_bytes()

    def get_small(self, key: str, limit: int) -> SmallObject:
        path = self._object_path(key)
        with self._os_errors(key):
            with self._locked(fcntl.LOCK_SH):  # the file and its sidecar, of one version
                file = path.open("rb")
                try:
                    etag = self._read_sidecar(key)["etag"]
                except BaseException:
                    file.close()
                    raise
            with file:  # read to its end as it was, whatever is renamed over it meanwhile
                size = os.fstat(file.fileno()).st_size
                if size > limit:
                    raise ObjectTooLarge(f"{size} bytes, more than {limit}", key)
                return SmallObject(file.read(), etag)

    def head(self, key: str) -> ObjectInfo:
        path = self._object_path(key)
        with self._os_errors(key), self._locked(fcntl.LOCK_SH):
            stat = path.stat()
            if not S_ISREG(stat.st_mode):
                raise ObjectNotFound("the key names a prefix of objects, not an object", key)
            sidecar = self._read_sidecar(key)
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            etag=sidecar["etag"],
            metadata=sidecar["metadata"],
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def list(self, prefix: str = "", *, start_after: str = "") -> Iterator[ObjectInfo]:
        for key, info in self._scan(prefix, start_after):
            if info is not None:
                yield info
            else:
                # A file put there by hand: no object of the store's, and one such file
                # must not hide every other object of the listing.
                logger.warning("listing skips %r: it has no metadata, so is no object", key)

    def unlisted(self, prefix: str) -> int:
        """Files under `prefix` without their metadata, which listings skip: put there by
        hand, or an object whose sidecar was deleted."""
        return sum(info is None for _, info in self._scan(prefix, ""))

    def _scan(self, prefix: str, start_after: str) -> Iterator[tuple[str, ObjectInfo | None]]:
        """(key, its listing entry, or None for a file without metadata) of the files
        under `prefix` after `start_after`, in key order."""
        for parent, name in self._files(prefix):
            key = parent + name
            if _is_reserved(parent, name) or not key.startswith(prefix) or key <= start_after:
                continue
            try:
                yield key, replace(self.head(key), metadata={})
            except ObjectNotFound:
                continue  # deleted since the directory was scanned
            except _SidecarMissing:
                yield key, None

    def delete(self, key: str) -> None:
        path = self._object_path(key)
        sidecar = self._sidecar_path(key)
        with self._os_errors(key), self._locked(fcntl.LOCK_EX):
            if not path.is_file():
                return
            path.unlink()
            sidecar.unlink(missing_ok=True)
            fsync_directory(path.parent)
            prune_empty(path.parent, self.root)
            prune_empty(sidecar.parent, self.root / META_DIR)

    def pending_uploads(self, prefix: str = "") -> builtins.list[str]:
        keys = {
            parent + name[TEMP_NAME_OVERHEAD:]
            for parent, name in self._files(prefix)
            if name.startswith(TEMP_PREFIX)
        }
        return sorted(key for key in keys if key.startswith(prefix))

    def abort_pending(
        self, prefix: str, *, exact: bool = False, upload_ids: Collection[str] | None = None
    ) -> int:
        temporaries = [
            parent + name
            for parent, name in self._files(prefix)
            if name.startswith(TEMP_PREFIX)
            and _under(parent + name[TEMP_NAME_OVERHEAD:], prefix, exact)
            and (upload_ids is None or _upload_id(name) in upload_ids)
        ]
        with self._os_errors(prefix), self._locked(fcntl.LOCK_EX):
            # Only files no live writer holds: one held may be another writer's upload of
            # the same key (a user's encrypt begun since the killed process died), and a
            # process dies holding nothing.
            return sum(
                remove_abandoned(self.root / temporary, math.inf) for temporary in temporaries
            )

    def clear_abandoned(self, written_before: datetime) -> int:
        """Temporary files of objects and of staged sidecars: a writer holds its file
        (`local_files.hold`) while it writes, so a slow one keeps it however old."""
        cutoff = written_before.timestamp()
        with self._os_errors(""):
            staged = [
                path
                for path in (self.root / META_DIR).iterdir()
                if path.name.startswith(TEMP_PREFIX)
            ]
        uploads = [
            self.root / parent / name
            for parent, name in self._files("")
            if name.startswith(TEMP_PREFIX)
        ]
        return sum(remove_abandoned(path, cutoff) for path in [*staged, *uploads])

    def complete_parts(
        self, upload: PartUpload, parts: Sequence[Part], *, if_absent: bool
    ) -> ObjectInfo:
        size = contiguous(parts)
        temp = self._part_file(upload)
        with self._os_errors(upload.key):
            descriptor = os.open(temp, os.O_WRONLY)
            try:
                os.ftruncate(descriptor, size)  # a part put again shorter leaves no tail
                os.fsync(descriptor)
                modified = os.fstat(descriptor).st_mtime
            finally:
                os.close(descriptor)
        etag = uuid.uuid4().hex
        sidecar = json.dumps({"etag": etag, "metadata": upload.metadata}).encode()
        self._commit(
            upload.key,
            self._object_path(upload.key),
            temp,
            sidecar,
            if_absent=if_absent,
            if_match=None,
        )
        return ObjectInfo(
            key=upload.key,
            size=size,
            etag=etag,
            metadata=upload.metadata,
            last_modified=datetime.fromtimestamp(modified, UTC),
        )

    def abort_parts(self, upload: PartUpload) -> None:
        temp = self._part_file(upload)
        with self._os_errors(upload.key), self._locked(fcntl.LOCK_EX):
            temp.unlink(missing_ok=True)

    def _start_parts(self, key: str, metadata: dict[str, str]) -> PartUpload:
        upload = PartUpload(key=key, upload_id=uuid.uuid4().hex, metadata=metadata)
        self._created(key, self._part_file(upload), lambda temp: new_private_file(temp).close())
        return upload

    def _put_part(
        self, upload: PartUpload, number: int, offset: int, data: bytes | bytearray
    ) -> Part:
        # The file is opened without O_CREAT: an upload aborted meanwhile stays gone. It
        # is synced by `sync_parts`, once for the parts put before.
        with self._os_errors(upload.key):
            file = UncachedFile(self._part_file(upload), at=offset)
            try:
                file.write(memoryview(data))
                file.flush()
            finally:
                file.close()
        return Part(number=number, offset=offset, size=len(data), etag=uuid.uuid4().hex)

    def sync_parts(self, upload: PartUpload) -> None:
        with self._os_errors(upload.key):
            descriptor = os.open(self._part_file(upload), os.O_WRONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    def _created(self, key: str, temp: Path, create: Callable[[Path], Created]) -> Created:
        """`create(temp)`: a new file of `key`'s, its directories made where missing (tried
        first without: most files go where others went before). No lock is taken: a
        delete prunes a directory only while it is empty, so one pruned between its
        making and the file's is made again."""
        with self._os_errors(key):
            for _ in range(CREATE_ATTEMPTS - 1):
                with suppress(FileNotFoundError):
                    return self._create_in_place(key, temp, create)
            return self._create_in_place(key, temp, create)

    def _create_in_place(self, key: str, temp: Path, create: Callable[[Path], Created]) -> Created:
        with suppress(FileNotFoundError, NotADirectoryError):
            return create(temp)
        try:
            private_directories(temp.parent, self.root)
        except (FileExistsError, NotADirectoryError):
            raise InvalidObjectKey("a prefix of the key is another object", key) from None
        return create(temp)

    def _part_file(self, upload: PartUpload) -> Path:
        """The one file a part upload's parts are written into, at their offsets."""
        if not _UPLOAD_ID.fullmatch(upload.upload_id):
            raise StorageError("not an upload id of this store", upload.key)
        return self._upload_file(upload.key, upload.upload_id)

    def _upload_file(self, key: str, upload_id: str) -> Path:
        """The temporary file of the upload `upload_id` of `key`, beside its final name
        so that a rename can put it in place."""
        return _upload_beside(self._object_path(key), upload_id)

    def check(self) -> None:
        self._require_bucket()
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable("the store directory is not writable")

    def _open_writer(
        self,
        key: str,
        metadata: dict[str, str],
        if_absent: bool,
        if_match: str | None,
        on_upload: UploadStarted | None,
    ) -> MultipartWriter:
        return _LocalWriter(self, key, metadata, if_absent, if_match, on_upload)

    def _read_range(
        self, key: str, start: int, stop: int | None, chunk_size: int, if_match: str | None
    ) -> Generator[bytes, None, None]:
        with self._os_errors(key), self._opened(key, if_match) as file:
            file.seek(start)
            remaining = (os.fstat(file.fileno()).st_size if stop is None else stop) - start
            while remaining:
                chunk = file.read(min(chunk_size, remaining))
                if not chunk:
                    return  # the caller reports the short read
                remaining -= len(chunk)
                yield chunk

    def _opened(self, key: str, if_match: str | None) -> BinaryIO:
        """The object's file, open; with `if_match`, only if it is that version. An open
        file is read to its end as it was, whatever is renamed over it meanwhile."""
        if if_match is None:
            return self._object_path(key).open("rb")
        with self._locked(fcntl.LOCK_SH):  # the sidecar and the file, of one version
            file = self._object_path(key).open("rb")
            try:
                self._require_etag(key, self._object_path(key), if_match)
            except BaseException:
                file.close()
                raise
        return file

    def _object_path(self, key: str) -> Path:
        """Where `key` lives, after refusing keys that are not safe as a relative path."""
        segments = encoded_key(key).split(b"/")
        if "\0" in key or "\\" in key:
            raise InvalidObjectKey("the key contains NUL or a backslash", key)
        if any(segment in (b"", b".", b"..") for segment in segments):
            raise InvalidObjectKey("the key has an empty, '.' or '..' segment", key)
        if segments[0].startswith(b"."):
            raise InvalidObjectKey("the key starts with '.', reserved for the store", key)
        if any(segment.startswith(TEMP_PREFIX.encode()) for segment in segments):
            raise InvalidObjectKey(f"the key has a segment starting with {TEMP_PREFIX!r}", key)
        if any(len(segment) > MAX_SEGMENT_BYTES for segment in segments):
            raise InvalidObjectKey(f"the key has a segment over {MAX_SEGMENT_BYTES} bytes", key)
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):
            raise InvalidObjectKey("the key resolves outside the store directory", key)
        return path

    def _sidecar_path(self, key: str) -> Path:
        return self.root / META_DIR / f"{key}.json"

    def _read_sidecar(self, key: str) -> dict[str, Any]:
        try:
            sidecar: dict[str, Any] = json.loads(self._sidecar_path(key).read_bytes())
        except (FileNotFoundError, ValueError):
            # Not the OS error, not even as the cause: it holds the sidecar's path on this
            # server, which would reach a log's traceback.
            raise _SidecarMissing("the object's metadata is missing or unreadable", key) from None
        if not _sidecar_shaped(sidecar):  # not one this store wrote: none at all, then
            raise _SidecarMissing("the object's metadata is missing or unreadable", key)
        return sidecar

    def _files(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(parent key prefix, file name) of files that may match `prefix`, in key order."""
        self._require_bucket()
        directory_key, _, name_start = prefix.rpartition("/")
        if not directory_key:
            yield from _walk(self.root, "", name_start)
            return
        try:
            directory = self._object_path(directory_key)
        except InvalidObjectKey:
            return  # no valid key lies under such a prefix
        yield from _walk(directory, f"{directory_key}/", name_start)

    def _commit(
        self,
        key: str,
        path: Path,
        temp: Path,
        sidecar: bytes,
        *,
        if_absent: bool,
        if_match: str | None,
    ) -> None:
        """Rename a finished file (`temp`) into place as `key`, at `path` (as
        `_object_path` gives it), its sidecar first; return once both names are durable.
        The sidecar is written and synced before the lock, and the renames share it, and
        the fsyncs of their directories, with the commits of other threads made at the
        same time (`_commit_batch`)."""
        staged = self.root / META_DIR / f"{TEMP_PREFIX}{uuid.uuid4().hex}.json"
        try:
            # The batch's lock is taken by whichever committer leads: its failure too is
            # raised to each as a storage error, never an OSError quoting the store's path.
            with self._os_errors(key):
                if if_absent and _mode(path) is not None:
                    # Taken already (as an overwrite's first try may find it): refused
                    # before a sidecar is synced for nothing and the commit waits on a
                    # batch. The check under the lock is still the one that counts.
                    raise ObjectExists("the object already exists", key)
                write_synced(staged, sidecar)
                self._commits.commit(
                    _Commit(key, path, temp, self._sidecar_path(key), staged, if_absent, if_match)
                )
        finally:
            with suppress(OSError):  # renamed into place, or a leftover of no one's
                staged.unlink(missing_ok=True)

    def _commit_batch(self, batch: builtins.list[Ticket["_Commit"]]) -> None:
        """Under the lock: each commit's checks and its sidecar's rename, one fsync of each
        sidecar directory, each object's rename, one fsync of each object directory. A
        directory's fsync makes every rename done in it before durable, so one serves
        the whole batch; nothing returns to a committer before it. A reader that takes
        no lock (`get`) may see an object between its rename and that fsync, which a
        crash then loses: one its writer was never told is stored."""
        with self._locked(fcntl.LOCK_EX):
            placed = self._each(batch, self._place_sidecar)
            placed = self._sync_directories(placed, lambda commit: commit.sidecar.parent)
            linked = self._each(placed, self._link)
            self._sync_directories(linked, lambda commit: commit.path.parent)

    def _each(
        self,
        tickets: builtins.list[Ticket["_Commit"]],
        step: Callable[["_Commit"], None],
    ) -> builtins.list[Ticket["_Commit"]]:
        """Take `step` for each commit; those it failed carry their error, the rest go on."""
        passed = []
        for ticket in tickets:
            try:
                with self._os_errors(ticket.item.key):
                    step(ticket.item)
            except Exception as error:  # the commit's own failure, raised to its thread
                ticket.error = error
            else:
                passed.append(ticket)
        return passed

    @staticmethod
    def _sync_directories(
        tickets: builtins.list[Ticket["_Commit"]], directory: Callable[["_Commit"], Path]
    ) -> builtins.list[Ticket["_Commit"]]:
        """One fsync of each directory the commits renamed into; the commits in one whose
        fsync failed fail, the rest go on."""
        failed: dict[Path, bool] = {}
        for ticket in tickets:
            path = directory(ticket.item)
            if path not in failed:
                try:
                    fsync_directory(path)
                    failed[path] = False
                except OSError:
                    failed[path] = True
            if failed[path]:
                ticket.error = StorageUnavailable(
                    "the store directory failed: its rename may not be durable", ticket.item.key
                )
        return [ticket for ticket in tickets if ticket.error is None]

    def _place_sidecar(self, commit: "_Commit") -> None:
        """Check that the object may be written, and put its new sidecar in place (its
        directories made only where the rename finds them missing)."""
        there = _mode(commit.path)
        if commit.if_absent and there is not None:
            raise ObjectExists("the object already exists", commit.key)
        if there is not None and S_ISDIR(there):
            raise InvalidObjectKey("the key is a prefix of other keys", commit.key)
        if commit.if_match is not None:
            self._require_etag(commit.key, commit.path, commit.if_match)
        try:
            commit.staged.replace(commit.sidecar)
        except (FileNotFoundError, NotADirectoryError):
            private_directories(commit.sidecar.parent, self.root)
            commit.staged.replace(commit.sidecar)

    @staticmethod
    def _link(commit: "_Commit") -> None:
        """Put the object's file in place under its name."""
        try:
            if commit.if_absent:
                commit.path.hardlink_to(commit.temp)  # fails atomically if the name is taken
                commit.temp.unlink()
            else:
                commit.temp.replace(commit.path)
        except FileExistsError:
            raise ObjectExists("the object already exists", commit.key) from None

    def _require_etag(self, key: str, path: Path, etag: str) -> None:
        """Refuse to replace anything but the version of `key` whose etag is `etag`."""
        if not path.is_file():
            raise ObjectNotFound("the object does not exist", key)
        if self._read_sidecar(key)["etag"] != etag:
            raise PreconditionFailed(f"the object is no longer the version {etag}", key)

    def _require_bucket(self) -> None:
        if not self.root.is_dir():
            raise BucketNotFound("the store directory does not exist")

    @contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        descriptor = os.open(self.root / META_DIR / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, operation)
            yield
        finally:
            os.close(descriptor)

    @contextmanager
    def _os_errors(self, key: str) -> Iterator[None]:
        """Translate OS errors about `key` (or a key prefix) into the storage hierarchy.

        The errors name the failure, never the server's own paths (which OS errors quote).
        """
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
            self._require_bucket()
            raise ObjectNotFound("the object does not exist", key) from error
        except OSError as error:
            reason = f"the store directory failed: {error.strerror}"
            raise StorageUnavailable(reason, key) from error


def _mode(path: Path) -> int | None:
    """The mode of what `path` names (through symlinks, as `Path.exists` looks), or None
    where nothing is."""
    try:
        return path.stat().st_mode
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _sidecar_shaped(sidecar: object) -> bool:
    """Whether `sidecar` is as this store writes them: a string etag, string metadata."""
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("etag"), str):
        return False
    metadata = sidecar.get("metadata")
    return isinstance(metadata, dict) and all(
        isinstance(name, str) and isinstance(value, str) for name, value in metadata.items()
    )


@dataclass(frozen=True)
class _Commit:
    """A finished object file, and its synced sidecar, to be renamed into place."""

    key: str
    path: Path  # where the object goes
    temp: Path  # the object's file, synced
    sidecar: Path  # where its sidecar goes
    staged: Path  # the sidecar's file, synced
    if_absent: bool
    if_match: str | None


class _SidecarMissing(StorageError):
    """A file in the store without its metadata: one copied in by hand, not written here."""

    code = "storage-error"  # to a client, as any other failure of the store


class _LocalWriter(MultipartWriter):
    """Appends to a temporary file beside the final name; `complete` renames it in place.

    It is part of its store, and uses the store's private helpers (each such line says
    `noqa: SLF001`): where objects live, the lock, the translation of OS errors and the
    commit that renames a written object in place.
    """

    def __init__(
        self,
        store: LocalStore,
        key: str,
        metadata: dict[str, str],
        if_absent: bool,
        if_match: str | None,
        on_upload: UploadStarted | None,
    ) -> None:
        super().__init__(key)
        self.if_absent = if_absent
        self.if_match = if_match
        self._store = store
        self._metadata = metadata
        self.path = store._object_path(key)  # noqa: SLF001
        upload_id = uuid.uuid4().hex
        self.temp = _upload_beside(self.path, upload_id)
        if on_upload is not None:
            # Before the file exists: an id its keeper never heard of is of no file.
            on_upload(key, upload_id)
        self._file = store._created(key, self.temp, UncachedFile)  # noqa: SLF001
        self._modified: float | None = None  # once the file is synced

    def _write(self, view: memoryview) -> None:
        with self._store._os_errors(self.key):  # noqa: SLF001
            self._file.write(view)

    def _send_whole(self, metadata: dict[str, str]) -> bool:
        self._metadata = metadata  # the sidecar is written once the file is complete
        return True

    def _complete(self) -> ObjectInfo:
        return self._complete_as(if_absent=self.if_absent, if_match=self.if_match)

    def _complete_if_absent(self) -> ObjectInfo | None:
        if self.if_match is not None:
            raise StorageError("only an object written unconditionally can be", self.key)
        try:
            return self._complete_as(if_absent=True, if_match=None)
        except ObjectExists:
            return None  # the file stays, synced, for a completion as opened

    def _complete_as(self, *, if_absent: bool, if_match: str | None) -> ObjectInfo:
        # A version token, not a digest: an etag only has to change when the object does,
        # and a digest would take another pass over every byte stored.
        etag = uuid.uuid4().hex
        if self._modified is None:  # synced once, whichever completion comes first
            with self._store._os_errors(self.key):  # noqa: SLF001
                self._modified = self._file.sync().st_mtime
                self._file.close()
        modified = self._modified
        sidecar = json.dumps({"etag": etag, "metadata": self._metadata}).encode()
        self._store._commit(  # noqa: SLF001
            self.key, self.path, self.temp, sidecar, if_absent=if_absent, if_match=if_match
        )
        return ObjectInfo(
            key=self.key,
            size=self.bytes_written,
            etag=etag,
            metadata=self._metadata,
            last_modified=datetime.fromtimestamp(modified, UTC),
        )

    def _abort(self) -> None:
        with self._store._os_errors(self.key):  # noqa: SLF001
            try:
                self._file.close()
            finally:
                self.temp.unlink(missing_ok=True)


def _upload_beside(path: Path, upload_id: str) -> Path:
    """The temporary file of the upload `upload_id` of the object at `path`."""
    return path.with_name(f"{TEMP_PREFIX}{upload_id}-{path.name}")


def _walk(directory: Path, parent: str, name_start: str) -> Iterator[tuple[str, str]]:
    """(parent key prefix, name) of files under `directory`, in the byte order of whole
    keys, as S3 lists them.

    At this level only subdirectories starting with `name_start` are entered; files are
    all yielded, since upload temporaries carry their key's name behind a prefix.
    """
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=_key_order)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not _is_directory(entry):
            yield parent, entry.name
        elif entry.name.startswith(name_start) and not _is_reserved(parent, entry.name):
            yield from _walk(Path(entry.path), f"{parent}{entry.name}/", "")


def _key_order(entry: os.DirEntry[str]) -> str:
    """Sorting a directory "d" as "d/" makes a depth-first walk list whole keys in order."""
    return entry.name + "/" if _is_directory(entry) else entry.name


def _is_directory(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _is_reserved(parent: str, name: str) -> bool:
    """Whether a name under the `parent` key prefix belongs to the store, not to a key."""
    return name.startswith(".") if not parent else name.startswith(TEMP_PREFIX)


def _upload_id(name: str) -> str:
    """The upload id a temporary file's name holds: its uuid."""
    return name[len(TEMP_PREFIX) : TEMP_NAME_OVERHEAD - 1]


def _under(key: str, prefix: str, exact: bool) -> bool:
    return key == prefix if exact else key.startswith(prefix)
