"""The shared usage count in Redis, for deployments that have it: every API process and
worker adds its batches to one hash per key with a script, atomically, so no addition is
lost and none waits on another.

Redis is not where the count is trusted from alone. The key's sealed record keeps a
checkpoint of it: written when a count reaches one of the key's limits (so that the
record alone says the key is exhausted, past its soft limit or worn out), and otherwise
at most every `checkpoint_interval` seconds per process. Each addition first raises the
hash to the record's counts, so a Redis that lost its data, or whose hash someone
lowered, starts again from the checkpoint; and a key record put back from an older copy
is raised again from the hash. A process that dies loses only its unadded batch, as
with the record ledger; Redis losing its data loses the uses since the last checkpoint.
"""

import logging
import re
import threading
import time
from datetime import UTC, datetime
from typing import cast

import redis
from redis.exceptions import RedisError

from keystore.counts import Uses, VersionUses
from keystore.errors import ConcurrentUpdate, KeystoreError
from keystore.persistence import KeyRecordStore
from keystore.records import KeyRecord
from keystore.usage import UsageLedger, UsageUnavailable, limits_reached
from storage import StorageError

DEFAULT_CHECKPOINT_INTERVAL = 60.0
# A hash outlives its last use by this long; should it expire, the checkpoint remains.
HASH_TTL = 90 * 24 * 3600

# ARGV[1] is the hash's time to live; then (field, floor, added) triples: each field is
# raised to its floor, then added to. The last use's time is a field whose floor is the
# time and which adds 0.
_ADD = """
for i = 2, #ARGV, 3 do
    local floor = tonumber(ARGV[i + 1])
    -- A field that is not a number (someone wrote Redis) counts as 0: the floor restores it.
    local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') or 0
    if current < floor then
        redis.call('HSET', KEYS[1], ARGV[i], floor)
    end
    if tonumber(ARGV[i + 2]) > 0 then
        redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 2])
    end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

_VERSION = re.compile(r"[1-9][0-9]{0,8}")

logger = logging.getLogger(__name__)


class RedisLedger(UsageLedger):
    """Counts in a Redis hash per key, checkpointed into the key's sealed record."""

    def __init__(
        self,
        client: redis.Redis,
        saved: KeyRecordStore,
        *,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        self._redis = client
        self._saved = saved
        self._interval = checkpoint_interval
        self._add = client.register_script(_ADD)
        self._lock = threading.Lock()
        # Per key: when this process last checkpointed it, and the limits it had reached.
        self._checkpoints: dict[tuple[str, str], tuple[float, tuple[bool, bool, bool]]] = {}

    def read(self, record: KeyRecord) -> Uses:
        try:
            fields = cast(dict[str, str], self._redis.hgetall(_hash_name(record)))
        except RedisError as error:
            raise UsageUnavailable(f"Redis: {type(error).__name__}") from None
        return _uses(fields).at_least(record.uses)

    def add(self, record: KeyRecord, floor: Uses, added: Uses) -> Uses:
        floor = floor.at_least(record.uses)
        arguments: list[str | int] = [HASH_TTL]
        for number in floor.versions.keys() | added.versions.keys():
            base, more = floor.of(number), added.of(number)
            arguments += [f"{number}:uses", base.uses, more.uses]
            arguments += [f"{number}:encrypts", base.encrypts, more.encrypts]
            last = more.last_used_at or base.last_used_at
            if last is not None:
                arguments += [f"{number}:last", _micros(last), 0]
        try:
            fields = self._add(keys=[_hash_name(record)], args=arguments)
        except RedisError as error:
            raise UsageUnavailable(f"Redis: {type(error).__name__}") from None
        shared = _uses(dict(zip(fields[::2], fields[1::2], strict=True)))
        self._checkpoint_if_due(record, shared)
        return shared

    def _checkpoint_if_due(self, record: KeyRecord, shared: Uses) -> None:
        key = (record.tenant, record.kid)
        reached = limits_reached(record, shared)
        with self._lock:
            last, was = self._checkpoints.get(key, (0.0, limits_reached(record, record.uses)))
        if reached == was and time.monotonic() - last < self._interval:
            return
        try:
            self._saved.update(
                record.tenant,
                record.kid,
                lambda stored, _now: stored.counting(shared, Uses()),
                notify=False,
            )
        except (KeystoreError, StorageError, ConcurrentUpdate) as error:
            logger.warning("usage checkpoint of key %r not written yet: %s", record.kid, error)
            return
        with self._lock:
            self._checkpoints[key] = (time.monotonic(), reached)


def _hash_name(record: KeyRecord) -> str:
    # The key's creation time tells a key from a later one given the same kid.
    return f"sealstream:usage:{record.tenant}/{record.kid}@{_micros(record.created_at)}"


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def _uses(fields: dict[str, str]) -> Uses:
    """The counts a hash holds: `<version>:uses`, `<version>:encrypts`, `<version>:last`."""
    numbers = {
        int(number)
        for number, _, _ in (name.partition(":") for name in fields)
        if _VERSION.fullmatch(number)
    }
    versions = {}
    for number in numbers:
        versions[number] = VersionUses(
            _count(fields.get(f"{number}:uses")),
            _count(fields.get(f"{number}:encrypts")),
            _moment(_count(fields.get(f"{number}:last"))),
        )
    return Uses(versions)


def _moment(micros: int) -> datetime | None:
    try:
        return datetime.fromtimestamp(micros / 1_000_000, UTC) if micros else None
    except (OverflowError, ValueError, OSError):
        return None  # not a time (someone wrote Redis): the record's stands


def _count(value: str | None) -> int:
    """A field's count; one that is missing, or not a count (someone wrote Redis), is 0,
    which the key record's counts then stand in for."""
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0
