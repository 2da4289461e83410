"""Archives in object storage read as streams of members, never downloaded whole.

tar (plain, gzip, bzip2, xz) is read front to back with `tarfile`'s streaming mode, in
constant memory, through ranged reads of a few MiB each. zip keeps its index at the end,
so `zipfile` gets a seekable file object that fetches the byte ranges it asks for, behind
a small read-ahead buffer. The objects under a prefix are offered the same way, one
member per object. Nothing is written to disk.

A member's name is only a claim: `member_path` turns it into a safe object path or
refuses it (absolute paths, `..`, links, devices...). Nothing is ever followed.

An archive may unpack to at most `max_expansion` times its own size. The sizes its
members declare are checked before their bytes are read or skipped (a zip's all at once,
from its index; a tar's one by one, as its headers stream past), and neither format
reads a member past its declared size, so a decompression bomb is refused before it has
cost anything.
"""

import io
import re
import stat
import tarfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import IO, TYPE_CHECKING, Literal

from sealstream.spaces import check_object_key
from storage import InvalidObjectKey, ObjectStore

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a first entry, or an empty archive
WINDOW = 8 << 20  # bytes per ranged read of a front-to-back read
READ_AHEAD = 64 << 10  # zip headers are small: fetch this much around each
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError)
TarMode = Literal["r|*", "r|", "r|gz", "r|bz2"]
TAR_MODES: dict[str, TarMode] = {"auto": "r|*", "tar": "r|", "tar.gz": "r|gz", "tar.bz2": "r|bz2"}


class InvalidArchive(Exception):
    """The object is not an archive of the expected format, or is damaged."""

    code = "invalid-archive"


class ArchiveBomb(InvalidArchive):
    """The members would unpack to more than the archive's size allows: a decompression
    bomb (or an archive to split before it is sealed)."""

    code = "archive-expands-too-far"


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
        self._store, self._key, self._size = store, key, size
        self._position = 0
        self.furthest = 0  # the end of the furthest range fetched

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: "WriteableBuffer") -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._position + len(view), self._size)
        if end <= self._position:
            return 0
        data = b"".join(self._store.read(self._key, self._position, end))
        view[: len(data)] = data
        self._position = end
        self.furthest = max(self.furthest, end)
        return len(data)


class _TarSource(MemberSource):
    def __init__(
        self, store: ObjectStore, key: str, size: int, mode: TarMode, max_unpacked: int
    ) -> None:
        self.bytes_total = size
        self.items_total = None
        self._max_unpacked = max_unpacked
        self._reader = ObjectReader(store, key, size)
        try:
            # Kept open across `members()`; `close()` closes it.
            self._tar = tarfile.open(  # noqa: SIM115
                fileobj=io.BufferedReader(self._reader, READ_AHEAD), mode=mode
            )
        except ARCHIVE_ERRORS as error:
            self._reader.close()
            raise InvalidArchive(f"not a readable tar archive: {error}") from error
        comptype = getattr(self._tar.fileobj, "comptype", "tar")
        self.format = "tar" if comptype == "tar" else f"tar.{comptype}"

    @property
    def bytes_read(self) -> int:
        return self._reader.position

    def members(self) -> Iterator[Member]:
        while (info := self._next()) is not None:
            # A streamed TarFile keeps every header it has read; the list would grow with
            # the archive, and nothing here looks back.
            self._tar.members.clear()  # type: ignore[attr-defined]  # untyped, but public
            # Where this member ends in the unpacked stream, whether it is read or skipped.
            _check_unpacked(info.offset_data + info.size, self._max_unpacked)
            yield Member(info.name, _tar_kind(info), info.size, partial(self._open, info))

    def _next(self) -> tarfile.TarInfo | None:
        try:
            return self._tar.next()
        except ARCHIVE_ERRORS as error:
            raise InvalidArchive(f"the tar archive is damaged: {error}") from error

    def _open(self, info: tarfile.TarInfo) -> IO[bytes]:
        stream = self._tar.extractfile(info)
        assert stream is not None  # a regular file's
        return stream

    def close(self) -> None:
        self._tar.close()
        self._reader.close()


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


class _ZipSource(MemberSource):
    format = "zip"

    def __init__(self, store: ObjectStore, key: str, size: int, max_unpacked: int) -> None:
        self.bytes_total = size
        self._raw = _RangedObject(store, key, size)
        try:
            self._zip = zipfile.ZipFile(io.BufferedReader(self._raw, READ_AHEAD))
        except ARCHIVE_ERRORS as error:
            raise InvalidArchive(f"not a readable zip archive: {error}") from error
        # In the order they are stored, so that reading goes front to back.
        self._infos = sorted(self._zip.infolist(), key=lambda info: info.header_offset)
        _check_unpacked(sum(info.file_size for info in self._infos), max_unpacked)
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
    start, so that objects written meanwhile are never read back."""

    format = "prefix"

    def __init__(self, store: ObjectStore, storage_prefix: str, skip: str | None) -> None:
        self._store = store
        self._prefix = storage_prefix
        self._objects = [
            (info.key, info.size)
            for info in store.list(storage_prefix)
            if skip is None or not info.key.startswith(skip)
        ]
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


def _check_unpacked(unpacked: int, max_unpacked: int) -> None:
    if unpacked > max_unpacked:
        raise ArchiveBomb(
            f"the archive's members unpack to more than {max_unpacked} bytes, "
            "the most its size allows"
        )


@contextmanager
def open_archive(
    store: ObjectStore, key: str, format_: str, max_expansion: float
) -> Iterator[MemberSource]:
    """The archive object `key` as members; `format_` is auto, tar, tar.gz, tar.bz2 or zip.
    Its members may unpack to `max_expansion` times its size at most."""
    size = store.head(key).size
    max_unpacked = int(max_expansion * size)
    if format_ == "auto" and _first_bytes(store, key, size) in ZIP_MAGICS:
        format_ = "zip"
    source: _TarSource | _ZipSource
    if format_ == "zip":
        source = _ZipSource(store, key, size, max_unpacked)
    else:
        source = _TarSource(store, key, size, TAR_MODES[format_], max_unpacked)
    try:
        yield source
    finally:
        source.close()


def _first_bytes(store: ObjectStore, key: str, size: int) -> bytes:
    return b"".join(store.read(key, 0, min(len(ZIP_MAGICS[0]), size)))
