"""Where checkpoints go besides the bucket: an anchor that the bucket's writers do not
control, so that a deleted tail or a deleted chain can be told from a crash.

- `StdoutSink`: one JSON line per checkpoint on standard output, for a log shipper to
  carry off the machine (`sealstream audit verify --checkpoints FILE` reads them back).
- `RedisSink`: the latest checkpoint of each chain in a Redis hash.
- `BucketSink`: every checkpoint as an object of its own in a second bucket, written once
  with a conditional write; with S3 Object Lock on that bucket, not even its owner can
  delete or replace them before their retention ends.

Each also reads back what it holds, for `verify`.
"""

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

import redis

from audit.chain import SEQ_DIGITS
from storage import ObjectExists, ObjectStore

CHECKPOINT_LINE_KEY = "sealstreamAuditCheckpoint"
REDIS_HASH = "sealstream:audit:checkpoints"
BUCKET_PREFIX = "sealstream/audit/checkpoints/"

Checkpoint = dict[str, Any]


class CheckpointSink(ABC):
    @abstractmethod
    def publish(self, checkpoint: Checkpoint) -> None:
        """Hand `checkpoint` over; raises if it could not be."""

    @abstractmethod
    def checkpoints(self) -> list[Checkpoint]:
        """What this sink holds (as far as it keeps them: at least each chain's latest)."""


class StdoutSink(CheckpointSink):
    def publish(self, checkpoint: Checkpoint) -> None:
        line = json.dumps({CHECKPOINT_LINE_KEY: checkpoint}, separators=(",", ":"))
        print(line, file=sys.stdout, flush=True)

    def checkpoints(self) -> list[Checkpoint]:
        raise NotImplementedError("standard output keeps nothing: give the shipped lines")


class RedisSink(CheckpointSink):
    """On a client of one Redis, or of the primary its sentinels name."""

    def __init__(self, client: "redis.Redis") -> None:
        self._redis = client

    def publish(self, checkpoint: Checkpoint) -> None:
        self._redis.hset(REDIS_HASH, str(checkpoint["chain"]), json.dumps(checkpoint))

    def checkpoints(self) -> list[Checkpoint]:
        stored: dict[str, str] = self._redis.hgetall(REDIS_HASH)  # type: ignore[assignment]
        return list(_documents(stored.values()))


class BucketSink(CheckpointSink):
    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def publish(self, checkpoint: Checkpoint) -> None:
        name = f"{BUCKET_PREFIX}{checkpoint['chain']}/{int(checkpoint['seq']):0{SEQ_DIGITS}d}.json"
        # A retried write that had landed is fine: checkpoints are written once.
        with suppress(ObjectExists):
            self._store.put(name, json.dumps(checkpoint).encode(), if_absent=True)

    def checkpoints(self) -> list[Checkpoint]:
        return list(
            _documents(self._store.get(info.key) for info in self._store.list(BUCKET_PREFIX))
        )


def checkpoint_lines(lines: Iterable[str]) -> list[Checkpoint]:
    """The checkpoints among log lines that `StdoutSink` wrote (other lines are skipped)."""
    found = []
    for line in lines:
        start = line.find("{")
        if start < 0 or CHECKPOINT_LINE_KEY not in line:
            continue
        try:
            document = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(document, dict) and isinstance(document.get(CHECKPOINT_LINE_KEY), dict):
            found.append(document[CHECKPOINT_LINE_KEY])
    return found


def _documents(blobs: Iterable[bytes | str]) -> Iterable[Checkpoint]:
    for blob in blobs:
        try:
            document = json.loads(blob)
        except ValueError:
            continue
        if isinstance(document, dict):
            yield document
