"""A batch-encrypt job's journal: its progress in the service's store, so that a rerun
resumes where a killed attempt stopped rather than starting over.

Before writing members the job adds an entry under `sealstream/jobs/<tenant>/<job
id>.partial/`: the objects it is about to write (up to one per member in flight, claimed
in one entry), the members finished since the entry before, and the objects it claimed
and then did not write. Each entry is small, so a large archive never rewrites a growing file; the
entries, read back in order, are also the manifest's member list. When the job ends, only
its result is kept, or nothing if it has none.

An upload the job starts that a killed worker would leave pending (on S3 an object larger
than one part, on a local directory a streamed object's file) gets an entry of its own
before any of its bytes are sent, naming its upload id: the store cannot tell whose a
pending upload is, and a rerun aborts those it finds here and no other (a resumable
upload or another job may be writing the same key). Objects sent whole, as most members
are on S3, start no such upload and add nothing.

A job fanned out into chunks (`workers.fanout`) keeps its plan here too, and each chunk
has a journal of its own, kept whole after the chunk ends: the job writes the manifest
from them, then deletes them.
"""

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from services.jobs import REPORTS_PREFIX
from storage import ObjectNotFound, StorageError
from storage.integrity import Records

logger = logging.getLogger(__name__)

FINAL_ENTRY = "final.json"
PLAN_ENTRY = "plan.json"
JOURNAL_KIND = "batch-journal"
PLAN_KIND = "batch-plan"
M = TypeVar("M", bound=BaseModel)


@dataclass
class Resumed:
    """What earlier attempts left: the paths of the members sealed, the objects that may
    have been written when the last one stopped, the result if the job had finished, and
    the uploads they started that may still be pending (by key, their ids)."""

    started: bool = False
    done: set[str] = field(default_factory=set)
    claims: set[str] = field(default_factory=set)
    result: dict[str, Any] | None = None
    uploads: dict[str, set[str]] = field(default_factory=dict)


class StartedUpload(BaseModel):
    key: str
    upload_id: str


class JournalEntry(BaseModel):
    claims: list[str]
    done: list[dict[str, Any]]
    released: list[str]
    uploads: list[StartedUpload] = []  # entries from before uploads were journaled have none


class JournalResult(BaseModel):
    result: dict[str, Any]


class Journal:
    """The job's progress in the service's store, one small entry per object written.

    Entries are sealed records: a rerun trusts them to say which object it may overwrite
    as its own, so one planted or altered in the bucket fails the job instead.
    """

    def __init__(self, records: Records, tenant: str, job_id: str) -> None:
        self._records = records
        self._objects = records.store
        self._prefix = f"{REPORTS_PREFIX}{tenant}/{job_id}.partial/"
        self._entries = 0
        self._numbering = threading.Lock()  # uploads are journaled from the sealing threads
        self._settled: list[dict[str, Any]] = []
        self._released: list[str] = []

    def resume(self) -> Resumed:
        resumed = Resumed()
        self._objects.abort_pending(self._prefix)  # an entry cut off mid-write
        claimed: set[str] = set()
        settled: set[str] = set()
        for key, entry in self._read_all():
            resumed.started = True
            if key.endswith(FINAL_ENTRY):
                resumed.result = entry["result"]
                continue
            self._entries = int(key.removeprefix(self._prefix).removesuffix(".json"))
            for upload in entry["uploads"]:
                resumed.uploads.setdefault(upload["key"], set()).add(upload["upload_id"])
            resumed.done.update(done["path"] for done in entry["done"])
            settled.update(done["storageKey"] for done in entry["done"])
            claimed.update(entry["claims"])
            claimed.difference_update(entry["released"])
            claimed.difference_update(done["storageKey"] for done in entry["done"])
        resumed.claims = claimed
        for storage_key in settled:  # its one upload completed: nothing of it is pending
            resumed.uploads.pop(storage_key, None)
        return resumed

    def sealed(self) -> Iterator[dict[str, Any]]:
        """The members sealed by this attempt (up to its last claim) and those before, in
        the order they were sealed, read back an entry at a time."""
        for key, entry in self._read_all():
            if not key.endswith(FINAL_ENTRY):
                yield from entry["done"]

    def _read_all(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for info in self._objects.list(self._prefix):
            if info.key.endswith(PLAN_ENTRY):
                continue
            model = JournalResult if info.key.endswith(FINAL_ENTRY) else JournalEntry
            yield info.key, self._records.get(JOURNAL_KIND, info.key, model).model_dump()

    def claim(self, storage_keys: list[str]) -> None:
        """Record the members settled and the objects released since the last entry, and
        the objects about to be written: each is the job's until it is settled or
        released, and a rerun may overwrite it."""
        entry = JournalEntry(claims=storage_keys, done=self._settled, released=self._released)
        self._records.put(JOURNAL_KIND, self._next_entry(), entry)
        self._settled, self._released = [], []

    def upload_started(self, storage_key: str, upload_id: str) -> None:
        """An upload of the job's that a killed worker would leave pending
        (`ObjectStore.multipart`'s `on_upload`), kept before any of its bytes are sent,
        for a rerun to abort; may be called from any thread."""
        entry = JournalEntry(
            claims=[],
            done=[],
            released=[],
            uploads=[StartedUpload(key=storage_key, upload_id=upload_id)],
        )
        self._records.put(JOURNAL_KIND, self._next_entry(), entry)

    def _next_entry(self) -> str:
        """The key of the next entry. Entries numbered at once may be written in another
        order; a rerun reads whichever were written, and numbers on from the last."""
        with self._numbering:
            self._entries += 1
            return f"{self._prefix}{self._entries:010d}.json"

    def settle(self, entry: dict[str, Any]) -> None:
        """A member sealed (its manifest entry, with its `storageKey`)."""
        self._settled.append(entry)

    def release(self, storage_key: str) -> None:
        """A claimed object not written: one there now is someone else's."""
        self._released.append(storage_key)

    def save_plan(self, plan: BaseModel) -> None:
        """Keep how the job was split into chunks, before any chunk exists."""
        self._records.put(PLAN_KIND, self._prefix + PLAN_ENTRY, plan)

    def plan(self, model: type[M]) -> M | None:
        """The plan an earlier attempt saved, if any; `RecordTampered` if not authentic."""
        try:
            return self._records.get(PLAN_KIND, self._prefix + PLAN_ENTRY, model)
        except ObjectNotFound:
            return None

    def finish(self, result: dict[str, Any], *, keep_entries: bool = False) -> None:
        """Keep the result, which a rerun after a crash right now returns as it is, and
        only that unless `keep_entries` (a chunk's, which its job reads)."""
        self._records.put(JOURNAL_KIND, self._prefix + FINAL_ENTRY, JournalResult(result=result))
        if not keep_entries:
            self._delete(keep=self._prefix + FINAL_ENTRY)

    def discard(self) -> None:
        """The job ended without a result: nothing will resume from the journal."""
        try:
            self._delete(keep=None)
        except StorageError as error:
            logger.warning("cannot delete the journal %s: %s", self._prefix, error)

    def _delete(self, keep: str | None) -> None:
        for info in list(self._objects.list(self._prefix)):
            if info.key != keep:
                self._objects.delete(info.key)
