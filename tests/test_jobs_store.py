"""The job stores on their own, Redis (a real `redis-server`) and memory alike: records
expire and leave their final report readable and listed, and finished jobs are counted
once each."""

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keystore import LocalKek
from sealstream.wiring import open_records
from services.jobs import JobKind, JobRecord, JobStatus, JobStore, MemoryJobStore, RedisJobStore
from services.jobs.records import report_key
from services.jobs.store import SCAN_PER_PAGE
from storage.integrity import seal
from storage.local import LocalStore
from tests.support.jobs import placeholder_job
from tests.support.services import RedisServer

TTL = timedelta(seconds=1)  # Redis expires keys in whole seconds
COPY_LIFETIME = timedelta(minutes=5)


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
    assert jobs.list("default") == ([done], None)  # listed from its report too


def test_jobs_are_listed_newest_first_from_live_records_and_reports_alike(
    jobs: JobStore, tmp_path: Path
) -> None:
    """A restart (a new store on the same reports) lists what had finished, page by page,
    each job once, and skips a report altered in storage; live records come first where
    both exist."""
    made = []
    for n in range(7):
        record = placeholder_job(JobKind.VERIFY if n % 2 else JobKind.REWRAP, "default")
        made.append(finished(record, JobStatus.SUCCEEDED))
        time.sleep(0.002)  # ids count down by the millisecond
    made.reverse()  # newest first
    for record in made:
        jobs.save(record)
        jobs.write_report(record)
    queued = placeholder_job(JobKind.VERIFY, "default")
    jobs.save(queued)  # no report yet
    jobs.write_report(finished(placeholder_job(JobKind.VERIFY, "other"), JobStatus.FAILED))
    assert [r.id for r in jobs.list("default", limit=50)[0]] == [queued.id, *(r.id for r in made)]

    restarted = MemoryJobStore(jobs._reports, TTL)
    altered = made[3]
    path = tmp_path / "reports" / report_key("default", altered.id)
    path.write_bytes(path.read_bytes().replace(b"succeeded", b"cancelled"))
    pages, cursor = [], None
    while True:
        page, cursor = restarted.list("default", limit=2, after=cursor)
        pages.append([r.id for r in page])
        if cursor is None:
            break
    expected = [r.id for r in made if r is not altered]
    assert pages == [expected[0:2], expected[2:4], expected[4:6]]
    only_verify, _ = restarted.list("default", kind=JobKind.VERIFY)
    assert [r.id for r in only_verify] == [
        r.id for r in made if r.kind is JobKind.VERIFY and r is not altered
    ]


def test_a_filter_that_matches_little_reads_a_bounded_page(tmp_path: Path) -> None:
    reports = open_records(LocalStore(tmp_path / "reports"), LocalKek(os.urandom(32)))
    jobs = MemoryJobStore(reports, TTL)
    rare = finished(placeholder_job(JobKind.VERIFY, "default"), JobStatus.FAILED)
    jobs.write_report(rare)
    for _ in range(SCAN_PER_PAGE + 5):
        jobs.write_report(finished(placeholder_job(JobKind.VERIFY, "default"), JobStatus.SUCCEEDED))
    seen: Counter[str] = Counter()
    cursor: str | None = None
    pages = 0
    while pages == 0 or cursor is not None:
        page, cursor = jobs.list("default", status=JobStatus.FAILED, after=cursor)
        seen.update(r.id for r in page)
        pages += 1
        assert pages <= 3
    assert seen == {rare.id: 1}
    assert pages == 2  # the first page stopped after SCAN_PER_PAGE reads, with a cursor


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


def test_a_record_is_put_back_only_from_an_authentic_queued_copy_of_a_job_not_ended(
    jobs: JobStore, tmp_path: Path
) -> None:
    queued = placeholder_job(JobKind.VERIFY, "default")
    carried = jobs.sealed(queued, COPY_LIFETIME)
    other = placeholder_job(JobKind.VERIFY, "default")
    forged = open_records(LocalStore(tmp_path / "elsewhere"), LocalKek(os.urandom(32)))
    live_form = json.loads(jobs.sealed(queued, COPY_LIFETIME))
    refused = [
        (other.id, carried),  # a copy of another job
        (queued.id, carried.replace('"default"', '"other"')),  # edited
        (queued.id, MemoryJobStore(forged, TTL).sealed(queued, COPY_LIFETIME)),  # not our KEK
        (queued.id, jobs.sealed(finished(queued, JobStatus.RUNNING), COPY_LIFETIME)),
        (queued.id, jobs.sealed(queued, timedelta(0))),  # expired as it was sealed
        # Its expiry moved on, under the copy's MAC: the MAC covers it.
        (queued.id, json.dumps(_with_expiry(live_form, "2999-01-01T00:00:00Z"))),
        # The record alone, as Redis keeps it: no expiry, so never a task's copy.
        (queued.id, seal(jobs._reports.key, "job", queued.id, queued).decode()),
    ]
    for job_id, copy in refused:
        assert jobs.restore(job_id, copy) is None
        assert jobs.load(job_id) is None

    assert jobs.restore(queued.id, carried) == queued
    assert jobs.load(queued.id) == queued

    ended = placeholder_job(JobKind.VERIFY, "default")
    jobs.write_report(finished(ended, JobStatus.SUCCEEDED))  # its record expired since
    assert jobs.restore(ended.id, jobs.sealed(ended, COPY_LIFETIME)) is None
    assert jobs.load(ended.id) is None


def _with_expiry(document: dict[str, Any], moment: str) -> dict[str, Any]:
    return {**document, "record": {**document["record"], "expiresAt": moment}}
