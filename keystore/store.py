"""`KeyStore`: the keys of every tenant, as the service uses and manages them.

It ties together the records (`keystore.persistence`: sealed, written conditionally),
the material (`keystore.material`: wrapped under a KEK) and a short cache of unwrapped
keyrings (`keystore.cache`). Another process's changes (a disabled key, say) are seen
here within `cache_ttl` seconds; this instance's own changes at once. The scheduled
sweeps (`rotate_due`, `destroy_due`) are idempotent: running one twice, or on two
workers, does its work once.

Every message sealed or opened under a key counts as one use of its version
(`sealing_keyring`, `count_opened`), shared with every process through a usage ledger
(`keystore.usage`): the key records themselves, or Redis when given one. A key that
rotates on its soft usage limit rotates once the shared count tells a process it has
reached it.
"""

import builtins  # `list` names a method inside `KeyStore`
import logging
from collections.abc import Callable, Iterable
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import redis

from envelope import Keyring, SigningKey, VerifyingKey
from keystore.algorithms import Jwk, KeyOp, KeyParams, import_jwk, key_type, resolve
from keystore.cache import DEFAULT_CACHE_TTL, CachedKey, KeyCache
from keystore.counts import Uses
from keystore.errors import (
    InvalidArgument,
    InvalidPendingWindow,
    KeyMismatch,
    KeyNotExportable,
    KeyNotFound,
    KeystoreError,
    OperationNotPermitted,
)
from keystore.kek import Kek
from keystore.kek_wraps import WrapCounter
from keystore.material import KEY_NAME_PATTERN, Material
from keystore.name_keys import DEFAULT_MAX_VERSIONS, NameKeys
from keystore.persistence import KeyRecordStore, check_tenant
from keystore.records import (
    ImportSpec,
    KeyChange,
    KeyOrigin,
    KeyPolicy,
    KeyRecord,
    KeySpec,
    KeyStatus,
    check_kid,
)
from keystore.usage import (
    DEFAULT_BATCH,
    DEFAULT_FLUSH_INTERVAL,
    RecordLedger,
    UsageLedger,
    UsageMeter,
)
from keystore.usage_redis import DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_MAX_RATE, RedisLedger
from storage import StorageError
from storage.integrity import Records

MAX_LIST_LIMIT = 1000
PENDING_WINDOW_DAYS = range(1, 31)

logger = logging.getLogger(__name__)


MESSAGE_PROOF_PURPOSE = "message-proof"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _key_ops(policy: KeyPolicy, params: KeyParams) -> tuple[KeyOp, ...]:
    """The new key's keyOps: what it asked for, within what its algorithm serves."""
    return policy.checked_key_ops(params, key_type(params.kty).operations(params.alg))


# Asked before a sweep destroys something (tenant, and what): whether it may now.
Proceed = Callable[[str, str], bool]


def always(_tenant: str, _name: str) -> bool:
    """The `Proceed` of a caller that asks nothing first."""
    return True


def check_pending_window(days: int) -> None:
    """Refuse a pending window before destruction outside 1 to 30 days."""
    if days not in PENDING_WINDOW_DAYS:
        raise InvalidPendingWindow(
            f"the pending window is {PENDING_WINDOW_DAYS.start} to "
            f"{PENDING_WINDOW_DAYS.stop - 1} days"
        )


