"""Archives in object storage read as streams of members, never downloaded whole.

tar (plain, gzip, bzip2, xz) is read front to back with `tarfile`'s streaming mode, in
constant memory, through ranged reads of a few MiB each. zip keeps its index at the end,
so `zipfile` gets a seekable file object that fetches the byte ranges it asks for, behind
a small read-ahead buffer. The objects under a prefix are offered the same way, one
member per object. Nothing is written to disk.

A member's name is only a claim: `member_path` turns it into a safe object path or
refuses it (absolute paths, `..`, links, devices...). Nothing is ever followed.

An archive is held to `ArchiveLimits`, each crossing failing the job with a code of its
own (`ArchiveLimitExceeded`). The members' declared sizes are checked before their bytes
are read or skipped (a zip's all at once, from its index; a tar's one by one, as its
headers stream past), and neither format reads a member past its declared size, so a
decompression bomb is refused before it has cost anything. What a tar's declared sizes
do not cover, its headers, is counted as it is decompressed: a tar is decompressed here,
a bounded read at a time, and `tarfile` reads the result through `_Bounded`, which stops
it at the end of the member it is on plus one member's worth of headers. So a pax or GNU
long-name header of any declared size costs at most `max_header_size` before the job
fails; a zip's index is refused by its size before `zipfile` reads it.
"""

import bz2
import gzip
import io
import lzma
import re
import stat
import tarfile
import zipfile
import zlib

# `lzma.LZMAFile` takes no memory limit; the reader it is built on does.
from _compression import DecompressReader
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import IO, TYPE_CHECKING

from services.placement import check_object_key
from storage import InvalidObjectKey, ObjectStore

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a first entry, or an empty archive
COMPRESSION_MAGICS = {b"\x1f\x8b": "tar.gz", b"BZh": "tar.bz2", b"\xfd7zXZ\x00": "tar.xz"}
MAGIC_LENGTH = 6  # the longest of the magics above
WINDOW = 8 << 20  # bytes per ranged read of a front-to-back read
READ_AHEAD = 64 << 10  # zip headers are small: fetch this much around each
# What `xz -9` needs is 65 MiB; a stream whose dictionary needs more is refused rather
# than given the memory its header asks for.
XZ_MEMORY_LIMIT = 128 << 20
# Bytes `tarfile` may read past what it has parsed: it reads its input a record at a time.
TAR_READ_AHEAD = tarfile.RECORDSIZE
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError)
# What a decompressor raises on damaged input (a truncated stream: EOFError).
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class ArchiveLimits:
    """How far one job may go into an archive or a prefix."""

    max_expansion: float  # unpacked bytes per byte of archive
    max_unpacked: int  # unpacked bytes of the whole archive: members, headers, padding
    max_member_size: int  # one member's unpacked size
    max_header_size: int  # one tar member's extended headers, or a zip's index
    max_members: int  # entries of an archive (files, directories, links...) or objects

    def unpacked_limit(self, archive_size: int) -> int:
        return min(int(self.max_expansion * archive_size), self.max_unpacked)


class InvalidArchive(Exception):
    """The object is not an archive of the expected format, or is damaged."""

    code = "invalid-archive"


class ArchiveLimitExceeded(InvalidArchive):
    """The archive goes past one of the job's `ArchiveLimits`; the message says which."""


class ArchiveBomb(ArchiveLimitExceeded):
    """The members would unpack to more than the archive's size allows: a decompression
    bomb (or an archive to split before it is sealed)."""

    code = "archive-expands-too-far"


class MemberTooLarge(ArchiveLimitExceeded):
    """A member would unpack to more than one member may."""

    code = "archive-member-too-large"


class HeaderTooLarge(ArchiveLimitExceeded):
    """A tar member's extended headers, or a zip's index, are larger than allowed."""

    code = "archive-header-too-large"


