"""`KeyStore`: key records persisted in an object store, material wrapped under a KEK,
unwrapped keyrings cached for a few seconds.

Each record is one sealed record (`storage.integrity`) at
`sealstream/keys/{tenant}/{kid}.json`, so every policy field (exportable, keyOps, status,
versions, dates) is authenticated and the record cannot be moved to another kid or
tenant; one that fails is refused (`RecordTampered`), never used. Creation is a
conditional write (`if_absent`), so of two creators of one kid exactly one wins; every
change is a read-modify-write guarded by the object's etag (`if_match`), retried on a
lost race. Another process's changes (a disabled key, say) are seen here within
`cache_ttl` seconds; this instance's own changes at once.
"""

import builtins  # `list` names a method inside `KeyStore`
import itertools
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cachetools import TTLCache

from envelope import Keyring
from keystore.algorithms import Jwk, KeyParams, import_jwk, key_type, resolve
from keystore.errors import (
    ConcurrentUpdate,
    CorruptRecord,
    InvalidArgument,
    InvalidPendingWindow,
    InvalidTenant,
    KeyExists,
    KeyMismatch,
    KeyNotExportable,
    KeyNotFound,
    KeystoreError,
)
from keystore.kek import Kek
from keystore.records import (
    KID_PATTERN,
    ImportSpec,
    KeyOrigin,
    KeyPolicy,
    KeyRecord,
    KeySpec,
    KeyStatus,
    KeyVersion,
    check_kid,
)
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
MATERIAL_AAD_PREFIX = "sealstream/key-material/v1"
DEFAULT_CACHE_TTL = 5.0
CACHE_SIZE = 4096
MAX_LIST_LIMIT = 1000
PENDING_WINDOW_DAYS = range(1, 31)
UPDATE_ATTEMPTS = 8

logger = logging.getLogger(__name__)

Change = Callable[[KeyRecord, datetime], KeyRecord]


def utcnow() -> datetime:
    return datetime.now(UTC)


def record_key(tenant: str, kid: str) -> str:
    """The object key of a record."""
    return f"{RECORD_PREFIX}{tenant}/{kid}{RECORD_SUFFIX}"


def material_aad(tenant: str, kid: str, version: int) -> bytes:
    """What wrapped material is bound to: '|' cannot occur in a tenant or kid."""
    return f"{MATERIAL_AAD_PREFIX}|{tenant}|{kid}|{version}".encode()


def check_tenant(tenant: str) -> None:
    if not KID_PATTERN.fullmatch(tenant):
        raise InvalidTenant("a tenant is 1 to 128 of [A-Za-z0-9._-], not starting with '.'")


@dataclass
class _CachedKey:
    """A record as read, and the keyrings of its versions unwrapped so far."""

    record: KeyRecord
    keyrings: dict[int, Keyring] = field(default_factory=dict)


