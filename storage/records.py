"""Records of encrypted objects: what verification needs to know about each one later.

An object written by an encrypt-to-storage request gets a record in the service's own
store under `sealstream/objects/<bucket>/<key>.json`: the key that sealed it, and the
plaintext's size and SHA-256 as measured on the way in (or, for an archive member whose
name is hidden, an HMAC of them under the tenant's name key). Writing the record last means a
record always describes a complete object. Records are sealed (`storage.integrity`), so
one changed or planted in the bucket is refused rather than believed.
"""

from datetime import datetime

from pydantic import Field

from storage.documents import FrozenCamelModel
from storage.integrity import Records, RecordTampered

RECORDS_PREFIX = "sealstream/objects/"
RECORD_KIND = "object"


class ObjectRecord(FrozenCamelModel):
    bucket: str
    key: str  # the storage key
    tenant: str
    kid: str
    key_version: int
    alg: str
    frame_length: int
    # Left out where names are hidden: `plaintext_mac` stands for both.
    plaintext_size: int | None = Field(None, exclude_if=lambda value: value is None)
    plaintext_sha256: str | None = Field(None, exclude_if=lambda value: value is None)
    ciphertext_size: int
    etag: str
    created_at: datetime
    # SHA-256 (hex) of the stored message's header: what ties the record to the one message
    # the service stored there (its ID, key commitment, data keys and context).
    header_sha256: str
    # HMAC-SHA256 of the plaintext's size and SHA-256 under the tenant's name key (that
    # version), bound to the object's place (`keystore.name_keys`).
    plaintext_mac: str | None = Field(None, exclude_if=lambda value: value is None)
    name_key_version: int | None = Field(None, exclude_if=lambda value: value is None)


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
