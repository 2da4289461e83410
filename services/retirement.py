"""Retiring a key version: refused while stored objects use it, confirmed by naming it,
and its material destroyed once the pending window ends, after the same check again.

Whether stored objects still use a version is asked in two ways, and a retirement needs
both to answer none:
- the index of key versions (`services.inventory`): one listing, but whoever can write
  the bucket can delete its markers;
- a census of the tenant's object records, each read and authenticated, and of every
  object in the tenant's space that has no record, whose header names the key versions
  it was sealed for. It finds what the index misses: a marker deleted, an object stored
  before the index existed, a marker lost in a race of two writes to one key.

Ciphertext streamed back to clients is in neither: the service does not know where it
went. So a retirement also takes the version's name as a confirmation (`kid#version`),
and until it has one answers with each version's use: how many messages it sealed or
opened, and when last.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from envelope import EnvelopeError, key_names
from keystore import KeyRecord, KeyStore, KeystoreError
from keystore.material import key_name
from keystore.store import Proceed, always, check_pending_window
from services.inventory import VersionIndex
from services.objects import read_stored_header
from services.placement import Spaces, tenant_prefix
from storage import InvalidRange, ObjectInfo, ObjectNotFound, ObjectStore, StorageError
from storage.integrity import Records, RecordTampered
from storage.records import object_record

# Records read at once by a census: each read is a request or two, mostly waiting.
CENSUS_THREADS = 8

logger = logging.getLogger(__name__)


class RetirementRefused(Exception):
    """A version that may not be retired now; `extensions` are the problem's members."""

    status: ClassVar[int] = 409
    code: ClassVar[str] = "retirement-refused"

    def extensions(self) -> dict[str, Any]:
        return {}


class VersionInUse(RetirementRefused):
    """Stored objects still use the version."""

    code = "version-in-use"

    def __init__(self, name: str, objects: int) -> None:
        super().__init__(
            f"{objects} stored objects still use {name}: re-encrypt them (a reencrypt job "
            "with kid and version) or delete them first"
        )
        self.objects = objects

    def extensions(self) -> dict[str, Any]:
        return {"objectCount": self.objects}


class VersionUsageUnknown(RetirementRefused):
    """Objects of the tenant of which the census cannot tell which key version they need."""

    code = "version-usage-unknown"

    def __init__(self, census: "Census") -> None:
        super().__init__(
            f"for {census.unknown} of the tenant's stored objects, which key versions they "
            f"need is unknown: {census.refused} object records failed authentication, "
            f"{census.unlisted} files have no metadata, {census.unreadable} objects have no "
            "message header that reads (nor a record that names the version); restore or "
            "delete them (the service's log names them)"
        )
        self.census = census

    def extensions(self) -> dict[str, Any]:
        census = self.census
        return {
            "unknownCount": census.unknown,
            "refusedRecords": census.refused,
            "unlistedFiles": census.unlisted,
            "unreadableHeaders": census.unreadable,
        }


class IndexUnreadable(RetirementRefused):
    """A run of the version's in the index is in a store that cannot be read now."""

    code = "version-usage-unknown"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"how many stored objects use {name} is unknown: a bucket an archive or batch "
            "job wrote them into cannot be read now (the service's log names it); try "
            "again once it can"
        )


class ConfirmationRequired(RetirementRefused):
    """The request did not name the version it retires."""

    status = 428
    code = "confirmation-required"

    def __init__(
        self, record: KeyRecord, number: int, object_counts: dict[int, int | None]
    ) -> None:
        name = key_name(record.kid, number)
        version = record.version(number)
        used = version.last_used_at.isoformat() if version.last_used_at else "never"
        super().__init__(
            f"{name} sealed or opened {version.usage_count} messages (last: {used}); "
            "ciphertext it sealed that was streamed back to clients is not tracked and "
            f'will not decrypt once it is retired: confirm with {{"confirm": "{name}"}}'
        )
        self.versions = [
            {
                "version": v.version,
                "usageCount": v.usage_count,
                "lastUsedAt": v.last_used_at.isoformat() if v.last_used_at else None,
                "objectCount": object_counts.get(v.version, 0),
                "retiredAt": v.retired_at.isoformat() if v.retired_at else None,
            }
            for v in record.versions
        ]

    def extensions(self) -> dict[str, Any]:
        return {"versions": self.versions}


@dataclass(frozen=True)
class Census:
    """What a census found of the objects of one key version, and of those whose version
    it cannot know."""

    objects: int = 0  # objects sealed under the version, recorded or not
    refused: int = 0  # records that failed authentication
    unlisted: int = 0  # files a listing skips (no metadata: a deleted sidecar)
    unreadable: int = 0  # objects whose header does not read, nor record names the version

    @property
    def unknown(self) -> int:
        return self.refused + self.unlisted + self.unreadable

    def plus(self, other: "Census") -> "Census":
        return Census(
            self.objects + other.objects,
            self.refused + other.refused,
            self.unlisted + other.unlisted,
            self.unreadable + other.unreadable,
        )