class KeyStore:
    """Key records of every tenant; thread-safe, sync (callers run it in threads)."""

    def __init__(
        self,
        records: Records,
        kek: Kek,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        clock: Callable[[], datetime] = utcnow,
        usage_redis: redis.Redis | None = None,
        usage_batch: int = DEFAULT_BATCH,
        usage_flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        usage_checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        usage_max_rate: float = DEFAULT_MAX_RATE,
        on_usage_rotation: Callable[[str, str, int], None] = lambda _t, _k, _v: None,
        name_key_max_versions: int = DEFAULT_MAX_VERSIONS,
    ) -> None:
        self._clock = clock
        self._records = records
        self._on_usage_rotation = on_usage_rotation
        # A shared count is checked against the sealed record only at checkpoints: a
        # version rotates on its soft limit no sooner than a checkpoint interval after it
        # was made, so forged counts cannot make versions without end.
        self._usage_rotation_age = timedelta(
            seconds=0 if usage_redis is None else usage_checkpoint_interval
        )
        self._cache = KeyCache(cache_ttl, timer=lambda: clock().timestamp())
        self._saved = KeyRecordStore(records, clock, on_write=self._cache.invalidate)
        wraps = WrapCounter(records, self._stored_versions)
        self._material = Material(kek, wraps.count_one)
        self.name_keys = NameKeys(records, kek, wraps.count_one, name_key_max_versions)
        ledger: UsageLedger = (
            RecordLedger(self._saved)
            if usage_redis is None
            else RedisLedger(
                usage_redis,
                self._saved,
                checkpoint_interval=usage_checkpoint_interval,
                flush_interval=usage_flush_interval,
                max_rate=usage_max_rate,
            )
        )
        self._usage = UsageMeter(
            ledger,
            self._saved.read,
            self._rotate_if_used_up,
            clock,
            batch=usage_batch,
            flush_interval=usage_flush_interval,
        )

    # Creating keys

    def create(self, tenant: str, spec: KeySpec) -> KeyRecord:
        """Generate a key; `KeyExists` if the tenant already has the kid."""
        now = self._checked_policy(tenant, spec)
        params = resolve(spec.kty, spec.alg, spec.key_size, signs=spec.signs)
        key_ops = _key_ops(spec, params)
        self._saved.refuse_taken(tenant, spec.kid)  # before generating, which can take seconds
        material = key_type(params.kty).generate(params)
        return self._insert(tenant, spec, params, key_ops, material, KeyOrigin.GENERATED, now)

    def import_jwk(self, tenant: str, spec: ImportSpec) -> KeyRecord:
        """Import material given as a private JWK (BYOK); `InvalidJwk` if malformed."""
        now = self._checked_policy(tenant, spec)
        params, material = import_jwk(spec.jwk)
        key_ops = _key_ops(spec, params)
        return self._insert(tenant, spec, params, key_ops, material, KeyOrigin.IMPORTED, now)

    # Reading keys

    def get(self, tenant: str, kid: str) -> KeyRecord:
        """The record as stored now, counting the uses every process has added and this
        one's not added yet; `KeyNotFound` if the tenant has no such key."""
        return self._with_usage(self._saved.read(tenant, kid))

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
        kids = self._saved.kids_after(tenant, after, limit + 1)
        records = []
        for kid in kids[:limit]:
            with suppress(KeyNotFound):  # deleted since it was listed
                records.append(self._with_usage(self._saved.read(tenant, kid)))
        return records, kids[limit - 1] if len(kids) > limit else None

    def export_jwk(self, tenant: str, kid: str, version: int | None = None) -> Jwk:
        """A version's material (the primary's by default) as a private JWK."""
        record = self._saved.read(tenant, kid)
        if not record.exportable:
            raise KeyNotExportable(f"key {kid!r} is not exportable")
        record.check_enabled()  # a disabled key's material stays in, as its use does
        chosen = record.primary if version is None else record.version(version)
        chosen.check_in_use(kid)
        return self._material.export_jwk(record, chosen)

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
            self._cache.invalidate(tenant, kid)
            entry = self._cached(tenant, kid)
        entry.record.check_usable("encrypt", self._clock())
        return entry.record, entry.keyring(entry.record.primary, self._material.keyring)

    def check_encrypt(self, tenant: str, kid: str) -> KeyRecord:
        """The key's record, if it may seal a message now: for a job to check before it
        starts (nothing is counted)."""
        record, _ = self.encryption_keyring(tenant, kid)
        self._usage.check_encrypt(record)
        return record

    def message_proof_key(self) -> bytes:
        """The key the service proves the messages it writes with (`services.provenance`),
        derived from the store's record key for that purpose alone."""
        return self._records.key.derive(MESSAGE_PROOF_PURPOSE)

    def sealing_keyring(self, tenant: str, kid: str) -> tuple[KeyRecord, Keyring, Uses]:
        """The primary version's keyring to seal one message with, counted as a use of
        it; and the key's uses with it. Refused once the key is past its
        maxUsageLimit (`KeyUsageExhausted`) or the version has wrapped as many data keys
        as its random IVs allow (`KeyVersionWornOut`)."""
        record, keyring = self.encryption_keyring(tenant, kid)
        uses = self._usage.use(record, record.primary_version, "encrypt")
        return record, keyring, uses

    def resuming_keyring(self, tenant: str, kid: str, version: int) -> tuple[KeyRecord, Keyring]:
        """The keyring of `version` of the key, to go on sealing a message started under
        it (a resumable upload), if the key may encrypt now. Nothing is counted: the
        message was counted once, when it started."""
        entry = self._cached(tenant, kid)
        if not entry.record.has_version(version):
            self._cache.invalidate(tenant, kid)
            entry = self._cached(tenant, kid)
        record = entry.record
        record.check_usable("encrypt", self._clock())
        chosen = record.version(version)
        chosen.check_in_use(kid)
        return record, entry.keyring(chosen, self._material.keyring)

    def count_opened(self, record: KeyRecord, version: int) -> Uses:
        """Count a message opened under `version` of the key; the key's uses with it."""
        return self._usage.use(record, version, "decrypt")

    def count_signed(self, record: KeyRecord) -> Uses:
        """Count a signature to be made by the key's primary version; the key's uses with
        it. Refused once the key is past its maxUsageLimit (`KeyUsageExhausted`)."""
        return self._usage.use(record, record.primary_version, "sign")

    def count_verified(self, record: KeyRecord, version: int) -> Uses:
        """Count a signature checked with `version` of the key; the key's uses with it."""
        return self._usage.use(record, version, "verify")

    def flush_usage(self) -> None:
        """Add this process's uncounted uses to the shared count now."""
        self._usage.flush()

    def close(self) -> None:
        """Stop counting in the background, adding what is left."""
        self._usage.close()

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
            self._cache.invalidate(tenant, kid)
            entry = self._cached(tenant, kid)
        record = entry.record
        record.check_usable("decrypt", self._clock())
        if needs_version is not None and record.has_version(needs_version):
            record.version(needs_version).check_in_use(kid)
        unwrap = self._material.keyring
        live = [version for version in record.versions if version.retired_at is None]
        return record, [entry.keyring(version, unwrap) for version in live]

    def signing_key(self, tenant: str, kid: str) -> tuple[KeyRecord, SigningKey]:
        """The primary version's signing key, if the key may sign now."""
        entry = self._cached(tenant, kid)
        entry.record.check_usable("sign", self._clock())
        return entry.record, entry.signing_key(entry.record.primary, self._material.signing_key)

    def verifying_key(
        self, tenant: str, kid: str, version: int | None = None
    ) -> tuple[KeyRecord, int, VerifyingKey]:
        """The key that checks signatures of a version (the primary if None), if the key
        may verify now; made from the version's public JWK, so no private material is
        unwrapped. A cached record without `version` is read again, as to decrypt."""
        entry = self._cached(tenant, kid)
        if version is not None and not entry.record.has_version(version):
            self._cache.invalidate(tenant, kid)
            entry = self._cached(tenant, kid)
        record = entry.record
        record.check_usable("verify", self._clock())
        chosen = record.primary if version is None else record.version(version)
        if chosen.public_jwk is None:
            raise OperationNotPermitted(f"key {kid!r} has no public key to verify with")
        return (
            record,
            chosen.version,
            key_type(record.kty).verifying_key(chosen.public_jwk, record.alg),
        )

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
        return self._saved.update(tenant, kid, self._material.rotated)

    def disable(self, tenant: str, kid: str) -> KeyRecord:
        return self._saved.update(tenant, kid, lambda record, now: record.disabled(now))

    def enable(self, tenant: str, kid: str) -> KeyRecord:
        return self._saved.update(tenant, kid, lambda record, now: record.enabled(now))

    def schedule_deletion(self, tenant: str, kid: str, pending_days: int = 7) -> KeyRecord:
        """Mark the key for destruction after `pending_days` (1 to 30); until then it is
        unusable, and `cancel_deletion` brings it back disabled."""
        check_pending_window(pending_days)
        return self._saved.update(
            tenant,
            kid,
            lambda record, now: record.scheduled_for_deletion(
                now + timedelta(days=pending_days), now
            ),
        )

    def cancel_deletion(self, tenant: str, kid: str) -> KeyRecord:
        return self._saved.update(tenant, kid, lambda record, now: record.deletion_cancelled(now))

    def retire_version(
        self, tenant: str, kid: str, version: int, pending_days: int = 7
    ) -> KeyRecord:
        """Retire a version that is not the primary: from now on it seals and opens
        nothing, and its material is destroyed after `pending_days` (1 to 30). Whether
        stored objects still need it is the caller's to check first."""
        check_pending_window(pending_days)
        return self._saved.update(
            tenant,
            kid,
            lambda record, now: record.with_retired(
                version, now + timedelta(days=pending_days), now
            ),
        )

    def cancel_retirement(self, tenant: str, kid: str, version: int) -> KeyRecord:
        """Put a retired version back in use, within its pending window."""
        return self._saved.update(
            tenant, kid, lambda record, now: record.with_retirement_cancelled(version, now)
        )

    def change(self, tenant: str, kid: str, change: KeyChange) -> KeyRecord:
        """Change what a PATCH may: exportable (to false only), expiresAt, the usage
        limits and rotateOnUsageLimit."""
        return self._with_usage(
            self._saved.update(tenant, kid, lambda record, now: record.with_changes(change, now))
        )

    # Scheduled work (idempotent: running it twice, or on two workers, does it once)

    def rotate_due(self) -> builtins.list[tuple[str, str]]:
        """Rotate the enabled keys whose rotation period has passed since their primary
        version was made, or whose primary version has reached the soft usage limit of a
        key that rotates on it; the (tenant, kid) of each key rotated."""
        now = self._clock()
        rotated = []
        for record in self._saved.records_where(lambda record: record.rotation_due(now)):
            try:
                after = self._saved.update(record.tenant, record.kid, self._rotated_if_due)
            except KeyNotFound:
                continue  # destroyed meanwhile
            if after.primary_version != record.primary_version:
                rotated.append((record.tenant, record.kid))
        return rotated

    def destroy_due(self, proceed: Proceed = always) -> builtins.list[tuple[str, str]]:
        """Delete the records (and so the material) of keys past their deletion date,
        each once `proceed(tenant, kid)` allows it (a key it does not is left for the
        next sweep)."""
        now = self._clock()
        destroyed = []
        for record in self._saved.records_where(lambda record: record.destruction_due(now)):
            if not proceed(record.tenant, record.kid):
                continue
            # Safe without a conditional delete: past its date a key admits no change.
            self._saved.delete(record.tenant, record.kid)
            destroyed.append((record.tenant, record.kid))
        return destroyed

    def versions_to_destroy(self) -> builtins.list[tuple[str, str, int]]:
        """(tenant, kid, version) of every retired version past its destruction date."""
        now = self._clock()
        return [
            (record.tenant, record.kid, number)
            for record in self._saved.records_where(lambda r: bool(r.versions_to_destroy(now)))
            for number in record.versions_to_destroy(now)
        ]

    def destroy_version(self, tenant: str, kid: str, version: int) -> bool:
        """Destroy the material of a retired version past its destruction date; whether
        this call did (not for any other version, nor one destroyed or put back in use
        meanwhile)."""
        destroyed = False

        def destroy(record: KeyRecord, now: datetime) -> KeyRecord:
            nonlocal destroyed
            changed = record.with_destroyed(version, now)
            destroyed = changed is not record
            return changed

        self._saved.update(tenant, kid, destroy)
        return destroyed

    # Helpers

    def _insert(
        self,
        tenant: str,
        policy: KeyPolicy,
        params: KeyParams,
        key_ops: tuple[KeyOp, ...],
        material: bytes,
        origin: KeyOrigin,
        now: datetime,
    ) -> KeyRecord:
        first = self._material.new_version(tenant, policy.kid, params, 1, material, now)
        record = KeyRecord(
            kid=policy.kid,
            tenant=tenant,
            kty=params.kty,
            alg=params.alg,
            key_size=params.key_size,
            key_ops=key_ops,
            exportable=policy.exportable,
            ever_exportable=policy.exportable,
            status=KeyStatus.ENABLED,
            primary_version=1,
            versions=(first,),
            created_at=now,
            updated_at=now,
            expires_at=policy.expires_at,
            rotation_period=policy.rotation_period,
            soft_usage_limit=policy.soft_usage_limit,
            max_usage_limit=policy.max_usage_limit,
            rotate_on_usage_limit=policy.rotate_on_usage_limit,
            origin=origin,
        )
        self._saved.insert(record)
        return record

    def _stored_versions(self) -> int:
        return sum(len(record.versions) for record in self._saved.records_where(lambda _: True))

    def _with_usage(self, record: KeyRecord) -> KeyRecord:
        return record.counting(self._usage.view(record), Uses())

    def _rotate_if_used_up(self, record: KeyRecord, uses: Uses) -> None:
        """Rotate a key that rotates on its soft limit, once `uses` (the shared count)
        says its primary version has reached it; `on_usage_rotation(tenant, kid, new
        primary version)` is told if this call rotated it."""
        if not (
            record.rotate_on_usage_limit and record.soft_limit_reached(uses, record.primary_version)
        ):
            return
        rotating: list[bool] = []  # the last try's: whether it rotated

        def rotated(stored: KeyRecord, now: datetime) -> KeyRecord:
            if now - stored.primary.created_at < self._usage_rotation_age:
                rotating.append(False)
                return stored  # a later use, or the lifecycle sweep, rotates it
            counted = stored.counting(uses, Uses())
            rotating.append(counted.rotation_due(now))
            return self._rotated_if_due(counted, now)

        try:
            after = self._saved.update(record.tenant, record.kid, rotated)
        except (KeystoreError, StorageError) as error:
            # The lifecycle sweep rotates it from the record's counts.
            logger.warning("key %r not rotated on its usage limit yet: %s", record.kid, error)
            return
        if rotating[-1]:
            self._on_usage_rotation(record.tenant, record.kid, after.primary_version)

    def _cached(self, tenant: str, kid: str) -> CachedKey:
        return self._cache.get(tenant, kid, lambda: self._saved.read(tenant, kid))

    def _rotated_if_due(self, record: KeyRecord, now: datetime) -> KeyRecord:
        return self._material.rotated(record, now) if record.rotation_due(now) else record

    def _checked_policy(self, tenant: str, policy: KeyPolicy) -> datetime:
        check_tenant(tenant)
        now = self._clock()
        policy.check(now)
        return now
