"""Celery beat on two hosts (`workers.beat`), as real `celery beat` processes on one
real redis-server, or embedded in every worker (`celery worker -B`, as the compose stack
runs it): only the one holding the lock schedules the sweeps; killed with SIGKILL (a
worker with its whole process group, as a lost host), it is replaced by the other within
the lock's TTL."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystore import LocalKek
from tests.support.services import redis_server, terminate
from tests.support.waiting import wait_until

LOCK_TTL = 3.0  # seconds
INTERVAL = 0.5  # seconds between sweeps
SENT = "Sending due task sweeps"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Beat:
    process: "subprocess.Popen[bytes]"
    log: Path

    def sent(self) -> int:
        """How many sweeps it has scheduled."""
        return self.log.read_text(errors="replace").count(SENT)


@contextmanager
def celery_beat(directory: Path, redis_url: str, name: str, *, in_worker: bool) -> Iterator[Beat]:
    """`celery -A workers.celery_app beat`, or a worker running beat (`worker -B`), in a
    process group of its own, its schedule file and log in `directory`; the worker's
    store is a directory there too, since it runs the sweeps it is sent."""
    kek = directory / "kek"
    LocalKek.load_or_create(kek)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")},
        "SEALSTREAM_REDIS_URL": redis_url,
        "SEALSTREAM_STORAGE_URL": f"file://{directory / 'store'}",
        "SEALSTREAM_KEK_FILE": str(kek),
        "SEALSTREAM_BEAT_LOCK_TTL": str(LOCK_TTL),
        "SEALSTREAM_LIFECYCLE_INTERVAL": str(INTERVAL),
        "PYTHONUNBUFFERED": "1",
    }
    role = ["worker", "-B", "-c", "1", "-n", f"{name}@%h"] if in_worker else ["beat"]
    command = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", *role, "-l", "INFO",
        "-s", str(directory / f"{name}-schedule"), "--pidfile=",
    ]  # fmt: skip
    log = directory / f"{name}.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    try:
        yield Beat(process, log)
    finally:
        terminate(process)


@pytest.mark.parametrize("in_worker", [False, True], ids=["beat", "worker-B"])
def test_one_of_two_beats_schedules_and_the_other_takes_over_when_it_is_killed(
    tmp_path: Path, in_worker: bool
) -> None:
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        first = stack.enter_context(celery_beat(tmp_path, redis.url, "first", in_worker=in_worker))
        wait_until(lambda: first.sent() >= 2, "the first beat to schedule", timeout=60)
        second = stack.enter_context(
            celery_beat(tmp_path, redis.url, "second", in_worker=in_worker)
        )
        wait_until(lambda: "beat: Starting" in second.log.read_text(), "the second beat")
        time.sleep(2 * LOCK_TTL)
        assert second.sent() == 0, second.log.read_text()[-2000:]
        assert first.process.poll() is None

        scheduled = first.sent()
        os.killpg(first.process.pid, signal.SIGKILL)  # with an embedded beat's process
        killed = time.monotonic()
        first.process.wait()
        wait_until(lambda: second.sent() > 0, "the second beat to take over", timeout=30)
        # The lock expires within its TTL; the standby tries every third of it.
        assert time.monotonic() - killed < LOCK_TTL + LOCK_TTL / 3 + 2
        assert first.sent() == scheduled