class TooManyMembers(ArchiveLimitExceeded):
    """More members (or objects under a prefix) than one job may take."""

    code = "archive-too-many-members"


class UnsafeMember(Exception):
    """A member that is refused; the message says why."""


class MemberKind(StrEnum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    DEVICE = "device"
    FIFO = "fifo"
    ENCRYPTED = "encrypted"
    OTHER = "other"


_REFUSED_KINDS = {
    MemberKind.SYMLINK: "a symbolic link",
    MemberKind.HARDLINK: "a hard link",
    MemberKind.DEVICE: "a device",
    MemberKind.FIFO: "a FIFO",
    MemberKind.ENCRYPTED: "a password-protected entry",
    MemberKind.OTHER: "not a regular file",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"[A-Za-z]:")


@dataclass(frozen=True)
class Member:
    """One entry: its name as the archive spells it, its kind, its size if known, and how
    to read its bytes (for tar, only until the next member is asked for)."""

    name: str
    kind: MemberKind
    size: int | None
    open: Callable[[], IO[bytes]]


def member_path(name: str, kind: MemberKind) -> str | None:
    """The object path a member is written under; None for a directory (skipped).

    Raises `UnsafeMember` for anything but a regular file with a plain relative name;
    `./a//b` becomes `a/b`.
    """
    if kind is MemberKind.DIRECTORY:
        return None
    if kind is not MemberKind.FILE:
        raise UnsafeMember(f"{_REFUSED_KINDS[kind]}: not followed")
    if _CONTROL.search(name):
        raise UnsafeMember("the name holds NUL or control characters")
    if "\\" in name:
        raise UnsafeMember("the name holds a backslash")
    if name.startswith("/"):
        raise UnsafeMember("an absolute path")
    if _DRIVE.match(name):
        raise UnsafeMember("a path with a drive letter")
    segments = [segment for segment in name.split("/") if segment not in ("", ".")]
    if ".." in segments:
        raise UnsafeMember("a path with a '..' segment")
    path = "/".join(segments)
    try:
        path.encode("utf-8")
        check_object_key(path)
    except UnicodeEncodeError:
        raise UnsafeMember("the name is not valid UTF-8") from None
    except InvalidObjectKey as error:
        raise UnsafeMember(str(error)) from None
    return path


class MemberSource(ABC):
    """Members to seal, and how far through its bytes the reading is."""

    format: str
    bytes_total: int
    items_total: int | None  # None while unknown (a tar stream, until its end)

    @property
    @abstractmethod
    def bytes_read(self) -> int: ...

    @abstractmethod
    def members(self) -> Iterator[Member]:
        """The members in order; raises `InvalidArchive` if the archive breaks off."""


class ObjectReader(io.RawIOBase):
    """An object's bytes front to back, one ranged read per window, so that no request
    stays open for the whole of a long job."""

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        self.position = 0
        self._chunks = _windows(store, key, size)
        self._chunk = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._chunk = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(self._chunk))
        view[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        self.position += count
        return count

    def close(self) -> None:
        self._chunks.close()  # releases the connection of a read cut short
        super().close()


def _windows(store: ObjectStore, key: str, size: int) -> Generator[bytes, None, None]:
    for start in range(0, size, WINDOW):
        yield from store.read(key, start, min(start + WINDOW, size))


class _RangedObject(io.RawIOBase):
    """A seekable view of an object: each read fetches just the range it asks for."""

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        self._store, self._key, self.size = store, key, size
        self._position = 0
        self.furthest = 0  # the end of the furthest range fetched

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: "WriteableBuffer") -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._position + len(view), self.size)
        if end <= self._position:
            return 0
        data = b"".join(self._store.read(self._key, self._position, end))
        view[: len(data)] = data
        self._position = end
        self.furthest = max(self.furthest, end)
        return len(data)


