"""`sealstream serve --workers N`: N server processes on one socket under a supervisor,
which replaces one that dies; one admin token, one KEK and one metrics view for all."""

import os
import shutil
import signal
import ssl
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import httpx
import psutil

from sealstream.processes import share_of
from sealstream.settings import Settings
from sealstream_client import SealstreamClient
from tests.support.http import DOCUMENTED_KEY, assert_round_trip
from tests.support.metrics import scrape, value
from tests.support.services import (
    RedisServer,
    ServeProcess,
    sealstream_serve,
    self_signed_certificate,
)
from tests.support.waiting import wait_until

ALGORITHMS = "/api/key-management/supported-algorithms"


def server_processes(served: ServeProcess) -> set[int]:
    """The server processes the supervisor runs now (not its resource tracker)."""
    running = set()
    for child in psutil.Process(served.process.pid).children():
        with suppress(psutil.ZombieProcess, psutil.NoSuchProcess):  # one just killed
            if "spawn_main" in " ".join(child.cmdline()):
                running.add(child.pid)
    return running


def serving(pids: set[int], port: int) -> set[int]:
    """Those of `pids` holding an established connection on `port`."""
    return {
        pid
        for pid in pids
        for connection in psutil.Process(pid).net_connections()
        if connection.status == psutil.CONN_ESTABLISHED and connection.laddr.port == port
    }


def test_processes_share_a_socket_and_one_dies_and_is_replaced(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    env = {"SEALSTREAM_REDIS_URL": redis_server.url, "SEALSTREAM_WORKERS": "2"}
    tls = ("--tls-cert", str(certificate), "--tls-key", str(key))
    trusted = ssl.create_default_context(cafile=str(certificate))
    with sealstream_serve(tmp_path, env, *tls, scheme="https") as served:
        assert "  processes:    2" in served.banner
        assert sum("admin token:" in line for line in served.banner) == 1
        port = int(served.url.rsplit(":", 1)[1])
        wait_until(lambda: len(server_processes(served)) == 2, "two server processes")
        first = server_processes(served)
        metrics_dir = Path(psutil.Process(min(first)).environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir() and (metrics_dir.stat().st_mode & 0o077) == 0

        headers = {"Authorization": f"Bearer {served.admin_token}"}
        with httpx.Client(base_url=served.url, headers=headers, verify=trusted, timeout=60) as kept:
            for _ in range(3):
                assert kept.get(ALGORITHMS).status_code == 200
            (doomed,) = serving(first, port)
            os.kill(doomed, signal.SIGKILL)
            wait_until(
                lambda: (
                    len(server_processes(served)) == 2 and doomed not in server_processes(served)
                ),
                "the dead process replaced",
            )

        # Served on: a stream through whichever process takes it, with the one token.
        client = SealstreamClient(served.url, served.admin_token, timeout=60, ssl_context=trusted)
        client.create_key(**DOCUMENTED_KEY)
        assert_round_trip(client, "mySymKey", 2 * 1024 * 1024 + 3)
        with httpx.Client(
            base_url=served.url, headers=headers, verify=trusted, timeout=60
        ) as again:
            for _ in range(2):
                assert again.get(ALGORITHMS).status_code == 200

        # Every scrape, whichever process answers it, counts the requests of all of them,
        # the dead one's included.
        for _ in range(3):
            _, samples = scrape(served.url, verify=trusted)
            requests = value(
                samples,
                "sealstream_http_requests_total",
                method="GET",
                route=ALGORITHMS,
                status="200",
            )
            assert requests == 5

        # And the memory of each live process, once the replacement has built its app.
        def memory_of_each() -> bool:
            _, samples = scrape(served.url, verify=trusted)
            reported = {
                dict(labels)["pid"]
                for name, labels in samples
                if name == "process_resident_memory_bytes"
            }
            return reported == {str(pid) for pid in server_processes(served)}

        wait_until(memory_of_each, "the memory of every server process")
    assert list(tmp_path.joinpath(".sealstream").glob("*kek*")) == [
        tmp_path / ".sealstream" / ".kek"
    ]
    assert not metrics_dir.exists()


def test_no_process_serves_on_when_the_supervisor_is_killed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {"SEALSTREAM_REDIS_URL": redis_server.url, "SEALSTREAM_WORKERS": "2"}
    with sealstream_serve(tmp_path, env) as served:
        wait_until(lambda: len(server_processes(served)) == 2, "two server processes")
        processes = [psutil.Process(pid) for pid in server_processes(served)]
        metrics_dir = Path(processes[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        served.process.kill()  # it cannot stop them itself: the kernel tells them
        wait_until(
            lambda: not any(process.is_running() for process in processes),
            "the server processes gone with their supervisor",
            timeout=120,  # one may still be starting: it stops once it has imported
        )
    shutil.rmtree(metrics_dir)  # what only a supervisor that exits cleans


def test_more_than_one_process_needs_redis(tmp_path: Path) -> None:
    command = [str(Path(sys.executable).with_name("sealstream")), "serve", "--workers", "2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sealstream: cannot start: SEALSTREAM_WORKERS: 2 processes need SEALSTREAM_REDIS_URL "
        "(jobs run in-process live in one process's memory); set it, or serve with 1"
    ]
    assert not (tmp_path / ".sealstream").exists()


def test_the_stream_cap_and_keygen_threads_are_shared_among_the_processes() -> None:
    shares = share_of(Settings(max_streams=10, keygen_threads=3), 4)
    assert (shares.max_streams, shares.keygen_threads) == (2, 1)
    assert share_of(Settings(max_streams=10), 1).max_streams == 10
