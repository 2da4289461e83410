"""The index of stored objects by key version: which objects each version of a key seals,
listed without reading the bucket.

For every object the service writes (an encryption into storage, a batch member, a
re-encrypted object) a marker, a sealed record, names its tenant, kid, version, bucket
and storage key:

    sealstream/index/<tenant>/<kid>/<version>/<SHA-256 of bucket "/" storage key>.json

Named by a digest, a marker's name has the same length whatever the object's key, so
every key an object record can name has a marker too; a listing comes in digest order.

The members a job seals into a prefix other than '' (an archive's) are marked once for
the run rather than one by one: before its first member of a key version becomes
visible, a run marker names the job, the version, the bucket and the storage prefix,

    sealstream/index/<tenant>/<kid>/<version>/run-<SHA-256 of bucket, prefix, job>.json

and stands for every object under the prefix whose authentic record names that job and
that version. Reading the index expands it (`VersionIndex`): the prefix listed, each
object's record read. Once the run has ended its marker is settled: it notes how many
objects it stands for and a digest of the prefix's listing, and counting believes the
figure while a listing of the prefix gives the same digest; a count that had to expand
a run notes what it found in the same way, so that a settlement broken by a later write
costs one expansion rather than one a request. Runs into one prefix (nightly jobs into
the same place) are counted together: one listing, and each object's record read once,
serve them all. Run markers sort after the
objects' markers, so a listing of a version yields the objects marked one by one, then
each run's members in key order.

Markers err on the side of too many, never too few. One is written before its object's
upload completes (a run's before its first member's), and an object's marker removed
only once its object is gone, has moved to another version, or was written over by a
run, whose marker then stands for it; a crash in between leaves one too many, which the
reencrypt job's version selector drops once it finds no such object. A run marker
stays: expanded, it stands for nothing once no member of its run under its version is
left. The index is a help, not the proof: whoever can write the bucket can delete
markers, so retiring a version checks the object records too (`services.retirement`).
"""

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Self

from pydantic import Field

from services.errors import error_code
from services.placement import Spaces, check_object_key, client_key
from storage import (
    InvalidObjectKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
)
from storage.documents import CamelModel, FrozenCamelModel
from storage.integrity import Records, RecordTampered
from storage.records import ObjectRecord, object_record

logger = logging.getLogger(__name__)

INDEX_PREFIX = "sealstream/index/"
MARKER_KIND = "object-marker"
RUN_MARKER_KIND = "run-marker"
MARKER_SUFFIX = ".json"
RUN_NAME_PREFIX = "run-"  # after every hex digest: a version's runs list after its objects
# Records of a run's members read at once when it is expanded: each a request, mostly
# waiting; and how many of its listing are handed to them at a time.
EXPANSION_THREADS = 8
EXPANSION_SLICE = 64
# Records of listed objects one reader of the index keeps (`VersionIndex._listed`): the
# runs into one prefix expand the same objects, each read once for all of them.
KEPT_RECORDS = 4096
# A page's cursor: the digest of an object's marker, or a run's and its member's key under
# the run's prefix (hex, UTF-8, at most an object key's 1,024 bytes; `member_cursor`).
CURSOR_PATTERN = "^([0-9a-f]{64}|run-[0-9a-f]{64}\\.([0-9a-f]{2}){1,1024})?$"


class Marker(FrozenCamelModel):
    """One stored object sealed under one key version."""

    tenant: str
    kid: str
    key_version: int
    bucket: str
    storage_key: str
    created_at: datetime

    @classmethod
    def new(cls, tenant: str, kid: str, version: int, bucket: str, storage_key: str) -> Self:
        """The marker of an object about to be sealed under `kid`'s `version`."""
        return cls(
            tenant=tenant,
            kid=kid,
            key_version=version,
            bucket=bucket,
            storage_key=storage_key,
            created_at=datetime.now(UTC),
        )

    @classmethod
    def of(cls, record: ObjectRecord) -> Self:
        """The marker of the object `record` describes."""
        return cls.new(record.tenant, record.kid, record.key_version, record.bucket, record.key)

    def moved_to(self, version: int) -> Self:
        """The marker of the same object sealed again under `version`."""
        return self.model_copy(update={"key_version": version, "created_at": datetime.now(UTC)})

    @property
    def name(self) -> str:
        return marker_name(self.tenant, self.kid, self.key_version, self.bucket, self.storage_key)


