"""The generation of each resumable upload's state, kept in Redis, outside the bucket.

A state in the bucket is authentic (`storage.integrity`) but may be an older authentic
copy put back by whoever can write the bucket; the HMACs that stop a frame from being
sealed from other bytes live in that state. An older copy would let a frame's (data key,
IV) seal a second plaintext, so the state counts its writes (`generation`) and Redis holds
the count: a state whose count is not Redis's is refused. Each write moves Redis first
(compare and set), so a crash between the two leaves Redis ahead: the upload is refused,
never rolled back. An upload finished or terminated leaves a tombstone, so that copies of
its state cannot bring it back.

Redis also counts each tenant's open uploads (`admit`), for every API process: an upload
is counted from its creation until it ends, or until its expiry should its end be lost
(a crash), when the next count drops it.

Each move is confirmed by the Redis replicas the settings ask for (`services.replicas`)
before the state it anchors is written: a failover that lost a move would put Redis back
at the generation of an older state, which a copy of that state would then match. A move
that its replicas do not confirm is undone where it was made, and `NotReplicated` raised.
"""

from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime, timedelta

import redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from services.replicas import UNCONFIRMED, NotReplicated, Replicas

KEY_PREFIX = "sealstream:upload:"
OPEN_PREFIX = "sealstream:uploads-open:"
GONE = "gone"
# Kept past the upload's expiry: by then its state is refused as expired anyway.
MARGIN = timedelta(days=1)

_ADVANCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
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


class UploadAnchor:
    """Each upload's generation in Redis: `start`, `advance`, `current`, `end`; and each
    tenant's open uploads: `admit`, `free`."""

    def __init__(self, client: "redis.Redis", replicas: Replicas = UNCONFIRMED) -> None:
        self._client = client
        self._replicas = replicas
        self._advance = client.register_script(_ADVANCE)
        self._admit = client.register_script(_ADMIT)

    def admit(self, tenant: str, upload: str, expires_at: datetime, cap: int) -> bool:
        """Count `upload` among the tenant's open uploads unless it has `cap` of them."""
        now = datetime.now(UTC)
        args: list[int | str] = [_ms(now), cap, upload, _ms(expires_at), _ttl(expires_at)]
        return bool(self._admit(keys=[_open_key(tenant)], args=args))

    def free(self, tenant: str, upload: str) -> None:
        """No longer count `upload` (never made, or ended)."""
        self._client.zrem(_open_key(tenant), upload)

    def start(self, upload: str, generation: int, expires_at: datetime) -> bool:
        """Anchor a new upload at `generation`; False if its id is taken (or was). An
        anchor not confirmed is left: its id is never used again."""
        key, ttl = _key(upload), _ttl(expires_at)
        (set_,) = self._replicas.write(
            self._client, lambda pipe: pipe.set(key, str(generation), nx=True, px=ttl)
        )
        return set_ is not None

    def advance(self, upload: str, read: int, written: int) -> bool:
        """Move the upload from generation `read` to `written`; False if it was not at
        `read` (another request moved it, or the state was put back)."""
        try:
            (moved,) = self._replicas.write(self._client, self._move(upload, read, written))
        except NotReplicated:
            self._undo(upload, read, written)
            raise
        return bool(moved)

    def _move(self, upload: str, read: int, written: int) -> Callable[[Pipeline], object]:
        return lambda pipe: self._advance(
            keys=[_key(upload)], args=[str(read), str(written)], client=pipe
        )

    def _undo(self, upload: str, read: int, written: int) -> None:
        """Move an upload back from `written` to `read`, where no replica confirmed the
        move and no state of `written` was written: the upload goes on from `read`."""
        # Failing, Redis stays ahead of the state: the upload is refused, never rolled back.
        with suppress(RedisError):
            UNCONFIRMED.write(self._client, self._move(upload, written, read))

    def current(self, upload: str) -> str | None:
        """The generation anchored (as text), `GONE`, or None for none."""
        value = self._client.get(_key(upload))
        return None if value is None else str(value)

    def end(self, upload: str, tenant: str, expires_at: datetime) -> None:
        """Leave a tombstone: the upload is finished or terminated, for good; its tenant
        no longer counts it."""
        key, ttl, open_key = _key(upload), _ttl(expires_at), _open_key(tenant)

        def both(pipe: Pipeline) -> None:
            pipe.set(key, GONE, px=ttl)
            pipe.zrem(open_key, upload)

        self._replicas.write(self._client, both)


def _key(upload: str) -> str:
    return f"{KEY_PREFIX}{upload}"


def _open_key(tenant: str) -> str:
    return f"{OPEN_PREFIX}{tenant}"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _ttl(expires_at: datetime) -> int:
    left = expires_at + MARGIN - datetime.now(UTC)
    return max(1, int(left.total_seconds() * 1000))
