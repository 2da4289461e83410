"""Files only their owner can use, written so that a crash never leaves half of one: the
filesystem steps the local store is made of.

Directories are created 0700 and files 0600 (the umask can only take more away). A file
is written under a fresh temporary name, fsync'd, renamed into place, and its directory
fsync'd, so that the new name survives a crash; a directory created is fsync'd into its
parent as it is made.

An object's bytes, streamed in by the GiB, go around the page cache where the filesystem
allows it (`UncachedFile`): through the cache, the writing process spent more CPU in the
kernel, copying each byte in and allocating and writing back its pages, than on the rest
of a stream, its encryption included (docs/benchmarks.md). Such a write waits for the
disk, so it runs on a thread of its own while the next buffer fills: the disk and the
CPU work of a stream overlap instead of taking turns.
"""

import fcntl
import logging
import mmap
import os
import threading
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path
from stat import S_IMODE
from typing import BinaryIO

from storage.pools import ForkSafePool

logger = logging.getLogger(__name__)

PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600
TEMP_PREFIX = ".tmp-"
# What a temporary name adds before the name it stands for: ".tmp-", 32 hex digits, "-".
TEMP_NAME_OVERHEAD = len(TEMP_PREFIX) + 32 + 1


def write_synced(path: Path, data: bytes) -> None:
    """A new file (the name must be free) of `data`, on disk before this returns."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        _write_all(descriptor, memoryview(data), 0)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def private_directories(directory: Path, root: Path) -> None:
    """Create `directory` and whatever is missing of it below `root`, each 0700 (`mkdir
    -p` would give the parents it creates the umask's mode), each in its parent on disk
    before this returns: the fsyncs of a commit make its renames durable, not the new
    directories they went into, which a crash could otherwise take with every object
    acknowledged in them. A file in the way raises `FileExistsError` or
    `NotADirectoryError`."""
    path = root
    for part in directory.relative_to(root).parts:
        path /= part
        try:
            path.mkdir(mode=PRIVATE_DIRECTORY)
        except FileExistsError:
            if not path.is_dir():
                raise
        else:
            fsync_directory(path.parent)


def make_private(directory: Path) -> None:
    """Take group and other access away from a directory that was left open (by an older
    version, or made by hand)."""
    mode = S_IMODE(directory.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        directory.chmod(mode & PRIVATE_DIRECTORY)
    except PermissionError:
        logger.warning("the store directory is open to others and not ours to close: %s", directory)


# Shared by every file being written: each has at most one write in flight, so a thread
# is never held for long.
_DISK_WRITERS = ForkSafePool("sealstream-disk")


def new_private_file(path: Path) -> BinaryIO:
    """A new file to write, 0600; the name must be free."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb")


# A file that stays under this many bytes is written through the cache, in one write
# when it is synced: O_DIRECT would write none of it (a file's tail goes through the
# cache), and setting it up (two stages, a switch of the file's flags there and back)
# costs more than such a file (an archive's small member).
_SMALL_BYTES = 64 * 1024