class IndexedObject(CamelModel):
    """A marker as a tenant sees it: the object named by its own key."""

    bucket: str
    key: str
    kid: str
    key_version: int
    marked_at: datetime

    @classmethod
    def of(cls, marker: Marker) -> Self:
        return cls(
            bucket=marker.bucket,
            key=client_key(marker.storage_key) or "",  # markers are of tenants' objects
            kid=marker.kid,
            key_version=marker.key_version,
            marked_at=marker.created_at,
        )


class UnreadableRun(CamelModel):
    """A run whose objects a page could not list: its bucket and prefix as the tenant
    names them, and why (the code a problem would have: `bucket-not-found`,
    `storage-unavailable`, ...)."""

    bucket: str
    prefix: str
    error: str


@dataclass(frozen=True)
class IndexPage:
    """Up to a page's markers of a key version, the cursor of the next page (None on the
    last), and the runs passed over on the way because their objects could not be
    listed: none of their objects is in this page or any other."""

    markers: list[Marker]
    next: str | None
    unreadable: list[UnreadableRun]


class RunMarker(FrozenCamelModel):
    """Every object a job writes under a storage prefix sealed under one key version."""

    tenant: str
    kid: str
    key_version: int
    bucket: str
    storage_prefix: str
    job_id: str
    created_at: datetime
    # Once the run has ended: how many objects it stood for, and the digest of the
    # prefix's listing then (`listing_digest`), for as long as the listing is the same.
    members: int | None = Field(None, exclude_if=lambda value: value is None)
    listing: str | None = Field(None, exclude_if=lambda value: value is None)

    @property
    def name(self) -> str:
        place = json.dumps([self.bucket, self.storage_prefix, self.job_id])
        digest = hashlib.sha256(place.encode()).hexdigest()
        prefix = version_prefix(self.tenant, self.kid, self.key_version)
        return f"{prefix}{RUN_NAME_PREFIX}{digest}{MARKER_SUFFIX}"

    def covers(self, record: ObjectRecord) -> bool:
        """Whether the object `record` describes is one this marker stands for."""
        return (
            record.job_id == self.job_id
            and (record.tenant, record.kid, record.key_version)
            == (self.tenant, self.kid, self.key_version)
            and record.bucket == self.bucket
            and record.key.startswith(self.storage_prefix)
        )


@dataclass(frozen=True)
class _Unlisted:
    """A run whose members could not all be listed, and why."""

    run: RunMarker
    error: StorageError


def key_prefix(tenant: str, kid: str) -> str:
    return f"{INDEX_PREFIX}{tenant}/{kid}/"


def version_prefix(tenant: str, kid: str, version: int) -> str:
    return f"{key_prefix(tenant, kid)}{version}/"


def marker_name(tenant: str, kid: str, version: int, bucket: str, storage_key: str) -> str:
    digest = hashlib.sha256(f"{bucket}/{storage_key}".encode()).hexdigest()
    return f"{version_prefix(tenant, kid, version)}{digest}{MARKER_SUFFIX}"


class Inventory:
    """The markers of every tenant's objects, kept beside the other records."""

    def __init__(self, records: Records) -> None:
        self._records = records
        self._store: ObjectStore = records.store

    def add(self, marker: Marker) -> bool:
        """Note that the object is (about to be) sealed under the marker's key version;
        whether this call wrote the marker (False: it was there already, and is not this
        caller's to take back)."""
        try:
            self._records.put(MARKER_KIND, marker.name, marker, if_absent=True)
        except ObjectExists:
            return False
        return True

    def remove(self, marker: Marker) -> None:
        """Drop a marker: once its object is gone, or sealed under another version."""
        self._store.delete(marker.name)

    def discard(self, marker: Marker) -> None:
        """`remove`, for a marker this process wrote for an object that never became
        visible: one left behind is one too many, which is safe."""
        with suppress(StorageError):
            self.remove(marker)

    def moved(self, before: ObjectRecord | None, after: ObjectRecord) -> None:
        """Once the object `after` describes has replaced the one `before` described (at
        the same place), drop `before`'s marker, unless both are of one key version."""
        if before is None:
            return
        if (before.kid, before.key_version) != (after.kid, after.key_version):
            self.discard(Marker.of(before))


