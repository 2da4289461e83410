"""The record key's document in the bucket: which key the store's records are sealed under.

`sealstream/record-key.json` names the store's record key by its id, the store it belongs
to, and (with KMS) holds the key wrapped by KMS; it is authenticated by a key derived from
the record key, so it cannot be altered or moved to another store. It tells these apart:
- a KEK (or store id) that is not the store's own: the records were sealed under another
  key, so the service refuses to start, and `/readyz` says so, rather than failing every
  key operation later;
- a store set up before records were sealed (unsealed records, no document): the service
  refuses to start until `sealstream upgrade-records` has sealed them, since sealing
  blesses whatever the bucket holds at that moment and is an operator's decision;
- a store whose document went missing though its records are sealed: with a local KEK the
  key is derived again and the document written back; with KMS the wrapped key is gone,
  and only a backup of the document brings the store back;
- a new store: the document is written and the service starts.

`allSealed` says that every record of the store has been sealed (from its first start,
or by a finished upgrade): an upgrade then refuses to run again unless told to, since an
unsealed record found later was not written before records were sealed.
"""

import base64
import hmac
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, ValidationError

from keystore.errors import KekError, KeystoreError
from keystore.kek import Kek
from keystore.records import Base64Bytes
from storage import ObjectExists, ObjectNotFound, ObjectStore
from storage.documents import FrozenCamelModel
from storage.integrity import RecordKey, canonical_json, sealed_by

DOCUMENT_KEY = "sealstream/record-key.json"
# Where a store keeps its records: tokens, keys, object records, job reports and journals.
RECORD_PREFIXES = (
    "sealstream/tokens/",
    "sealstream/keys/",
    "sealstream/objects/",
    "sealstream/jobs/",
)


class KekMismatch(KekError):
    """The KEK or store id in use is not the one the store's records were sealed under."""

    code = "kek-mismatch"


class RecordKeyMissing(KekError):
    """The store's records are sealed, and the document that holds their key is gone."""

    code = "record-key-missing"


class StoreNeedsUpgrade(KeystoreError):
    """The store holds records from before they were sealed."""

    code = "store-needs-upgrade"


class RecordKeyDocument(FrozenCamelModel):
    format: Literal["sealstream-record-key/2"] = "sealstream-record-key/2"
    key_id: str
    store: str
    wrapped_key: Base64Bytes | None = None
    all_sealed: bool
    created_at: AwareDatetime
    mac: str = ""

    def signed(self, key: RecordKey) -> "RecordKeyDocument":
        return self.model_copy(update={"mac": self._mac(key)})

    def authentic(self, key: RecordKey) -> bool:
        return hmac.compare_digest(self.mac.encode(), self._mac(key).encode())

    def _mac(self, key: RecordKey) -> str:
        fields = self.model_dump(mode="json", exclude={"mac"})
        digest = hmac.digest(key.derive("record-key-document"), canonical_json(fields), "sha256")
        return base64.b64encode(digest).decode("ascii")


def open_record_key(
    kek: Kek, objects: ObjectStore, store: str, *, upgrading: bool = False
) -> RecordKey:
    """The record key of the store `objects`, whose id is `store`, checked against its
    document (see the module docstring for each case)."""
    document = _read(objects)
    if document is None:
        return _set_up(kek, objects, store, upgrading=upgrading)
    material, _ = kek.record_key(store, document.wrapped_key)
    key = RecordKey(material)
    _check(document, key, store)
    return key


def check_record_key(key: RecordKey, objects: ObjectStore, store: str) -> None:
    """Readiness: the store's document still names this key (`KekMismatch` if not)."""
    _checked(key, objects, store)


def all_sealed(key: RecordKey, objects: ObjectStore, store: str) -> bool:
    """Whether every record of the store has been sealed (see the module docstring)."""
    return _checked(key, objects, store).all_sealed


