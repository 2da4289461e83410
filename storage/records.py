"""Records of encrypted objects: what verification needs to know about each one later.

An object written by an encrypt-to-storage request gets a record in the service's own
store under `sealstream/objects/<bucket>/<key>.json`: the key that sealed it, and the
plaintext's size and SHA-256 as measured on the way in (or, for an archive member whose
name is hidden, an HMAC of them under the tenant's name key). Writing the record last means a
record always describes a complete object. Records are sealed (`storage.integrity`), so
one changed or planted in the bucket is refused rather than believed.

A small object written in one request may carry its record in its own metadata instead
(archive members do: `SEALSTREAM_BATCH_CONCURRENCY` of them in flight would otherwise
spend most of their time on bookkeeping), under `sealstream-record`: the record less its
bucket, storage key and etag (storage says those), sealed as a record file would be and
bound to the same name, so it cannot be forged, altered, or copied to another object.
Object and record then appear together, in one write, with no intent and no record file;
`object_record` finds either kind.

Completing the upload and saving the record are two steps, so the record is written
first as an *intent*, before the upload completes: the same record with no etag yet,
named by the object's place and its header's digest,

    sealstream/intents/<SHA-256 of bucket "/" storage key>/<header SHA-256>.json

and dropped once the record is saved. Between the two, a reader takes the intent that
names the very message it finds there for its record; after a crash in between, the
lifecycle sweep saves the record from it (`services.unfinished`).

An intent stands for its object only over an older record. Each write takes a
*generation*, sealed in its intent and so in its record: one more than the record it
replaces, and no less than the writer's clock in microseconds, so that a write after a
deletion (which leaves no record to count from) still outnumbers the writes before it.
An intent put back with its object after its write was recorded is thus no newer than
the record there: a rollback, refused and counted as a refused record (`outdated`).
"""

import hashlib
import time
from collections.abc import Iterator
from datetime import datetime

from pydantic import Field

from storage.base import ObjectInfo, ObjectStore
from storage.documents import FrozenCamelModel
from storage.errors import ObjectNotFound
from storage.integrity import Records, RecordTampered, canonical_json, compact_seal, note_refusal

RECORDS_PREFIX = "sealstream/objects/"
RECORD_KIND = "object"
INTENTS_PREFIX = "sealstream/intents/"
INTENT_KIND = "object-intent"
METADATA_KIND = "object-metadata"
RECORD_METADATA = "sealstream-record"
# What an object's metadata may hold in all: S3 takes 2 KB of user metadata.
METADATA_BUDGET = 1800
PLACE_FIELDS = {"bucket", "key", "etag"}  # left out of a record in its object's metadata


class MessageRecord(FrozenCamelModel):
    """What a record says of the message stored: all of it but where it is stored."""

    tenant: str
    kid: str
    key_version: int
    alg: str
    frame_length: int
    # Left out where names are hidden: `plaintext_mac` stands for both.
    plaintext_size: int | None = Field(None, exclude_if=lambda value: value is None)
    plaintext_sha256: str | None = Field(None, exclude_if=lambda value: value is None)
    ciphertext_size: int
    created_at: datetime
    # SHA-256 (hex) of the stored message's header: what ties the record to the one message
    # the service stored there (its ID, key commitment, data keys and context).
    header_sha256: str
    # HMAC-SHA256 of the plaintext's size and SHA-256 under the tenant's name key (that
    # version), bound to the object's place (`keystore.name_keys`).
    plaintext_mac: str | None = Field(None, exclude_if=lambda value: value is None)
    # Where `plaintext_sha256` could not be taken (a resumable upload, sealed over many
    # requests): the chain of SHA-256s over its frames (`services.frame_chain`).
    plaintext_frame_chain: str | None = Field(None, exclude_if=lambda value: value is None)
    name_key_version: int | None = Field(None, exclude_if=lambda value: value is None)
    # Which material that version was (`keystore.name_keys`); absent from records from before.
    name_key_fingerprint: str | None = Field(None, exclude_if=lambda value: value is None)
    # The job that wrote it (archive members): what lets a rerun of that job tell its own
    # object from one another writer put at a place it had claimed.
    job_id: str | None = Field(None, exclude_if=lambda value: value is None)
    # Orders the writes at this place (`next_generation`); 0 in records from before it.
    generation: int = 0


class ObjectRecord(MessageRecord):
    bucket: str
    key: str  # the storage key
    etag: str


def record_key(bucket: str, storage_key: str) -> str:
    return f"{RECORDS_PREFIX}{bucket}/{storage_key}.json"


def save_record(records: Records, record: ObjectRecord) -> None:
    records.put(RECORD_KIND, record_key(record.bucket, record.key), record)


def load_record(records: Records, bucket: str, storage_key: str) -> ObjectRecord:
    """The object's record: `ObjectNotFound` if it has none, `RecordTampered` if the one
    stored is not authentic or describes another object."""
    record = records.get(RECORD_KIND, record_key(bucket, storage_key), ObjectRecord)
    if (record.bucket, record.key) != (bucket, storage_key):
        raise RecordTampered("it describes another object", record_key(bucket, storage_key))
    return record


