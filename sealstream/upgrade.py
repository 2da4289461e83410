"""`sealstream upgrade-records`: seal the records a store kept before records were sealed.

Sealing blesses whatever the bucket holds at that moment, a record planted there by
someone who could write the bucket included. So it is not something a start-up does on
its own: the service refuses to start on such a store, and an operator runs this once,
with the service's settings and KEK, and reviews what it lists. Every token and key
record it seals is listed with what it grants; records already sealed are left alone,
and those that fail authentication are listed too (they stay refused).

Once every record of a store is sealed (the record-key document says so), an upgrade
refuses to run unless told to run `again`: an unsealed record found after that was not
written before records were sealed, but put there since, by someone else.

Token records held a plain SHA-256 of the token: they become HMAC(token-hash key, that
SHA-256), so no token is re-issued, and their ids go into the index of ids issued before
ids carried a MAC. Naive datetimes, which the service once accepted, are read as UTC.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from api.tokens import (
    LEGACY_IDS_KEY,
    LEGACY_IDS_KIND,
    TOKENS_PREFIX,
    LegacyTokenIds,
    TokenHasher,
    TokenRecord,
)
from api.tokens import (
    RECORD_KIND as TOKEN_KIND,
)
from envelope import EnvelopeError
from keystore import KeyRecord
from keystore.persistence import RECORD_KIND as KEY_KIND
from keystore.persistence import RECORD_PREFIX as KEYS_PREFIX
from keystore.recordkey import all_sealed, mark_all_sealed
from sealstream.settings import Settings
from sealstream.wiring import open_kek, open_object_store, open_service_records
from services.jobs import REPORT_KIND, REPORTS_PREFIX, JobRecord
from services.objects import header_digest, read_stored_header
from storage import ObjectNotFound, ObjectStore, PreconditionFailed, StorageError
from storage.integrity import Records, RecordTampered, is_sealed
from storage.records import RECORD_KIND as OBJECT_KIND
from storage.records import RECORDS_PREFIX as OBJECTS_PREFIX
from storage.records import ObjectRecord
from workers.journal import JOURNAL_KIND, JournalEntry, JournalResult

Upgrade = Callable[[dict[str, Any]], BaseModel]


@dataclass
class UpgradeReport:
    """What an upgrade did: each list holds storage keys, or the sealed records themselves."""

    dry_run: bool = False  # nothing was sealed: the lists say what would be
    tokens: list[TokenRecord] = field(default_factory=list)
    keys: list[KeyRecord] = field(default_factory=list)
    others: dict[str, list[str]] = field(default_factory=dict)  # kind → the names sealed
    already_sealed: int = 0
    refused: list[str] = field(default_factory=list)  # sealed, yet not authentic
    unreadable: list[str] = field(default_factory=list)  # not a record of its kind at all

    def lines(self) -> Iterator[str]:
        sealed = "would seal" if self.dry_run else "sealed"
        yield f"{sealed} {len(self.tokens)} token records; review what each grants:"
        for token in self.tokens:
            state = "revoked" if token.revoked_at else f"expires {token.expires_at or 'never'}"
            yield (
                f"  token {token.id}  tenant {token.tenant}  scopes {','.join(token.scopes)}"
                f"  name {token.name!r}  {state}"
            )
        yield f"{sealed} {len(self.keys)} key records; review each one's policy:"
        for key in self.keys:
            yield (
                f"  key {key.tenant}/{key.kid}  {key.kty} {key.alg}  {key.status}"
                f"  exportable {str(key.exportable).lower()}  keyOps {','.join(key.key_ops)}"
                f"  versions {len(key.versions)}"
            )
        for kind, names in sorted(self.others.items()):
            yield f"{sealed} {len(names)} {kind} records:"
            yield from (f"  {name}" for name in names)
        yield f"left {self.already_sealed} records alone: sealed already"
        for name in self.refused:
            yield f"REFUSED (sealed, but not by this service's key): {name}"
        for name in self.unreadable:
            yield f"UNREADABLE (left as it is, and refused): {name}"


class AlreadySealed(Exception):
    """Every record of the store was sealed already: there is nothing from before."""


def upgrade_records(
    settings: Settings, *, again: bool = False, dry_run: bool = False
) -> UpgradeReport:
    """Seal every record of the store that `settings` name written before records were
    sealed (or with `dry_run`, only list what that would seal); see the module docstring.
    Once that is done for a store (or if it never held records from before),
    `AlreadySealed` unless `again`: an unsealed record there now was put there since, by
    someone else."""
    objects = open_object_store(settings)
    records = open_service_records(settings, objects, open_kek(settings), upgrading=True)
    if all_sealed(records.key, objects, records.store_id) and not (again or dry_run):
        raise AlreadySealed(
            "every record of this store has been sealed already, so an unsealed record found "
            "there now was not written before records were sealed: find out who wrote it "
            "before you run this again with --again, which seals what it lists"
        )
    hasher = TokenHasher(records)
    report = UpgradeReport(dry_run=dry_run)
    tokens = _seal_all(records, TOKEN_KIND, TOKENS_PREFIX, _token_upgrade(hasher), report)
    report.tokens = [token for token in tokens if isinstance(token, TokenRecord)]
    keys = _seal_all(records, KEY_KIND, KEYS_PREFIX, KeyRecord.model_validate, report)
    report.keys = [key for key in keys if isinstance(key, KeyRecord)]
    for kind, prefix, upgrade in (
        (OBJECT_KIND, OBJECTS_PREFIX, _object_upgrade(settings, objects)),
        (REPORT_KIND, REPORTS_PREFIX, JobRecord.model_validate),
    ):
        _seal_all(records, kind, prefix, upgrade, report)
    if not dry_run:
        _index_legacy_ids(records, [token.id for token in report.tokens])
        mark_all_sealed(records.key, objects, records.store_id)
    return report


def _seal_all(
    records: Records, kind: str, prefix: str, upgrade: Upgrade, report: UpgradeReport
) -> list[BaseModel]:
    """Seal the unsealed records under `prefix`; the tokens and keys sealed are returned,
    other kinds' names go into `report.others`."""
    sealed = []
    for info in list(records.store.list(prefix)):
        kind_here, upgrade_here = _journal(info.key) or (kind, upgrade)
        try:
            data = records.store.get(info.key)
        except ObjectNotFound:
            continue  # deleted since it was listed
        except StorageError:
            report.unreadable.append(info.key)
            continue
        if is_sealed(data):
            _check(records, kind_here, info.key, data, report)
            continue
        try:
            record = upgrade_here(json.loads(data))
        except (ValueError, RecursionError, KeyError, EnvelopeError, StorageError):
            report.unreadable.append(info.key)  # a ValidationError is a ValueError
            continue
        try:
            if not report.dry_run:
                records.put(kind_here, info.key, record, if_match=info.etag)
        except (PreconditionFailed, ObjectNotFound):
            report.unreadable.append(info.key)  # changed meanwhile: run the upgrade again
            continue
        if kind_here in (TOKEN_KIND, KEY_KIND):
            sealed.append(record)
        else:
            report.others.setdefault(kind_here, []).append(info.key)
    return sealed


