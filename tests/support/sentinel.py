"""A Redis Sentinel group of real processes for tests: a primary, its replica and one
sentinel watching them (`redis-server` and `redis-sentinel`, which `make system`
installs)."""

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import pytest
import redis

from tests.support.ports import LOCALHOST, free_port
from tests.support.services import terminate
from tests.support.waiting import wait_until

MASTER = "jobs"
START_ATTEMPTS = 3


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install {name} (or run `make system`)")
    return path


@contextmanager
def sentinel_group(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """A primary, its replica and one sentinel watching them as `MASTER`; yields the
    sentinel URL and the ports of the primary, the replica and the sentinel."""
    with ExitStack() as stack:
        primary = _started(stack, partial(_redis_server, tmp_path, None))
        ports = [primary, _started(stack, partial(_redis_server, tmp_path, primary))]
        wait_until(lambda: _linked(ports[1]), "the replica to copy the primary")
        sentinel_port = _started(stack, partial(_sentinel, tmp_path, ports[0]))
        wait_until(lambda: _promotable(sentinel_port), "the sentinel to find the replica")
        yield f"sentinel://{LOCALHOST}:{sentinel_port}/0", [*ports, sentinel_port]


def _redis_server(tmp_path: Path, primary: int | None, port: int) -> list[str]:
    """A redis-server on `port`, the replica of the one on `primary` if given."""
    follow = ["--replicaof", LOCALHOST, str(primary)] if primary else []
    return [binary("redis-server"), "--port", str(port), "--bind", LOCALHOST,
            "--save", "", "--dir", str(tmp_path), *follow]  # fmt: skip


def _sentinel(tmp_path: Path, primary: int, port: int) -> list[str]:
    config = tmp_path / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\nbind {LOCALHOST}\n"
        f"sentinel monitor {MASTER} {LOCALHOST} {primary} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 5000\n"
    )
    return [binary("redis-sentinel"), str(config)]


def _started(stack: ExitStack, command: Callable[[int], list[str]]) -> int:
    """Start `command(port)` on a free port, stopped when `stack` closes; its port once the
    process itself answers there. A free port can be taken by another test's server
    before this one binds it (the process then exits), so a few ports are tried."""
    for _ in range(START_ATTEMPTS):
        port = free_port()
        argv = command(port)
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        stack.callback(terminate, process)
        wait_until(partial(_up_or_gone, process, port), f"{argv[0]} on {port}")
        if process.poll() is None:
            return port
    raise AssertionError(f"no free port held for {argv[0]} in {START_ATTEMPTS} tries")


def _up_or_gone(process: "subprocess.Popen[bytes]", port: int) -> bool:
    return process.poll() is not None or _served_by(port, process.pid)


def _served_by(port: int, pid: int) -> bool:
    """Whether the server answering on `port` is the process `pid`, not another's."""
    client = redis.Redis(host=LOCALHOST, port=port, socket_connect_timeout=1)
    try:
        return int(client.info("server")["process_id"]) == pid
    except redis.RedisError:
        return False
    finally:
        client.close()


def _linked(replica_port: int) -> bool:
    client = redis.Redis(host=LOCALHOST, port=replica_port, decode_responses=True)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


def _promotable(sentinel_port: int) -> bool:
    """Whether the sentinel knows a replica it could promote."""
    client = redis.Redis(host=LOCALHOST, port=sentinel_port, decode_responses=True)
    try:
        replicas = client.sentinel_slaves(MASTER)
    finally:
        client.close()
    return any(
        not replica["is_sdown"] and replica.get("master-link-status") == "ok"
        for replica in replicas
    )


def primary_port(sentinel_port: int) -> int:
    client = redis.Redis(host=LOCALHOST, port=sentinel_port, decode_responses=True)
    try:
        address = client.sentinel_get_master_addr_by_name(MASTER)
        assert isinstance(address, tuple)
        return int(address[1])
    finally:
        client.close()


def role(port: int) -> str:
    client = redis.Redis(host=LOCALHOST, port=port, decode_responses=True)
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


def process_id(port: int) -> int:
    """The process of the redis-server on `port`, for a test to stop or kill."""
    client = redis.Redis(host=LOCALHOST, port=port, decode_responses=True)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def waiting_for_replicas(port: int) -> bool:
    """Whether a client of the server on `port` is blocked in WAIT for its replicas."""
    client = redis.Redis(host=LOCALHOST, port=port, decode_responses=True)
    try:
        clients = client.client_list()
    finally:
        client.close()
    return any(entry["cmd"] == "wait" and "b" in entry["flags"] for entry in clients)
