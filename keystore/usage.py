"""Counting key uses across processes, and the limits the counts enforce.

Each process counts the messages it seals and opens, and the signatures it makes and
checks, per key version (`UsageMeter.use`)
and adds them, in batches, to a count every process shares (a `UsageLedger`): the key's
sealed record in the object store, updated by compare-and-swap (`RecordLedger`), or a
Redis hash updated by a script (`keystore.usage_redis.RedisLedger`). A batch is added
once it holds `batch` uses, before the next encryption, or after `flush_interval`
seconds, whichever comes first; every addition answers the shared count, which is what
the process checks its next uses against. Hence the bounds `docs/audit.md` states:

- a process that dies loses at most its unadded batch (per key: `batch` uses, or the
  decryptions counted while the shared count could not be reached);
- with P processes, at most P × `batch` encryptions pass `maxUsageLimit`: after the
  addition that takes the shared count to the limit, each process seals at most what
  fits in its own batch before its next addition tells it so.

An encryption (or a signature) whose batch is full waits for the addition; if the
shared count cannot be reached it is refused (`UsageUnavailable`), so that no process
runs ahead of the bound. A decryption (or a check of a signature) is counted regardless.

`WRAP_LIMIT` caps the data keys one AES key version may wrap: the AES keyring draws a
random 96-bit IV for each, and NIST SP 800-38D allows 2^32 such IVs under one key.
"""

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from keystore.counts import MAKING, WRAP_LIMIT, Operation, Uses
from keystore.errors import (
    ConcurrentUpdate,
    KeyNotFound,
    KeystoreError,
    KeyUsageExhausted,
    KeyVersionWornOut,
)
from keystore.persistence import KeyRecordStore
from keystore.records import KeyRecord
from storage import StorageError

RANDOM_IV_KTY = "oct"  # the AES keyring; RSA and ML-KEM wrap without a nonce of their own
DEFAULT_BATCH = 16
DEFAULT_FLUSH_INTERVAL = 1.0
IDLE_AFTER = 60.0  # seconds after which an idle key's count is read afresh on its next use

logger = logging.getLogger(__name__)


class UsageUnavailable(KeystoreError):
    """The shared usage count cannot be reached, and an encryption needs it."""

    code = "usage-count-unavailable"


class UsageLedger(ABC):
    """The count every process adds its uses to."""

    @abstractmethod
    def read(self, record: KeyRecord) -> Uses:
        """The key's uses as counted now, no fewer than `record` (as just read) counts."""

    @abstractmethod
    def add(self, record: KeyRecord, floor: Uses, added: Uses) -> Uses:
        """Raise the key's counts to at least `floor`, add `added`, and answer the counts
        after; `KeyNotFound` if the key is gone, `UsageUnavailable` if the count cannot
        be reached."""


class RecordLedger(UsageLedger):
    """The counts in the key's sealed record, added to by compare-and-swap."""

    def __init__(self, saved: KeyRecordStore) -> None:
        self._saved = saved

    def read(self, record: KeyRecord) -> Uses:
        return record.uses

    def add(self, record: KeyRecord, floor: Uses, added: Uses) -> Uses:
        def counted(stored: KeyRecord, _now: datetime) -> KeyRecord:
            if stored.uses.below(floor):
                logger.warning(
                    "the record of key %r of tenant %r counts fewer uses than this process "
                    "saw: an older copy put back? Counting from the higher figures",
                    stored.kid,
                    stored.tenant,
                )
            return stored.counting(floor, added)

        try:
            return self._saved.update(record.tenant, record.kid, counted, notify=False).uses
        except (StorageError, ConcurrentUpdate) as error:
            raise UsageUnavailable(f"the usage count of key {record.kid!r}: {error}") from None


@dataclass
class _KeyCount:
    """One key's count in this process: the shared count as last heard, the uses being
    added to it now, and those not added yet."""

    record: KeyRecord  # the latest seen: the key's identity and limits
    known: Uses
    adding: Uses = field(default_factory=Uses)
    pending: Uses = field(default_factory=Uses)
    last_use: float = field(default_factory=time.monotonic)
    adding_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def estimate(self) -> Uses:
        return self.known.plus(self.adding).plus(self.pending)

    @property
    def unadded(self) -> int:
        return self.adding.total + self.pending.total


Counted = Callable[[KeyRecord, Uses], None]