def _journal(name: str) -> tuple[str, Upgrade] | None:
    """A batch job's journal entry, kept under its report's prefix."""
    if ".partial/" not in name:
        return None
    if name.endswith("/final.json"):
        return JOURNAL_KIND, JournalResult.model_validate
    return JOURNAL_KIND, JournalEntry.model_validate


def _check(records: Records, kind: str, name: str, data: bytes, report: UpgradeReport) -> None:
    try:
        records.open(kind, name, data, _AnyRecord)
    except RecordTampered:
        report.refused.append(name)
    else:
        report.already_sealed += 1


class _AnyRecord(BaseModel):
    """Any authentic record, when only its authenticity is in question."""


def _object_upgrade(settings: Settings, default: ObjectStore) -> Upgrade:
    """Object records name the header of the message stored, which records from before
    did not: it is read from the object now, so sealing blesses the object as it is, as
    it does every record (a verify job then checks its plaintext against the record)."""
    stores = {default.bucket: default}

    def upgrade(data: dict[str, Any]) -> ObjectRecord:
        legacy = ObjectRecord.model_validate({**data, "headerSha256": "-"})
        if legacy.bucket not in stores:
            stores[legacy.bucket] = open_object_store(settings, legacy.bucket)
        store = stores[legacy.bucket]
        header = read_stored_header(store, legacy.key, store.head(legacy.key).size)
        return legacy.model_copy(update={"header_sha256": header_digest(header)})

    return upgrade


class _LegacyTokenRecord(BaseModel):
    """What a token record could hold before: any datetime, and the token's SHA-256."""

    model_config = TokenRecord.model_config
    expires_at: datetime | None = None
    hash: str


def _token_upgrade(hasher: TokenHasher) -> Upgrade:
    def upgrade(data: dict[str, Any]) -> TokenRecord:
        legacy = _LegacyTokenRecord.model_validate(data)
        expires_at = legacy.expires_at
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        changes = {"expiresAt": expires_at, "hash": hasher.rehash(legacy.hash)}
        return TokenRecord.model_validate({**data, **changes})

    return upgrade


def _index_legacy_ids(records: Records, ids: list[str]) -> None:
    try:
        known = records.get(LEGACY_IDS_KIND, LEGACY_IDS_KEY, LegacyTokenIds).ids
    except ObjectNotFound:
        known = []
    if set(ids) - set(known):
        records.put(LEGACY_IDS_KIND, LEGACY_IDS_KEY, LegacyTokenIds(ids=sorted({*known, *ids})))