class RunIndex:
    """How a job's members under one storage prefix are marked: one run marker for each
    key version they are sealed under, written before the first such member is made
    visible; thread-safe, as members are sealed several at once."""

    def __init__(
        self, records: Records, tenant: str, bucket: str, storage_prefix: str, job_id: str
    ) -> None:
        self._records = records
        self._tenant = tenant
        self._bucket = bucket
        self._storage_prefix = storage_prefix
        self._job_id = job_id
        self._marked: dict[tuple[str, int], RunMarker] = {}
        self._sealed: dict[str, str] = {}  # storage key: etag, of the objects written
        self._lock = threading.Lock()

    def mark(self, marker: Marker) -> bool:
        """Make sure the run marker that stands for `marker`'s object is written; False,
        as it is never this caller's to take back (other members stand on it)."""
        if (marker.tenant, marker.bucket) != (self._tenant, self._bucket) or not (
            marker.storage_key.startswith(self._storage_prefix)
        ):
            raise ValueError("the object is not under the run's prefix")
        version = (marker.kid, marker.key_version)
        with self._lock:  # members wait for the run's marker, written once
            if version not in self._marked:
                run = RunMarker(
                    tenant=self._tenant,
                    kid=marker.kid,
                    key_version=marker.key_version,
                    bucket=self._bucket,
                    storage_prefix=self._storage_prefix,
                    job_id=self._job_id,
                    created_at=datetime.now(UTC),
                )
                with suppress(ObjectExists):  # an earlier attempt of the job wrote it
                    self._records.put(RUN_MARKER_KIND, run.name, run, if_absent=True)
                self._marked[version] = run
        return False

    def sealed(self, record: ObjectRecord) -> None:
        """Note an object of the run's made visible, as `record` says."""
        with self._lock:
            self._sealed[record.key] = record.etag

    def settle(self, store: ObjectStore) -> None:
        """Once the run has ended: note in each of its markers how many objects it stands
        for, and the digest of the prefix's listing, so that counting them takes one
        listing for as long as nothing under the prefix changes. The objects this run
        wrote are known; any other (an earlier attempt's, another writer's) has its
        record read. A marker left unsettled is expanded, as before: so is every one if
        an object listed has no record to believe (`_tally`)."""
        listing = list(store.list(self._storage_prefix))
        runs = list(self._marked.values())
        # The run's own objects are of its one version, if it sealed under one.
        mine = (
            {i.key for i in listing if self._sealed.get(i.key) == i.etag}
            if len(runs) == 1
            else set()
        )
        others = [info for info in listing if info.key not in mine]
        tallies, complete = _tally(self._records, store, runs, others)
        if not complete:
            return
        digest = listing_digest(listing)
        for run, tally in zip(runs, tallies, strict=True):
            settled = run.model_copy(update={"members": len(mine) + tally, "listing": digest})
            self._records.put(RUN_MARKER_KIND, run.name, settled)


def run_index(
    records: Records, tenant: str, bucket: str, prefix: str, storage_prefix: str, job_id: str
) -> RunIndex | None:
    """How a job writing under the tenant's `prefix` marks its objects: by one run marker,
    or (None) one by one where the prefix is '', the tenant's whole space. A run there
    would be settled against a listing of every object the tenant has, broken by any
    write anywhere in it and then expanded over all of them: its cost would grow with the
    space, not with the run."""
    if not prefix:
        return None
    return RunIndex(records, tenant, bucket, storage_prefix, job_id)


