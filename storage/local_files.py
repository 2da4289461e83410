"""Files only their owner can use, written so that a crash never leaves half of one: the
filesystem steps the local store is made of.

Directories are created 0700 and files 0600 (the umask can only take more away). A file
is written under a fresh temporary name beside its final one, fsync'd, renamed into
place, and its directory fsync'd, so that the new name survives a crash.

An object's bytes, streamed in by the GiB, go around the page cache where the filesystem
allows it (`UncachedFile`): through the cache, the writing process spent more CPU in the
kernel, copying each byte in and allocating and writing back its pages, than on the rest
of a stream, its encryption included (docs/benchmarks.md).
"""

import fcntl
import logging
import mmap
import os
import uuid
from pathlib import Path
from stat import S_IMODE
from typing import BinaryIO

logger = logging.getLogger(__name__)

PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600
TEMP_PREFIX = ".tmp-"
# What a temporary name adds before the name it stands for: ".tmp-", 32 hex digits, "-".
TEMP_NAME_OVERHEAD = len(TEMP_PREFIX) + 32 + 1


def write_atomically(path: Path, data: bytes, root: Path) -> None:
    private_directories(path.parent, root)
    temp = temp_beside(path)
    with new_private_file(temp) as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    temp.replace(path)
    fsync_directory(path.parent)


def private_directories(directory: Path, root: Path) -> None:
    """Create `directory` and whatever is missing of it below `root`, each 0700 (`mkdir
    -p` would give the parents it creates the umask's mode). A file in the way raises
    `FileExistsError` or `NotADirectoryError`."""
    path = root
    for part in directory.relative_to(root).parts:
        path /= part
        try:
            path.mkdir(mode=PRIVATE_DIRECTORY)
        except FileExistsError:
            if not path.is_dir():
                raise


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


def new_private_file(path: Path) -> BinaryIO:
    """A new file to write, 0600; the name must be free."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb")


class UncachedFile:
    """A new file, 0600 (its name must be free), written with O_DIRECT where its filesystem
    allows it: from a page-aligned buffer of `stage_bytes`, a whole buffer at a time, and
    the tail, of any length, through the cache once the file is synced. Where O_DIRECT is
    refused (tmpfs, some network filesystems) it is written through the cache throughout.
    """

    def __init__(self, path: Path, stage_bytes: int = 4 * 1024 * 1024) -> None:
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        self._stage: mmap.mmap | None = None
        self._staged = 0
        try:
            self._set_direct(True)
        except OSError:
            return  # the filesystem writes through its cache only
        # Anonymous memory is page-aligned, as O_DIRECT wants its buffers and lengths.
        self._stage = mmap.mmap(-1, stage_bytes)

    def write(self, data: memoryview) -> None:
        if self._stage is None:
            _write_all(self._descriptor, data)
            return
        stage = self._stage
        while data:
            taken = min(len(data), len(stage) - self._staged)
            stage[self._staged : self._staged + taken] = data[:taken]
            self._staged += taken
            data = data[taken:]
            if self._staged == len(stage):
                _write_all(self._descriptor, memoryview(stage))
                self._staged = 0

    def sync(self) -> os.stat_result:
        """Write out what is staged, make the file durable, and give its status."""
        if self._stage is not None and self._staged:
            self._set_direct(False)  # the tail is not a whole number of blocks
            _write_all(self._descriptor, memoryview(self._stage)[: self._staged])
            self._staged = 0
        os.fsync(self._descriptor)
        return os.fstat(self._descriptor)

    def close(self) -> None:
        """Close the file; again, nothing."""
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def _set_direct(self, direct: bool) -> None:
        flags = fcntl.fcntl(self._descriptor, fcntl.F_GETFL)
        flags = flags | os.O_DIRECT if direct else flags & ~os.O_DIRECT
        fcntl.fcntl(self._descriptor, fcntl.F_SETFL, flags)


def _write_all(descriptor: int, data: memoryview) -> None:
    while data:
        data = data[os.write(descriptor, data) :]


def temp_beside(path: Path) -> Path:
    """A fresh temporary name in the same directory, so a rename can put it in place."""
    return path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{path.name}")


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
