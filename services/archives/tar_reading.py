"""A tar (plain, gzip, bzip2, xz) read front to back, in constant memory, with
`tarfile`'s streaming mode: from object storage over ranged reads of a few MiB each, or
from an upload as it arrives.

Each member's declared size is checked as its header streams past, before its data is
read or skipped, and no member is read past its declared size. What the declared sizes
do not cover, the headers, is counted as it is decompressed: the tar is decompressed
here, a bounded read at a time, and `tarfile` reads the result through `_Bounded`, which
stops it at the end of the member it is on plus one member's worth of headers. So a pax
or GNU long-name header of any declared size costs at most `max_header_size` before the
job fails.

An archive of known size may unpack to `max_expansion` times that size. An upload's size
is not known until it ends, so what it has unpacked so far is held to `max_expansion`
times what has arrived so far (`ArchiveLimits.allowance`): a bomb is refused after the
few bytes it takes to send, not after a declared length that nothing backs yet.
"""

import bz2
import gzip
import io
import lzma
import tarfile
import zlib

# `lzma.LZMAFile` takes no memory limit; the reader it is built on does.
from _compression import DecompressReader
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import IO, TYPE_CHECKING, Self

from services.archives.limits import (
    ARCHIVE_ERRORS,
    ArchiveLimitExceeded,
    ArchiveLimits,
    HeaderTooLarge,
    InvalidArchive,
    check_member_size,
    check_members,
    check_unpacked,
    expands_too_far,
)
from services.archives.members import Member, MemberKind, MemberSource
from services.archives.object_readers import READ_AHEAD, ObjectReader
from storage import ObjectStore

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# What `xz -9` needs is 65 MiB; a stream whose dictionary needs more is refused rather
# than given the memory its header asks for.
XZ_MEMORY_LIMIT = 128 << 20
# Bytes `tarfile` may read past what it has parsed: it reads its input a record at a time.
TAR_READ_AHEAD = tarfile.RECORDSIZE
# What a decompressor raises on damaged input (a truncated stream: EOFError).
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


class _Bounded(io.RawIOBase):
    """An archive's unpacked bytes as `tarfile` takes them, counted (`position`), and cut
    off at a limit its reader moves as it goes (`limit_to`): a read past it raises the
    limit's error instead, so nothing past a limit is ever decompressed."""

    def __init__(
        self,
        unpacked: io.BufferedIOBase,
        limit: int,
        exceeded: ArchiveLimitExceeded,
        allowance: Callable[[], int] | None,
    ) -> None:
        self._unpacked = unpacked
        self._allowance = allowance  # how far it may have unpacked by now, if that moves
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
        if self._allowance is not None:
            check_unpacked(self.position, self._allowance())
        return count

    def _read(self, view: memoryview) -> int:
        try:
            return self._unpacked.readinto(view)
        except DECOMPRESSION_ERRORS as error:
            raise InvalidArchive(f"cannot unpack the archive: {error}") from error

    def close(self) -> None:
        self._unpacked.close()
        super().close()


def _unpacked(compressed: io.BufferedIOBase, format_: str) -> io.BufferedIOBase:
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


class TarSource(MemberSource):
    """A tar's members in the order they stream past, each checked against the limits
    as its header is read.

    `compressed` is the archive's bytes as stored or sent, and `raw_read` says how many
    of them have been taken from their source so far; `size` is the archive's, or None
    while it is not known (an upload).
    """

    def __init__(
        self,
        compressed: io.BufferedIOBase,
        raw_read: Callable[[], int],
        format_: str,
        limits: ArchiveLimits,
        size: int | None,
    ) -> None:
        self.format = format_
        self.bytes_total = size
        self.items_total = None
        self._limits = limits
        self._raw_read = raw_read
        self._compressed = compressed
        self._max_unpacked = limits.max_unpacked if size is None else limits.unpacked_limit(size)
        # Known, the size bounds the whole archive at once; unknown, what has arrived so far.
        allowance = None if size is not None else partial(_arrived_allowance, limits, raw_read)
        self._declared = 0  # the members' declared sizes, summed
        # `tarfile.open` reads the first member's headers.
        self._stream = _Bounded(
            _unpacked(compressed, format_), *self._bound(end_of_member=0), allowance
        )
        try:
            with _tar_errors("not a readable tar archive"):
                # Kept open across `members()`; `close()` closes it.
                self._tar = tarfile.open(  # noqa: SIM115
                    fileobj=self._stream, mode="r|", tarinfo=_EndChecked
                )
        except BaseException:
            self._stream.close()
            compressed.close()
            raise

    @classmethod
    def of_object(
        cls, store: ObjectStore, key: str, size: int, format_: str, limits: ArchiveLimits
    ) -> "TarSource":
        """The tar stored at `key`, of `size` bytes, read through ranged reads."""
        reader = ObjectReader(store, key, size)
        compressed = io.BufferedReader(reader, READ_AHEAD)
        return cls(compressed, lambda: reader.position, format_, limits, size)

    @property
    def bytes_read(self) -> int:
        return self._raw_read()

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
        check_members(count, self._limits)
        check_member_size(info.size, self._limits)
        # Where this member ends in the unpacked stream, whether it is read or skipped; and
        # the sizes so far, which a sparse member's data area does not show.
        self._declared += info.size
        check_unpacked(max(info.offset_data + info.size, self._declared), self._max_unpacked)

    def _bound(self, end_of_member: int) -> tuple[int, ArchiveLimitExceeded]:
        """How far `tarfile` may read: the current member's data, then only as many bytes
        of headers as one member may have before the next one's data starts; and what
        reading further means."""
        max_header = self._limits.max_header_size
        headers = end_of_member + max_header + TAR_READ_AHEAD
        if headers >= self._max_unpacked:
            return self._max_unpacked, expands_too_far(self._max_unpacked)
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
        self._compressed.close()


class _EndChecked(tarfile.TarInfo):
    """A member's header, read by `tarfile`, which takes any header it cannot read after
    the first (a damaged one, one cut off, none at all) for the archive's end: only the
    end-of-archive block counts as one here, so that an archive cut short, even at a
    member's boundary, never passes for a whole one."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as error:
            if isinstance(error, _END_BLOCK):
                raise
            if isinstance(error, _NO_HEADER):
                raise InvalidArchive(
                    "the tar archive ends without its end-of-archive block"
                ) from None
            raise InvalidArchive(f"the tar archive is damaged: {error}") from None


# `tarfile`'s own kinds of HeaderError, which typeshed leaves out: the zero block that
# ends an archive, and no header at all where one should be.
_END_BLOCK: type[tarfile.HeaderError] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_NO_HEADER: type[tarfile.HeaderError] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]


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


def _arrived_allowance(limits: ArchiveLimits, raw_read: Callable[[], int]) -> int:
    return limits.allowance(raw_read())


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
