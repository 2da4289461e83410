"""The verify job: read a stored object back and prove it is what was uploaded
(`services.open_stored.verify_stored`).

Every frame and the header are authenticated on the way, and the plaintext's size and
SHA-256 are compared with what the upload recorded. Nothing is written but the job's
own record, so running it twice is harmless.
"""

from typing import Any

from sealstream.wiring import Parts
from services.jobs import VerifyParams
from services.jobs.context import JobContext, JobFailed
from services.objects import VERIFIED_FIELDS, ObjectSummary, RecordMismatch
from services.open_stored import verify_stored
from storage import ObjectNotFound
from storage.records import object_record


def verify(context: JobContext, services: Parts) -> dict[str, Any]:
    tenant, params = context.record.tenant, context.params(VerifyParams)
    storage_key = params.storage_key
    store = services.spaces.store(tenant, params.bucket)
    try:
        stored = store.head(storage_key)
        recorded = object_record(services.records, store, storage_key, stored)
    except ObjectNotFound:
        raise JobFailed(
            "object-record-missing",
            "no upload record for this object: it was not written by encrypt-to-storage",
        ) from None
    size = stored.size
    # From zero: a rerun reads the whole object again.
    context.progress(bytes_total=size, bytes_done=0, items_total=1, items_done=0, force=True)
    try:
        decryptor = verify_stored(
            services.keys, store, storage_key, size, recorded, context.add_bytes
        )
    except RecordMismatch as mismatch:
        raise JobFailed(mismatch.code, str(mismatch)) from None
    context.progress(items_done=1, force=True)
    assert decryptor.keyring is not None
    summary = ObjectSummary.of(recorded, params.key)
    return {
        **summary.fields(*VERIFIED_FIELDS),
        "keyUsed": decryptor.keyring.key_name,
        "verified": True,
    }