class _Bounded(io.RawIOBase):
    """An archive's unpacked bytes as `tarfile` takes them, counted (`position`), and cut
    off at a limit its reader moves as it goes (`limit_to`): a read past it raises the
    limit's error instead, so nothing past a limit is ever decompressed."""

    def __init__(
        self, unpacked: io.BufferedIOBase, limit: int, exceeded: ArchiveLimitExceeded
    ) -> None:
        self._unpacked = unpacked
        self.position = 0
        self.limit_to(limit, exceeded)

    def limit_to(self, limit: int, exceeded: ArchiveLimitExceeded) -> None:
        self._limit, self._exceeded = limit, exceeded

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        view = memoryview(buffer).cast("B")
        room = self._limit - self.position
        if room <= 0:
            if self._read(view[:1]):  # the stream goes on past the limit
                raise self._exceeded
            return 0
        count = self._read(view[:room])
        self.position += count
        return count

    def _read(self, view: memoryview) -> int:
        try:
            return self._unpacked.readinto(view)
        except DECOMPRESSION_ERRORS as error:
            raise InvalidArchive(f"cannot unpack the archive: {error}") from error

    def close(self) -> None:
        self._unpacked.close()
        super().close()


def _unpacked(compressed: "io.BufferedReader[ObjectReader]", format_: str) -> io.BufferedIOBase:
    """The decompressed bytes of a tar; each read decompresses no more than it returns,
    where `tarfile`'s own streaming mode inflates a whole input record at once."""
    if format_ == "tar.gz":
        return gzip.GzipFile(fileobj=compressed, mode="rb")
    if format_ == "tar.bz2":
        return bz2.BZ2File(compressed)
    if format_ == "tar.xz":
        reader = DecompressReader(
            compressed,
            lzma.LZMADecompressor,
            trailing_error=lzma.LZMAError,
            memlimit=XZ_MEMORY_LIMIT,
        )
        return io.BufferedReader(reader)
    return compressed


class _TarSource(MemberSource):
    def __init__(
        self, store: ObjectStore, key: str, size: int, format_: str, limits: ArchiveLimits
    ) -> None:
        self.format = format_
        self.bytes_total = size
        self.items_total = None
        self._limits = limits
        self._max_unpacked = limits.unpacked_limit(size)
        self._declared = 0  # the members' declared sizes, summed
        self._reader = ObjectReader(store, key, size)
        compressed = io.BufferedReader(self._reader, READ_AHEAD)
        # `tarfile.open` reads the first member's headers.
        self._stream = _Bounded(_unpacked(compressed, format_), *self._bound(end_of_member=0))
        try:
            with _tar_errors("not a readable tar archive"):
                # Kept open across `members()`; `close()` closes it.
                self._tar = tarfile.open(fileobj=self._stream, mode="r|")  # noqa: SIM115
        except BaseException:
            self._stream.close()
            self._reader.close()
            raise

    @property
    def bytes_read(self) -> int:
        return self._reader.position

    def members(self) -> Iterator[Member]:
        count = 0
        while (info := self._next()) is not None:
            # A streamed TarFile keeps every header it has read; the list would grow with
            # the archive, and nothing here looks back.
            self._tar.members.clear()  # type: ignore[attr-defined]  # untyped, but public
            count += 1
            self._check(info, count)
            self._stream.limit_to(*self._bound(end_of_member=_data_end(info)))
            yield Member(info.name, _tar_kind(info), info.size, partial(self._open, info))

    def _check(self, info: tarfile.TarInfo, count: int) -> None:
        """The limits a member's header declares it keeps to, checked before its data is
        read or skipped."""
        _check_members(count, self._limits)
        _check_member_size(info.size, self._limits)
        # Where this member ends in the unpacked stream, whether it is read or skipped; and
        # the sizes so far, which a sparse member's data area does not show.
        self._declared += info.size
        _check_unpacked(max(info.offset_data + info.size, self._declared), self._max_unpacked)

    def _bound(self, end_of_member: int) -> tuple[int, ArchiveLimitExceeded]:
        """How far `tarfile` may read: the current member's data, then only as many bytes
        of headers as one member may have before the next one's data starts; and what
        reading further means."""
        max_header = self._limits.max_header_size
        headers = end_of_member + max_header + TAR_READ_AHEAD
        if headers >= self._max_unpacked:
            return self._max_unpacked, _expands_too_far(self._max_unpacked)
        return headers, HeaderTooLarge(f"a member's headers are larger than {max_header} bytes")

    def _next(self) -> tarfile.TarInfo | None:
        with _tar_errors("the tar archive is damaged"):
            return self._tar.next()

    def _open(self, info: tarfile.TarInfo) -> IO[bytes]:
        stream = self._tar.extractfile(info)
        assert stream is not None  # a regular file's
        return stream

    def close(self) -> None:
        self._tar.close()
        self._stream.close()
        self._reader.close()