class UncachedFile:
    """A file written with O_DIRECT where its filesystem allows it: a new one, 0600 (its
    name must be free), or with `at` an existing one from that offset on (a part of an
    upload into the upload's one file). Page-aligned buffers of `stage_bytes` are written
    around the cache, a whole buffer at a time; what comes before the first block boundary
    (a part that starts inside a block) and the tail, of any length, go through the cache,
    as O_DIRECT writes whole blocks only. Where O_DIRECT is refused (tmpfs, some network
    filesystems) the file is written through the cache throughout. So is a file that
    stays small (`_SMALL_BYTES`, or a stage): kept in memory until it is flushed, and
    written then in one write.

    Two buffers take turns: one is written out on a disk thread while the other fills,
    so at most one write is in flight and the file is written in order. A write that
    failed there is raised by the next `write` or by `sync`.
    """

    def __init__(
        self, path: Path, stage_bytes: int = 4 * 1024 * 1024, *, at: int | None = None
    ) -> None:
        flags = os.O_WRONLY if at is not None else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._descriptor = os.open(path, flags, PRIVATE_FILE)
        hold(self._descriptor)
        self._position = at or 0  # where the next byte written out goes
        self._head = 0  # bytes up to a block boundary, once the file goes uncached
        self._stages: list[mmap.mmap] = []
        self._staged = 0
        self._in_flight: Future[None] | None = None
        self._stage_bytes = stage_bytes
        # What is kept until the file proves large (`_SMALL_BYTES`, or a stage): None once
        # it has, and the file is written as it fills.
        self._small: bytearray | None = bytearray()

    def write(self, data: memoryview) -> None:
        if self._small is not None:
            if len(self._small) + len(data) < min(_SMALL_BYTES, self._stage_bytes):
                self._small += data
                return
            data = memoryview(bytes(self._small) + bytes(data)) if self._small else data
            self._small = None
            self._go_uncached()
        if self._head and self._stages:
            head, data = data[: self._head], data[self._head :]
            self._write_cached(head)
            self._head -= len(head)
            if not self._head:
                self._set_direct(True)
        if not self._stages:
            self._write_cached(data)
            return
        while data:
            stage = self._stages[0]
            taken = min(len(data), len(stage) - self._staged)
            stage[self._staged : self._staged + taken] = data[:taken]
            self._staged += taken
            data = data[taken:]
            if self._staged == len(stage):
                self._write_out(stage)
                self._stages.reverse()  # fill the other while this one is written
                self._staged = 0

    def flush(self) -> None:
        """Write out what is staged, not yet durably: the file is whole once synced."""
        self._wait()
        if self._small:
            self._write_cached(memoryview(self._small))
            self._small.clear()
        if self._stages and self._staged:
            self._set_direct(False)  # the tail is not a whole number of blocks
            _write_staged(self._descriptor, self._stages[0], self._staged, self._position)
            self._position += self._staged
            self._staged = 0

    def sync(self) -> os.stat_result:
        """Write out what is staged, make the file durable, and give its status."""
        self.flush()
        os.fsync(self._descriptor)
        return os.fstat(self._descriptor)

    def close(self) -> None:
        """Close the file, once a write in flight has ended; again, nothing."""
        with suppress(OSError):  # closing: what was written no longer matters
            self._wait()
        for stage in self._stages:
            _SPARE_STAGES.give_back(stage)
        self._stages = []
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def _write_cached(self, data: memoryview) -> None:
        _write_all(self._descriptor, data, self._position)
        self._position += len(data)

    def _write_out(self, stage: mmap.mmap) -> None:
        """Write `stage` out on a disk thread, once the write before it has ended."""
        self._wait()
        self._in_flight = _DISK_WRITERS.executor.submit(
            _write_staged, self._descriptor, stage, len(stage), self._position
        )
        self._position += len(stage)

    def _wait(self) -> None:
        """Wait for the write in flight, if any; raise its error."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _go_uncached(self) -> None:
        """Write around the cache from here on, if the filesystem allows it."""
        self._head = -self._position % mmap.PAGESIZE
        try:
            self._set_direct(True)
        except OSError:
            return  # the filesystem writes through its cache only
        if self._head:
            self._set_direct(False)  # until the boundary
        self._stages = [
            _SPARE_STAGES.take(self._stage_bytes),
            _SPARE_STAGES.take(self._stage_bytes),
        ]

    def _set_direct(self, direct: bool) -> None:
        flags = fcntl.fcntl(self._descriptor, fcntl.F_GETFL)
        flags = flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT
        fcntl.fcntl(self._descriptor, fcntl.F_SETFL, flags)


class _SpareStages:
    """Stages closed files gave back, for the next: a fresh one costs the faults and
    zeroing of its pages as it fills, about as much as writing them out again for a file
    of a few stages (a resumable upload's part). Each holds only what a file of the
    store held. A forked child starts with none: anonymous mappings are shared with the
    parent, whose files may be filling them."""

    KEPT = 4

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._stages: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        """A stage of `size` bytes: anonymous memory, page-aligned as O_DIRECT wants."""
        with self._lock:
            for index, stage in enumerate(self._stages):
                if len(stage) == size:
                    return self._stages.pop(index)
        return mmap.mmap(-1, size)

    def give_back(self, stage: mmap.mmap) -> None:
        with self._lock:
            if len(self._stages) < self.KEPT:
                self._stages.append(stage)
                return
        stage.close()


_SPARE_STAGES = _SpareStages()


def _write_staged(descriptor: int, stage: mmap.mmap, length: int, position: int) -> None:
    """Write the first `length` bytes of `stage` at `position`. A failure is raised as a
    new OSError, with no traceback into the write: its frames would hold views of the
    buffer, which could then not be closed."""
    failure: tuple[int | None, str | None] | None = None
    try:
        _write_all(descriptor, memoryview(stage)[:length], position)
    except OSError as error:
        failure = (error.errno, error.strerror)
    if failure is not None:
        raise OSError(*failure)


def _write_all(descriptor: int, data: memoryview, position: int) -> None:
    while data:
        written = os.pwrite(descriptor, data, position)
        data, position = data[written:], position + written


def hold(descriptor: int) -> None:
    """Mark a temporary file as being written for as long as `descriptor` is open: the
    kernel drops the lock when its process dies, however long its writer stalls first."""
    fcntl.flock(descriptor, fcntl.LOCK_SH)


def remove_abandoned(path: Path, written_before: float) -> bool:
    """Remove the temporary file `path` if no writer holds it (`hold`) and it was last
    written before `written_before` (a time); whether it was removed. A file not held may
    still be live between two writes (a resumable upload's, between its PATCHes): the age
    is what vouches that it is not."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # gone meanwhile, or no file of ours (a symlink put there)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.fstat(descriptor)
        # Still the file opened (not one renamed in since), and old enough.
        if held.st_mtime >= written_before or os.lstat(path).st_ino != held.st_ino:
            return False
        path.unlink()
    except OSError:
        return False  # a writer holds it, or it went meanwhile
    finally:
        os.close(descriptor)
    return True


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable: the new name is an entry of the directory."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def prune_empty(directory: Path, stop: Path) -> None:
    """Remove now-empty directories from `directory` up to, not including, `stop`."""
    while directory != stop:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty: another key still lives here
        directory = directory.parent
