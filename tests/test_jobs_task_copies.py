"""The record a job's task carries expires, on real parts (a redis-server, a Celery worker
process, the API over HTTP, moto over HTTP): whoever can delete an ended job's final report
from the bucket and send its old task through Redis again cannot run the job a second
time once the copy the task carries has expired, while a copy still in its window (the
legitimate case: a queued job whose record a failover lost) is put back and run."""

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
from redis import Redis

from services.jobs.records import report_key
from services.jobs.store import TaskCopy
from tests.support.http import create_key
from tests.support.jobs import JobStack, finished_job, job_stack, store_object
from tests.support.waiting import wait_until
from workers.celery_app import RUN_JOB, make_celery

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

COPY_TTL = 2  # seconds: the stack's tasks carry copies that expire this soon
QUEUE = "celery"  # Celery's default queue: a Redis list of messages


@pytest.fixture
def stack(moto_endpoint: str, moto_s3: "S3Client", tmp_path: Path) -> Iterator[JobStack]:
    bucket = f"copies-{uuid.uuid4().hex}"
    moto_s3.create_bucket(Bucket=bucket)
    with job_stack(tmp_path, moto_endpoint, bucket, workers=0, task_copy_ttl=COPY_TTL) as stack:
        with stack.client() as client:
            create_key(client)
        yield stack


def carried_copy(message: str) -> TaskCopy:
    """The record copy a queued Celery message carries (its body: args, kwargs, embed)."""
    _, kwargs, _ = json.loads(base64.b64decode(json.loads(message)["body"]))
    return TaskCopy.model_validate(json.loads(kwargs["record"])["record"])


def test_an_ended_jobs_old_task_sent_again_after_its_copy_expired_does_not_run_it(
    stack: JobStack, moto_s3: "S3Client"
) -> None:
    redis = Redis.from_url(stack.redis.url, decode_responses=True)
    with stack.client() as client:
        job_id = store_object(client, "copies/doc.bin", b"a document")["verifyJob"]
        # No worker yet: the job's task waits in the queue, where the test keeps a copy.
        (message,) = cast(list[str], redis.lrange(QUEUE, 0, -1))
        copy = carried_copy(message)
        assert copy.record.id == job_id and copy.record.status == "queued"
        assert copy.expires_at - copy.issued_at == timedelta(seconds=COPY_TTL)

        worker = stack.start_worker()
        assert finished_job(client, job_id)["status"] == "succeeded"

        # The attack: the job's record gone from Redis, its final report from the bucket,
        # and its old task sent again once the copy it carries has expired.
        bucket = stack.services.objects.bucket
        report = report_key("default", job_id)
        redis.delete(f"sealstream:job:{job_id}")
        moto_s3.delete_object(Bucket=bucket, Key=report)
        wait_until(lambda: datetime.now(UTC) > copy.expires_at, "the copy to expire")
        redis.lpush(QUEUE, message)
        wait_until(
            lambda: f"job {job_id}: its task's copy of the record expired" in worker.output(),
            "the worker to refuse the expired copy",
        )
        assert f"job {job_id}: no record" in _after_refusal(worker.output(), job_id)
        assert redis.get(f"sealstream:job:{job_id}") is None
        assert "Contents" not in moto_s3.list_objects_v2(Bucket=bucket, Prefix=report)

        # The same record in a copy still in its window (a queued job whose record a
        # failover lost) is put back and run: only the expiry refused the old task.
        fresh = stack.services.jobs.sealed(copy.record, timedelta(hours=1))
        make_celery(stack.api.settings).send_task(RUN_JOB, args=[job_id], kwargs={"record": fresh})
        wait_until(
            lambda: f"job {job_id}: its record was lost; put back from its task" in worker.output(),
            "the worker to put the record back",
        )
        rerun = finished_job(client, job_id)
        assert rerun["status"] == "succeeded" and rerun["attempts"] == 1
        assert moto_s3.list_objects_v2(Bucket=bucket, Prefix=report)["KeyCount"] == 1


def _after_refusal(output: str, job_id: str) -> str:
    return output[output.index(f"job {job_id}: its task's copy of the record expired") :]
