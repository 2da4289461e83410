"""Writes to Redis that the service answers for, held until Redis replicas confirm them.

Redis replicates asynchronously: a primary acknowledges a write before any replica has
it, and a failover that promotes a replica loses whatever that replica had not received.
A write the service tells a client about (a job accepted, its task, a cancel request, a
resumable upload's generation) is therefore followed, when the deployment asks for
replicas (`SEALSTREAM_REDIS_MIN_REPLICAS`), by `WAIT numreplicas timeout` on the same
connection: Redis answers how many replicas have acknowledged every write that
connection made. Fewer than asked for within the timeout is `NotReplicated`, answered
503, never as done.

WAIT is not a consensus: the write stays on the primary when it is not confirmed, and a
sentinel may still promote a replica that has not got it (docs/production.md says what it
does and does not promise).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import CaseInsensitiveDict, Pipeline
from redis.exceptions import RedisError

# Written after a write that another connection of the same Redis made: replication keeps
# the primary's order, so a replica that confirms this has every write made before it.
MARKER = "sealstream:replicated"
# The least time a write is waited for to reach the append-only files on disk.
AOF_WAIT_MS = 2000


class NotReplicated(RedisError):
    """Fewer Redis replicas than the deployment asks for confirmed a write in time."""


@dataclass(frozen=True)
class Replicas:
    """How many replicas must confirm a write the service answers for (0: none, and no
    waiting), and the seconds to wait for them."""

    count: int = 0
    timeout: float = 1.0

    def write(
        self, client: redis.Redis, queue: Callable[[Pipeline], object], *, fsynced: bool = False
    ) -> list[Any]:
        """Run the commands `queue` adds to a pipeline as one transaction, then wait for
        the replicas on the same connection; the commands' replies, as Redis gave them
        (commands queued in a transaction reply QUEUED, which redis-py's reply parsers
        do not expect, so none is applied). `NotReplicated` if they do not confirm.
        `fsynced` (Redis 7.2 on, with AOF): wait instead until the server and the replicas
        have the write in their append-only files on disk (WAITAOF), which a crash of
        them all does not lose."""
        wait = max(1, round(self.timeout * 1000))
        with client.pipeline(transaction=False) as pipe:
            pipe.response_callbacks = CaseInsensitiveDict({})
            # A transaction of its own, not redis-py's: WAIT must follow EXEC on the same
            # connection, and inside MULTI it would not wait.
            pipe.pipeline_execute_command("MULTI")
            queue(pipe)
            pipe.pipeline_execute_command("EXEC")
            if fsynced:
                # Under `appendfsync everysec` the next sync may be a second away.
                aof_wait = max(wait, AOF_WAIT_MS)
                pipe.pipeline_execute_command("WAITAOF", 1, self.count, aof_wait)
            elif self.count:
                pipe.pipeline_execute_command("WAIT", self.count, wait)
            replies = pipe.execute()
        waited = fsynced or self.count
        done: list[Any] = replies[-2] if waited else replies[-1]
        failed = [reply for reply in done if isinstance(reply, Exception)]
        if failed:
            raise failed[0]
        if fsynced:
            self._check_fsynced(replies[-1])
        elif self.count and replies[-1] < self.count:
            raise NotReplicated(
                f"{replies[-1]} of {self.count} Redis replicas confirmed the write "
                f"within {self.timeout:g} s"
            )
        return done

    def _check_fsynced(self, reply: list[int]) -> None:
        local, replicas = reply
        if local < 1 or replicas < self.count:
            raise NotReplicated(
                f"the Redis server ({local} of 1) and {replicas} of {self.count} replicas "
                f"had the write in their append-only files on disk in time"
            )

    def confirm(self, client: redis.Redis) -> None:
        """Wait for the replicas to have every write the server `client` reaches took so
        far, whichever connection made it (Celery's, for a task): a marker written now
        and waited for. `NotReplicated` if they do not confirm."""
        if self.count:
            self.write(client, lambda pipe: pipe.incr(MARKER))


UNCONFIRMED = Replicas()  # no replica waited for