class VersionIndex:
    """The index read: the objects each version of a key seals, runs expanded into their
    members (whose records are read in the tenant's stores)."""

    def __init__(self, records: Records, spaces: Spaces) -> None:
        self._records = records
        self._store: ObjectStore = records.store
        self._spaces = spaces
        self._kept: dict[tuple[str, str, str], ObjectRecord | None] = {}
        self._kept_lock = threading.Lock()

    def markers(self, tenant: str, kid: str, version: int, after: str = "") -> Iterator[Marker]:
        """The authentic markers of one key version, a run's expanded into one for each
        member, in index order, from the cursor `after` on; a marker that fails
        authentication is logged, counted and passed over. A run whose objects cannot be
        listed raises its storage error: a caller acting on every object must not go on
        as if there were none."""
        for _, entry in self._entries(tenant, kid, version, after):
            if isinstance(entry, _Unlisted):
                raise entry.error
            yield entry

    def page(
        self, tenant: str, kid: str, version: int, *, limit: int, after: str = ""
    ) -> IndexPage:
        """Up to `limit` markers of a key version after the cursor `after`, and the cursor
        of the next page; a run whose objects cannot be listed now (its bucket gone,
        unavailable, or no longer readable) is passed over, logged and named in the
        page, so that one bucket does not keep a tenant from the rest."""
        found: list[Marker] = []
        unreadable: list[UnreadableRun] = []
        last = ""
        for place, entry in self._entries(tenant, kid, version, after):
            if len(found) == limit:
                return IndexPage(found, last, unreadable)
            if isinstance(entry, _Unlisted):
                run = entry.run
                logger.warning(
                    "the run %s of %s#%d cannot be listed: %s",
                    run.name,
                    run.kid,
                    run.key_version,
                    entry.error,
                )
                prefix = client_key(run.storage_prefix) or ""  # runs are in tenants' spaces
                unreadable.append(
                    UnreadableRun(bucket=run.bucket, prefix=prefix, error=error_code(entry.error))
                )
                continue
            found.append(entry)
            last = place
        return IndexPage(found, None, unreadable)

    def counts(self, tenant: str, kid: str) -> dict[int, int | None]:
        """How many objects each version of a key has in the index: the objects' markers
        counted from one listing of the key's index, by name; the runs' members from one
        listing of each prefix runs were written into (`_count_place`). None for a
        version one of whose runs is in a store that cannot be read now: how many
        objects use it is unknown."""
        prefix = key_prefix(tenant, kid)
        marked: Counter[int] = Counter()
        places: dict[tuple[str, str], list[tuple[int, RunMarker, str]]] = {}
        for info in self._store.list(prefix):
            version, _, name = info.key.removeprefix(prefix).partition("/")
            if not version.isdigit() or not name.endswith(MARKER_SUFFIX):
                continue
            if not name.startswith(RUN_NAME_PREFIX):
                marked[int(version)] += 1
            elif (read := self._run(info.key)) is not None:
                run, etag = read
                places.setdefault((run.bucket, run.storage_prefix), []).append(
                    (int(version), run, etag)
                )
        counted: dict[int, int | None] = dict(marked)
        for runs in places.values():
            figures = self._count_place([(run, etag) for _, run, etag in runs])
            for (number, _, _), found in zip(runs, figures, strict=True):
                so_far = counted.get(number, 0)
                counted[number] = None if so_far is None or found is None else so_far + found
        return {number: count for number, count in counted.items() if count != 0}

    def _count_place(self, runs: list[tuple[RunMarker, str]]) -> list[int | None]:
        """How many objects each of `runs` (marker, etag), all into one bucket and prefix,
        stands for: one listing of the prefix serves them all, each believed as settled
        if the listing is still what it was then; the others' members counted together,
        each object's record read once whatever the number of runs, and their figures
        noted (`_settle_again`). None for each if the store cannot be listed (logged):
        one unreadable bucket leaves the other versions' counts."""
        bucket, storage_prefix = runs[0][0].bucket, runs[0][0].storage_prefix
        try:
            store = self._spaces.own_store(bucket)
            listing = list(store.list(storage_prefix))
        except StorageError as error:
            for run, _ in runs:
                logger.warning(
                    "the run %s of %s#%d cannot be counted: %s",
                    run.name,
                    run.kid,
                    run.key_version,
                    error,
                )
            return [None] * len(runs)
        digest = listing_digest(listing)
        figures: list[int | None] = [
            run.members if run.members is not None and run.listing == digest else None
            for run, _ in runs
        ]
        unsettled = [read for read, figure in zip(runs, figures, strict=True) if figure is None]
        tallies, complete = _tally(self._records, store, [run for run, _ in unsettled], listing)
        if complete:
            for (run, etag), members in zip(unsettled, tallies, strict=True):
                self._settle_again(run, etag, members, digest)
        found = iter(tallies)
        return [next(found) if figure is None else figure for figure in figures]

    def _settle_again(self, run: RunMarker, etag: str, members: int, digest: str) -> None:
        """Write back what an expansion found, so that the next count takes one listing
        again: a settlement broken by a later write (or never made) costs one expansion,
        not one per request. The figure is the one the listing of `digest` gives, so any
        change under the prefix since breaks it as it breaks the run's own. Only after a
        `complete` tally: an object listed without a record may be a write between its
        completion and its record, which a figure fixed now would miss once the record is
        there. Only over the marker as read (`etag`): a settlement written meanwhile, by
        the run's end or another count, may be of a later listing, and is left."""
        settled = run.model_copy(update={"members": members, "listing": digest})
        with suppress(StorageError):  # not written back: expanded again next time
            self._records.put(RUN_MARKER_KIND, run.name, settled, if_match=etag)

    def _entries(
        self, tenant: str, kid: str, version: int, after: str
    ) -> Iterator[tuple[str, Marker | _Unlisted]]:
        """(cursor after it, marker) of each object of the version after `after`, and
        (the run's name, what failed) where a run's objects cannot be listed."""
        prefix = version_prefix(tenant, kid, version)
        name_after, _, member_after = after.partition(".")
        within_after = member_key(member_after) if member_after else None
        start = f"{prefix}{name_after}{MARKER_SUFFIX}" if name_after else ""
        if member_after:  # within a run: from its member after the cursor's on
            start = f"{prefix}{name_after}"
        for info in self._store.list(prefix, start_after=start):
            name = info.key.removeprefix(prefix).removesuffix(MARKER_SUFFIX)
            if name.startswith(RUN_NAME_PREFIX):
                within = within_after if name == name_after else None
                if (read := self._run(info.key)) is not None:
                    run = read[0]
                    try:
                        for marker in self._members(run, within):
                            yield member_cursor(name, run, marker), marker
                    except StorageError as error:
                        yield name, _Unlisted(run, error)
                continue
            try:
                yield name, self._records.get(MARKER_KIND, info.key, Marker)
            except (ObjectNotFound, RecordTampered):
                continue  # dropped since it was listed, or refused and counted

    def _run(self, name: str) -> tuple[RunMarker, str] | None:
        """The run marker at `name`, and the etag of the version read."""
        try:
            return self._records.get_versioned(RUN_MARKER_KIND, name, RunMarker)
        except (ObjectNotFound, RecordTampered):
            return None  # dropped since it was listed, or refused and counted

    def _members(self, run: RunMarker, after: str | None) -> Iterator[Marker]:
        """The markers of the objects `run` stands for, in key order, after the key
        `after` under its prefix (from the first, with None): those under its prefix
        whose authentic record it covers. The store is the one the authentic marker
        names, whether or not the tenant may still use that bucket: the objects there
        still need the version."""
        store = self._spaces.own_store(run.bucket)
        start = "" if after is None else run.storage_prefix + after
        listing = store.list(run.storage_prefix, start_after=start)
        with ThreadPoolExecutor(EXPANSION_THREADS, thread_name_prefix="index") as pool:
            while infos := list(islice(listing, EXPANSION_SLICE)):
                found = pool.map(lambda info: self._listed(store, info), infos)
                for info, record in zip(infos, found, strict=True):
                    if record is not None and run.covers(record):
                        yield _member_marker(run, info.key)

    def _listed(self, store: ObjectStore, info: ObjectInfo) -> ObjectRecord | None:
        """`_listed_record`, kept (the `KEPT_RECORDS` last) for the other runs into the
        same prefix, which list the same object: by its etag as listed, so that an
        object replaced since has its record read again."""
        place = (store.bucket, info.key, info.etag)
        with self._kept_lock:
            if place in self._kept:
                return self._kept[place]
        record = _listed_record(self._records, store, info)
        with self._kept_lock:
            if len(self._kept) >= KEPT_RECORDS:
                del self._kept[next(iter(self._kept))]
            self._kept[place] = record
        return record


