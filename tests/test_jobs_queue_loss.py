"""Jobs when the queue loses or refuses them, with a real redis-server, Celery worker
processes and the moto server: an object stored while Redis refuses writes is answered
as stored, its verify job parked and queued by the sweep later; a job whose task was lost
is queued again by the sweep, and runs once; a worker whose Redis refuses its writes
(NOREPLICAS) waits, backing off, and works again once Redis takes writes."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from redis import Redis

from sealstream.wiring import build_parts
from services.jobs import JobKind, JobRecord, VerifyParams
from tests.support.data import MiB, random_chunks
from tests.support.http import create_key
from tests.support.jobs import JobStack, finished_job, get_job, job_stack, show, store_object
from tests.support.waiting import wait_until
from workers.lifecycle import run_sweeps
from workers.runner import CeleryRunner

REQUEUE_AFTER = 5  # seconds


@contextmanager
def refusing_writes(stack: JobStack) -> Iterator[None]:
    """Redis answers every write NOREPLICAS, as a primary under `min-replicas-to-write`
    does while its replica is away."""
    redis = Redis.from_url(stack.redis.url)
    redis.config_set("min-replicas-to-write", 1)
    try:
        yield
    finally:
        redis.config_set("min-replicas-to-write", 0)
        redis.close()


def sweeper(stack: JobStack) -> Callable[[], dict[str, Any]]:
    """The periodic sweeps task's body, as beat runs it, its parts built once."""
    settings = stack.api.settings
    parts = build_parts(settings)
    return partial(run_sweeps, parts, CeleryRunner(settings, parts.jobs).submit)


def test_an_object_stored_while_redis_refuses_writes_is_answered_stored_and_verified_later(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    data = b"".join(random_chunks(MiB + 3, seed=5))
    with job_stack(tmp_path, moto_endpoint, s3_bucket) as stack, stack.client() as client:
        create_key(client)
        sweep = sweeper(stack)
        with refusing_writes(stack):
            stored = store_object(client, "parked.bin", data)
            assert stored["verifyQueued"] is False
            parked = get_job(client, stored["verifyJob"])  # from its report in storage
            assert parked["status"] == "queued", show(parked)

        assert sweep()["parkedJobsQueued"] == [stored["verifyJob"]]
        record = finished_job(client, stored["verifyJob"])
        assert record["status"] == "succeeded", show(record)
        assert record["result"]["plaintextSha256"] == stored["plaintextSha256"]
        assert sweep()["parkedJobsQueued"] == []  # queued once

        queued = store_object(client, "queued.bin", data)
        assert queued["verifyQueued"] is True


def test_a_job_whose_task_was_lost_is_queued_again_by_the_sweep_and_runs_once(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    with (
        job_stack(tmp_path, moto_endpoint, s3_bucket, requeue_after=REQUEUE_AFTER) as stack,
        stack.client() as client,
    ):
        create_key(client)
        stored = store_object(client, "lost.bin", random_chunks(MiB, seed=6))
        finished_job(client, stored["verifyJob"])
        params = VerifyParams(
            bucket=stored["bucket"], key="lost.bin", storage_key=stored["storageKey"]
        )
        lost = JobRecord.new(JobKind.VERIFY, "default", params)
        sweep = sweeper(stack)
        stack.services.jobs.save(lost)  # its task lost with a failed-over Redis primary

        assert sweep()["requeuedJobs"] == []  # not queued long enough yet
        time.sleep(REQUEUE_AFTER + 0.5)
        assert sweep()["requeuedJobs"] == [lost.id]
        assert sweep()["requeuedJobs"] == []  # queued again once per bound
        record = finished_job(client, lost.id)
        assert record["status"] == "succeeded" and record["attempts"] == 1, show(record)

        # Its first task turns up after all, twice: the job has ended, and stays as it was.
        worker = stack.workers[0]
        ran = worker.output().count("succeeded in")
        runner = CeleryRunner(stack.api.settings, stack.services.jobs)
        runner.submit(lost)
        runner.submit(lost)
        wait_until(
            lambda: worker.output().count("succeeded in") == ran + 2, "the worker to run both"
        )
        assert get_job(client, lost.id) == record
        assert sweep()["requeuedJobs"] == []


def test_a_worker_waits_out_a_redis_that_refuses_writes_and_works_again(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    with job_stack(tmp_path, moto_endpoint, s3_bucket) as stack, stack.client() as client:
        create_key(client)
        worker = stack.workers[0]
        with refusing_writes(stack):
            wait_until(lambda: "NOREPLICAS" in worker.output(), "the worker to meet NOREPLICAS")
            time.sleep(6)
            assert worker.process.poll() is None, worker.output()[-3000:]
            refused = worker.output().count("the broker failed")
            assert 2 <= refused <= 5, worker.output()[-3000:]  # 0.5 s, 1 s, 2 s, 4 s apart
        stored = store_object(client, "after.bin", random_chunks(MiB, seed=7))
        record = finished_job(client, stored["verifyJob"], timeout=60)
        assert record["status"] == "succeeded", show(record)
