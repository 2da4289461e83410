"""Celery beat with a lock in Redis, so that beat can run on two hosts: the one holding
the lock schedules, the other stands by.

The lock is a Redis key with a TTL (`SEALSTREAM_BEAT_LOCK_TTL`), renewed by the beat that
holds it at every tick, three times per TTL at least. A standby tries to take it at the
same pace: once the holder is gone (its host lost, or cut off from Redis), the lock
expires and a standby takes over within one TTL and a tick. A holder that cannot renew
for a whole TTL stops scheduling, since a standby may have taken over. The sweeps it
schedules are idempotent, so the rare overlap (a holder stalled past its TTL) does the
work twice, not wrong.
"""

import logging
import time
from typing import Any

from celery.beat import PersistentScheduler
from redis.exceptions import LockError, RedisError

from sealstream.settings import Settings
from services.jobs.redis_store import redis_client

logger = logging.getLogger(__name__)

LOCK_NAME = "sealstream:beat:lock"
TICKS_PER_TTL = 3


class LockedScheduler(PersistentScheduler):
    """Celery's persistent scheduler, scheduling only while it holds the beat lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = Settings()
        if settings.redis_url is None:
            raise RuntimeError("beat needs Redis (SEALSTREAM_REDIS_URL)")
        self._ttl = settings.beat_lock_ttl
        client = redis_client(settings.redis_url, settings.redis_sentinel_master)
        self._lock = client.lock(LOCK_NAME, timeout=self._ttl, thread_local=False)
        self._renewed: float | None = None  # monotonic time of the last renewal, if held
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        pace = self._ttl / TICKS_PER_TTL
        if not self._hold():
            return pace
        return float(min(super().tick(*args, **kwargs), pace))

    def close(self) -> None:
        """Stop, handing the lock on at once rather than when it expires."""
        try:
            super().close()
        finally:
            if self._renewed is not None:
                self._renewed = None
                try:
                    self._lock.release()
                except (LockError, RedisError):
                    logger.warning("beat: could not release its lock; it expires on its own")

    def _hold(self) -> bool:
        """Whether this beat holds the lock now: renewed if it held it, taken if free."""
        try:
            if self._renewed is None:
                taken = bool(self._lock.acquire(blocking=False))
                if taken:
                    logger.info("beat: took the lock; scheduling")
            else:
                taken = bool(self._lock.reacquire())
        except LockError:
            logger.warning("beat: lost the lock to another beat; standing by")
            taken = False
        except RedisError as error:
            held_lately = self._renewed is not None and time.monotonic() - self._renewed < self._ttl
            logger.warning("beat: cannot reach Redis for the lock: %s", error)
            return held_lately  # nobody can take it before it expires
        self._renewed = time.monotonic() if taken else None
        return taken
