"""The generation of each resumable upload's state, kept in Redis, outside the bucket.

A state in the bucket is authentic (`storage.integrity`) but may be an older authentic
copy put back by whoever can write the bucket; the HMACs that stop a frame from being
sealed from other bytes live in that state. An older copy would let a frame's (data key,
IV) seal a second plaintext, so the state counts its writes (`generation`) and Redis holds
the count with the digest of the state of that generation (`Anchored`): a state that is
not the one anchored is refused. An upload finished or terminated leaves a tombstone, so
that copies of its state cannot bring it back; a completed upload's tombstone says so,
with its length and tenant (`Completed`), so that a client that lost the answer of the
request completing it is told it is complete (tus's `Upload-Offset` of `Upload-Length`)
rather than that it is gone.

Each write is a step in two moves around the bucket's write: `advance` (compare and set)
anchors the state about to be written as *in flight*, keeping the digest of the state it
replaces; `commit` then marks it written, and only after that is any ciphertext whose
HMACs it records stored. While a step is in flight, the state it replaces is still the
upload's (`Anchored.accepts`): a reader that finds it has raced the write, or the writer
died before its state reached the bucket (a crash is not tampering), and either way no
frame recorded only by the step in flight was stored. Another request may go on from that
state only once the step's hold is over on Redis's clock: two requests that read one state
never both advance while both are live. A conditional write that fails puts back what its
advance replaced, unless the bucket holds the very state written (its answer was lost),
which is then committed. A committed step keeps no previous digest: an older state put
back after it is refused.

Redis also counts each tenant's open uploads (`admit`), for every API process: an upload
is counted from its creation until it ends, or until its expiry should its end be lost
(a crash), when the next count drops it.

Each move is confirmed by the Redis replicas the settings ask for (`services.replicas`)
before the bucket is written or ciphertext stored: a failover that lost an advance would
put Redis back at the generation of an older state, which a copy of that state would then
match; one that lost a commit would leave the step in flight, whose previous state a
bucket writer could put back once frames it did not record were stored. An advance that
its replicas do not confirm is undone where it was made, and `NotReplicated` raised.

Nor may a crash of Redis lose a move once the service acted on it: a Redis back from an
older snapshot, or from an append-only file missing its last second, anchors an older
generation, and a bucket writer who kept that generation's state could put it back and
have frames sealed again from other bytes. So uploads go on only over a Redis that keeps
every write it answered (`durability`): one that can say it has written a write to its
append-only file on disk (`appendonly yes`, `appendfsync always`), or one that can say
when a write is there (Redis 7.2 on with `appendonly yes`: each move then waits for
WAITAOF, under `appendfsync everysec` until the next sync), or one the operator vouches
for (`SEALSTREAM_REDIS_DURABLE`). Anything else, or a Redis that will not
say (CONFIG refused), is `AnchorNotDurable`. What Redis says is asked again every
`RECHECK`, as its configuration may change while the service runs (every
`RECHECK_REFUSED` while it says it may lose writes, so that a fix is seen at once).

A change must not wait that long, though: a move Redis answered once it no longer syncs
each write may be lost, and every move after it until the next ask too. So where the
proof is `appendfsync always`, each move reads the setting in its own transaction
(`CONFIG GET`, queued after the move: no round trip more, and the value is the one the
move ran under); a move that finds it changed is `MoveNotDurable`, never acknowledged (an
advance is undone, as one its replicas did not confirm), and what Redis says is asked
again at the next move. Under WAITAOF each move proves itself, and one refused (AOF
turned off) is not acknowledged either. What this cannot see is a change that Redis
applies after a move but before it writes that move out, in the same turn of its event
loop (another client's CONFIG SET at that very instant): that one move goes unseen.
"""

import math
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from services.replicas import UNCONFIRMED, NotReplicated, Replicas

KEY_PREFIX = "sealstream:upload:"
OPEN_PREFIX = "sealstream:uploads-open:"
GONE = "gone"
COMPLETED = "completed:"  # then "<length>:<tenant>"
# Kept past the upload's expiry: by then its state is refused as expired anyway.
MARGIN = timedelta(days=1)
# How long what Redis said of its persistence is believed before it is asked again.
RECHECK = timedelta(seconds=60)
# Asked again this soon while Redis said it may lose writes: an operator's fix is seen
# at once (one CONFIG GET a second, while uploads are refused anyway).
RECHECK_REFUSED = timedelta(seconds=1)
WAITAOF_SINCE = (7, 2)

