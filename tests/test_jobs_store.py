"""The job stores on their own, Redis (a real `redis-server`) and memory alike: records
expire and leave their final report readable, and finished jobs are counted once each."""

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from keystore import LocalKek
from sealstream.wiring import open_records
from services.jobs import JobKind, JobRecord, JobStatus, JobStore, MemoryJobStore, RedisJobStore
from storage.local import LocalStore
from tests.support.jobs import placeholder_job
from tests.support.services import RedisServer

TTL = timedelta(seconds=1)  # Redis expires keys in whole seconds


@pytest.fixture(params=["memory", "redis"])
def jobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    reports = open_records(LocalStore(tmp_path / "reports"), LocalKek(os.urandom(32)))
    if request.param == "memory":
        yield MemoryJobStore(reports, TTL)
        return
    redis: RedisServer = request.getfixturevalue("redis_server")
    yield RedisJobStore.from_url(redis.url, reports, TTL, "mymaster")


def finished(record: JobRecord, status: JobStatus) -> JobRecord:
    return record.model_copy(update={"status": status})


def test_a_record_expires_and_its_final_report_stays_readable(jobs: JobStore) -> None:
    done = finished(placeholder_job(JobKind.VERIFY, "default"), JobStatus.SUCCEEDED)
    running = finished(placeholder_job(JobKind.REWRAP, "default"), JobStatus.RUNNING)
    jobs.save(done)
    jobs.write_report(done)
    jobs.save(running)
    jobs.request_cancel(running.id)
    assert jobs.load(done.id) == done
    assert jobs.running_ids() == [running.id]

    time.sleep(TTL.total_seconds() + 0.5)
    assert jobs.load(done.id) is None
    assert jobs.load(running.id) is None
    assert jobs.running_ids() == []
    assert not jobs.cancel_requested(running.id)
    assert jobs.find("default", done.id) == done  # from its report
    assert jobs.find("default", running.id) is None
    assert jobs.list("default") == ([], None)


def test_finished_jobs_are_counted_once_each_by_kind_and_outcome(jobs: JobStore) -> None:
    verify = placeholder_job(JobKind.VERIFY, "default")
    batch = placeholder_job(JobKind.BATCH_ENCRYPT, "other")
    assert jobs.finished_counts() == {}

    jobs.save(verify)
    jobs.save(finished(verify, JobStatus.RUNNING))
    assert jobs.finished_counts() == {}
    for _ in range(3):  # its report rewritten, a late worker: still one job
        jobs.save(finished(verify, JobStatus.SUCCEEDED))
    jobs.save(finished(batch, JobStatus.FAILED))
    jobs.save(finished(placeholder_job(JobKind.VERIFY, "default"), JobStatus.SUCCEEDED))

    assert jobs.finished_counts() == {("verify", "succeeded"): 2, ("batch-encrypt", "failed"): 1}


def test_every_process_sees_the_same_counts_in_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    reports = open_records(LocalStore(tmp_path / "reports"), LocalKek(os.urandom(32)))
    worker, api = (
        RedisJobStore.from_url(redis_server.url, reports, TTL, "mymaster") for _ in range(2)
    )
    worker.save(finished(placeholder_job(JobKind.REWRAP, "default"), JobStatus.CANCELLED))
    assert api.finished_counts() == {("rewrap", "cancelled"): 1}
