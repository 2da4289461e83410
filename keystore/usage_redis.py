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

Nor is a hash believed further ahead of the record than the processes could have
counted. The record seals when its counts were last checkpointed (`usageCountedAt`; the
key's creation, before the first), and every use counted since was counted after it, or
in a batch at most a flush interval older: at `max_rate` uses a second of one key, the
whole deployment's most, a hash is never more than `max_rate` × (the time since, and a
flush interval) ahead of the record. The bound is one for all processes, since they
checkpoint into one record: however many there are, a count is believed to grow no
faster than `max_rate`. A count further ahead is someone writing Redis: it is logged and
counted (`sealstream_usage_counts_refused`), never checkpointed, put back to the record's
count where the hash still holds it, and the record's count is the one enforced. Between
checkpoints, each addition's answer is held to the same rate against the last count this
process believed; one beyond it is checked against the record at once.
"""

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import redis
from prometheus_client import Counter
from redis.exceptions import RedisError

from keystore.counts import Uses, VersionUses
from keystore.errors import ConcurrentUpdate, KeystoreError
from keystore.persistence import KeyRecordStore
from keystore.records import KeyRecord
from keystore.usage import (
    DEFAULT_FLUSH_INTERVAL,
    UsageLedger,
    UsageUnavailable,
    limits_reached,
)
from storage import StorageError

DEFAULT_CHECKPOINT_INTERVAL = 60.0
DEFAULT_MAX_RATE = 10_000.0  # uses a second of one key, by all processes together
# A hash outlives its last use by this long; should it expire, the checkpoint remains.
HASH_TTL = 90 * 24 * 3600

# ARGV[1] is the hash's time to live; then (field, floor, added) triples: each field is
# raised to its floor, then added to. The last use's time is a field whose floor is the
# time and which adds 0.
_ADD = """
for i = 2, #ARGV, 3 do
    local floor = tonumber(ARGV[i + 1])
    -- A field that is not a count (someone wrote Redis) counts as 0: the floor restores it.
    local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') or 0
    if current ~= math.floor(current) or current > 2^53 then
        current = -1
    end
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

# Triples (field, value refused, value to restore): a field that still holds the refused
# value is set back (deleted, if the value to restore is empty); one changed since keeps
# the newer addition.
_RESET = """
for i = 1, #ARGV, 3 do
    if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
        if ARGV[i + 2] == '' then
            redis.call('HDEL', KEYS[1], ARGV[i])
        else
            redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
        end
    end
end
return 0
"""

_VERSION = re.compile(r"[1-9][0-9]{0,8}")

# In no registry of its own: the API's metrics show it, as they show refused records.
IMPLAUSIBLE_COUNTS = Counter(
    "sealstream_usage_counts_refused",
    "Usage counts read from Redis further ahead of the key's sealed record than the "
    "processes could have counted, and so not believed: someone wrote Redis. Alert on any",
    registry=None,
)

logger = logging.getLogger(__name__)


