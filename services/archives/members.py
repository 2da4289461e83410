"""An archive's members as batch-encrypt takes them: what a member is, the sources that
offer members one after another, and the rules a member's name must keep to.

A member's name is only a claim: `member_path` turns it into a safe object path or
refuses it (absolute paths, `..`, links, devices...). Nothing is ever followed.
"""

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import IO

from services.placement import check_object_key
from storage import InvalidObjectKey


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
    bytes_total: int | None  # None while unknown (an upload, until its end)
    items_total: int | None  # None while unknown (a tar stream, until its end)

    @property
    @abstractmethod
    def bytes_read(self) -> int: ...

    @abstractmethod
    def members(self) -> Iterator[Member]:
        """The members in order; raises `InvalidArchive` if the archive breaks off."""

    @abstractmethod
    def close(self) -> None:
        """Let go of what the reading holds open."""