@dataclass(frozen=True)
class Retirements:
    """What retiring versions takes: keys, the records (the index among them), and the
    tenant's stores."""

    keys: KeyStore
    records: Records
    spaces: Spaces

    def retire(
        self, tenant: str, kid: str, version: int, *, confirm: str | None, pending_days: int
    ) -> KeyRecord:
        """Retire `kid`'s `version` if nothing stored uses it and `confirm` names it; a
        retired version is answered as it is. Raises a `RetirementRefused` or the key
        store's errors (no such key or version, the primary version)."""
        check_pending_window(pending_days)
        record = self.keys.get(tenant, kid)
        if record.version(version).retired_at is not None:
            return record
        record.check_retirable(version)
        name = key_name(kid, version)
        counts = VersionIndex(self.records, self.spaces).counts(tenant, kid)
        if version in counts and counts[version] is None:
            raise IndexUnreadable(name)
        if counts.get(version):
            raise VersionInUse(name, counts.get(version) or 0)
        if confirm != name:
            raise ConfirmationRequired(record, version, counts)
        self.require_unused(tenant, kid, version)
        return self.keys.retire_version(tenant, kid, version, pending_days)

    def require_unused(self, tenant: str, kid: str, version: int) -> None:
        """Refuse unless a census finds no stored object of the version, and every record
        of the tenant authentic."""
        census = self.census(tenant, kid, version)
        if census.objects:
            logger.warning(
                "%d objects of tenant %s use %s but the index lists none: markers were "
                "deleted, or the objects were stored before the index was kept",
                census.objects,
                tenant,
                key_name(kid, version),
            )
            raise VersionInUse(key_name(kid, version), census.objects)
        if census.unknown:
            raise VersionUsageUnknown(census)

    def census(self, tenant: str, kid: str, version: int) -> Census:
        """Count the tenant's objects sealed under `kid#version`, in every bucket it may
        use, from the object records and, for objects without one, their headers."""
        name = key_name(kid, version)
        census = Census()
        for store in self.spaces.tenant_stores(tenant):
            census = census.plus(_count_in(self.records, store, tenant, name))
        return census

    def destroy_due(self, proceed: Proceed = always) -> list[str]:
        """Destroy the material of retired versions past their destruction date, each
        once a census again finds nothing stored that uses it and `proceed(tenant,
        kid#version)` allows it; `tenant/kid#version` of each this call destroyed (not one
        another sweep destroyed, or a cancellation kept, meanwhile). One still in use is
        held back, and logged as an error; one `proceed` refuses waits for the next
        sweep. One whose census or index cannot be read is logged and waits too, and the
        others go on."""
        destroyed = []
        for tenant, kid, version in self.keys.versions_to_destroy():
            name = key_name(kid, version)
            try:
                if self._destroy_if_unused(tenant, kid, version, proceed):
                    destroyed.append(f"{tenant}/{name}")
            except (StorageError, KeystoreError) as error:
                logger.error("not destroying %s of tenant %s now: %s", name, tenant, error)
        return destroyed

    def _destroy_if_unused(self, tenant: str, kid: str, version: int, proceed: Proceed) -> bool:
        name = key_name(kid, version)
        indexed = VersionIndex(self.records, self.spaces).counts(tenant, kid).get(version, 0)
        census = self.census(tenant, kid, version)
        if indexed is None or indexed or census.objects or census.unknown:
            logger.error(
                "not destroying %s of tenant %s: %d objects use it (%s in the index), "
                "and of %d the key version is unknown",
                name,
                tenant,
                census.objects,
                "unknown" if indexed is None else indexed,
                census.unknown,
            )
            return False
        return proceed(tenant, name) and self.keys.destroy_version(tenant, kid, version)


class _Verdict(Enum):
    SEALED_FOR = "sealed for the version"
    NOT = "not sealed for it"
    REFUSED = "its record failed authentication"
    UNREADABLE = "no message header that reads, nor a record naming the version"


def _count_in(records: Records, store: ObjectStore, tenant: str, name: str) -> Census:
    """The census of the key name `name` in one store."""
    prefix = tenant_prefix(tenant)
    objects = list(store.list(prefix))
    with ThreadPoolExecutor(CENSUS_THREADS, thread_name_prefix="census") as pool:
        verdicts = list(pool.map(lambda info: _sealed_for(records, store, info, name), objects))
    return Census(
        objects=verdicts.count(_Verdict.SEALED_FOR),
        refused=verdicts.count(_Verdict.REFUSED),
        unlisted=store.unlisted(prefix),
        unreadable=verdicts.count(_Verdict.UNREADABLE),
    )


def _sealed_for(records: Records, store: ObjectStore, info: ObjectInfo, name: str) -> _Verdict:
    """Whether the object `info` is sealed for the key name `name`, by its record or by
    its header. A record naming another version is not taken at its word: a bucket
    writer can put back an older record, or an older object beside a newer record, and
    a census that undercounts lets a version in use be destroyed. So the header is read
    too (only for those: a census is rare), and counts if it names `name`."""
    try:
        record = object_record(records, store, info.key, info)
    except RecordTampered:
        return _Verdict.REFUSED
    except ObjectNotFound:
        return _header_names(store, info, name)
    if key_name(record.kid, record.key_version) == name:
        return _Verdict.SEALED_FOR
    return _header_names(store, info, name)


def _header_names(store: ObjectStore, info: ObjectInfo, name: str) -> _Verdict:
    """Whether an object names `name` among its header's keys. One whose header does not
    read is unknown, whatever its first bytes: whoever can write the bucket can change
    them, and put them back once the version is retired. Everything the service writes
    in a tenant's space is a message, so this takes nothing of its own for unknown."""
    try:
        header = read_stored_header(store, info.key, info.size)
    except ObjectNotFound:  # gone since listed
        return _Verdict.NOT
    except (EnvelopeError, InvalidRange):
        logger.warning(
            "%s has no message header that reads: which key it needs is unknown",
            info.key,
        )
        return _Verdict.UNREADABLE
    return _Verdict.SEALED_FOR if name in key_names(header) else _Verdict.NOT