class RedisLedger(UsageLedger):
    """Counts in a Redis hash per key, checkpointed into the key's sealed record, and
    believed only as far as the processes could have counted (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        saved: KeyRecordStore,
        *,
        checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_rate: float = DEFAULT_MAX_RATE,
    ) -> None:
        self._redis = client
        self._saved = saved
        self._interval = checkpoint_interval
        self._flush_interval = flush_interval
        self._max_rate = max_rate
        self._add = client.register_script(_ADD)
        self._reset = client.register_script(_RESET)
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str], _KeyState] = {}

    def read(self, record: KeyRecord) -> Uses:
        try:
            fields = cast(dict[str, str], self._redis.hgetall(_hash_name(record)))
        except RedisError as error:
            raise UsageUnavailable(f"Redis: {type(error).__name__}") from None
        shared = _uses(fields)
        jump = _jump(record.uses, shared)
        if jump > self._allowance(record, self._saved.now()):
            _note_implausible(record, jump)
            return record.uses
        return shared.at_least(record.uses)

    def add(self, record: KeyRecord, floor: Uses, added: Uses) -> Uses:
        floor = floor.at_least(record.uses)
        fields = self._added(record, floor, added)
        shared = _uses(fields)
        now = time.monotonic()
        with self._lock:
            state = self._keys.get(_key(record))
            if state is not None and not state.due(
                limits_reached(record, shared), now, self._interval
            ):
                unchecked = now - state.vouched_at + self._flush_interval
                if _jump(state.vouched, shared) <= self._max_rate * unchecked + added.total:
                    state.vouched, state.vouched_at = shared, now
                    return shared
        return self._checkpoint(record, floor, added, fields)

    def _added(self, record: KeyRecord, floor: Uses, added: Uses) -> dict[str, str]:
        """Raise the hash to `floor` and add `added`; the hash's fields after."""
        arguments: list[str | int] = [HASH_TTL]
        for number in floor.versions.keys() | added.versions.keys():
            base, more = floor.of(number), added.of(number)
            arguments += [f"{number}:uses", base.uses, more.uses]
            arguments += [f"{number}:encrypts", base.encrypts, more.encrypts]
            last = more.last_used_at or base.last_used_at
            if last is not None:
                arguments += [f"{number}:last", _micros(last), 0]
        try:
            answer = self._add(keys=[_hash_name(record)], args=arguments)
        except RedisError as error:
            raise UsageUnavailable(f"Redis: {type(error).__name__}") from None
        return dict(zip(answer[::2], answer[1::2], strict=True))

    def _checkpoint(
        self, record: KeyRecord, floor: Uses, added: Uses, fields: dict[str, str]
    ) -> Uses:
        """Write the hash's count into the key's sealed record if it is no more ahead of
        the record than the processes could have counted since; the count to go by."""
        shared = _uses(fields)
        sealed: list[Uses] = []

        def checkpointed(stored: KeyRecord, now: datetime) -> KeyRecord:
            sealed.append(stored.uses)
            if _jump(stored.uses, shared) > self._allowance(stored, now) + added.total:
                raise _Implausible
            return stored.checkpointing(shared, now)

        try:
            self._saved.update(record.tenant, record.kid, checkpointed, notify=False)
        except _Implausible:
            _note_implausible(record, _jump(sealed[-1], shared))
            vouched = sealed[-1].at_least(floor).plus(added)
            self._restore(record, fields, vouched)
            self._vouch(record, vouched, checkpointed=False)
            return vouched
        except (KeystoreError, StorageError, ConcurrentUpdate) as error:
            logger.warning("usage checkpoint of key %r not written yet: %s", record.kid, error)
            return self._unchecked(record, floor, shared, added)
        if shared.below(sealed[-1]):
            logger.warning(
                "the Redis count of key %r of tenant %r was below its sealed checkpoint: "
                "raised back to it",
                record.kid,
                record.tenant,
            )
            shared = _uses(self._added(record, sealed[-1], Uses()))
        self._vouch(record, shared, checkpointed=True)
        return shared

    def _unchecked(self, record: KeyRecord, floor: Uses, shared: Uses, added: Uses) -> Uses:
        """`shared`, when the sealed record cannot be reached to check it against: taken
        if no more ahead of what this process last believed (at first, `floor`) than the
        processes could have counted since, else the count is unavailable."""
        now = time.monotonic()
        with self._lock:
            state = self._keys.setdefault(_key(record), _KeyState(vouched=floor))
            unchecked = now - state.vouched_at + self._flush_interval
            if _jump(state.vouched, shared) > self._max_rate * unchecked + added.total:
                raise UsageUnavailable(
                    f"the usage count of key {record.kid!r} in Redis cannot be checked "
                    "against its sealed record now"
                )
            state.vouched, state.vouched_at = shared, now
        return shared

    def _vouch(self, record: KeyRecord, vouched: Uses, *, checkpointed: bool) -> None:
        now = time.monotonic()
        with self._lock:
            state = self._keys.setdefault(_key(record), _KeyState(vouched=vouched))
            state.vouched, state.vouched_at = vouched, now
            if checkpointed:
                state.checkpointed_at = now
                state.reached = limits_reached(record, vouched)

    def _restore(self, record: KeyRecord, fields: dict[str, str], vouched: Uses) -> None:
        """Put the hash back to `vouched` where it still holds what was refused."""
        arguments: list[str] = []
        for name, value in fields.items():
            number, _, kind = name.partition(":")
            if not _VERSION.fullmatch(number):
                continue
            arguments += [name, value, _field(vouched.versions.get(int(number)), kind)]
        try:
            self._reset(keys=[_hash_name(record)], args=arguments)
        except RedisError as error:
            logger.warning("the Redis count of key %r not restored yet: %s", record.kid, error)

    def _allowance(self, record: KeyRecord, now: datetime) -> float:
        """The most uses the processes could have added to a hash past `record`'s counts
        by `now`: each use counted since its last checkpoint was, or its batch waiting,
        within a flush interval of it."""
        return self._max_rate * (record.counts_since(now) + self._flush_interval)


@dataclass
class _KeyState:
    """What this process knows of a key's count: the last count it believed (and when),
    and when it last checkpointed it, with the limits reached then."""

    vouched: Uses
    vouched_at: float = field(default_factory=time.monotonic)
    checkpointed_at: float | None = None
    reached: tuple[bool, bool, bool] = (False, False, False)

    def due(self, reached: tuple[bool, bool, bool], now: float, interval: float) -> bool:
        """Whether a checkpoint is due: a limit reached, or the interval past."""
        return (
            self.checkpointed_at is None
            or reached != self.reached
            or now - self.checkpointed_at >= interval
        )


class _Implausible(Exception):
    """A count further ahead of the sealed record than the processes could have counted."""


def _note_implausible(record: KeyRecord, jump: int) -> None:
    logger.error(
        "the Redis count of key %r of tenant %r is %d uses ahead of its sealed record, "
        "more than the processes could have counted (SEALSTREAM_USAGE_MAX_RATE): someone "
        "wrote Redis? Counting from the sealed record; the count is not checkpointed",
        record.kid,
        record.tenant,
        jump,
    )
    IMPLAUSIBLE_COUNTS.inc()


def _jump(sealed: Uses, shared: Uses) -> int:
    """How far `shared` is ahead of `sealed`: the uses it counts beyond it over all
    versions, or the encryptions beyond it of one version, whichever is more."""
    ahead = 0
    encrypts = 0
    for number, uses in shared.versions.items():
        before = sealed.of(number)
        ahead += max(uses.uses - before.uses, 0)
        encrypts = max(encrypts, uses.encrypts - before.encrypts)
    return max(ahead, encrypts)


def _key(record: KeyRecord) -> tuple[str, str]:
    return (record.tenant, record.kid)


def _field(uses: VersionUses | None, kind: str) -> str:
    """A hash field's value for `uses`; empty (the field is deleted) for no such version."""
    if uses is None:
        return ""
    if kind == "last":
        return str(_micros(uses.last_used_at)) if uses.last_used_at else ""
    return str(uses.encrypts if kind == "encrypts" else uses.uses)


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