def listing_digest(listing: list[ObjectInfo]) -> str:
    """SHA-256 of a listing's keys, etags, sizes and times: any object written, replaced
    or deleted under the prefix changes it."""
    entries = [[i.key, i.etag, i.size, i.last_modified.isoformat()] for i in listing]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _tally(
    records: Records, store: ObjectStore, runs: list[RunMarker], listing: list[ObjectInfo]
) -> tuple[list[int], bool]:
    """How many listed objects are each of `runs`' (all into the listing's prefix), each
    object's record read once whatever the number of runs; and whether every one had a
    record to decide it by."""
    if not runs:
        return [], True

    def covering(info: ObjectInfo) -> list[bool] | None:
        record = _listed_record(records, store, info)
        return None if record is None else [run.covers(record) for run in runs]

    with ThreadPoolExecutor(EXPANSION_THREADS, thread_name_prefix="index") as pool:
        found = [covers for covers in pool.map(covering, listing) if covers is not None]
    tallies = [sum(covers[n] for covers in found) for n in range(len(runs))]
    return tallies, len(found) == len(listing)


def _listed_record(records: Records, store: ObjectStore, info: ObjectInfo) -> ObjectRecord | None:
    """The record of the listed object, if it has one to believe; None if not (gone since
    listed, written and not recorded yet, or refused): not counted (the census counts
    it), and no figure fixed on it. Read as a read of the object reads it, the object's
    metadata first: a run's small members carry their record there, one request each,
    where a listing's entry (no metadata) would look for a record file first. A record
    file of another version of the object is none to believe either: one a write left
    behind, its own record not saved yet (or never, by a crash the sweep finishes), names
    what was there before, perhaps another job or version."""
    try:
        stored = store.head(info.key)
        record = object_record(records, store, info.key, stored)
    except (ObjectNotFound, RecordTampered):
        return None
    return record if record.etag == stored.etag else None


