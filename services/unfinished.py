"""Objects their writer left between completing the upload and saving the record: a host
lost, or storage cut off, in between. The record's intent, noted before the upload
completed (`storage.records`), names the very message the writer made visible, so the
lifecycle sweep saves the record from it, as the writer would have: the object is whole
(an upload becomes visible whole or not at all).

The sweep reads each intent's object header. The header is no proof that the service
sealed what follows it (it is no secret: a resumable upload's first staging object starts
with it), so an object whose header and size are the intent's is then read back whole
(`services.open_stored.holds_recorded_message`: every frame authenticated under the data
key, which only the KEK unwraps, and the plaintext's digest the intent's); one that is
not is refused (logged, counted) and never recorded. An intent naming the message stored
there is recorded (unless a record of that message, or of a later write, is there already: an
older intent put back with its object must not roll its record back) and dropped. One
whose message is not there (the upload never completed, or another object replaced it) is
dropped once it is older than `ABANDONED_AFTER`: until then its upload may still be
completing. Records are written conditionally, so that one saved meanwhile by a writer
at the same place is never overwritten with an older one.
"""

import logging
from datetime import UTC, datetime, timedelta

from envelope import DataKeyUnavailable, MessageFormatError
from keystore import KeyStore, KeystoreError
from services.inventory import Inventory, Marker
from services.objects import header_digest, read_stored_header, stored_record
from services.open_stored import holds_recorded_message
from services.placement import BucketNotAllowed, Spaces
from storage import (
    InvalidRange,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from storage.integrity import Records, RecordTampered, note_refusal
from storage.records import (
    INTENT_KIND,
    RECORD_KIND,
    ObjectRecord,
    drop_intent,
    intent_key,
    intents,
    load_record,
    outdated,
    record_key,
)

logger = logging.getLogger(__name__)

ABANDONED_AFTER = timedelta(hours=1)  # far longer than any upload takes to complete


def finish_recording(records: Records, keys: KeyStore, spaces: Spaces) -> int:
    """Record every object whose writer was lost before it could (the lifecycle sweep),
    once read back as the message its intent names, and drop the intents left; how many
    objects were recorded."""
    recorded = 0
    now = datetime.now(UTC)
    for intent in intents(records):
        try:
            store = spaces.store(intent.tenant, intent.bucket)
            recorded += _finish(records, keys, store, intent, now)
        except StorageUnavailable:
            raise  # the next sweep tries again
        except (BucketNotAllowed, StorageError, KeystoreError, DataKeyUnavailable) as error:
            # A key that cannot open the object now proves nothing either way: the
            # intent stays for a later sweep.
            logger.warning("cannot finish the record of %s: %s", intent.key, error)
    return recorded


def _finish(
    records: Records, keys: KeyStore, store: ObjectStore, intent: ObjectRecord, now: datetime
) -> bool:
    """Record the intent's object if it is stored, proven, and unrecorded; whether it was."""
    stored = _proven(keys, store, intent) if _names_message(store, intent) else None
    if stored is None:
        if now - intent.created_at > ABANDONED_AFTER:
            drop_intent(records, intent)
        return False
    saved = _save_unless_recorded(records, intent, stored)
    drop_intent(records, intent)
    return saved


def _names_message(store: ObjectStore, intent: ObjectRecord) -> bool:
    """Whether the object at the intent's place looks like the message the intent names
    (its size and header): the cheap test, before the read that proves it."""
    try:
        info = store.head(intent.key)
        header = read_stored_header(store, intent.key, info.size)
    except (ObjectNotFound, MessageFormatError, InvalidRange):
        return False
    return (info.size, header_digest(header)) == (intent.ciphertext_size, intent.header_sha256)


def _proven(keys: KeyStore, store: ObjectStore, intent: ObjectRecord) -> ObjectInfo | None:
    """The object at the intent's place if it reads back as the intent's message; one that
    only looks like it (its header copied, its frames not sealed under its data key) is
    refused and counted."""
    proven = holds_recorded_message(keys, store, intent)
    if proven is None:
        refusal = RecordTampered(
            "the object there has the intent's header and size, but is not its message",
            intent_key(intent.bucket, intent.key, intent.header_sha256),
        )
        note_refusal(INTENT_KIND, refusal)
    return proven


def _save_unless_recorded(records: Records, intent: ObjectRecord, stored: ObjectInfo) -> bool:
    """Save the record of the object the intent names unless a record of it is there;
    whether this call saved it. A record written meanwhile wins."""
    name = record_key(intent.bucket, intent.key)
    try:
        current: ObjectInfo | None = records.store.head(name)
        recorded = load_record(records, intent.bucket, intent.key)
    except ObjectNotFound:
        current = None
    except RecordTampered:
        pass  # a record there that names nothing: replaced, if it is still that one
    else:
        if recorded.header_sha256 == intent.header_sha256 or outdated(intent, recorded):
            return False  # recorded already, or a write older than the record's
    record = stored_record(intent, stored)
    try:
        records.put(
            RECORD_KIND,
            name,
            record,
            if_absent=current is None,
            if_match=None if current is None else current.etag,
        )
    except PreconditionFailed:
        return False  # recorded meanwhile, by its writer or another
    Inventory(records).add(Marker.of(record))  # the index never misses an object
    logger.warning(
        "recorded %s in bucket %s, which its writer left unrecorded", record.key, record.bucket
    )
    return True
