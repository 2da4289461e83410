"""A batch-encrypt job's rerun aborts the multipart uploads its killed attempt left
pending and no other writer's (a redis-server, the API over HTTP, real Celery worker
processes, moto over HTTP; the workers reach S3 through a proxy that holds or fails their
part uploads):

- a worker killed while a member larger than one part is being uploaded (its first part
  held): the rerun aborts that upload, which the job journaled before sending the part,
  and leaves another writer's upload of the same key, begun before the job, pending
  with its part; the job completes, nothing else of it left pending. Both for a tar read
  by one job (`workers.batch`) and for a prefix split into chunks (`workers.fanout`);
- a member whose parts the store refuses fails alone, its upload aborted: the job
  completes with nothing of its own left pending.
"""

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support.data import MiB, random_bytes, random_chunks, tar_archive
from tests.support.http import create_key, read_object
from tests.support.jobs import (
    JOBS,
    VISIBILITY_TIMEOUT,
    JobStack,
    finished_job,
    seconds_since,
    show,
)
from tests.support.jobs import job_stack as open_job_stack
from tests.support.s3_proxy import HeldParts, PartsAfter, Rule
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

TENANT = "tenants/default/"
LARGE = "large.bin"
# Over two parts of the stack's (S3's 5 MiB minimum), sealed: a multipart upload.
LARGE_SIZE = 12 * MiB
CHUNK = 2  # members per chunk, where the job is split


def members() -> dict[str, bytes]:
    return {
        "a.txt": random_bytes(3000, seed=1),
        "b.txt": random_bytes(4000, seed=2),
        LARGE: b"".join(random_chunks(LARGE_SIZE, seed=3)),
        "c.txt": random_bytes(5000, seed=4),
    }


StackWith = Callable[[Rule], JobStack]


@pytest.fixture
def stack_with(tmp_path: Path, moto_endpoint: str, s3_bucket: str) -> Iterator[StackWith]:
    """Opens a stack whose one worker reaches S3 through a proxy applying the rule given,
    splitting jobs into chunks of `CHUNK` members, with the tenant's key made."""
    with ExitStack() as exits:

        def open_stack(rule: Rule) -> JobStack:
            stack = exits.enter_context(
                open_job_stack(
                    tmp_path, moto_endpoint, s3_bucket, proxied=True, rule=rule, workers=0
                )
            )
            stack.worker_env["SEALSTREAM_BATCH_CHUNK_MEMBERS"] = str(CHUNK)
            stack.start_worker()
            with stack.client() as client:
                create_key(client)
            return stack

        yield open_stack


def put_source(moto_s3: "S3Client", bucket: str, source: str, files: dict[str, bytes]) -> None:
    """The members as a tar at in/archive.tar, or as objects under src/."""
    if source == "tar":
        body = tar_archive(files)
        moto_s3.put_object(Bucket=bucket, Key=f"{TENANT}in/archive.tar", Body=body)
        return
    for name, data in files.items():
        moto_s3.put_object(Bucket=bucket, Key=f"{TENANT}src/{name}", Body=data)


def start_batch(client: httpx.Client, source: str) -> str:
    response = client.post(
        f"{JOBS}/batch-encrypt",
        json={
            "kid": "mySymKey",
            "source": {"key": "in/archive.tar"} if source == "tar" else {"prefix": "src/"},
            "destination": {"prefix": "out/"},
        },
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def pending(moto_s3: "S3Client", bucket: str) -> list[tuple[str, str]]:
    """(key, upload id) of every multipart upload pending in the bucket."""
    uploads = moto_s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted((upload["Key"], upload["UploadId"]) for upload in uploads)


@pytest.mark.parametrize("source", ["tar", "prefix"])
def test_a_rerun_aborts_its_own_pending_upload_and_no_other_writers(
    stack_with: StackWith, moto_s3: "S3Client", s3_bucket: str, source: str
) -> None:
    held = HeldParts()
    stack = stack_with(held)
    files = members()
    put_source(moto_s3, s3_bucket, source, files)
    large_key = f"{TENANT}out/{LARGE}"
    # Another writer's upload of the key the job will claim, under way before the job.
    theirs = moto_s3.create_multipart_upload(Bucket=s3_bucket, Key=large_key)["UploadId"]
    their_part = moto_s3.upload_part(
        Bucket=s3_bucket, Key=large_key, UploadId=theirs, PartNumber=1, Body=b"theirs"
    )

    with stack.client() as client:
        job_id = start_batch(client, source)
        wait_until(lambda: held.held >= 1, "the large member's first part to be held", 60)
        # The part is held: the upload it belongs to was journaled before it was sent.
        uploads = pending(moto_s3, s3_bucket)
        [own] = [upload_id for key, upload_id in uploads if upload_id != theirs]
        assert uploads == sorted([(large_key, theirs), (large_key, own)])
        killed_at = client.get(f"{JOBS}/{job_id}").json()
        stack.workers[0].kill()
        held.release()
        wait_until(
            lambda: seconds_since(killed_at["startedAt"]) > VISIBILITY_TIMEOUT + 0.5,
            "the visibility timeout to pass",
            timeout=VISIBILITY_TIMEOUT + 5,
        )
        assert (large_key, own) in pending(moto_s3, s3_bucket)  # left by the killed worker
        stack.start_worker()
        record = finished_job(client, job_id, timeout=120)
        assert record["status"] == "succeeded", show(record)
        assert record["attempts"] == 2, show(record)
        counts = record["result"]["counts"]
        assert counts["sealed"] == len(files) and counts["failed"] == 0, show(record)
        for name, data in files.items():
            assert read_object(client, f"out/{name}").content == data, name

    # The job's own upload aborted, nothing else of it left; the other writer's upload is
    # pending still, with its part.
    assert pending(moto_s3, s3_bucket) == [(large_key, theirs)]
    parts = moto_s3.list_parts(Bucket=s3_bucket, Key=large_key, UploadId=theirs)["Parts"]
    assert [part["ETag"] for part in parts] == [their_part["ETag"]]
    moto_s3.abort_multipart_upload(Bucket=s3_bucket, Key=large_key, UploadId=theirs)


def test_a_member_whose_parts_fail_leaves_no_upload_pending(
    stack_with: StackWith, moto_s3: "S3Client", s3_bucket: str
) -> None:
    stack = stack_with(PartsAfter(limit=0))  # every part upload refused
    files = members()
    put_source(moto_s3, s3_bucket, "tar", files)

    with stack.client() as client:
        record = finished_job(client, start_batch(client, "tar"), timeout=120)
        assert record["status"] == "succeeded", show(record)
        result = record["result"]
        assert result["counts"]["sealed"] == len(files) - 1, show(record)
        assert [failure["path"] for failure in result["failed"]] == [LARGE], show(record)

    assert pending(moto_s3, s3_bucket) == []
