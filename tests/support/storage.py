"""What the tests check of a store: that nothing of a refused or aborted upload is left;
and an upload left as a killed process leaves it."""

import os
import signal
from typing import Any

from storage import MIN_PART_SIZE, LocalStore, ObjectStore
from storage.records import RECORDS_PREFIX


def nothing_stored(store: ObjectStore, prefix: str = "tenants/") -> bool:
    """No object and no pending upload under `prefix`, and no object record at all."""
    records = list(store.list(RECORDS_PREFIX))
    return not list(store.list(prefix)) and not store.pending_uploads(prefix) and not records


def leave_pending(store: ObjectStore, key: str, **options: Any) -> None:
    """An upload of `key` (a part shipped, on S3) that nobody will finish, as a killed
    worker leaves it: in a local directory from a process then killed, since a live
    writer holds its file and an abort keeps it."""
    if not isinstance(store, LocalStore):
        store.multipart(key, **options).write(bytes(MIN_PART_SIZE + 1))
        return
    child = os.fork()
    if child == 0:  # pragma: no cover - the child is killed before it could report
        store.multipart(key, **options).write(bytes(MIN_PART_SIZE + 1))
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status)
