"""What the tests check of a store: that nothing of a refused or aborted upload is left."""

from storage import ObjectStore
from storage.records import RECORDS_PREFIX


def nothing_stored(store: ObjectStore, prefix: str = "tenants/") -> bool:
    """No object and no pending upload under `prefix`, and no object record at all."""
    records = list(store.list(RECORDS_PREFIX))
    return not list(store.list(prefix)) and not store.pending_uploads(prefix) and not records
