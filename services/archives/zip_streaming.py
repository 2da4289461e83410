"""A zip read as it is uploaded: its members from their local headers, with
`stream-unzip` (data descriptors and zip64 included), then its central directory, which
comes last, checked against what was read.

`stream-unzip` reads past the central directory and drops it, so the bytes it is given
go through `_Tail`, which keeps the last ones (as many as a zip's index may take); once
the members are read, `check_index` finds the end-of-central-directory record there and
parses the directory. A zip whose directory disagrees with its local headers (another
member count, name, size or CRC, in another order, or a directory that is not where it
says it is) reads one way to a streaming reader and another to `zipfile`: the job fails.
The directory also says what the local headers cannot: which members are links or
devices (in their Unix mode), refused once it is read.
"""

import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import IO, TYPE_CHECKING

from stream_unzip import MissingPasswordError, NotStreamUnzippable, UnzipError, stream_unzip

from services.archives.limits import (
    ArchiveLimits,
    HeaderTooLarge,
    InvalidArchive,
    check_member_size,
    check_members,
    check_unpacked,
)
from services.archives.members import Member, MemberKind, MemberSource
from services.archives.zip_reading import zip_kind

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

READ_SIZE = 64 << 10
EOCD = struct.Struct("<4sHHHHIIH")
EOCD_SIGNATURE = b"PK\x05\x06"
ZIP64_LOCATOR = struct.Struct("<4sIQI")
ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
ENTRY = struct.Struct("<4sHHHHHHIIIHHHHHII")
ENTRY_SIGNATURE = b"PK\x01\x02"
ZIP64_EXTRA = 0x0001
MAX_COMMENT = 0xFFFF
UNIX = 3  # the "made by" system whose external attributes hold a Unix mode


class ZipNotStreamable(InvalidArchive):
    """A zip whose members cannot be told apart from their local headers alone."""

    code = "zip-not-streamable"


class EncryptedMember(InvalidArchive):
    """A password-protected member: read as a stream, it cannot be skipped."""

    code = "archive-member-encrypted"


class IndexMismatch(InvalidArchive):
    """The central directory disagrees with the local headers."""

    code = "zip-index-mismatch"


@dataclass
class _Tail:
    """The last `keep` bytes of what goes through, and how many went through."""

    keep: int
    seen: int = 0
    data: bytearray = field(default_factory=bytearray)

    def through(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.seen += len(chunk)
            self.data += chunk
            if len(self.data) > 2 * self.keep:  # trimmed now and then, not at every chunk
                del self.data[: len(self.data) - self.keep]
            yield chunk


@dataclass(frozen=True)
class _Read:
    """What the local headers and the data said of a member."""

    name: bytes
    size: int
    crc: int


class _MemberReader(io.RawIOBase):
    """A member's unpacked bytes, counted, its CRC-32 taken, and held to the limits."""

    def __init__(self, chunks: Iterator[bytes], check: Callable[[int], None]) -> None:
        self._chunks = chunks
        self._check = check
        self._chunk = memoryview(b"")
        self.size = 0
        self.crc = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        while not self._chunk:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.size += len(chunk)
            self.crc = zlib.crc32(chunk, self.crc)
            self._check(len(chunk))
            self._chunk = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(self._chunk))
        view[:count] = self._chunk[:count]
        self._chunk = self._chunk[count:]
        return count

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass


class ZipStream(MemberSource):
    """An uploaded zip's members as they arrive; `check_index()` once they are all read."""

    format = "zip"

    def __init__(
        self, compressed: io.BufferedIOBase, raw_read: Callable[[], int], limits: ArchiveLimits
    ) -> None:
        self.bytes_total = None
        self.items_total = None
        self._compressed = compressed
        self._raw_read = raw_read
        self._limits = limits
        # The end records: the zip64 ones, and the last record with its longest comment.
        self._tail = _Tail(limits.max_header_size + ZIP64_EOCD.size + 20 + EOCD.size + MAX_COMMENT)
        self._read: list[_Read] = []
        self._unpacked = 0

    @property
    def bytes_read(self) -> int:
        return self._raw_read()

    def members(self) -> Iterator[Member]:
        chunks = self._tail.through(iter(partial(self._compressed.read, READ_SIZE), b""))
        try:
            for name, size, data in stream_unzip(chunks):
                check_members(len(self._read) + 1, self._limits)
                if size is not None:
                    check_member_size(size, self._limits)
                reader = _MemberReader(data, partial(self._count, [0]))
                yield Member(_decoded(name), _local_kind(name), size, partial(_opened, reader))
                reader.drain()
                self._read.append(_Read(name, reader.size, reader.crc))
        except NotStreamUnzippable:
            raise ZipNotStreamable(
                "a member is stored uncompressed with its size only after its data: it "
                "cannot be read as a stream (store the zip, then use a batch-encrypt job)"
            ) from None
        except MissingPasswordError:
            raise EncryptedMember("a member is password-protected") from None
        except UnzipError as error:
            raise InvalidArchive(f"not a readable zip archive: {type(error).__name__}") from None

    def _count(self, member: list[int], count: int) -> None:
        """Hold one member, and the archive so far, to the limits."""
        member[0] += count
        check_member_size(member[0], self._limits)
        self._unpacked += count
        check_unpacked(self._unpacked, self._limits.allowance(self._raw_read()))

    def check_index(self) -> list[MemberKind]:
        """The central directory, checked against the members read: the kind it gives
        each of them, in order. `IndexMismatch` if it disagrees."""
        entries = _central_directory(bytes(self._tail.data), self._tail.seen, self._limits)
        read = [_Read(entry.name, entry.size, entry.crc) for entry in entries]
        if read != self._read:
            raise IndexMismatch(
                "the zip's central directory disagrees with its local headers: it does not "
                "list the members read, in the same order, with the same names, sizes and CRCs"
            )
        return [entry.kind for entry in entries]

    def close(self) -> None:
        self._compressed.close()


