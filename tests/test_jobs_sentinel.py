"""Redis Sentinel for jobs: a `sentinel://` Redis URL gives the job store the primary the
sentinels name, and it follows them through a failover (real `redis-server` and
`redis-sentinel` processes); Celery's broker gets the same URL and the primary's name;
credentials in any part of such a URL are never shown."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from keystore import LocalKek
from sealstream.settings import Settings, without_credentials
from sealstream.wiring import open_records
from services.jobs import JobKind, RedisJobStore
from services.jobs.redis_store import redis_client
from storage.local import LocalStore
from tests.support.jobs import placeholder_job
from tests.support.ports import LOCALHOST, free_port
from tests.support.services import terminate
from tests.support.waiting import wait_until
from workers.celery_app import make_celery

MASTER = "jobs"
TTL_SECONDS = 600


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install {name} (or run `make system`)")
    return path


def answers(port: int) -> bool:
    client = redis.Redis(host=LOCALHOST, port=port, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """A primary, its replica and one sentinel watching them as `MASTER`; yields the
    sentinel URL and the ports of the primary, the replica and the sentinel."""
    ports = [free_port(), free_port()]
    sentinel_port = free_port()
    with ExitStack() as stack:
        for index, port in enumerate(ports):
            replica = ["--replicaof", LOCALHOST, str(ports[0])] if index else []
            command = [binary("redis-server"), "--port", str(port), "--bind", LOCALHOST,
                       "--save", "", "--dir", str(tmp_path), *replica]  # fmt: skip
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            stack.callback(terminate, process)
            wait_until(partial(answers, port), f"redis-server on {port}")
        config = tmp_path / "sentinel.conf"
        config.write_text(
            f"port {sentinel_port}\nbind {LOCALHOST}\n"
            f"sentinel monitor {MASTER} {LOCALHOST} {ports[0]} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        process = subprocess.Popen(
            [binary("redis-sentinel"), str(config)], stdout=subprocess.DEVNULL
        )
        stack.callback(terminate, process)
        wait_until(lambda: answers(sentinel_port), "redis-sentinel")
        yield f"sentinel://{LOCALHOST}:{sentinel_port}/0", [*ports, sentinel_port]


def primary_port(sentinel_port: int) -> int:
    client = redis.Redis(host=LOCALHOST, port=sentinel_port, decode_responses=True)
    try:
        address = client.sentinel_get_master_addr_by_name(MASTER)
        assert isinstance(address, tuple)
        return int(address[1])
    finally:
        client.close()


def test_the_job_store_follows_the_primary_through_a_failover(
    sentinel: tuple[str, list[int]], tmp_path: Path
) -> None:
    url, (first, second, sentinel_port) = sentinel
    reports = open_records(LocalStore(tmp_path / "reports"), LocalKek(os.urandom(32)))
    jobs = RedisJobStore.from_url(url, reports, timedelta(seconds=TTL_SECONDS), MASTER)
    before = placeholder_job(JobKind.VERIFY, "default")
    jobs.save(before)
    assert jobs.load(before.id) == before
    replica = redis.Redis(host=LOCALHOST, port=second)
    wait_until(lambda: replica.exists(f"sealstream:job:{before.id}") == 1, "the replica to copy")
    replica.close()

    control = redis.Redis(host=LOCALHOST, port=sentinel_port)
    control.sentinel_failover(MASTER)
    control.close()
    wait_until(lambda: primary_port(sentinel_port) == second, "the sentinel to promote the replica")
    # Until the old primary is told it is a replica, it still takes writes that the
    # resync then drops: what Sentinel's asynchronous replication can lose.
    wait_until(lambda: role(first) == "slave", "the old primary to follow the new one")

    after = placeholder_job(JobKind.REENCRYPT, "default")
    wait_until(lambda: _saves(jobs, after), "a save on the new primary")
    assert jobs.load(before.id) == before and jobs.load(after.id) == after
    promoted = redis.Redis(host=LOCALHOST, port=second)
    assert promoted.exists(f"sealstream:job:{after.id}") == 1
    promoted.close()


def role(port: int) -> str:
    client = redis.Redis(host=LOCALHOST, port=port, decode_responses=True)
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


def _saves(jobs: RedisJobStore, record: object) -> bool:
    try:
        jobs.save(record)  # type: ignore[arg-type]
    except redis.RedisError:
        return False
    return True


def test_a_sentinel_url_lists_sentinels_that_agree() -> None:
    client = redis_client("sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2/3", MASTER)
    pool: Any = client.connection_pool
    assert pool.service_name == MASTER
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["host"] for s in sentinels] == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    for bad in ("sentinel://a:1;redis://b:2", "sentinel://:x@a:1;sentinel://:y@b:1",
                "sentinel://a:1/1;sentinel://b:1/2", "sentinel://a:1/99"):  # fmt: skip
        with pytest.raises(ValueError, match="sentinel"):
            redis_client(bad, MASTER)


def test_celery_takes_the_sentinel_url_and_the_primary_name() -> None:
    url = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0"
    app = make_celery(Settings(redis_url=url, redis_sentinel_master=MASTER))
    assert app.conf.broker_url == url
    assert app.conf.broker_transport_options["master_name"] == MASTER


def test_credentials_in_any_sentinel_are_hidden() -> None:
    shown = without_credentials("sentinel://:s3cret@h1:26379;sentinel://u:s3cret@h2:26379/0")
    assert "s3cret" not in shown
    assert shown == "sentinel://***@h1:26379;sentinel://***@h2:26379/0"
