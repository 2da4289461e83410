"""The objects under a prefix offered as members, one member per object, each read front
to back like an archive."""

import io
from collections.abc import Iterator
from functools import partial
from typing import IO

from services.archives.limits import TooManyMembers
from services.archives.members import Member, MemberKind, MemberSource
from services.archives.object_readers import READ_AHEAD, ObjectReader
from storage import ObjectStore


class PrefixSource(MemberSource):
    """Every object under `storage_prefix` (but those under `skip`), listed once at the
    start, so that objects written meanwhile are never read back; at most `max_members`.
    With `after` and `last`, only those whose keys sort after `after` and up to `last`
    (a chunk's share)."""

    format = "prefix"

    def __init__(
        self,
        store: ObjectStore,
        storage_prefix: str,
        skip: str | None,
        max_members: int,
        *,
        after: str | None = None,
        last: str | None = None,
    ) -> None:
        self._store = store
        self._prefix = storage_prefix
        self._objects: list[tuple[str, int]] = []
        for info in store.list(storage_prefix, start_after=after or ""):
            if last is not None and info.key > last:
                break
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
    def listed(self) -> list[tuple[str, int]]:
        """The objects' storage keys and sizes, in key order."""
        return list(self._objects)

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

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