@contextmanager
def _tar_errors(what: str) -> Iterator[None]:
    """`tarfile`'s errors as `InvalidArchive`, saying `what` failed."""
    try:
        yield
    except ARCHIVE_ERRORS as error:
        raise InvalidArchive(f"{what}: {error}") from error
    except RecursionError:
        # tarfile reads a run of extended headers recursively: within the headers'
        # limit, a run of tiny ones could still be deeper than Python allows.
        raise HeaderTooLarge("a member has too many extended headers") from None


def _data_end(info: tarfile.TarInfo) -> int:
    """Where a member's data area ends in the unpacked stream (a sparse member's is
    shorter: its size is the unpacked one)."""
    blocks = -(-info.size // tarfile.BLOCKSIZE)
    return info.offset_data + blocks * tarfile.BLOCKSIZE


def _tar_kind(info: tarfile.TarInfo) -> MemberKind:
    if info.isreg():
        return MemberKind.FILE
    if info.isdir():
        return MemberKind.DIRECTORY
    if info.issym():
        return MemberKind.SYMLINK
    if info.islnk():
        return MemberKind.HARDLINK
    if info.ischr() or info.isblk():
        return MemberKind.DEVICE
    return MemberKind.FIFO if info.isfifo() else MemberKind.OTHER


class _IndexReader(io.BufferedReader):
    """A zip's bytes for `zipfile`. While its index is read (`budget` set), a read that
    would take the bytes read so far past the budget is refused before anything is
    fetched or allocated: `zipfile` reads the whole central directory in one read, and
    then holds an entry object for each of its records."""

    def __init__(self, raw: _RangedObject, budget: int) -> None:
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


class _ZipSource(MemberSource):
    format = "zip"

    def __init__(self, store: ObjectStore, key: str, size: int, limits: ArchiveLimits) -> None:
        self.bytes_total = size
        self._raw = _RangedObject(store, key, size)
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

    @property
    def bytes_read(self) -> int:
        return self._raw.furthest

    def members(self) -> Iterator[Member]:
        for info in self._infos:
            yield Member(info.filename, _zip_kind(info), info.file_size, partial(self._open, info))

    def _open(self, info: zipfile.ZipInfo) -> IO[bytes]:
        return self._zip.open(info)

    def close(self) -> None:
        self._zip.close()


def _check_zip(infos: list[zipfile.ZipInfo], limits: ArchiveLimits, max_unpacked: int) -> None:
    """The limits a zip's index says it keeps to, checked before any member is read."""
    _check_members(len(infos), limits)
    _check_member_size(max((info.file_size for info in infos), default=0), limits)
    _check_unpacked(sum(info.file_size for info in infos), max_unpacked)


def _check_members(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_members:
        raise TooManyMembers(f"the archive holds more than {limits.max_members} members")


def _check_member_size(size: int, limits: ArchiveLimits) -> None:
    if size > limits.max_member_size:
        raise MemberTooLarge(
            f"a member unpacks to {size} bytes, more than the "
            f"{limits.max_member_size} one member may"
        )


def _check_unpacked(unpacked: int, max_unpacked: int) -> None:
    if unpacked > max_unpacked:
        raise _expands_too_far(max_unpacked)


def _expands_too_far(max_unpacked: int) -> ArchiveBomb:
    return ArchiveBomb(
        f"the archive's members unpack to more than {max_unpacked} bytes, the most its size allows"
    )


_ZIP_MODE_KINDS = {
    0: MemberKind.FILE,  # permissions only, or a non-Unix archiver
    stat.S_IFREG: MemberKind.FILE,
    stat.S_IFDIR: MemberKind.DIRECTORY,
    stat.S_IFLNK: MemberKind.SYMLINK,
    stat.S_IFCHR: MemberKind.DEVICE,
    stat.S_IFBLK: MemberKind.DEVICE,
    stat.S_IFIFO: MemberKind.FIFO,
}


def _zip_kind(info: zipfile.ZipInfo) -> MemberKind:
    if info.is_dir():
        return MemberKind.DIRECTORY
    # Unix archivers keep the file's mode in the high 16 bits: a symlink's target is
    # stored as its content, which must not pass for a regular file.
    kind = _ZIP_MODE_KINDS.get(stat.S_IFMT(info.external_attr >> 16), MemberKind.OTHER)
    if kind is MemberKind.FILE and info.flag_bits & 0x1:
        return MemberKind.ENCRYPTED
    return kind


class PrefixSource(MemberSource):
    """Every object under `storage_prefix` (but those under `skip`), listed once at the
    start, so that objects written meanwhile are never read back; at most `max_members`."""

    format = "prefix"

    def __init__(
        self, store: ObjectStore, storage_prefix: str, skip: str | None, max_members: int
    ) -> None:
        self._store = store
        self._prefix = storage_prefix
        self._objects: list[tuple[str, int]] = []
        for info in store.list(storage_prefix):
            if skip is not None and info.key.startswith(skip):
                continue
            if len(self._objects) == max_members:
                raise TooManyMembers(f"more than {max_members} objects under the prefix")
            self._objects.append((info.key, info.size))
        self.items_total = len(self._objects)
        self.bytes_total = sum(size for _, size in self._objects)
        self._passed = 0  # bytes of the objects before the current one
        self._current: ObjectReader | None = None

    @property
    def bytes_read(self) -> int:
        return self._passed + (self._current.position if self._current else 0)

    def members(self) -> Iterator[Member]:
        for key, size in self._objects:
            name = key[len(self._prefix) :]
            yield Member(name, MemberKind.FILE, size, partial(self._open, key, size))
            self._passed += size
            self._current = None

    def _open(self, key: str, size: int) -> IO[bytes]:
        self._current = ObjectReader(self._store, key, size)
        return io.BufferedReader(self._current, READ_AHEAD)


@contextmanager
def open_archive(
    store: ObjectStore, key: str, format_: str, limits: ArchiveLimits
) -> Iterator[MemberSource]:
    """The archive object `key` as members; `format_` is auto, tar, tar.gz, tar.bz2 or zip
    (auto also reads tar.xz)."""
    size = store.head(key).size
    if format_ == "auto":
        format_ = _detect(_first_bytes(store, key, size))
    source: _TarSource | _ZipSource
    if format_ == "zip":
        source = _ZipSource(store, key, size, limits)
    else:
        source = _TarSource(store, key, size, format_, limits)
    try:
        yield source
    finally:
        source.close()


def _detect(magic: bytes) -> str:
    if magic.startswith(ZIP_MAGICS):
        return "zip"
    for start, format_ in COMPRESSION_MAGICS.items():
        if magic.startswith(start):
            return format_
    return "tar"


def _first_bytes(store: ObjectStore, key: str, size: int) -> bytes:
    return b"".join(store.read(key, 0, min(MAGIC_LENGTH, size)))
