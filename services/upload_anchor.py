"""The generation of each resumable upload's state, kept in Redis, outside the bucket.

A state in the bucket is authentic (`storage.integrity`) but may be an older authentic
copy put back by whoever can write the bucket; the HMACs that stop a frame from being
sealed from other bytes live in that state. An older copy would let a frame's (data key,
IV) seal a second plaintext, so the state counts its writes (`generation`) and Redis holds
the count: a state whose count is not Redis's is refused. Each write moves Redis first
(compare and set), so a crash between the two leaves Redis ahead: the upload is refused,
never rolled back. An upload finished or terminated leaves a tombstone, so that copies of
its state cannot bring it back.
"""

from datetime import UTC, datetime, timedelta

import redis

KEY_PREFIX = "sealstream:upload:"
GONE = "gone"
# Kept past the upload's expiry: by then its state is refused as expired anyway.
MARGIN = timedelta(days=1)

_ADVANCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""


class UploadAnchor:
    """Each upload's generation in Redis: `start`, `advance`, `current`, `end`."""

    def __init__(self, client: "redis.Redis") -> None:
        self._client = client
        self._advance = client.register_script(_ADVANCE)

    def start(self, upload: str, generation: int, expires_at: datetime) -> bool:
        """Anchor a new upload at `generation`; False if its id is taken (or was)."""
        set_ = self._client.set(_key(upload), str(generation), nx=True, px=_ttl(expires_at))
        return bool(set_)

    def advance(self, upload: str, read: int, written: int) -> bool:
        """Move the upload from generation `read` to `written`; False if it was not at
        `read` (another request moved it, or the state was put back)."""
        return bool(self._advance(keys=[_key(upload)], args=[str(read), str(written)]))

    def current(self, upload: str) -> str | None:
        """The generation anchored (as text), `GONE`, or None for none."""
        value = self._client.get(_key(upload))
        return None if value is None else str(value)

    def end(self, upload: str, expires_at: datetime) -> None:
        """Leave a tombstone: the upload is finished or terminated, for good."""
        self._client.set(_key(upload), GONE, px=_ttl(expires_at))


def _key(upload: str) -> str:
    return f"{KEY_PREFIX}{upload}"


def _ttl(expires_at: datetime) -> int:
    left = expires_at + MARGIN - datetime.now(UTC)
    return max(1, int(left.total_seconds() * 1000))
