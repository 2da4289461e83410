"""Records of encrypted objects: what verification needs to know about each one later.

An object written by an encrypt-to-storage request gets a record in the service's own
store under `sealstream/objects/<bucket>/<key>.json`: the key that sealed it, and the
plaintext's size and SHA-256 as measured on the way in. Writing the record last means a
record always describes a complete object.
"""

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from storage.base import ObjectStore

RECORDS_PREFIX = "sealstream/objects/"


class ObjectRecord(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, serialize_by_alias=True, frozen=True
    )

    bucket: str
    key: str  # the storage key
    tenant: str
    kid: str
    key_version: int
    alg: str
    frame_length: int
    plaintext_size: int
    plaintext_sha256: str
    ciphertext_size: int
    etag: str
    created_at: datetime


def record_key(bucket: str, storage_key: str) -> str:
    return f"{RECORDS_PREFIX}{bucket}/{storage_key}.json"


def save_record(records: ObjectStore, record: ObjectRecord) -> None:
    records.put(record_key(record.bucket, record.key), record.model_dump_json().encode())


def load_record(records: ObjectStore, bucket: str, storage_key: str) -> ObjectRecord:
    return ObjectRecord.model_validate_json(records.get(record_key(bucket, storage_key)))


def delete_record(records: ObjectStore, bucket: str, storage_key: str) -> None:
    records.delete(record_key(bucket, storage_key))