# An anchor is "<generation>:<digest>" once written, "<generation>:<digest>:<previous
# state's digest>:<deadline>" while in flight, the deadline (ms, Redis's own clock, so no
# API process's clock counts) when the writer's hold on the state it writes lapses. ARGV:
# the generation and digest of the state read, the step to set (its deadline added here),
# the hold (ms). Moves from the state read, whether it is anchored itself or is the one a
# step still in flight would replace once that step's deadline is past (its writer died or
# stalled past its hold: that step never reaches the bucket, as its writer's conditional
# write or commit now fails). Before it, a step in flight is a live writer's, which two
# requests that read one unlocked state would otherwise both think theirs. A bare
# "<generation>", as versions before digests wrote, is taken at its generation; a step
# with no deadline, as versions before deadlines wrote, as past it. Answers the anchor it
# replaced (an undo puts it back), nil if it moved nothing.
_ADVANCE = """
local now = redis.call('GET', KEYS[1])
if not now then return false end
local gen, digest, previous, deadline = string.match(now, '^(%d+):(%x+):?(%x*):?(%d*)$')
if not gen then
  gen, digest, previous, deadline = string.match(now, '^(%d+)$'), ARGV[2], '', ''
end
local time = redis.call('TIME')
local ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local current = gen == ARGV[1] and digest == ARGV[2]
local lapsed = deadline == '' or tonumber(deadline) <= ms
local replaced = previous ~= '' and lapsed and tonumber(gen) == tonumber(ARGV[1]) + 1
if not (current or (replaced and previous == ARGV[2])) then return false end
redis.call('SET', KEYS[1], ARGV[3] .. ':' .. (ms + tonumber(ARGV[4])), 'KEEPTTL')
return now
"""

# ARGV: the step in flight expected (its deadline aside), the anchor to set.
_SWAP = """
local now = redis.call('GET', KEYS[1])
if not now or string.sub(now, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

# KEYS[1]: the tenant's open uploads, scored by expiry (ms). ARGV: now (ms), the cap, the
# upload, its expiry (ms), the set's time to live (ms).
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[5]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return 1
"""


class Durability(Enum):
    """Why a move Redis answered is not lost by a crash of Redis."""

    FSYNC_ALWAYS = "Redis syncs its append-only file before it answers each write"
    WAITAOF = "each move is waited for until it is in the append-only file on disk"
    VOUCHED = "the operator vouches for it (SEALSTREAM_REDIS_DURABLE)"


class AnchorNotDurable(Exception):
    """The uploads' Redis may lose a write it answered, or will not say whether it
    would: a move of a generation could be lost in a crash."""


class MoveNotDurable(AnchorNotDurable, NotReplicated):
    """A move Redis made after it stopped syncing each write before answering: like one
    its replicas did not confirm, a crash could lose it, so it is not acknowledged."""


NOT_DURABLE = (
    "the uploads' Redis may lose the writes it answered last in a crash: give it "
    "appendonly yes and appendfsync always (or Redis 7.2 or later with appendonly yes), or "
    "set SEALSTREAM_REDIS_DURABLE if its writes are kept otherwise"
)


@dataclass(frozen=True)
class Anchored:
    """An upload's anchor: the generation and digest of its last state, and while that
    state's write is in flight (`previous` set), the digest of the state it replaces."""

    generation: int
    digest: str  # "" for an anchor written before digests: its generation alone
    previous: str = ""

    @classmethod
    def parse(cls, value: str) -> "Anchored | None":
        generation, _, rest = value.partition(":")
        digest, _, rest = rest.partition(":")
        previous, _, deadline = rest.partition(":")
        if not generation.isdigit() or (rest and not digest) or not (deadline or "0").isdigit():
            return None
        return cls(int(generation), digest, previous)

    def accepts(self, generation: int, digest: str) -> bool:
        """Whether the state of `generation` and `digest` is the upload's: the one
        anchored, or the one an in-flight step replaces (the last the bucket holds)."""
        if generation == self.generation and self.digest in (digest, ""):
            return True
        return bool(self.previous) and (generation + 1, digest) == (
            self.generation,
            self.previous,
        )