def _member_marker(run: RunMarker, storage_key: str) -> Marker:
    return Marker(
        tenant=run.tenant,
        kid=run.kid,
        key_version=run.key_version,
        bucket=run.bucket,
        storage_key=storage_key,
        created_at=run.created_at,
    )


def record_at(records: Records, store: ObjectStore, storage_key: str) -> ObjectRecord | None:
    """The record of the object at a place, if there is one to believe: that of the object
    a write there replaces, whose marker then goes. One that cannot be believed leaves its
    marker, if any, in place: one too many."""
    try:
        return object_record(records, store, storage_key, store.head(storage_key))
    except (ObjectNotFound, RecordTampered):
        return None


class InvalidCursor(ValueError):
    """A page's cursor that names no place a member of a run could be."""


def member_cursor(name: str, run: RunMarker, marker: Marker) -> str:
    """The cursor after a run's member: the run's name, and the member's key under the
    run's prefix, as an object key (at most `MAX_KEY_BYTES`), whatever the length of the
    tenant's part of the storage key."""
    return f"{name}.{marker.storage_key.removeprefix(run.storage_prefix).encode().hex()}"


def member_key(hexed: str) -> str:
    """The key under a run's prefix that a member's cursor names (hex, as the pattern
    checked): `InvalidCursor` unless it could be an object's key, which a listing may be
    asked to start after."""
    try:
        key = bytes.fromhex(hexed).decode()
        check_object_key(key)
    except (UnicodeDecodeError, InvalidObjectKey):
        raise InvalidCursor("not a cursor this index gave") from None
    return key
