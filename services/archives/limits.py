"""How far one job may go into an archive, the errors that say which limit was crossed,
and the checks of the sizes and counts an archive declares, made before the bytes they
describe are read or skipped."""

import tarfile
import zipfile
from dataclasses import dataclass

# What an archive of unknown size may unpack to before enough of it has arrived to allow
# more: a tar's end and padding (tens of KiB of zeros) compress to a few dozen bytes.
ALLOWANCE_FLOOR = 1 << 20
# What `tarfile` and `zipfile` raise on a file that is not an archive of their format.
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError)


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

    def allowance(self, arrived: int) -> int:
        """How far an archive of unknown size may have unpacked once `arrived` of its
        bytes have: never less than `ALLOWANCE_FLOOR`."""
        return min(max(int(self.max_expansion * arrived), ALLOWANCE_FLOOR), self.max_unpacked)


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


def check_members(count: int, limits: ArchiveLimits) -> None:
    if count > limits.max_members:
        raise TooManyMembers(f"the archive holds more than {limits.max_members} members")


def check_member_size(size: int, limits: ArchiveLimits) -> None:
    if size > limits.max_member_size:
        raise MemberTooLarge(
            f"a member unpacks to {size} bytes, more than the "
            f"{limits.max_member_size} one member may"
        )


def check_unpacked(unpacked: int, max_unpacked: int) -> None:
    if unpacked > max_unpacked:
        raise expands_too_far(max_unpacked)


def expands_too_far(max_unpacked: int) -> ArchiveBomb:
    return ArchiveBomb(
        f"the archive's members unpack to more than {max_unpacked} bytes, the most its size allows"
    )
