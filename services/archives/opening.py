"""An archive object opened as members: its format told by its first bytes unless the
job names it, and the reader for that format."""

from collections.abc import Iterator
from contextlib import contextmanager

from services.archives.limits import ArchiveLimits
from services.archives.members import MemberSource
from services.archives.tar_reading import TarSource
from services.archives.zip_reading import ZipSource
from storage import ObjectStore

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a first entry, or an empty archive
COMPRESSION_MAGICS = {b"\x1f\x8b": "tar.gz", b"BZh": "tar.bz2", b"\xfd7zXZ\x00": "tar.xz"}
MAGIC_LENGTH = 6  # the longest of the magics above


@contextmanager
def open_archive(
    store: ObjectStore, key: str, format_: str, limits: ArchiveLimits
) -> Iterator[MemberSource]:
    """The archive object `key` as members; `format_` is auto, tar, tar.gz, tar.bz2 or zip
    (auto also reads tar.xz)."""
    size = store.head(key).size
    if format_ == "auto":
        format_ = detect_format(_first_bytes(store, key, size))
    source: TarSource | ZipSource
    if format_ == "zip":
        source = ZipSource(store, key, size, limits)
    else:
        source = TarSource.of_object(store, key, size, format_, limits)
    try:
        yield source
    finally:
        source.close()


def detect_format(magic: bytes) -> str:
    """An archive's format told by its first bytes: zip, a compressed tar, or else tar."""
    if magic.startswith(ZIP_MAGICS):
        return "zip"
    for start, format_ in COMPRESSION_MAGICS.items():
        if magic.startswith(start):
            return format_
    return "tar"


def _first_bytes(store: ObjectStore, key: str, size: int) -> bytes:
    return b"".join(store.read(key, 0, min(MAGIC_LENGTH, size)))
