"""The record key's document in the bucket: which key the store's records are sealed under.

`sealstream/record-key.json` names the record key by its id (and, with KMS, holds the key
wrapped by KMS). Written at a store's first start, it then tells three things apart:
- a KEK that is not the store's own (its record key has another id): the service refuses
  to start, and `/readyz` says so, rather than failing every key operation later;
- a store set up before records were sealed (records, but no document): the service
  refuses to start until `sealstream upgrade-records` has sealed them, since sealing
  blesses whatever the bucket holds at that moment and is an operator's decision;
- a new store (neither): the document is written and the service starts.
"""

from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, ValidationError

from keystore.errors import KekError, KeystoreError
from keystore.kek import Kek
from keystore.records import Base64Bytes, CamelModel
from storage import ObjectExists, ObjectNotFound, ObjectStore
from storage.integrity import RecordKey

DOCUMENT_KEY = "sealstream/record-key.json"
# Where a store kept records before they were sealed; any object here means it did.
RECORD_PREFIXES = ("sealstream/tokens/", "sealstream/keys/")


class KekMismatch(KekError):
    """The KEK in use is not the one the store's records were sealed under."""

    code = "kek-mismatch"


class StoreNeedsUpgrade(KeystoreError):
    """The store holds records from before they were sealed."""

    code = "store-needs-upgrade"


class RecordKeyDocument(CamelModel):
    format: Literal["sealstream-record-key/1"] = "sealstream-record-key/1"
    key_id: str
    wrapped_key: Base64Bytes | None = None
    created_at: AwareDatetime


def open_record_key(kek: Kek, objects: ObjectStore, *, upgrading: bool = False) -> RecordKey:
    """The store's record key, checked against its document (written first if the store
    is new, or if `upgrading` one from before records were sealed)."""
    document = _read(objects)
    if document is None:
        if not upgrading and holds_unsealed_records(objects):
            raise StoreNeedsUpgrade(
                "this store holds records written before records were sealed: run "
                "`sealstream upgrade-records` once, with the same settings, and review "
                "what it lists"
            )
        return _create(kek, objects)
    material, _ = kek.record_key(document.wrapped_key)
    key = RecordKey(material)
    _check(document, key)
    return key


def check_record_key(key: RecordKey, objects: ObjectStore) -> None:
    """Readiness: the store's document still names this key (`KekMismatch` if not)."""
    document = _read(objects)
    if document is None:
        raise KekMismatch("the store's record-key document is missing")
    _check(document, key)


def holds_unsealed_records(objects: ObjectStore) -> bool:
    return any(next(iter(objects.list(prefix)), None) for prefix in RECORD_PREFIXES)


def _create(kek: Kek, objects: ObjectStore) -> RecordKey:
    material, wrapped = kek.record_key(None)
    key = RecordKey(material)
    document = RecordKeyDocument(
        key_id=key.key_id, wrapped_key=wrapped, created_at=datetime.now(UTC)
    )
    try:
        objects.put(DOCUMENT_KEY, document.model_dump_json().encode(), if_absent=True)
    except ObjectExists:
        # Another process set the store up first: use its key (for KMS, a new one was
        # generated here and is dropped unused).
        return open_record_key(kek, objects, upgrading=True)
    return key


def _read(objects: ObjectStore) -> RecordKeyDocument | None:
    try:
        data = objects.get(DOCUMENT_KEY)
    except ObjectNotFound:
        return None
    try:
        return RecordKeyDocument.model_validate_json(data)
    except ValidationError:
        raise KekMismatch(f"the store's record-key document ({DOCUMENT_KEY}) is damaged") from None


def _check(document: RecordKeyDocument, key: RecordKey) -> None:
    if document.key_id != key.key_id:
        raise KekMismatch(
            "the KEK is not the one this store was set up with: its records were sealed "
            f"under record key {document.key_id}, and this KEK gives {key.key_id}"
        )
