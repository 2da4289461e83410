"""The key record as persisted (pydantic models, camelCase JSON), the specs that create
one, the public view of one, and the pure rules of its life cycle.

A record holds every version's material only wrapped under the KEK; neither the
wrapped material nor an imported JWK appears in any repr. Transitions (`rotated`,
`disabled`, ...) return a new record and never touch storage; `KeyStore` persists them.
"""

import base64
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
)

from keystore.algorithms import ENCRYPTION_OPS, KEY_OPS, SIGNATURE_OPS, Jwk, KeyOp, KeyParams
from keystore.counts import Uses, VersionUses
from keystore.errors import (
    ExportabilityIsOneWay,
    InvalidExpiry,
    InvalidKeyOps,
    InvalidKeyState,
    InvalidKid,
    InvalidRotationPeriod,
    InvalidUsageLimit,
    KeyDisabled,
    KeyExpired,
    KeyNotFound,
    KeyPendingDeletion,
    KeyVersionRetired,
    MixedKeyOps,
    OperationNotPermitted,
    PrimaryVersion,
    VersionNotRetired,
)
from storage.documents import FrozenCamelModel

MIN_ROTATION_PERIOD = timedelta(hours=1)
_MAKING_OPS: tuple[KeyOp, ...] = ("encrypt", "sign")  # what an expired key no longer does
# No leading "." so no kid is a hidden, "." or ".." name in a store path.
KID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class KeyStatus(StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending-deletion"


class KeyOrigin(StrEnum):
    GENERATED = "generated"
    IMPORTED = "imported"


def _from_base64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise ValueError("expected base64 text")


Base64Bytes = Annotated[
    bytes,
    PlainValidator(_from_base64),
    PlainSerializer(lambda data: base64.b64encode(data).decode("ascii"), return_type=str),
]


class UsageLimits(FrozenCamelModel):
    """How much a key may be used: past `softUsageLimit` its answers warn (and, with
    `rotateOnUsageLimit`, it rotates, the count towards the soft limit then starting again
    with the new version); at `maxUsageLimit` it stops encrypting."""

    soft_usage_limit: int | None = Field(None, ge=1)
    max_usage_limit: int | None = Field(None, ge=1)
    rotate_on_usage_limit: bool = False

    def check_limits(self) -> None:
        """Refuse limits no key may have together."""
        soft, most = self.soft_usage_limit, self.max_usage_limit
        if soft is not None and most is not None and soft > most:
            raise InvalidUsageLimit("softUsageLimit must not exceed maxUsageLimit")
        if self.rotate_on_usage_limit and soft is None:
            raise InvalidUsageLimit("rotateOnUsageLimit needs a softUsageLimit to rotate at")


class KeyPolicy(UsageLimits):
    """What every new key states, whether generated or imported."""

    model_config = ConfigDict(extra="forbid")

    kid: str
    key_ops: list[str] | None = None  # None: every operation the key's algorithm serves
    exportable: bool = False
    expires_at: AwareDatetime | None = None
    rotation_period: timedelta | None = None

    @property
    def signs(self) -> bool:
        """Whether keyOps name signing operations (and so, once checked, only those)."""
        return self.key_ops is not None and bool(set(self.key_ops) & set(SIGNATURE_OPS))

    def checked_key_ops(self, params: KeyParams, served: tuple[KeyOp, ...]) -> tuple[KeyOp, ...]:
        """keyOps in canonical order, `served` if none were given; `InvalidKeyOps` unless
        a non-empty subset of what the key's algorithm serves."""
        ops = self._checked_ops()
        if ops is None:
            return served
        if not set(ops) <= set(served):
            raise InvalidKeyOps(f"keyOps of an {params.alg} key must be a subset of {list(served)}")
        return ops

    def check(self, now: datetime) -> None:
        """Refuse a kid, keyOps, expiry or rotation period no key may have."""
        check_kid(self.kid)
        self._checked_ops()
        if self.expires_at is not None and self.expires_at <= now:
            raise InvalidExpiry("expiresAt must lie in the future")
        if self.rotation_period is not None and self.rotation_period < MIN_ROTATION_PERIOD:
            raise InvalidRotationPeriod(f"rotationPeriod must be at least {MIN_ROTATION_PERIOD}")
        self.check_limits()

    def _checked_ops(self) -> tuple[KeyOp, ...] | None:
        ops = self.key_ops
        if ops is None:
            return None
        if not ops or len(set(ops)) != len(ops) or not set(ops) <= set(KEY_OPS):
            raise InvalidKeyOps(f"keyOps must be a non-empty subset of {list(KEY_OPS)}")
        if set(ops) & set(ENCRYPTION_OPS) and set(ops) & set(SIGNATURE_OPS):
            raise MixedKeyOps("a key either encrypts or signs: keyOps may not name both")
        return tuple(op for op in KEY_OPS if op in ops)


class KeySpec(KeyPolicy):
    """A request to generate a key: `{"kid","kty","alg","keyOps","exportable"}` works as is."""

    kty: str
    alg: str | None = None
    key_size: int | None = None


class ImportSpec(KeyPolicy):
    """A request to import key material (BYOK) given as a private JWK."""

    # The JWK holds material: keep it out of reprs and out of validation error messages.
    model_config = ConfigDict(hide_input_in_errors=True)

    jwk: dict[str, Any] = Field(repr=False)


class KeyChange(UsageLimits):
    """What PATCH may change. A field left out stays as it is; `null` clears a limit or
    the expiry. `exportable` may only go from true to false."""

    model_config = ConfigDict(extra="forbid")

    exportable: bool | None = None
    expires_at: AwareDatetime | None = None

    def given(self) -> dict[str, Any]:
        """The fields the request named, by their attribute names."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class VersionInfo(FrozenCamelModel):
    """A version as its key's readers see it: when it was made, how much it has been used
    (`encryptCount` of its `usageCount` sealed messages, the rest opened ones), and
    whether it is retired (then, when its material is, or was, destroyed)."""

    version: int = Field(ge=1)
    created_at: AwareDatetime
    usage_count: int = Field(0, ge=0)
    encrypt_count: int = Field(0, ge=0)
    last_used_at: AwareDatetime | None = None
    retired_at: AwareDatetime | None = None
    destruction_date: AwareDatetime | None = None
    destroyed_at: AwareDatetime | None = None

    def check_in_use(self, kid: str) -> None:
        """Refuse a retired version: it may neither seal nor open a message."""
        if self.retired_at is not None:
            raise KeyVersionRetired(f"key version {kid}#{self.version} is retired")


class KeyVersion(VersionInfo):
    """One version: its material wrapped under the KEK (empty once destroyed), and its
    public JWK if asymmetric."""

    wrapped_material: Base64Bytes = Field(repr=False)
    public_jwk: Jwk | None = None


class KeyMetadata(UsageLimits):
    """Everything about a key but its versions."""

    kid: str
    tenant: str
    kty: str
    alg: str
    key_size: int | None = None
    key_ops: tuple[KeyOp, ...]
    exportable: bool
    status: KeyStatus
    primary_version: int
    created_at: AwareDatetime
    updated_at: AwareDatetime
    deletion_date: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    rotation_period: timedelta | None = None
    usage_count: int = 0
    last_used_at: AwareDatetime | None = None
    origin: KeyOrigin


class KeyView(KeyMetadata):
    """What a key's readers see: metadata, the primary public JWK, version numbers."""

    public_jwk: Jwk | None
    versions: tuple[VersionInfo, ...]


class KeyRecord(KeyMetadata):
    """The stored record."""

    versions: tuple[KeyVersion, ...]
    # Whether the key was ever exportable: set when it is made, kept when `exportable`
    # turns false, so a key's material known outside the service stays known to be. A
    # record from before it was kept may have been: true.
    ever_exportable: bool = True
    # When a shared (Redis) count was last checkpointed into the usage counts: how far a
    # count may have gone past them since is bounded by the time since.
    usage_counted_at: datetime | None = Field(None, exclude_if=lambda value: value is None)

    @property
    def params(self) -> KeyParams:
        return KeyParams(self.kty, self.alg, self.key_size)

    @property
    def primary(self) -> KeyVersion:
        return self.version(self.primary_version)

    def has_version(self, number: int) -> bool:
        return any(version.version == number for version in self.versions)

    def version(self, number: int) -> KeyVersion:
        for version in self.versions:
            if version.version == number:
                return version
        raise KeyNotFound(f"key {self.kid!r} has no version {number}")

    @property
    def may_be_known_outside(self) -> bool:
        """Whether anyone outside the service may hold the material: imported, or ever
        exportable."""
        return self.origin is KeyOrigin.IMPORTED or self.ever_exportable

    def public_view(self) -> KeyView:
        metadata = {name: getattr(self, name) for name in KeyMetadata.model_fields}
        return KeyView(
            **metadata,
            public_jwk=self.primary.public_jwk,
            versions=tuple(
                VersionInfo(**{name: getattr(v, name) for name in VersionInfo.model_fields})
                for v in self.versions
            ),
        )

    # Checks: each raises the error that tells the caller why the key cannot serve.

    def check_usable(self, operation: KeyOp, now: datetime) -> None:
        """Refuse `operation` unless the key is enabled, allows it and (to encrypt or
        sign) is not expired; expired keys still decrypt and verify, so that their data
        stays readable and their signatures checkable."""
        self.check_enabled()
        if operation not in self.key_ops:
            raise OperationNotPermitted(f"key {self.kid!r} does not allow {operation!r}")
        if operation in _MAKING_OPS and self.expires_at is not None and self.expires_at <= now:
            raise KeyExpired(f"key {self.kid!r} expired at {self.expires_at.isoformat()}")

    def check_enabled(self) -> None:
        self.check_not_pending_deletion()
        if self.status is KeyStatus.DISABLED:
            raise KeyDisabled(f"key {self.kid!r} is disabled")

    def check_not_pending_deletion(self) -> None:
        if self.status is KeyStatus.PENDING_DELETION:
            raise KeyPendingDeletion(f"key {self.kid!r} is pending deletion")

    def rotation_due(self, now: datetime) -> bool:
        """Whether the key is to rotate now: its rotation period has passed since its
        primary version was made, or that version has reached the soft usage limit of a
        key that rotates on it."""
        if self.status is not KeyStatus.ENABLED:
            return False
        if (
            self.rotation_period is not None
            and self.primary.created_at + self.rotation_period <= now
        ):
            return True
        return self.rotate_on_usage_limit and self.soft_limit_reached(
            self.uses, self.primary_version
        )

    def versions_to_destroy(self, now: datetime) -> list[int]:
        """The retired versions whose material is past its destruction date."""
        return [
            version.version
            for version in self.versions
            if version.destroyed_at is None
            and version.destruction_date is not None
            and version.destruction_date <= now
        ]

    # Usage: what the record counts, and what a count means for the key

    @property
    def uses(self) -> Uses:
        """The uses this record counts, by version."""
        return Uses(
            {
                version.version: VersionUses(
                    version.usage_count, version.encrypt_count, version.last_used_at
                )
                for version in self.versions
            }
        )

    def counting(self, floor: Uses, added: Uses) -> Self:
        """The record counting `added` uses more than the larger of its own counts and
        `floor`'s (another view of them): not a change to the key, so `updatedAt` stays."""
        counted = self.uses.at_least(floor).plus(added)
        versions = tuple(
            version.model_copy(
                update={
                    "usage_count": counted.of(version.version).uses,
                    "encrypt_count": counted.of(version.version).encrypts,
                    "last_used_at": counted.of(version.version).last_used_at,
                }
            )
            for version in self.versions
        )
        kept = Uses({version.version: counted.of(version.version) for version in self.versions})
        return self.model_copy(
            update={
                "versions": versions,
                # Never lower than before, should a version ever leave the record.
                "usage_count": max(self.usage_count, kept.total),
                "last_used_at": kept.last_used_at or self.last_used_at,
            }
        )

    def checkpointing(self, uses: Uses, now: datetime) -> Self:
        """The record counting `uses` (a shared count), checkpointed at `now`."""
        return self.counting(uses, Uses()).model_copy(update={"usage_counted_at": now})

    def counts_since(self, now: datetime) -> float:
        """Seconds since the usage counts were last checkpointed from a shared count (or,
        never, since the key was made): the time uses may have gone uncheckpointed."""
        since = self.usage_counted_at or self.created_at
        return max((now - since).total_seconds(), 0.0)

    def usage_exhausted(self, uses: Uses) -> bool:
        """Whether `uses` have reached the key's maxUsageLimit."""
        return self.max_usage_limit is not None and uses.total >= self.max_usage_limit

    def soft_limit_reached(self, uses: Uses, version: int) -> bool:
        """Whether `uses` have reached the soft limit: the key's count, or for a key that
        rotates on it, the count of `version` (the one in use)."""
        if self.soft_usage_limit is None:
            return False
        counted = uses.of(version).uses if self.rotate_on_usage_limit else uses.total
        return counted >= self.soft_usage_limit

    def expiry_near(self, now: datetime, window: timedelta) -> bool:
        return self.expires_at is not None and self.expires_at - window <= now

    def destruction_due(self, now: datetime) -> bool:
        return (
            self.status is KeyStatus.PENDING_DELETION
            and self.deletion_date is not None
            and self.deletion_date <= now
        )

    # Transitions: the new record, or `self` when nothing changes.

    def with_version(self, version: KeyVersion, now: datetime) -> Self:
        return self._changed(
            now, versions=(*self.versions, version), primary_version=version.version
        )

    def disabled(self, now: datetime) -> Self:
        self.check_not_pending_deletion()
        return self._with_status(KeyStatus.DISABLED, now)

    def enabled(self, now: datetime) -> Self:
        self.check_not_pending_deletion()
        return self._with_status(KeyStatus.ENABLED, now)

    def scheduled_for_deletion(self, deletion_date: datetime, now: datetime) -> Self:
        if self.status is KeyStatus.PENDING_DELETION:
            return self  # the first schedule stands, as a repeated DELETE expects
        return self._changed(now, status=KeyStatus.PENDING_DELETION, deletion_date=deletion_date)

    def deletion_cancelled(self, now: datetime) -> Self:
        if self.status is not KeyStatus.PENDING_DELETION:
            raise InvalidKeyState(f"key {self.kid!r} is not pending deletion")
        if self.destruction_due(now):
            raise KeyPendingDeletion(f"key {self.kid!r} is past its deletion date")
        # As AWS KMS does: a key brought back from deletion must be enabled on purpose.
        return self._changed(now, status=KeyStatus.DISABLED, deletion_date=None)

    def with_retired(self, number: int, destruction_date: datetime, now: datetime) -> Self:
        """The record with version `number` retired, its material to be destroyed at
        `destruction_date`; `self` if it is retired already (the first date stands)."""
        version = self.version(number)
        if version.retired_at is not None:
            return self
        self.check_retirable(number)
        retired = version.model_copy(
            update={"retired_at": now, "destruction_date": destruction_date}
        )
        return self._with_version_replaced(retired, now)

    def with_retirement_cancelled(self, number: int, now: datetime) -> Self:
        """The record with version `number` in use again, if it is retired and its
        destruction date has not come."""
        version = self.version(number)
        if version.retired_at is None:
            raise VersionNotRetired(f"key version {self.kid}#{number} is not retired")
        if version.destruction_date is None or version.destruction_date <= now:
            raise KeyVersionRetired(
                f"key version {self.kid}#{number} is past its destruction date: its material "
                "is, or is about to be, destroyed"
            )
        restored = version.model_copy(update={"retired_at": None, "destruction_date": None})
        return self._with_version_replaced(restored, now)

    def check_retirable(self, number: int) -> None:
        """Refuse to retire the primary version, or a version of a key pending deletion."""
        self.check_not_pending_deletion()
        if number == self.primary_version:
            raise PrimaryVersion(
                f"version {number} is the primary version of key {self.kid!r}: rotate first"
            )

    def with_destroyed(self, number: int, now: datetime) -> Self:
        """The record with the material of the retired version `number` gone, if its
        destruction date has passed; `self` otherwise."""
        if number not in self.versions_to_destroy(now):
            return self
        destroyed = self.version(number).model_copy(
            update={"wrapped_material": b"", "public_jwk": None, "destroyed_at": now}
        )
        return self._with_version_replaced(destroyed, now)

    def _with_version_replaced(self, version: KeyVersion, now: datetime) -> Self:
        versions = tuple(version if v.version == version.version else v for v in self.versions)
        return self._changed(now, versions=versions)

    def with_changes(self, change: KeyChange, now: datetime) -> Self:
        """The record with what a PATCH names changed; `self` if nothing is."""
        given = change.given()
        exportable = given.pop("exportable", None)
        changed = self if exportable is None else self.with_exportable(exportable, now)
        expires_at = given.get("expires_at")
        if expires_at is not None and expires_at <= now:
            raise InvalidExpiry("expiresAt must lie in the future")
        limits = {name: getattr(self, name) for name in UsageLimits.model_fields}
        UsageLimits(**{**limits, **given}).check_limits()
        if any(getattr(self, name) != value for name, value in given.items()):
            changed = changed._changed(now, **given)  # noqa: SLF001 - a record of this class
        return changed

    def with_exportable(self, exportable: bool, now: datetime) -> Self:
        if exportable == self.exportable:
            return self
        if exportable:
            raise ExportabilityIsOneWay(f"key {self.kid!r} was created non-exportable")
        return self._changed(now, exportable=False)

    def next_version_number(self) -> int:
        return max(version.version for version in self.versions) + 1

    def _with_status(self, status: KeyStatus, now: datetime) -> Self:
        return self if self.status is status else self._changed(now, status=status)

    def _changed(self, now: datetime, **changes: Any) -> Self:
        return self.model_copy(update={**changes, "updated_at": now})


def check_kid(kid: str) -> None:
    if not KID_PATTERN.fullmatch(kid):
        raise InvalidKid("kid must be 1 to 128 of [A-Za-z0-9._-], not starting with '.'")