def _opened(reader: _MemberReader) -> IO[bytes]:
    return io.BufferedReader(reader, READ_SIZE)


def _decoded(name: bytes) -> str:
    """A member's name: UTF-8 if it is, else the zip format's old default, CP437."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name.decode("cp437")


def _local_kind(name: bytes) -> MemberKind:
    """What the local header shows: a directory by its name; a file until the central
    directory says otherwise."""
    return MemberKind.DIRECTORY if name.endswith(b"/") else MemberKind.FILE


@dataclass(frozen=True)
class _Entry:
    name: bytes
    size: int
    crc: int
    offset: int
    kind: MemberKind


def _central_directory(tail: bytes, total: int, limits: ArchiveLimits) -> list[_Entry]:
    """The entries of the central directory at the end of a zip of `total` bytes whose
    last bytes are `tail`, in the order of their local headers."""
    end = _end_record(tail)
    count, size, offset, directory_end = _directory_place(tail, end)
    start = offset - (total - len(tail))  # where the directory starts in `tail`
    if size > limits.max_header_size or start < 0:
        raise HeaderTooLarge(f"the zip's index is larger than {limits.max_header_size} bytes")
    if start + size != directory_end:
        raise IndexMismatch("the zip's central directory is not where its end record says")
    entries = _entries(tail[start : start + size], count)
    offsets = [entry.offset for entry in entries]
    if offsets != sorted(set(offsets)):
        raise IndexMismatch("the zip's central directory lists its members out of order")
    return entries


def _end_record(tail: bytes) -> int:
    """Where the end-of-central-directory record starts in `tail`: the last one whose
    comment runs to the end."""
    position = tail.rfind(EOCD_SIGNATURE)
    while position >= 0:
        if position + EOCD.size <= len(tail):
            comment = EOCD.unpack_from(tail, position)[7]
            if position + EOCD.size + comment == len(tail):
                return position
        position = tail.rfind(EOCD_SIGNATURE, 0, position)
    raise IndexMismatch("the zip has no end-of-central-directory record at its end")


def _directory_place(tail: bytes, end: int) -> tuple[int, int, int, int]:
    """The directory's entry count, size and offset, from the end record (or its zip64
    one), and where in `tail` the directory must end: where the end records start."""
    _, _, _, _, count, size, offset, _ = EOCD.unpack_from(tail, end)
    locator = end - ZIP64_LOCATOR.size
    if locator < 0 or tail[locator : locator + 4] != ZIP64_LOCATOR_SIGNATURE:
        return count, size, offset, end
    record = locator - ZIP64_EOCD.size
    if record < 0 or tail[record : record + 4] != ZIP64_EOCD_SIGNATURE:
        raise IndexMismatch("the zip's zip64 end record is missing")
    fields = ZIP64_EOCD.unpack_from(tail, record)
    return fields[7], fields[8], fields[9], record


def _entries(directory: bytes, count: int) -> list[_Entry]:
    entries = []
    position = 0
    for _ in range(count):
        if directory[position : position + 4] != ENTRY_SIGNATURE:
            raise IndexMismatch("the zip's central directory holds fewer entries than it says")
        fields = ENTRY.unpack_from(directory, position)
        made_by, flags, crc, size, name_length, extra_length, comment_length = (
            fields[1],
            fields[3],
            fields[7],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
        )
        external, offset = fields[15], fields[16]
        position += ENTRY.size
        name = directory[position : position + name_length]
        extra = directory[position + name_length : position + name_length + extra_length]
        position += name_length + extra_length + comment_length
        size, offset = _zip64_values(extra, size, fields[8], offset)
        info = zipfile.ZipInfo(_decoded(name))
        info.create_system = made_by >> 8
        info.external_attr = external if info.create_system == UNIX else 0
        info.flag_bits = flags
        entries.append(_Entry(name, size, crc, offset, zip_kind(info)))
    if position != len(directory):
        raise IndexMismatch("the zip's central directory holds more than it says")
    return entries


def _zip64_values(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int]:
    """The size and local header offset, from the zip64 extra field where the entry's own
    fields are full (its values come in order: size, compressed size, offset)."""
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + length]
        position += 4 + length
        if tag != ZIP64_EXTRA:
            continue
        values = iter(struct.unpack_from(f"<{len(body) // 8}Q", body))
        if size == 0xFFFFFFFF:
            size = next(values, size)
        if compressed == 0xFFFFFFFF:
            next(values, None)
        if offset == 0xFFFFFFFF:
            offset = next(values, offset)
    return size, offset
