"""Files only their owner can use, written so that a crash never leaves half of one: the
filesystem steps the local store is made of.

Directories are created 0700 and files 0600 (the umask can only take more away). A file
is written under a fresh temporary name beside its final one, fsync'd, renamed into
place, and its directory fsync'd, so that the new name survives a crash.
"""

import logging
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
