"""Key records in the object store: where each one lives, and writes that settle races.

Each record is one sealed record (`storage.integrity`) at
`sealstream/keys/{tenant}/{kid}.json`, so every policy field (exportable, keyOps, status,
versions, dates) is authenticated and the record cannot be moved to another kid or
tenant; one that fails is refused (`RecordTampered`), never used. Creation is a
conditional write (`if_absent`), so of two creators of one kid exactly one wins; every
change is a read-modify-write guarded by the object's etag (`if_match`), retried on a
lost race.
"""

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from datetime import datetime

from keystore.errors import (
    ConcurrentUpdate,
    CorruptRecord,
    InvalidTenant,
    KeyExists,
    KeyNotFound,
)
from keystore.records import KID_PATTERN, KeyRecord, check_kid
from storage import (
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from storage.integrity import Records

RECORD_KIND = "key"
RECORD_PREFIX = "sealstream/keys/"
RECORD_SUFFIX = ".json"
UPDATE_ATTEMPTS = 8

logger = logging.getLogger(__name__)

Change = Callable[[KeyRecord, datetime], KeyRecord]


def record_key(tenant: str, kid: str) -> str:
    """The object key of a record."""
    return f"{RECORD_PREFIX}{tenant}/{kid}{RECORD_SUFFIX}"


def check_tenant(tenant: str) -> None:
    if not KID_PATTERN.fullmatch(tenant):
        raise InvalidTenant("a tenant is 1 to 128 of [A-Za-z0-9._-], not starting with '.'")


class KeyRecordStore:
    """The key records of every tenant in one store.

    `on_write` is told the (tenant, kid) of every record written, deleted, or whose
    conditional write lost: the stored record may have changed, so a cache of it must go.
    """

    def __init__(
        self,
        records: Records,
        clock: Callable[[], datetime],
        on_write: Callable[[str, str], None],
    ) -> None:
        self._records = records
        self._objects = records.store
        self._clock = clock
        self._on_write = on_write

    def now(self) -> datetime:
        """The time by the clock record changes are dated with."""
        return self._clock()

    def insert(self, record: KeyRecord) -> None:
        """Store a new record; `KeyExists` if its tenant already has the kid."""
        name = record_key(record.tenant, record.kid)
        try:
            self._records.put(RECORD_KIND, name, record, if_absent=True)
        except ObjectExists:
            raise KeyExists(f"key {record.kid!r} already exists") from None
        self._on_write(record.tenant, record.kid)

    def refuse_taken(self, tenant: str, kid: str) -> None:
        """`KeyExists` early; the conditional write in `insert` still settles races."""
        try:
            self._objects.head(record_key(tenant, kid))
        except ObjectNotFound:
            return
        raise KeyExists(f"key {kid!r} already exists")

    def update(self, tenant: str, kid: str, change: Change, *, notify: bool = True) -> KeyRecord:
        """Apply `change` to the stored record, re-reading and retrying on lost races.
        With `notify` false, `on_write` is not told: for changes to usage counts alone,
        which no cached copy needs."""
        for attempt in range(UPDATE_ATTEMPTS):
            record, etag = self._read_versioned(tenant, kid)
            changed = change(record, self._clock())
            if changed is record:
                return record
            try:
                self._records.put(RECORD_KIND, record_key(tenant, kid), changed, if_match=etag)
            except (PreconditionFailed, ObjectNotFound):
                back_off(attempt)
                continue
            finally:
                if notify:
                    self._on_write(tenant, kid)
            return changed
        raise ConcurrentUpdate(f"key {kid!r} kept changing; gave up after {UPDATE_ATTEMPTS} tries")

    def delete(self, tenant: str, kid: str) -> None:
        self._objects.delete(record_key(tenant, kid))
        self._on_write(tenant, kid)

    def read(self, tenant: str, kid: str) -> KeyRecord:
        """The record as stored now; `KeyNotFound` if the tenant has no such key."""
        return self._read_versioned(tenant, kid)[0]

    def _read_versioned(self, tenant: str, kid: str) -> tuple[KeyRecord, str]:
        """The record as stored now and the etag of the version read, in one read."""
        check_tenant(tenant)
        check_kid(kid)
        try:
            record, etag = self._records.get_versioned(
                RECORD_KIND, record_key(tenant, kid), KeyRecord
            )
        except ObjectNotFound:
            raise KeyNotFound(f"no key {kid!r}") from None
        if (record.tenant, record.kid) != (tenant, kid):
            # The MAC binds the name, so only a service bug could get here: refuse anyway.
            raise CorruptRecord(f"the record stored as key {kid!r} names another key")
        return record, etag

    def kids_after(self, tenant: str, after: str | None, count: int) -> list[str]:
        """Up to `count` kids of the tenant, in listing order, after the kid `after`."""
        start = record_key(tenant, after) if after is not None else ""
        keys = self._stored_keys(f"{RECORD_PREFIX}{tenant}/", start)
        return [kid for _, kid in itertools.islice(keys, count)]

    def records_where(self, due: Callable[[KeyRecord], bool]) -> Iterator[KeyRecord]:
        """Every tenant's records for which `due` holds; a record that cannot be read is
        logged and passed over, unless the store itself is unavailable."""
        for tenant, kid in self._stored_keys(RECORD_PREFIX):
            try:
                record = self.read(tenant, kid)
            except KeyNotFound:
                continue  # deleted since it was listed
            except StorageUnavailable:
                raise  # the next sweep tries again
            except (CorruptRecord, StorageError) as error:
                # One bad record must not stop the sweep for every other key.
                logger.warning("skipping key %r of tenant %r: %s", kid, tenant, error)
                continue
            if due(record):
                yield record

    def _stored_keys(self, prefix: str, after: str = "") -> Iterator[tuple[str, str]]:
        """(tenant, kid) of every record under `prefix` whose object key sorts after `after`."""
        for info in self._objects.list(prefix):
            tenant, _, name = info.key.removeprefix(RECORD_PREFIX).partition("/")
            kid = name.removesuffix(RECORD_SUFFIX)
            if (
                info.key > after
                and name.endswith(RECORD_SUFFIX)
                and KID_PATTERN.fullmatch(tenant)
                and KID_PATTERN.fullmatch(kid)
            ):
                yield tenant, kid


def back_off(attempt: int) -> None:
    """A short random wait, so racing writers do not collide again in lockstep."""
    time.sleep(random.uniform(0, 0.005 * 2**attempt))  # noqa: S311 - jitter, not secrecy
