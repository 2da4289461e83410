"""services.archives: archives in object storage read as streams of members, never
downloaded whole, for batch-encrypt. Nothing is written to disk.

- `opening`: an archive object opened as members, its format told by its first bytes;
- `tar_reading`: tar (plain, gzip, bzip2, xz) read front to back, its headers counted;
- `zip_reading`: zip read through ranged reads, its index refused by its size first;
- `prefixes`: the objects under a prefix offered the same way, one member per object;
- `members`: what a member is, and the rules its name must keep to;
- `limits`: how far a job may go into an archive (`ArchiveLimits`), each crossing
  failing the job with a code of its own, so a decompression bomb is refused before it
  has cost anything;
- `object_readers`: an object read as a file, through ranged reads.

Exported here is what other modules use; the rest is imported from its own module.
"""

from services.archives.limits import ArchiveLimits, InvalidArchive
from services.archives.members import (
    Member,
    MemberKind,
    MemberSource,
    UnsafeMember,
    member_path,
)
from services.archives.object_readers import ObjectReader
from services.archives.opening import open_archive
from services.archives.prefixes import PrefixSource

__all__ = [
    "ArchiveLimits",
    "InvalidArchive",
    "Member",
    "MemberKind",
    "MemberSource",
    "ObjectReader",
    "PrefixSource",
    "UnsafeMember",
    "member_path",
    "open_archive",
]
