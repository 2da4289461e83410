"""A batch-encrypt job fanned out across two real Celery worker processes (a redis-server,
the API over HTTP, moto over HTTP), each fault injected at a point the test has seen:

- the worker running the job is killed with SIGKILL mid-job, a chunk of its own in hand:
  the other worker takes the job back and the job completes, every member sealed once
  (objects and records counted against the source, the manifest listing each once),
  with the members' names hidden in their object keys throughout;
- the job is cancelled mid-job: its chunks stop, no upload is left pending, every
  object written is complete and recorded, and no manifest is written.
"""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from storage.records import object_record, record_key
from tests.support.data import random_bytes
from tests.support.http import create_key, read_object
from tests.support.jobs import (
    JOBS,
    JobStack,
    finished_job,
    get_job,
    show,
    wait_for_job,
)
from tests.support.jobs import job_stack as open_job_stack
from tests.support.services import CeleryWorker
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MEMBERS = 60
CHUNK = 6  # members per chunk: ten chunks
TENANT = "tenants/default/"


@pytest.fixture
def stack(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> Iterator[JobStack]:
    """Two workers logging each task's arguments (DEBUG), splitting into small chunks, and
    `MEMBERS` small objects under src/."""
    with open_job_stack(tmp_path, moto_endpoint, s3_bucket, workers=0) as stack:
        stack.worker_env["SEALSTREAM_BATCH_CHUNK_MEMBERS"] = str(CHUNK)
        for _ in range(2):
            stack.start_worker(loglevel="DEBUG")
        for path, data in sources().items():
            moto_s3.put_object(Bucket=s3_bucket, Key=f"{TENANT}src/{path}", Body=data)
        with stack.client() as client:
            create_key(client)
        yield stack


def sources() -> dict[str, bytes]:
    return {f"m/{n:03d}.bin": random_bytes(2000 + 97 * n, seed=n) for n in range(MEMBERS)}


def start_batch(client: httpx.Client, names: str = "plain") -> str:
    response = client.post(
        f"{JOBS}/batch-encrypt",
        json={
            "kid": "mySymKey",
            "source": {"prefix": "src/"},
            "destination": {"prefix": "out/"},
            "names": names,
        },
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def runs(worker: CeleryWorker, job_id: str) -> bool:
    """Whether the worker took a task of `job_id` itself (not one of its chunks)."""
    return re.search(r"TaskPool: Apply .*'" + re.escape(job_id) + "'", worker.output()) is not None


def chunks(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get(JOBS, params={"kind": "batch-encrypt-chunk", "limit": 500})
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["jobs"]
    return listed


def stored(moto_s3: "S3Client", bucket: str, prefix: str) -> list[str]:
    pages = moto_s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(entry["Key"] for page in pages for entry in page.get("Contents", []))


def test_a_killed_workers_share_is_redone_each_member_once(
    stack: JobStack, moto_s3: "S3Client"
) -> None:
    bucket = stack.api.objects.bucket
    files = sources()
    with stack.client() as client:
        job_id = start_batch(client, names="encrypted")
        # Two chunks running at once: one on each worker (the job's own worker runs
        # chunks too while it waits); then kill the worker running the job.
        wait_until(
            lambda: sum(chunk["status"] == "running" for chunk in chunks(client)) == 2,
            "a chunk running on each worker",
            timeout=60,
        )
        [parent] = [worker for worker in stack.workers if runs(worker, job_id)]
        parent.kill()
        mid = get_job(client, job_id)
        assert mid["progress"]["itemsDone"] < MEMBERS, show(mid)
        record = finished_job(client, job_id, timeout=120)
        assert record["status"] == "succeeded", show(record)
        assert record["attempts"] == 2, show(record)
        result = record["result"]
        assert result["chunks"] == MEMBERS // CHUNK
        assert result["counts"]["sealed"] == MEMBERS, show(record)
        assert result["counts"]["failed"] == result["counts"]["refused"] == 0, show(record)
        progress = record["progress"]
        assert progress["itemsDone"] == progress["itemsTotal"] == MEMBERS, show(record)
        shares = chunks(client)
        assert {chunk["status"] for chunk in shares} == {"succeeded"}
        print("runs of each chunk:", [chunk["attempts"] for chunk in shares])

        manifest = read_object(client, result["manifestKey"]).json()
        paths = [entry["path"] for entry in manifest["members"]]
        assert sorted(paths) == sorted(files)  # each member once
        for entry in manifest["members"]:  # under its hidden name, it opens to the member
            assert read_object(client, entry["key"]).content == files[entry["path"]]
        keys = [f"{TENANT}{entry['key']}" for entry in manifest["members"]]

    # One object and one record per member, and the manifest's: no more, no fewer; no
    # object key names a member.
    objects = stored(moto_s3, bucket, f"{TENANT}out/")
    assert objects == sorted([*keys, f"{TENANT}out/manifest.json"])
    assert not any(path in key for key in objects for path in files)
    assert_recorded(stack, moto_s3, objects)
    assert not moto_s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert stored(moto_s3, bucket, f"sealstream/jobs/default/{job_id}-") == [
        f"sealstream/jobs/default/{job_id}-{n:04d}.json" for n in range(MEMBERS // CHUNK)
    ]  # the chunks' reports; their journals are gone


def assert_recorded(stack: JobStack, moto_s3: "S3Client", objects: list[str]) -> None:
    """Each of `objects` has its record (a small one's in its metadata), and no record
    file is left of anything else under out/."""
    api, bucket = stack.api, stack.api.objects.bucket
    for key in objects:
        assert object_record(api.records, api.objects, key).key == key
    files = stored(moto_s3, bucket, f"sealstream/objects/{bucket}/{TENANT}out/")
    assert set(files) <= {record_key(bucket, key) for key in objects}


def test_cancelling_the_job_stops_its_chunks(stack: JobStack, moto_s3: "S3Client") -> None:
    bucket = stack.api.objects.bucket
    with stack.client() as client:
        job_id = start_batch(client)
        wait_for_job(
            client,
            job_id,
            lambda r: r["status"] == "running" and r["progress"]["itemsDone"] >= CHUNK,
            "the job running with a chunk's worth of members sealed",
            timeout=60,
        )
        response = client.post(f"{JOBS}/{job_id}/cancel")
        assert response.status_code == 202, response.text
        record = finished_job(client, job_id, timeout=90)
        assert record["status"] == "cancelled", show(record)
        statuses = [chunk["status"] for chunk in chunks(client)]
        assert set(statuses) <= {"succeeded", "cancelled"}, statuses
        assert "cancelled" in statuses
        assert record["progress"]["itemsDone"] < MEMBERS, show(record)

    assert not moto_s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    objects = stored(moto_s3, bucket, f"{TENANT}out/")
    assert 0 < len(objects) < MEMBERS
    assert f"{TENANT}out/manifest.json" not in objects
    assert_recorded(stack, moto_s3, objects)
    assert stored(moto_s3, bucket, f"sealstream/jobs/default/{job_id}.partial/") == []
    with stack.client() as client:
        for key in objects:  # each one whole: it opens
            assert read_object(client, key.removeprefix(TENANT)).status_code == 200
