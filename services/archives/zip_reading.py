"""A zip read from object storage: `zipfile` gets a seekable file object that fetches the
byte ranges it asks for, behind a small read-ahead buffer, since a zip keeps its index at
the end.

The index is refused by its size before `zipfile` reads it; the members' declared sizes
and count are then checked all at once, from the index, before any member is read, and
no member is read past its declared size.
"""

import hashlib
import io
import itertools
import json
import stat
import zipfile
from collections.abc import Iterator
from functools import partial
from typing import IO

from services.archives.limits import (
    ARCHIVE_ERRORS,
    ArchiveLimits,
    HeaderTooLarge,
    InvalidArchive,
    check_member_size,
    check_members,
    check_unpacked,
)
from services.archives.members import Member, MemberKind, MemberSource
from services.archives.object_readers import READ_AHEAD, RangedObject
from storage import ObjectStore


class _IndexReader(io.BufferedReader):
    """A zip's bytes for `zipfile`. While its index is read (`budget` set), a read that
    would take the bytes read so far past the budget is refused before anything is
    fetched or allocated: `zipfile` reads the whole central directory in one read, and
    then holds an entry object for each of its records."""

    def __init__(self, raw: RangedObject, budget: int) -> None:
        super().__init__(raw, READ_AHEAD)
        self._size = raw.size
        self.budget: int | None = budget
        self._spent = 0

    def read(self, size: int | None = -1, /) -> bytes:
        if self.budget is not None:
            wanted = self._size - self.tell() if size is None or size < 0 else size
            self._spent += wanted
            if self._spent > self.budget:
                raise HeaderTooLarge(f"the zip's index is larger than {self.budget} bytes")
        return super().read(size)


class ZipSource(MemberSource):
    """A zip's members in the order they are stored, all checked against the limits from
    its index when it is opened."""

    format = "zip"

    def __init__(self, store: ObjectStore, key: str, size: int, limits: ArchiveLimits) -> None:
        self.bytes_total = size
        self._raw = RangedObject(store, key, size)
        reader = _IndexReader(self._raw, limits.max_header_size)
        try:
            self._zip = zipfile.ZipFile(reader)
        except ARCHIVE_ERRORS as error:
            raise InvalidArchive(f"not a readable zip archive: {error}") from error
        reader.budget = None  # the index is read; members are read within their sizes
        # In the order they are stored, so that reading goes front to back.
        self._infos = sorted(self._zip.infolist(), key=lambda info: info.header_offset)
        _check_zip(self._infos, limits, limits.unpacked_limit(size))
        self.items_total = len(self._infos)
        self._raw.furthest = 0  # the index at the end is not progress
        self._start = 0  # where the members offered start

    @property
    def bytes_read(self) -> int:
        return self._raw.furthest - self._start

    @property
    def spans(self) -> list[int]:
        """Each member's bytes in the archive, its local header included, in the order
        they are stored."""
        offsets = [info.header_offset for info in self._infos] + [self._zip.start_dir]
        return [end - start for start, end in itertools.pairwise(offsets)]

    def index_digest(self) -> str:
        """A digest of what the index says of every member: the same for the same index."""
        fields = [
            (i.filename, i.header_offset, i.compress_size, i.file_size, i.CRC, i.external_attr)
            for i in self._infos
        ]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    def only(self, start: int, count: int) -> list[tuple[str, MemberKind]]:
        """Offer only the `count` members from the `start`-th on; the names and kinds of
        those before them."""
        earlier = [(info.filename, zip_kind(info)) for info in self._infos[:start]]
        self._infos = self._infos[start : start + count]
        self.items_total = len(self._infos)
        self._start = self._infos[0].header_offset if self._infos else 0
        self._raw.furthest = self._start
        return earlier

    def members(self) -> Iterator[Member]:
        for info in self._infos:
            yield Member(info.filename, zip_kind(info), info.file_size, partial(self._open, info))

    def _open(self, info: zipfile.ZipInfo) -> IO[bytes]:
        return self._zip.open(info)

    def close(self) -> None:
        self._zip.close()


def _check_zip(infos: list[zipfile.ZipInfo], limits: ArchiveLimits, max_unpacked: int) -> None:
    """The limits a zip's index says it keeps to, checked before any member is read."""
    check_members(len(infos), limits)
    check_member_size(max((info.file_size for info in infos), default=0), limits)
    check_unpacked(sum(info.file_size for info in infos), max_unpacked)


_ZIP_MODE_KINDS = {
    0: MemberKind.FILE,  # permissions only, or a non-Unix archiver
    stat.S_IFREG: MemberKind.FILE,
    stat.S_IFDIR: MemberKind.DIRECTORY,
    stat.S_IFLNK: MemberKind.SYMLINK,
    stat.S_IFCHR: MemberKind.DEVICE,
    stat.S_IFBLK: MemberKind.DEVICE,
    stat.S_IFIFO: MemberKind.FIFO,
}


def zip_kind(info: zipfile.ZipInfo) -> MemberKind:
    if info.is_dir():
        return MemberKind.DIRECTORY
    # Unix archivers keep the file's mode in the high 16 bits: a symlink's target is
    # stored as its content, which must not pass for a regular file.
    kind = _ZIP_MODE_KINDS.get(stat.S_IFMT(info.external_attr >> 16), MemberKind.OTHER)
    if kind is MemberKind.FILE and info.flag_bits & 0x1:
        return MemberKind.ENCRYPTED
    return kind