class KeyStore:
    """Key records of every tenant; thread-safe, sync (callers run it in threads)."""

    def __init__(
        self,
        records: Records,
        kek: Kek,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._records = records
        self._objects = records.store
        self._kek = kek
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: TTLCache[tuple[str, str], _CachedKey] = TTLCache(
            maxsize=CACHE_SIZE, ttl=cache_ttl, timer=self._seconds
        )
        # Bumped by every invalidation, so a load that raced one is not cached.
        self._generation = 0

    # Creating keys

    def create(self, tenant: str, spec: KeySpec) -> KeyRecord:
        """Generate a key; `KeyExists` if the tenant already has the kid."""
        now = self._checked_policy(tenant, spec)
        params = resolve(spec.kty, spec.alg, spec.key_size)
        self._refuse_taken(tenant, spec.kid)  # before generating, which can take seconds
        material = key_type(params.kty).generate(params)
        return self._insert(tenant, spec, params, material, KeyOrigin.GENERATED, now)

    def import_jwk(self, tenant: str, spec: ImportSpec) -> KeyRecord:
        """Import material given as a private JWK (BYOK); `InvalidJwk` if malformed."""
        now = self._checked_policy(tenant, spec)
        params, material = import_jwk(spec.jwk)
        return self._insert(tenant, spec, params, material, KeyOrigin.IMPORTED, now)

    # Reading keys

    def get(self, tenant: str, kid: str) -> KeyRecord:
        """The record as stored now; `KeyNotFound` if the tenant has no such key."""
        return self._read(tenant, kid)

    def list(
        self, tenant: str, *, limit: int = 100, after: str | None = None
    ) -> tuple[builtins.list[KeyRecord], str | None]:
        """Up to `limit` records after the cursor `after` (a kid), in the order of their
        object keys, and the cursor of the next page (None on the last page)."""
        check_tenant(tenant)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit must be in [1, {MAX_LIST_LIMIT}]")
        if after is not None:
            check_kid(after)
        kids = self._kids_after(tenant, after, limit + 1)
        records = []
        for kid in kids[:limit]:
            with suppress(KeyNotFound):  # deleted since it was listed
                records.append(self._read(tenant, kid))
        return records, kids[limit - 1] if len(kids) > limit else None

    def export_jwk(self, tenant: str, kid: str, version: int | None = None) -> Jwk:
        """A version's material (the primary's by default) as a private JWK."""
        record = self._read(tenant, kid)
        if not record.exportable:
            raise KeyNotExportable(f"key {kid!r} is not exportable")
        record.check_enabled()  # a disabled key's material stays in, as its use does
        chosen = record.primary if version is None else record.version(version)
        material = self._unwrap(record, chosen)
        return key_type(record.kty).export_jwk(
            _key_name(kid, chosen.version), record.params, material
        )

    # Using keys

    def encryption_keyring(
        self, tenant: str, kid: str, *, min_primary: int | None = None
    ) -> tuple[KeyRecord, Keyring]:
        """The primary version's keyring, if the key may encrypt now.

        `min_primary` is a primary version another process has seen: a cached record
        whose primary version is older is read again, so that a rotation made elsewhere
        within the cache TTL is not missed.
        """
        entry = self._cached(tenant, kid)
        if min_primary is not None and entry.record.primary_version < min_primary:
            self._invalidate(tenant, kid)
            entry = self._cached(tenant, kid)
        entry.record.check_usable("encrypt", self._clock())
        return entry.record, self._keyring(entry, entry.record.primary)

    def decryption_keyrings(
        self, tenant: str, kid: str, *, needs_version: int | None = None
    ) -> tuple[KeyRecord, builtins.list[Keyring]]:
        """Every version's keyring, if the key may decrypt now.

        `needs_version` is the version a message names (its key name is `kid#version`):
        a cached record without it is read again, so that a version another process
        made within the cache TTL still decrypts.
        """
        entry = self._cached(tenant, kid)
        if needs_version is not None and not entry.record.has_version(needs_version):
            self._invalidate(tenant, kid)
            entry = self._cached(tenant, kid)
        entry.record.check_usable("decrypt", self._clock())
        return entry.record, [self._keyring(entry, version) for version in entry.record.versions]

    def opening_keyrings(
        self, tenant: str, key_names: Iterable[str], *, expected_kid: str | None = None
    ) -> tuple[KeyRecord, builtins.list[Keyring]]:
        """The keyrings of the first of a message's key names (`kid#version`) that name a
        usable key of this tenant; names of other forms are skipped.

        `expected_kid` restricts the search to that key (`KeyMismatch` if the message does
        not name it). When no named key is usable, the first reason is raised (a disabled
        key says so; keys that do not exist answer `KeyNotFound`).
        """
        matches = [m for m in map(KEY_NAME_PATTERN.fullmatch, key_names) if m is not None]
        if expected_kid is not None:
            matches = [m for m in matches if m["kid"] == expected_kid]
            if not matches:
                raise KeyMismatch(f"the message is not sealed for key {expected_kid!r}")
        first_error: KeystoreError | None = None
        for match in matches:
            try:
                return self.decryption_keyrings(
                    tenant, match["kid"], needs_version=int(match["version"])
                )
            except KeystoreError as error:
                if first_error is None or isinstance(first_error, KeyNotFound):
                    first_error = error
        if first_error is not None:
            raise first_error
        raise KeyNotFound("the message is not sealed for any key of this tenant")

    # Changing keys

    def rotate(self, tenant: str, kid: str) -> KeyRecord:
        """Add a version and make it primary; only enabled keys rotate."""
        return self._update(tenant, kid, self._rotated)

    def disable(self, tenant: str, kid: str) -> KeyRecord:
        return self._update(tenant, kid, lambda record, now: record.disabled(now))

    def enable(self, tenant: str, kid: str) -> KeyRecord:
        return self._update(tenant, kid, lambda record, now: record.enabled(now))

    def schedule_deletion(self, tenant: str, kid: str, pending_days: int = 7) -> KeyRecord:
        """Mark the key for destruction after `pending_days` (1 to 30); until then it is
        unusable, and `cancel_deletion` brings it back disabled."""
        if pending_days not in PENDING_WINDOW_DAYS:
            raise InvalidPendingWindow(
                f"the pending window is {PENDING_WINDOW_DAYS.start} to "
                f"{PENDING_WINDOW_DAYS.stop - 1} days"
            )
        return self._update(
            tenant,
            kid,
            lambda record, now: record.scheduled_for_deletion(
                now + timedelta(days=pending_days), now
            ),
        )

    def cancel_deletion(self, tenant: str, kid: str) -> KeyRecord:
        return self._update(tenant, kid, lambda record, now: record.deletion_cancelled(now))

    def set_exportable(self, tenant: str, kid: str, exportable: bool) -> KeyRecord:
        """Make a key non-exportable; the other way raises `ExportabilityIsOneWay`."""
        return self._update(
            tenant, kid, lambda record, now: record.with_exportable(exportable, now)
        )

    # Scheduled work (idempotent: running it twice, or on two workers, does it once)

    def rotate_due(self) -> builtins.list[tuple[str, str]]:
        """Rotate the enabled keys whose rotation period has passed since their primary
        version was made; the (tenant, kid) of each key rotated."""
        rotated = []
        for record in self._records_where(lambda record, now: record.rotation_due(now)):
            try:
                after = self._update(record.tenant, record.kid, self._rotated_if_due)
            except KeyNotFound:
                continue  # destroyed meanwhile
            if after.primary_version != record.primary_version:
                rotated.append((record.tenant, record.kid))
        return rotated

    def destroy_due(self) -> builtins.list[tuple[str, str]]:
        """Delete the records (and so the material) of keys past their deletion date."""
        destroyed = []
        for record in self._records_where(lambda record, now: record.destruction_due(now)):
            # Safe without a conditional delete: past its date a key admits no change.
            self._objects.delete(record_key(record.tenant, record.kid))
            self._invalidate(record.tenant, record.kid)
            destroyed.append((record.tenant, record.kid))
        return destroyed

    # Persistence

    def _insert(
        self,
        tenant: str,
        policy: KeyPolicy,
        params: KeyParams,
        material: bytes,
        origin: KeyOrigin,
        now: datetime,
    ) -> KeyRecord:
        record = KeyRecord(
            kid=policy.kid,
            tenant=tenant,
            kty=params.kty,
            alg=params.alg,
            key_size=params.key_size,
            key_ops=policy.checked_key_ops(),
            exportable=policy.exportable,
            status=KeyStatus.ENABLED,
            primary_version=1,
            versions=(self._new_version(tenant, policy.kid, params, 1, material, now),),
            created_at=now,
            updated_at=now,
            expires_at=policy.expires_at,
            rotation_period=policy.rotation_period,
            origin=origin,
        )
        try:
            self._records.put(RECORD_KIND, record_key(tenant, policy.kid), record, if_absent=True)
        except ObjectExists:
            raise KeyExists(f"key {policy.kid!r} already exists") from None
        self._invalidate(tenant, policy.kid)
        return record

    def _refuse_taken(self, tenant: str, kid: str) -> None:
        """`KeyExists` early; the conditional write still settles races."""
        try:
            self._objects.head(record_key(tenant, kid))
        except ObjectNotFound:
            return
        raise KeyExists(f"key {kid!r} already exists")

    def _update(self, tenant: str, kid: str, change: Change) -> KeyRecord:
        """Apply `change` to the stored record, re-reading and retrying on lost races."""
        for attempt in range(UPDATE_ATTEMPTS):
            record, etag = self._read_for_update(tenant, kid)
            changed = change(record, self._clock())
            if changed is record:
                return record
            try:
                self._records.put(RECORD_KIND, record_key(tenant, kid), changed, if_match=etag)
            except (PreconditionFailed, ObjectNotFound):
                _back_off(attempt)
                continue
            finally:
                self._invalidate(tenant, kid)
            return changed
        raise ConcurrentUpdate(f"key {kid!r} kept changing; gave up after {UPDATE_ATTEMPTS} tries")

    def _read(self, tenant: str, kid: str) -> KeyRecord:
        check_tenant(tenant)
        check_kid(kid)
        try:
            record = self._records.get(RECORD_KIND, record_key(tenant, kid), KeyRecord)
        except ObjectNotFound:
            raise KeyNotFound(f"no key {kid!r}") from None
        if (record.tenant, record.kid) != (tenant, kid):
            # The MAC binds the name, so only a service bug could get here: refuse anyway.
            raise CorruptRecord(f"the record stored as key {kid!r} names another key")
        return record

    def _read_for_update(self, tenant: str, kid: str) -> tuple[KeyRecord, str]:
        """The record and an etag no newer than it: the etag is read first, so a change
        between the two reads makes the conditional write fail rather than win."""
        check_tenant(tenant)
        check_kid(kid)
        try:
            etag = self._objects.head(record_key(tenant, kid)).etag
        except ObjectNotFound:
            raise KeyNotFound(f"no key {kid!r}") from None
        return self._read(tenant, kid), etag

    def _kids_after(self, tenant: str, after: str | None, count: int) -> builtins.list[str]:
        """Up to `count` kids of the tenant, in listing order, after the kid `after`."""
        start = record_key(tenant, after) if after is not None else ""
        keys = self._stored_keys(f"{RECORD_PREFIX}{tenant}/", start)
        return [kid for _, kid in itertools.islice(keys, count)]

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

    def _records_where(self, due: Callable[[KeyRecord, datetime], bool]) -> Iterator[KeyRecord]:
        now = self._clock()
        for tenant, kid in self._stored_keys(RECORD_PREFIX):
            try:
                record = self._read(tenant, kid)
            except KeyNotFound:
                continue  # deleted since it was listed
            except StorageUnavailable:
                raise  # the next sweep tries again
            except (CorruptRecord, StorageError) as error:
                # One bad record must not stop the sweep for every other key.
                logger.warning("skipping key %r of tenant %r: %s", kid, tenant, error)
                continue
            if due(record, now):
                yield record

    # Material

    def _new_version(
        self, tenant: str, kid: str, params: KeyParams, number: int, material: bytes, now: datetime
    ) -> KeyVersion:
        return KeyVersion(
            version=number,
            created_at=now,
            wrapped_material=self._kek.wrap(material, material_aad(tenant, kid, number)),
            public_jwk=key_type(params.kty).public_jwk(_key_name(kid, number), params, material),
        )

    def _unwrap(self, record: KeyRecord, version: KeyVersion) -> bytes:
        aad = material_aad(record.tenant, record.kid, version.version)
        return self._kek.unwrap(version.wrapped_material, aad)

    def _rotated(self, record: KeyRecord, now: datetime) -> KeyRecord:
        record.check_enabled()  # only enabled keys rotate
        number = record.next_version_number()
        material = key_type(record.kty).generate(record.params)
        version = self._new_version(record.tenant, record.kid, record.params, number, material, now)
        return record.with_version(version, now)

    def _rotated_if_due(self, record: KeyRecord, now: datetime) -> KeyRecord:
        return self._rotated(record, now) if record.rotation_due(now) else record

    # Cache

    def _cached(self, tenant: str, kid: str) -> _CachedKey:
        with self._lock:
            entry = self._cache.get((tenant, kid))
            generation = self._generation
        if entry is not None:
            return entry
        entry = _CachedKey(self._read(tenant, kid))
        with self._lock:
            if generation == self._generation:
                self._cache[(tenant, kid)] = entry
        return entry

    def _keyring(self, entry: _CachedKey, version: KeyVersion) -> Keyring:
        keyring = entry.keyrings.get(version.version)
        if keyring is None:
            record = entry.record
            material = self._unwrap(record, version)
            keyring = key_type(record.kty).keyring(
                _key_name(record.kid, version.version), record.params, material
            )
            # Unlocked: two threads may both unwrap a version; either keyring serves.
            entry.keyrings[version.version] = keyring
        return keyring

    def _invalidate(self, tenant: str, kid: str) -> None:
        with self._lock:
            self._cache.pop((tenant, kid), None)
            self._generation += 1

    # Helpers

    def _checked_policy(self, tenant: str, policy: KeyPolicy) -> datetime:
        check_tenant(tenant)
        now = self._clock()
        policy.check(now)
        return now

    def _seconds(self) -> float:
        return self._clock().timestamp()


KEY_NAME_PATTERN = re.compile(rf"(?P<kid>{KID_PATTERN.pattern})#(?P<version>[1-9][0-9]{{0,8}})")


def _key_name(kid: str, version: int) -> str:
    return f"{kid}#{version}"


def _back_off(attempt: int) -> None:
    """A short random wait, so racing writers do not collide again in lockstep."""
    time.sleep(random.uniform(0, 0.005 * 2**attempt))  # noqa: S311 - jitter, not secrecy