def record_metadata(
    records: Records, intent: ObjectRecord, metadata: dict[str, str]
) -> dict[str, str] | None:
    """`metadata` with the record `intent` names added, for an object written in one
    request; None if it would not fit in what storage allows."""
    body = MessageRecord.model_validate(intent.model_dump(exclude=PLACE_FIELDS))
    value = compact_seal(records.key, METADATA_KIND, record_key(intent.bucket, intent.key), body)
    if len(value) + len(canonical_json(metadata)) > METADATA_BUDGET:
        return None
    return {**metadata, RECORD_METADATA: value}


def metadata_record(records: Records, bucket: str, stored: ObjectInfo) -> ObjectRecord | None:
    """The record the object `stored` carries in its metadata, if any: `RecordTampered`
    if it is not one the service sealed for this very object."""
    value = stored.metadata.get(RECORD_METADATA)
    if value is None:
        return None
    name = record_key(bucket, stored.key)
    message = records.open(METADATA_KIND, name, value.encode(), MessageRecord)
    return ObjectRecord(**message.model_dump(), bucket=bucket, key=stored.key, etag=stored.etag)


def object_record(
    records: Records, store: ObjectStore, storage_key: str, stored: ObjectInfo | None = None
) -> ObjectRecord:
    """The record of the object at `storage_key`: the one in its metadata, written with
    it, else its record file (which a crash may have left behind a member written over
    its object). `stored` describes the object if that is at hand (else it is asked); a
    listing's entry, which has no metadata, is asked only if there is no record file or
    the record file describes another version of the object. `ObjectNotFound` if it has
    neither (or there is no object), `RecordTampered` if the one found is not authentic."""
    if stored is None:
        stored = store.head(storage_key)
    if (found := metadata_record(records, store.bucket, stored)) is not None:
        return found
    try:
        filed = load_record(records, store.bucket, storage_key)
    except ObjectNotFound:
        if stored.metadata:
            raise
        found = metadata_record(records, store.bucket, store.head(storage_key))
        if found is None:
            raise
        return found
    if not stored.metadata and (filed.etag, filed.ciphertext_size) != (stored.etag, stored.size):
        # A listing's entry, and a record file of another version of the object (left
        # behind, or put back by a bucket writer): reads believe the record the object
        # carries, so listings and the census must too.
        carried = metadata_record(records, store.bucket, store.head(storage_key))
        if carried is not None:
            return carried
    return filed


def intent_key(bucket: str, storage_key: str, header_sha256: str) -> str:
    place = hashlib.sha256(f"{bucket}/{storage_key}".encode()).hexdigest()
    return f"{INTENTS_PREFIX}{place}/{header_sha256}.json"


def save_intent(records: Records, intent: ObjectRecord) -> None:
    """Note the record of an object about to be made visible, before it is."""
    records.put(INTENT_KIND, intent_key(intent.bucket, intent.key, intent.header_sha256), intent)


def load_intent(
    records: Records, bucket: str, storage_key: str, header_sha256: str
) -> ObjectRecord:
    """The intent noted for the message with this header at this place: `ObjectNotFound`
    if there is none, `RecordTampered` if it is not authentic or names another."""
    name = intent_key(bucket, storage_key, header_sha256)
    intent = records.get(INTENT_KIND, name, ObjectRecord)
    if (intent.bucket, intent.key, intent.header_sha256) != (bucket, storage_key, header_sha256):
        raise RecordTampered("it describes another object", name)
    return intent


def next_generation(replaced: ObjectRecord | None) -> int:
    """The generation of a write over the object `replaced` records (None: no record
    to believe). Clocks between hosts may differ: only after a deletion does ordering
    rest on them."""
    after = 0 if replaced is None else replaced.generation
    return max(after + 1, time.time_ns() // 1000)


def outdated(intent: ObjectRecord, recorded: ObjectRecord) -> bool:
    """Whether `intent` is too old to stand for its object over `recorded`, the record at
    its place: a write begun before that record's was. One of another message than the
    record's is a rollback (its object and intent put back), refused and counted; one of
    the record's own message is its writer's, left over after the record was saved."""
    if intent.generation > recorded.generation:
        return False
    if intent.header_sha256 != recorded.header_sha256:
        name = intent_key(intent.bucket, intent.key, intent.header_sha256)
        reason = (
            f"an intent of generation {intent.generation}, not after its object's record "
            f"({recorded.generation}): put back with its object"
        )
        note_refusal(INTENT_KIND, RecordTampered(reason, name))
    return True


def drop_intent(records: Records, intent: ObjectRecord) -> None:
    records.store.delete(intent_key(intent.bucket, intent.key, intent.header_sha256))


def intents(records: Records) -> Iterator[ObjectRecord]:
    """Every authentic intent left (a bad one is logged, counted and passed over)."""
    for name, intent in records.all(INTENT_KIND, INTENTS_PREFIX, ObjectRecord):
        if name == intent_key(intent.bucket, intent.key, intent.header_sha256):
            yield intent