def mark_all_sealed(key: RecordKey, objects: ObjectStore, store: str) -> None:
    """Say in the document that every record of the store is sealed now."""
    document = _checked(key, objects, store)
    marked = document.model_copy(update={"all_sealed": True}).signed(key)
    objects.put(DOCUMENT_KEY, marked.model_dump_json().encode())


def _set_up(kek: Kek, objects: ObjectStore, store: str, *, upgrading: bool) -> RecordKey:
    """The record key of a store without a document, which is written now. Every record
    of the store is looked at (only ever when the document is missing): a store that
    holds any sealed record was set up with a document, and lost it, and is never taken
    for one from before records were sealed, whatever else has been put there."""
    sealed_under = _sealed_under(objects)
    if sealed_under is None:
        return _create(kek, objects, store, all_sealed=True)  # a new store
    if not sealed_under:
        if not upgrading:
            raise StoreNeedsUpgrade(
                "this store holds records written before records were sealed, and none "
                "sealed: if a version that seals records never ran on it, run `sealstream "
                "upgrade-records` once, with the same settings, and review what it lists"
            )
        return _create(kek, objects, store, all_sealed=False)
    material, wrapped = kek.record_key(store, None)
    key = RecordKey(material)
    if wrapped is not None:
        raise RecordKeyMissing(
            f"the store's records are sealed but its record-key document ({DOCUMENT_KEY}) "
            "is missing, and with KMS it holds the only copy of their key: restore it from "
            "a backup"
        )
    if sealed_under != {key.key_id}:
        raise KekMismatch(
            "the KEK (or store id) is not the one this store's records were sealed under"
        )
    # Derived from the KEK again, and the store's own records confirm it: write it back.
    return _create(kek, objects, store, all_sealed=True)


def _create(kek: Kek, objects: ObjectStore, store: str, *, all_sealed: bool) -> RecordKey:
    material, wrapped = kek.record_key(store, None)
    key = RecordKey(material)
    document = RecordKeyDocument(
        key_id=key.key_id,
        store=store,
        wrapped_key=wrapped,
        all_sealed=all_sealed,
        created_at=datetime.now(UTC),
    ).signed(key)
    try:
        objects.put(DOCUMENT_KEY, document.model_dump_json().encode(), if_absent=True)
    except ObjectExists:
        # Another process set the store up first: use its key (for KMS, a new one was
        # generated here and is dropped unused).
        return open_record_key(kek, objects, store, upgrading=True)
    return key


def _sealed_under(objects: ObjectStore) -> set[str] | None:
    """The ids of the keys the store's records say they are sealed under (empty if none
    is sealed), or None if the store holds no record at all."""
    found: set[str] | None = None
    for prefix in RECORD_PREFIXES:
        for info in objects.list(prefix):
            try:
                data = objects.get(info.key)
            except ObjectNotFound:
                continue  # deleted since it was listed
            found = found if found is not None else set()
            key_id = sealed_by(data)
            if key_id is not None:
                found.add(key_id)
    return found


def _read(objects: ObjectStore) -> RecordKeyDocument | None:
    try:
        data = objects.get(DOCUMENT_KEY)
    except ObjectNotFound:
        return None
    try:
        return RecordKeyDocument.model_validate_json(data)
    except ValidationError:
        raise KekMismatch(f"the store's record-key document ({DOCUMENT_KEY}) is damaged") from None


def _checked(key: RecordKey, objects: ObjectStore, store: str) -> RecordKeyDocument:
    document = _read(objects)
    if document is None:
        raise RecordKeyMissing("the store's record-key document is missing")
    _check(document, key, store)
    return document


def _check(document: RecordKeyDocument, key: RecordKey, store: str) -> None:
    if document.key_id != key.key_id or document.store != store:
        raise KekMismatch(
            f"the KEK is not the one store {store!r} was set up with: its records were "
            f"sealed under record key {document.key_id} (store {document.store!r}), and "
            f"this KEK gives {key.key_id}"
        )
    if not document.authentic(key):
        raise KekMismatch(f"the store's record-key document ({DOCUMENT_KEY}) is not authentic")