@dataclass(frozen=True)
class Step:
    """A write of an upload's state from `read` to `written` (generation, digest), and
    the anchor it replaced in Redis (`read` anchored, unless given: a lapsed step in
    flight it took over, which its writer's bucket write may still land)."""

    read: tuple[int, str]
    written: tuple[int, str]
    replaced_anchor: str = ""

    @property
    def anchor(self) -> str:
        """The step in flight, its deadline aside."""
        return f"{self.written[0]}:{self.written[1]}:{self.read[1]}"

    @property
    def written_anchor(self) -> str:
        return f"{self.written[0]}:{self.written[1]}"

    @property
    def replaced(self) -> str:
        return self.replaced_anchor or f"{self.read[0]}:{self.read[1]}"


class UploadAnchor:
    """Each upload's generation in Redis: `start`, `advance`, `commit`, `current`, `end`;
    and each tenant's open uploads: `admit`, `free`."""

    def __init__(
        self,
        client: "redis.Redis",
        replicas: Replicas = UNCONFIRMED,
        *,
        vouched: bool = False,
        recheck: timedelta = RECHECK,
    ) -> None:
        self._client = client
        self._replicas = replicas
        self._vouched = vouched
        self._recheck = recheck.total_seconds()
        self._durability: tuple[Durability | None, float] | None = None  # and when asked
        self._advance = client.register_script(_ADVANCE)
        self._swap = client.register_script(_SWAP)
        self._admit = client.register_script(_ADMIT)

    def durability(self) -> Durability:
        """Why a move answered survives a crash of Redis, as Redis said at most `recheck`
        ago; `AnchorNotDurable` if it may not."""
        known = self._durability
        recheck = self._recheck
        if known is not None and known[0] is None:
            recheck = min(recheck, RECHECK_REFUSED.total_seconds())
        if known is None or time.monotonic() - known[1] >= recheck:
            known = (self._asked_durability(), time.monotonic())
            self._durability = known
        if known[0] is None:
            raise AnchorNotDurable(NOT_DURABLE)
        return known[0]

    def _asked_durability(self) -> Durability | None:
        if self._vouched:
            return Durability.VOUCHED
        try:
            config = self._client.config_get("append*")
        except ResponseError:  # CONFIG renamed or refused, as managed Redis services do
            config = {}
        if _fsyncs_always(config):
            return Durability.FSYNC_ALWAYS
        version = str(self._client.info("server").get("redis_version", "0"))
        aof = bool(self._client.info("persistence").get("aof_enabled"))
        if aof and _version(version) >= WAITAOF_SINCE:
            return Durability.WAITAOF
        return None

    def _write(self, queue: Callable[[Pipeline], object]) -> list[Any]:
        """A move, confirmed by the replicas and, where Redis can say so, on disk; where
        `appendfsync always` is the proof, `MoveNotDurable` if Redis ran it without. A
        process that never asked (a worker's sweep) moves as it did before it could ask."""
        if self._durability is None:
            return self._replicas.write(self._client, queue)
        durability = self.durability()
        if durability is not Durability.FSYNC_ALWAYS:
            fsynced = durability is Durability.WAITAOF
            return self._replicas.write(self._client, queue, fsynced=fsynced)

        def checked(pipe: Pipeline) -> None:
            queue(pipe)
            pipe.config_get("append*")

        *done, config = self._replicas.write(self._client, checked)
        if not _fsyncs_always(_settings(config)):
            self._durability = (None, -math.inf)  # asked again at the next move
            raise MoveNotDurable(f"{NOT_DURABLE} (it stopped syncing each write meanwhile)")
        return done

    def admit(self, tenant: str, upload: str, expires_at: datetime, cap: int) -> bool:
        """Count `upload` among the tenant's open uploads unless it has `cap` of them."""
        now = datetime.now(UTC)
        args: list[int | str] = [_ms(now), cap, upload, _ms(expires_at), _ttl(expires_at)]
        return bool(self._admit(keys=[_open_key(tenant)], args=args))

    def free(self, tenant: str, upload: str) -> None:
        """No longer count `upload` (never made, or ended)."""
        self._client.zrem(_open_key(tenant), upload)

    def start(self, upload: str, generation: int, digest: str, expires_at: datetime) -> bool:
        """Anchor a new upload's state (`generation`, `digest`) as written before it is;
        False if its id is taken (or was). An anchor not confirmed is left: its id is
        never used again."""
        key, ttl, value = _key(upload), _ttl(expires_at), f"{generation}:{digest}"
        (set_,) = self._write(lambda pipe: pipe.set(key, value, nx=True, px=ttl))
        return set_ is not None

    def advance(
        self, upload: str, read: tuple[int, str], written: tuple[int, str], hold: timedelta
    ) -> "Step | None":
        """Anchor the state `written` (generation, digest) in flight in place of `read`,
        for `hold` at most: until then no other request may take the upload over from
        `read`. None if `read` is not the upload's (another request moved it, its step
        still in hold, or the state was put back)."""
        step = Step(read, written)
        hold_ms = max(0, int(hold.total_seconds() * 1000))
        args = [str(read[0]), read[1], step.anchor, str(hold_ms)]
        try:
            (replaced,) = self._write(
                lambda pipe: self._advance(keys=[_key(upload)], args=args, client=pipe)
            )
        except NotReplicated:
            self.undo(upload, step)
            raise
        if replaced is None:
            return None
        return Step(read, written, str(replaced))

    def commit(self, upload: str, step: "Step") -> bool:
        """Mark the state of `step` as in the bucket; False if another request took the
        upload over meanwhile (its writer stalled past its hold): what that state records
        must then not be stored."""
        return self._swapped(upload, step.anchor, step.written_anchor, confirmed=True)

    def undo(self, upload: str, step: "Step") -> None:
        """Put back the anchor `step` replaced (`read` anchored, or the step in flight it
        took over), as its state was not written (a replica did not confirm the move, or
        the bucket held another state than `read` by then): the upload goes on from
        there, or is refused. Nothing if the step is no longer the one in flight."""
        # Failing, the step stays in flight: the states it accepts are still accepted.
        with suppress(RedisError):
            self._swapped(upload, step.anchor, step.replaced, confirmed=False)

    def _swapped(self, upload: str, expected: str, anchor: str, *, confirmed: bool) -> bool:
        def swap(pipe: Pipeline) -> None:
            self._swap(keys=[_key(upload)], args=[expected, anchor], client=pipe)

        if confirmed:
            (swapped,) = self._write(swap)
        else:
            (swapped,) = UNCONFIRMED.write(self._client, swap)
        return bool(swapped)

    def current(self, upload: str) -> "Anchored | str | None":
        """The upload's anchor, `GONE` (whatever its tombstone says), or None for none
        (or one of another form)."""
        value = self._client.get(_key(upload))
        if value is None:
            return None
        if str(value) == GONE or str(value).startswith(COMPLETED):
            return GONE
        return Anchored.parse(str(value))

    def completed(self, upload: str, tenant: str) -> int | None:
        """The length of the upload if its tombstone says it was completed, and it was
        `tenant`'s (another tenant is told nothing of it); else None."""
        value = self._client.get(_key(upload))
        if value is None or not str(value).startswith(COMPLETED):
            return None
        length, _, owner = str(value).removeprefix(COMPLETED).partition(":")
        return int(length) if owner == tenant and length.isdigit() else None

    def end(
        self, upload: str, tenant: str, expires_at: datetime, *, completed: int | None = None
    ) -> None:
        """Leave a tombstone: the upload is finished (`completed`: of that length) or
        terminated, for good; its tenant no longer counts it."""
        key, ttl, open_key = _key(upload), _ttl(expires_at), _open_key(tenant)
        tombstone = GONE if completed is None else f"{COMPLETED}{completed}:{tenant}"

        def both(pipe: Pipeline) -> None:
            pipe.set(key, tombstone, px=ttl)
            pipe.zrem(open_key, upload)

        self._write(both)


def _key(upload: str) -> str:
    return f"{KEY_PREFIX}{upload}"


def _open_key(tenant: str) -> str:
    return f"{OPEN_PREFIX}{tenant}"


def _fsyncs_always(config: Mapping[Any, Any]) -> bool:
    """Whether Redis's `append*` settings have it sync each write before it answers."""
    return (config.get("appendonly"), config.get("appendfsync")) == ("yes", "always")


def _settings(reply: dict[str, str] | list[str]) -> dict[str, str]:
    """CONFIG GET's reply as Redis gave it: a map (RESP3), or its pairs in a list (RESP2)."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


def _version(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _ttl(expires_at: datetime) -> int:
    left = expires_at + MARGIN - datetime.now(UTC)
    return max(1, int(left.total_seconds() * 1000))