class UsageMeter:
    """This process's counts of key uses, added to a `UsageLedger` in batches; thread-safe.

    `load(tenant, kid)` reads a key's record afresh; `counted(record, counts)` is told the
    shared counts after each addition (to rotate a key that reached its soft limit).
    """

    def __init__(
        self,
        ledger: UsageLedger,
        load: Callable[[str, str], KeyRecord],
        counted: Counted,
        clock: Callable[[], datetime],
        *,
        batch: int = DEFAULT_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self._ledger = ledger
        self._load = load
        self._counted = counted
        self._clock = clock
        self._batch = batch
        self._interval = flush_interval
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], _KeyCount] = {}
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None

    def check_encrypt(self, record: KeyRecord) -> None:
        """Refuse if the key's primary version may not seal one more message now."""
        with self._lock:
            count = self._keys.get((record.tenant, record.kid))
            estimate = record.uses if count is None else count.estimate.at_least(record.uses)
        _check_encrypt(record, estimate, record.primary_version)

    def use(self, record: KeyRecord, version: int, operation: Operation) -> Uses:
        """Count one message sealed or opened, or one signature made or checked, under
        `version` of the key `record`; the key's counts with it, as this process knows
        them. An encryption or a signature is first checked against the limits
        (`KeyUsageExhausted`, `KeyVersionWornOut`)."""
        count = self._count(record)
        while True:
            with self._lock:
                count.record = record
                count.last_use = time.monotonic()
                if operation not in MAKING or count.unadded < self._batch:
                    estimate = count.estimate.at_least(record.uses)
                    if operation in MAKING:
                        _check_encrypt(record, estimate, version)
                    one = Uses.one(version, operation, self._clock())
                    count.pending = count.pending.plus(one)
                    full = count.pending.total >= self._batch
                    break
            # The batch is full: add it, or wait for the addition under way, before
            # sealing again.
            self._add(count, at_least=self._batch)
        self._start_flusher()
        if full:
            self._add_quietly(count, at_least=self._batch)
        return estimate.plus(one)

    def view(self, record: KeyRecord) -> Uses:
        """The key's counts as known here: the shared count and this process's unadded
        uses. `record` must have just been read; should the shared count be out of reach,
        the record's own counts stand in for it."""
        try:
            shared = self._ledger.read(record)
        except UsageUnavailable as error:
            logger.warning("showing key %r with the counts of its record: %s", record.kid, error)
            shared = record.uses
        with self._lock:
            count = self._keys.get((record.tenant, record.kid))
            if count is None or count.record.created_at != record.created_at:
                return shared
            return shared.at_least(count.known).plus(count.pending)

    def flush(self) -> None:
        """Add every key's unadded uses now; failures are logged and retried later."""
        with self._lock:
            counts = [count for count in self._keys.values() if count.pending.total]
        for count in counts:
            self._add_quietly(count)
        self._forget_idle()

    def close(self) -> None:
        """Stop the periodic additions, adding what is left."""
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join()
        self.flush()

    def _count(self, record: KeyRecord) -> _KeyCount:
        key = (record.tenant, record.kid)
        with self._lock:
            count = self._keys.get(key)
        if count is not None and count.record.created_at == record.created_at:
            return count
        # Read afresh: a cached record may predate this process's last addition, and a
        # count taken from it could let a batch more through past the limit.
        fresh = self._load(record.tenant, record.kid)
        try:
            known = self._ledger.read(fresh)
        except UsageUnavailable as error:
            # The record's counts hold every limit reached; a batch more is the bound.
            logger.warning("counting key %r from its record for now: %s", record.kid, error)
            known = fresh.uses
        with self._lock:
            count = self._keys.get(key)
            if count is None or count.record.created_at != record.created_at:
                count = self._keys[key] = _KeyCount(fresh, known)
            return count

    def _add(self, count: _KeyCount, *, at_least: int = 1) -> None:
        """Add the key's pending uses to the shared count, one addition at a time, if
        they are `at_least` this many once the addition before has ended: uses that
        waited for a full batch to be added go on once it is, rather than each adding
        the few counted since, an addition of a few uses at a time."""
        with count.adding_lock:
            with self._lock:
                if count.pending.total < at_least:
                    return
                record, floor, added = count.record, count.known, count.pending
                count.adding, count.pending = added, Uses()
            try:
                shared = self._ledger.add(record, floor, added)
            except KeyNotFound:
                with self._lock:
                    count.adding = Uses()
                    self._keys.pop((record.tenant, record.kid), None)
                return
            except UsageUnavailable:
                with self._lock:
                    count.pending, count.adding = added.plus(count.pending), Uses()
                raise
            with self._lock:
                count.known, count.adding = count.known.at_least(shared), Uses()
        self._counted(record, shared)

    def _add_quietly(self, count: _KeyCount, *, at_least: int = 1) -> None:
        try:
            self._add(count, at_least=at_least)
        except KeystoreError as error:
            logger.warning("key uses not yet counted; trying again: %s", error)

    def _forget_idle(self) -> None:
        idle_since = time.monotonic() - IDLE_AFTER
        with self._lock:
            for key, count in list(self._keys.items()):
                if not count.unadded and count.last_use < idle_since:
                    del self._keys[key]

    def _start_flusher(self) -> None:
        if self._flusher is not None or self._stopping.is_set():
            return
        with self._lock:
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_periodically, name="sealstream-usage", daemon=True
                )
                self._flusher.start()

    def _flush_periodically(self) -> None:
        while not self._stopping.wait(self._interval):
            self.flush()


def worn_out(record: KeyRecord, uses: Uses, version: int) -> bool:
    """Whether `version` has wrapped as many data keys as random IVs safely allow."""
    return record.kty == RANDOM_IV_KTY and uses.of(version).encrypts >= WRAP_LIMIT


def limits_reached(record: KeyRecord, uses: Uses) -> tuple[bool, bool, bool]:
    """Whether `uses` have reached the key's soft limit, its maximum, and the primary
    version's wrap limit."""
    version = record.primary_version
    return (
        record.soft_limit_reached(uses, version),
        record.usage_exhausted(uses),
        worn_out(record, uses, version),
    )


def _check_encrypt(record: KeyRecord, uses: Uses, version: int) -> None:
    if record.usage_exhausted(uses):
        raise KeyUsageExhausted(
            f"key {record.kid!r} has reached its maxUsageLimit ({record.max_usage_limit} "
            "uses): it no longer encrypts or signs, and still decrypts and verifies"
        )
    if worn_out(record, uses, version):
        raise KeyVersionWornOut(
            f"version {version} of key {record.kid!r} has sealed {WRAP_LIMIT} messages, as "
            "many as one AES key safely wraps with random IVs: rotate the key"
        )
