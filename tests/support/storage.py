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


def leave_pending(store: ObjectStore, key: str, **options: Any) -> str:
    """An upload of `key` (a part shipped, on S3) that nobody will finish, as a killed
    worker leaves it: in a local directory from a process then killed, since a live
    writer holds its file and an abort keeps it. Its upload id, as the writer's
    `on_upload` was told it."""
    started: list[str] = []
    if not isinstance(store, LocalStore):
        store.multipart(key, on_upload=lambda _, i: started.append(i), **options).write(
            bytes(MIN_PART_SIZE + 1)
        )
        (upload_id,) = started
        return upload_id
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child is killed before it could report
        os.close(reading)

        def tell(_: str, upload_id: str) -> None:
            os.write(writing, upload_id.encode())

        store.multipart(key, on_upload=tell, **options).write(bytes(MIN_PART_SIZE + 1))
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(writing)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status)
    with os.fdopen(reading, "rb") as told:
        return told.read().decode()
