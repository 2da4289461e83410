"""Resumable uploads over a Redis that stops syncing each write while the service runs
(`CONFIG SET appendfsync everysec`): what it said of its persistence is believed for a
minute (a refusal for a second), but not by a move of an upload's generation, which
reads the setting back in its own transaction: the first move after the change is
refused and undone, never acknowledged, and Redis is asked again before the next."""

import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import redis as redis_py

from services.jobs.redis_store import redis_client
from services.upload_anchor import (
    KEY_PREFIX,
    RECHECK_REFUSED,
    Anchored,
    AnchorNotDurable,
    Durability,
    MoveNotDurable,
    UploadAnchor,
)
from tests.conftest import Api
from tests.support.http import create_key, problem
from tests.test_api_uploads import FRAME, create, offset_of, patch

if TYPE_CHECKING:
    from tests.support.services import RedisServer


@pytest.mark.parametrize("api", ["s3"], indirect=True)
def test_the_first_move_after_redis_stops_syncing_each_write_is_refused_and_undone(
    api: Api, redis_server: "RedisServer"
) -> None:
    """The PATCH after the change stores and acknowledges nothing, its move of the
    generation (the lock) undone; the next request asks again (and goes on, Redis
    syncing each write again by then)."""
    redis = redis_client(redis_server.url, "")
    api.parts.__dict__["upload_anchor"] = UploadAnchor(redis)
    with api.client() as client:
        create_key(client)
        url = create(client, 2 * FRAME)
        anchored = redis.get(KEY_PREFIX + url.rsplit("/", 1)[1])
        redis.config_set("appendfsync", "everysec")

        refused = patch(client, url, 0, b"x" * FRAME)

        detail = problem(refused, 503, "resumable-uploads-need-durable-redis")["detail"]
        assert "appendfsync always" in detail
        assert redis.get(KEY_PREFIX + url.rsplit("/", 1)[1]) == anchored
        redis.config_set("appendfsync", "always")
        assert offset_of(client, url) == 0
        assert patch(client, url, 0, b"x" * 2 * FRAME).status_code == 204


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_move_redis_made_without_syncing_it_is_undone_and_the_next_asks_again(
    redis_server: "RedisServer", protocol: int
) -> None:
    """As a request under way finds it, whose check passed before the change: its next
    move is refused and undone, and the one after asks Redis again before moving. Over
    either protocol, whose replies to CONFIG GET differ."""
    redis = redis_py.Redis.from_url(redis_server.url, decode_responses=True, protocol=protocol)
    anchor = UploadAnchor(redis)
    assert anchor.durability() is Durability.FSYNC_ALWAYS
    assert anchor.start("up", 1, "aa", datetime.now(UTC) + timedelta(hours=1))
    redis.config_set("appendfsync", "everysec")

    with pytest.raises(MoveNotDurable):
        anchor.advance("up", (1, "aa"), (2, "bb"), timedelta(minutes=1))

    assert anchor.current("up") == Anchored(1, "aa")
    with pytest.raises(AnchorNotDurable) as refused:
        anchor.advance("up", (1, "aa"), (2, "bb"), timedelta(minutes=1))
    assert not isinstance(refused.value, MoveNotDurable)  # refused before moving
    assert anchor.current("up") == Anchored(1, "aa")

    # Fixed by the operator: seen within a second, not the minute a good answer is kept.
    redis.config_set("appendfsync", "always")
    time.sleep(RECHECK_REFUSED.total_seconds() + 0.1)
    assert anchor.advance("up", (1, "aa"), (2, "bb"), timedelta(minutes=1)) is not None
    assert anchor.current("up") == Anchored(2, "bb", "aa")
