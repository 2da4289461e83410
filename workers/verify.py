"""The verify job: read a stored object back and prove it is what was uploaded.

Every frame and the header are authenticated on the way, and the plaintext's size and
SHA-256 are compared with what the upload recorded. Nothing is written but the job's
own record, so running it twice is harmless.
"""

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from envelope import Decryptor, Header, Keyring
from services.keys import opening_keyrings
from services.objects import RecordMismatch, check_against_record
from services.open_stored import OnChunk, open_stored
from storage import ObjectNotFound, ObjectStore
from storage.records import ObjectRecord, load_record
from workers.execution import JobContext, JobFailed
from workers.services import WorkerServices


def verify_object(
    store: ObjectStore,
    storage_key: str,
    size: int,
    keyrings_for: Callable[[Header], Sequence[Keyring]],
    recorded: ObjectRecord,
    on_chunk: OnChunk,
) -> Decryptor:
    """Stream-decrypt a stored object (every frame and the header authenticated) and
    compare its plaintext's size and SHA-256 with its upload record; `JobFailed` if they
    differ."""
    digest = hashlib.sha256()
    with open_stored(store, storage_key, size, keyrings_for, recorded.tenant, on_chunk) as stored:
        for piece in stored.plaintext:
            digest.update(piece)
    try:
        check_against_record(stored.decryptor, digest.hexdigest(), recorded)
    except RecordMismatch as mismatch:
        raise JobFailed(mismatch.code, str(mismatch)) from None
    return stored.decryptor


def verify(context: JobContext, services: WorkerServices) -> dict[str, Any]:
    tenant = context.record.tenant
    bucket, storage_key = context.params["bucket"], context.params["storageKey"]
    store = services.spaces.store(tenant, bucket)
    try:
        recorded = load_record(services.records, store.bucket, storage_key)
    except ObjectNotFound:
        raise JobFailed(
            "object-record-missing",
            "no upload record for this object: it was not written by encrypt-to-storage",
        ) from None
    size = store.head(storage_key).size
    # From zero: a rerun reads the whole object again.
    context.progress(bytes_total=size, bytes_done=0, items_total=1, items_done=0, force=True)
    decryptor = verify_object(
        store,
        storage_key,
        size,
        lambda header: opening_keyrings(services.keys, tenant, header)[1],
        recorded,
        context.add_bytes,
    )
    context.progress(items_done=1, force=True)
    assert decryptor.keyring is not None
    return {
        "bucket": store.bucket,
        "key": context.params.get("key"),
        "storageKey": storage_key,
        "ciphertextSize": size,
        "plaintextSize": decryptor.plaintext_length,
        "plaintextSha256": recorded.plaintext_sha256,
        "keyUsed": decryptor.keyring.key_name,
        "verified": True,
    }
