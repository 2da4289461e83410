"""Jobs on real parts: a redis-server, Celery worker processes and the API over HTTP, on a
moto S3 server over HTTP, all started here on free ports.

- Encrypt-to-storage starts a verify job that a worker process runs to `succeeded`; a
  tampered object (a flip_bit ciphertext byte, a truncated object, a changed recorded
  digest, a missing upload record) fails verification with a clear reason code.
- A tenant can neither see, list nor cancel another tenant's jobs; listing filters and pages.
- Faults, each injected at a point the test has seen (a running job with bytes done; the
  worker's S3 downloads paced and held by a proxy): a worker killed with SIGKILL, its job
  redone by a new worker after the visibility timeout; a pool process killed, its job
  requeued at once; Redis restarted empty mid-job (and the job routes while it is down); a
  lost worker's job failed by the stale sweep; a running job cancelled; a batch-encrypt
  worker killed mid-archive.
- Jobs that take their worker down: one whose pool process is killed during two runs is
  failed rather than run a third time; one that needs more memory than a pool process may
  use fails alone (the process lives on); either way the worker's next job runs.
"""

import hashlib
import json
import os
import re
import signal
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from redis import Redis

import workers.celery_app as celery_module
from sealstream.capacity import available_memory
from sealstream.settings import Settings
from sealstream.wiring import build_parts
from services.jobs import JobKind
from storage.records import object_record
from tests.support.data import MiB, flip_bit, random_bytes, random_chunks, tar_archive
from tests.support.envelope import frame_count, frame_offset
from tests.support.http import create_key, problem, read_object
from tests.support.jobs import (
    FINAL,
    JOBS,
    VISIBILITY_TIMEOUT,
    JobStack,
    finished_job,
    get_job,
    running_with_progress,
    seconds_since,
    show,
    start_verify,
    store_object,
    wait_for_job,
)
from tests.support.jobs import job_stack as open_job_stack
from tests.support.memory import PeakRss
from tests.support.services import CeleryWorker
from tests.support.waiting import wait_until
from workers.celery_app import RUN_JOB, SWEEPS, make_celery
from workers.lifecycle import run_sweeps
from workers.memory_limit import MIN_DEFAULT_LIMIT
from workers.registry import JOB_BODIES
from workers.runner import CeleryRunner

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1024
BIG = 24 * MiB  # at the proxy's 8 MiB/s, a verify of this streams for about 3 s
PACE = 8 * MiB


@pytest.fixture(scope="module")
def shared_stack(
    moto_endpoint: str, moto_s3: "S3Client", tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JobStack]:
    """One stack for the tests that break nothing. Its worker logs at DEBUG, where Celery
    names each task's arguments: the log shows which job ids the worker process ran."""
    bucket = f"jobs-{uuid.uuid4().hex}"
    moto_s3.create_bucket(Bucket=bucket)
    directory = tmp_path_factory.mktemp("jobs")
    with open_job_stack(directory, moto_endpoint, bucket, worker_loglevel="DEBUG") as stack:
        with stack.client() as client:
            create_key(client)
        yield stack


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def task_ids(worker: CeleryWorker, job_id: str) -> list[str]:
    """The ids of the Celery tasks the worker took for `job_id` (from its DEBUG log)."""
    pattern = re.compile(r"TaskPool: Apply .*?'id': '([0-9a-f-]+)'.*?" + re.escape(job_id))
    return pattern.findall(worker.output())


def received(worker: CeleryWorker) -> list[str]:
    return re.findall(rf"Task {RUN_JOB}\[([0-9a-f-]+)\] received", worker.output())


def succeeded(worker: CeleryWorker) -> list[str]:
    return re.findall(rf"Task {RUN_JOB}\[([0-9a-f-]+)\] succeeded", worker.output())


def succeeded_once_logged(worker: CeleryWorker) -> list[str]:
    """`succeeded(worker)`, once the worker has logged a success: the task finishes its
    job's record itself, a moment before the worker's main process logs that it returned."""
    wait_until(lambda: bool(succeeded(worker)), "the worker to log the task's success")
    return succeeded(worker)


def issue_token(client: httpx.Client, tenant: str, scopes: list[str]) -> str:
    response = client.post("/api/admin/tokens", json={"tenant": tenant, "scopes": scopes})
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def start_batch(client: httpx.Client, key: str) -> str:
    """Start a batch-encrypt job of the archive `key` into out/; the job's id."""
    response = client.post(
        f"{JOBS}/batch-encrypt",
        json={"kid": "mySymKey", "source": {"key": key}, "destination": {"prefix": "out/"}},
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


TENANT_SCOPES = ["keys:write", "crypto:encrypt", "crypto:decrypt", "jobs:read", "jobs:write"]


# Configuration


def test_celery_app_is_configured_to_redo_a_killed_workers_job(shared_stack: JobStack) -> None:
    """acks_late, reject_on_worker_lost, prefetch 1 and the visibility timeout from the
    settings: in an app made from settings, in the module's app, and in a running worker,
    whose pool process also holds itself to the default memory limit."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", job_visibility_timeout=1234)
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 1234
    assert conf.broker_url == settings.redis_url

    module_app = celery_module.app
    assert {RUN_JOB, SWEEPS} <= set(module_app.tasks)
    assert module_app.conf.task_acks_late and module_app.conf.task_reject_on_worker_lost
    assert module_app.conf.beat_schedule["sweeps"]["task"] == SWEEPS

    # The worker process built its app from SEALSTREAM_* in its environment.
    worker = shared_stack.workers[0]
    control = make_celery(shared_stack.api.settings)
    try:
        replies = control.control.inspect(destination=[worker.hostname], timeout=10).conf()
    finally:
        control.close()
    assert replies is not None and worker.hostname in replies, replies
    live = replies[worker.hostname]
    assert live["task_acks_late"] is True
    assert live["task_reject_on_worker_lost"] is True
    assert live["worker_prefetch_multiplier"] == 1
    assert live["broker_transport_options"]["visibility_timeout"] == VISIBILITY_TIMEOUT

    # An API with a Redis URL hands its jobs to Celery; it runs none itself.
    assert isinstance(shared_stack.services.runner, CeleryRunner)

    # With no memory limit configured, its one pool process takes the machine's memory.
    [pool] = worker.pool_pids()
    expected = max(available_memory(), MIN_DEFAULT_LIMIT)
    wait_until(lambda: address_space_limit(pool) == expected, "the default memory limit")


# Verify jobs


def test_encrypt_to_storage_is_verified_by_a_worker_process(shared_stack: JobStack) -> None:
    data = b"".join(random_chunks(3 * MiB + 17, seed=1))
    with shared_stack.client() as client:
        stored = store_object(client, "verify/plain.bin", data, frameLength=64 * KiB)
        job_id = stored["verifyJob"]
        record = finished_job(client, job_id)
    assert record["status"] == "succeeded", show(record)
    assert record["kind"] == "verify" and record["tenant"] == "default"
    assert record["attempts"] == 1
    assert record["error"] is None
    result = record["result"]
    assert result["verified"] is True
    assert result["key"] == "verify/plain.bin"
    assert result["plaintextSha256"] == stored["plaintextSha256"] == sha256(data)
    assert result["plaintextSize"] == len(data)
    assert result["ciphertextSize"] == stored["ciphertextSize"]
    assert record["progress"]["bytesDone"] == record["progress"]["bytesTotal"]
    assert record["progress"]["bytesTotal"] == stored["ciphertextSize"]

    # Run by the worker process: its log names the job, and that task succeeded there.
    worker = shared_stack.workers[0]
    tasks = task_ids(worker, job_id)
    assert len(tasks) == 1, worker.output()[-3000:]
    assert tasks[0] in succeeded_once_logged(worker)


def frame_tampered(message: bytes) -> bytes:
    """A byte of a middle frame's ciphertext flip_bit."""
    middle = frame_offset(message, frame_count(message) // 2)
    return flip_bit(message, middle + 4 + 12 + 100)  # past the sequence number and IV


def truncated(message: bytes) -> bytes:
    """Cut inside a middle frame."""
    return message[: frame_offset(message, frame_count(message) // 2) + 1000]


@pytest.mark.parametrize(
    ("damage", "codes"),
    [
        ("frame", {"frame-authentication-failed"}),
        ("truncate", {"truncated-message"}),
        ("rolled-back", {"object-replaced"}),
        ("moved", {"object-misplaced"}),
        ("record", {"record-tampered"}),
        ("no-record", {"object-record-missing"}),
    ],
)
def test_a_tampered_object_fails_verification(
    shared_stack: JobStack, moto_s3: "S3Client", damage: str, codes: set[str]
) -> None:
    bucket = shared_stack.api.objects.bucket
    key = f"tamper/{damage}.bin"
    data = b"".join(random_chunks(MiB + 333, seed=2))
    with shared_stack.client() as client:
        stored = store_object(client, key, data, frameLength=64 * KiB)
        first = finished_job(client, stored["verifyJob"])
        assert first["status"] == "succeeded", show(first)

        storage_key = stored["storageKey"]
        record_key = f"sealstream/objects/{bucket}/{storage_key}.json"
        message = moto_s3.get_object(Bucket=bucket, Key=storage_key)["Body"].read()
        if damage == "frame":
            moto_s3.put_object(Bucket=bucket, Key=storage_key, Body=frame_tampered(message))
        elif damage == "truncate":
            moto_s3.put_object(Bucket=bucket, Key=storage_key, Body=truncated(message))
        elif damage == "rolled-back":
            # An older authentic version of the object, put back under its record: every
            # frame opens, so only the plaintext digest recorded at upload tells it apart.
            overwritten = store_object(
                client,
                key,
                data[::-1],
                frameLength=64 * KiB,
                destination={"key": key, "overwrite": True},
            )
            assert finished_job(client, overwritten["verifyJob"])["status"] == "succeeded"
            moto_s3.put_object(Bucket=bucket, Key=storage_key, Body=message)
        elif damage == "moved":
            # Another authentic object of the same size, under the same key, copied here.
            other = store_object(client, f"{key}.other", data[::-1], frameLength=64 * KiB)
            body = moto_s3.get_object(Bucket=bucket, Key=other["storageKey"])["Body"].read()
            moto_s3.put_object(Bucket=bucket, Key=storage_key, Body=body)
        elif damage == "record":
            # The record says another plaintext, but a bucket writer cannot seal it.
            document = json.loads(moto_s3.get_object(Bucket=bucket, Key=record_key)["Body"].read())
            assert document["record"]["plaintextSha256"] == sha256(data)
            document["record"]["plaintextSha256"] = sha256(b"something else")
            moto_s3.put_object(Bucket=bucket, Key=record_key, Body=json.dumps(document).encode())
        else:
            moto_s3.delete_object(Bucket=bucket, Key=record_key)

        job = start_verify(client, key)
        assert job["status"] == "queued" and job["kind"] == "verify"
        record = finished_job(client, job["id"])
    assert record["status"] == "failed", show(record)
    assert record["error"]["code"] in codes, show(record)
    assert record["error"]["detail"], show(record)
    assert record["result"] is None
    assert record["attempts"] == 1


# Redis is not a root of trust either


def test_job_records_altered_or_planted_in_redis_or_tasks_are_refused(
    shared_stack: JobStack,
) -> None:
    redis = Redis.from_url(shared_stack.redis.url, decode_responses=True)
    with shared_stack.client() as client:
        stored = store_object(client, "redis/doc.bin", b"a document")
        done = finished_job(client, stored["verifyJob"])
        assert done["status"] == "succeeded", show(done)
        # A finished job's record, its verdict changed and its MAC left as it was.
        key = f"sealstream:job:{done['id']}"
        sealed = json.loads(str(redis.get(key)))
        sealed["record"]["result"]["plaintextSize"] = 1
        redis.set(key, json.dumps(sealed))
        problem(client.get(f"{JOBS}/{done['id']}"), 502, "record-tampered")

        # A job record planted as another tenant's, and its task queued: never run.
        planted_id = f"job_{uuid.uuid4().hex[:24]}"
        planted = dict(sealed["record"], id=planted_id, status="queued", tenant="acme")
        planted["params"] = {**planted["params"], "storageKey": "tenants/acme/secret.bin"}
        redis.set(f"sealstream:job:{planted_id}", json.dumps(planted))
        redis.zadd("sealstream:jobs:default", {planted_id: 0})
        make_celery(shared_stack.api.settings).send_task(RUN_JOB, args=[planted_id])
        worker = shared_stack.workers[0]
        wait_until(
            lambda: f"job {planted_id}: its record failed authentication" in worker.output(),
            "the worker to refuse the planted job",
        )
        assert json.loads(str(redis.get(f"sealstream:job:{planted_id}"))) == planted  # untouched

        # A task carrying a record of its own for a job Redis has none of (as a worker
        # puts back a record a failover lost): the copy fails authentication, so it is
        # neither saved nor run.
        carried_id = f"job_{uuid.uuid4().hex[:24]}"
        carried = json.dumps(dict(sealed, record=dict(planted, id=carried_id)))
        app = make_celery(shared_stack.api.settings)
        app.send_task(RUN_JOB, args=[carried_id], kwargs={"record": carried})
        wait_until(
            lambda: f"job {carried_id}: no record" in worker.output(),
            "the worker to refuse the carried record",
        )
        assert redis.get(f"sealstream:job:{carried_id}") is None
        listed = client.get(JOBS, params={"limit": 500}).json()["jobs"]
        assert planted_id not in {job["id"] for job in listed}
        assert done["id"] not in {job["id"] for job in listed}  # refused, so not listed


# Tenants, listing


def test_a_tenant_cannot_see_or_cancel_another_tenants_jobs(shared_stack: JobStack) -> None:
    with shared_stack.client() as admin:
        theirs = store_object(admin, "isolation/doc.bin", b"default tenant's data")["verifyJob"]
        assert finished_job(admin, theirs)["status"] == "succeeded"
        acme_token = issue_token(admin, "acme", TENANT_SCOPES)
        with shared_stack.client(acme_token) as acme:
            problem(acme.get(f"{JOBS}/{theirs}"), 404, "job-not-found")
            problem(acme.post(f"{JOBS}/{theirs}/cancel"), 404, "job-not-found")
            listed = acme.get(JOBS, params={"limit": 500})
            assert listed.status_code == 200, listed.text
            assert theirs not in [job["id"] for job in listed.json()["jobs"]]
            # Nor can it reach the other tenant's object to verify it.
            assert acme.post(f"{JOBS}/verify", json={"key": "isolation/doc.bin"}).status_code == 404

            # And the other way round.
            create_key(acme)
            ours = store_object(acme, "isolation/doc.bin", b"acme's data")["verifyJob"]
            assert finished_job(acme, ours)["status"] == "succeeded"
            assert [job["id"] for job in acme.get(JOBS).json()["jobs"]] == [ours]
        problem(admin.get(f"{JOBS}/{ours}"), 404, "job-not-found")
        problem(admin.post(f"{JOBS}/{ours}/cancel"), 404, "job-not-found")
        assert ours not in [
            job["id"] for job in admin.get(JOBS, params={"limit": 500}).json()["jobs"]
        ]
        # Its own finished job: the owner gets 409, where a stranger got 404.
        problem(admin.post(f"{JOBS}/{theirs}/cancel"), 409, "job-finished")
        assert get_job(admin, theirs)["status"] == "succeeded"


def test_jobs_are_listed_by_status_and_kind_one_page_at_a_time(
    shared_stack: JobStack, moto_s3: "S3Client"
) -> None:
    tenant = f"pager-{uuid.uuid4().hex[:8]}"
    with shared_stack.client() as admin:
        token = issue_token(admin, tenant, TENANT_SCOPES)
    with shared_stack.client(token) as client:
        create_key(client)
        started = [store_object(client, f"page/{n}.bin", b"x" * n)["verifyJob"] for n in range(3)]
        for job_id in started:
            assert finished_job(client, job_id)["status"] == "succeeded"
        # An object with no upload record: its verify job fails.
        bucket = shared_stack.api.objects.bucket
        moto_s3.put_object(Bucket=bucket, Key=f"tenants/{tenant}/page/stray.bin", Body=b"?")
        failed = start_verify(client, "page/stray.bin")["id"]
        assert finished_job(client, failed)["status"] == "failed"

        pages: list[list[str]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"status": "succeeded", "kind": "verify", "limit": 1}
            if cursor is not None:
                params["after"] = cursor
            response = client.get(JOBS, params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            pages.append([job["id"] for job in page["jobs"]])
            cursor = page["next"]
            if cursor is None:
                break
            assert cursor == page["jobs"][-1]["id"]
            assert len(pages) <= len(started), pages
        assert pages == [[job_id] for job_id in reversed(started)]  # newest first

        by_status = client.get(JOBS, params={"status": "failed"}).json()
        assert [job["id"] for job in by_status["jobs"]] == [failed]
        assert by_status["next"] is None
        everything = client.get(JOBS).json()
        assert [job["id"] for job in everything["jobs"]] == [failed, *reversed(started)]
        assert client.get(JOBS, params={"kind": "batch-encrypt"}).json()["jobs"] == []
        problem(client.get(JOBS, params={"status": "stuck"}), 422, "invalid-request")


# Faults


def verify_held_mid_stream(stack: JobStack, client: httpx.Client) -> tuple[dict[str, Any], str]:
    """Store a big object, and hold its verify job in the middle of the worker's download:
    the record shows it running with some bytes done. The 201 body and the job's id."""
    assert stack.proxy is not None
    stack.proxy.pace(PACE)
    stored = store_object(client, "big.bin", random_chunks(BIG, seed=7))
    job_id = stored["verifyJob"]
    wait_for_job(client, job_id, running_with_progress, "the verify job running with progress")
    stack.proxy.hold()
    wait_until(stack.proxy.holding, "the worker's download held at the proxy")
    record = get_job(client, job_id)
    assert running_with_progress(record), show(record)
    return stored, job_id


def assert_verified(record: dict[str, Any], stored: dict[str, Any]) -> None:
    assert record["status"] == "succeeded", show(record)
    assert record["error"] is None
    assert record["result"]["verified"] is True
    assert record["result"]["plaintextSha256"] == stored["plaintextSha256"]
    assert record["progress"]["bytesTotal"] == stored["ciphertextSize"]


def test_a_job_whose_worker_was_killed_is_redone_by_a_new_worker(job_stack: JobStack) -> None:
    """SIGKILL to the whole worker (no process left to reject the message): the message
    stays unacknowledged in Redis, and a worker that starts once the visibility timeout
    has passed takes it back and runs the job again."""
    first = job_stack.workers[0]
    with job_stack.client() as client:
        stored, job_id = verify_held_mid_stream(job_stack, client)
        started_at = get_job(client, job_id)["startedAt"]
        first.kill()
        assert job_stack.proxy is not None
        job_stack.proxy.release()
        assert get_job(client, job_id)["status"] == "running"  # nobody is running it now

        # Kombu hands back unacknowledged messages older than the visibility timeout when
        # a worker starts (a running worker looks again only every ~100 s: see the report).
        wait_until(
            lambda: seconds_since(started_at) > VISIBILITY_TIMEOUT + 0.5,
            "the visibility timeout to pass since the job was delivered",
            timeout=VISIBILITY_TIMEOUT + 5,
        )
        second = job_stack.start_worker()
        record = finished_job(client, job_id, timeout=60)
    assert_verified(record, stored)
    assert record["attempts"] == 2, show(record)
    assert received(first) and not succeeded(first), first.output()[-3000:]
    # The same task, perhaps more than once: while the killed worker's lease on the job
    # lasts, a delivery finds it held and comes back later (a retry), never runs beside it.
    assert set(received(second)) == set(received(first)), second.output()[-3000:]
    assert succeeded_once_logged(second) == received(first)


def redo_after_pool_kill(stack: JobStack) -> tuple[dict[str, Any], dict[str, Any]]:
    """Kill the pool process mid-job; the 201 body of the object and the final record."""
    worker = stack.workers[0]
    with stack.client() as client:
        stored, job_id = verify_held_mid_stream(stack, client)
        pool = worker.pool_pids()
        assert len(pool) == 1, pool
        os.kill(pool[0], signal.SIGKILL)
        assert stack.proxy is not None
        stack.proxy.release()
        return stored, finished_job(client, job_id, timeout=60)


def test_a_job_whose_pool_process_was_killed_is_redone_at_once_and_counted_once(
    job_stack: JobStack,
) -> None:
    """SIGKILL to the pool process only: the worker's main process sees it lost and, with
    reject_on_worker_lost, puts the message back at once; a new pool process redoes it.
    A client polling the redone job sees bytes done never exceed the total."""
    stored, record = redo_after_pool_kill(job_stack)
    assert_verified(record, stored)
    assert record["attempts"] == 2, show(record)
    worker = job_stack.workers[0]
    tasks = received(worker)
    # Redelivered at once; a delivery that finds the dead process's lease still held is
    # retried later, so the one task may be received more than twice, but runs once more.
    assert len(tasks) >= 2 and len(set(tasks)) == 1, worker.output()[-3000:]
    assert len(succeeded_once_logged(worker)) == 1, worker.output()[-3000:]
    progress = record["progress"]
    assert progress["bytesDone"] == progress["bytesTotal"], (
        "the redone verify counted the first attempt's bytes again:\n" + show(record)
    )


def test_redis_restarted_mid_job_the_job_still_ends(job_stack: JobStack) -> None:
    """Redis stops while a verify job runs and comes back empty on the same port. The job
    must end `succeeded` or `failed` (the stale sweep's verdict), never stay `running`.

    What happens: the worker keeps verifying while its progress writes fail (it logs
    them); once Redis is back, its next write puts the record back and it finishes the
    job: `succeeded`. Until that write the record is gone and the API answers 404."""
    worker = job_stack.workers[0]
    assert job_stack.proxy is not None
    with job_stack.client() as client:
        stored, job_id = verify_held_mid_stream(job_stack, client)
        job_stack.redis.stop()
        job_stack.proxy.release(PACE)  # the job goes on while Redis is away
        wait_until(
            lambda: f"job {job_id}: cannot reach the job store" in worker.output(),
            "the worker to find the job store gone",
        )
        job_stack.redis.start()  # the same port, empty
        job_stack.proxy.release()

        seen: list[str] = []

        def ended() -> bool:
            response = client.get(f"{JOBS}/{job_id}")
            assert response.status_code in (200, 404), response.text
            seen.append(response.json()["status"] if response.status_code == 200 else "absent")
            return seen[-1] in FINAL

        wait_until(ended, "the job to end after the Redis restart", timeout=60)
        record = get_job(client, job_id)
    outcome = record["status"]
    assert outcome in ("succeeded", "failed"), show(record)
    if outcome == "failed":  # the worker could not write it back: the stale sweep did
        assert record["error"]["code"] == "job-stale", show(record)
    else:
        assert_verified(record, stored)
        assert record["attempts"] == 1
    print(f"after the Redis restart the job ended {outcome}; statuses polled: {set(seen)}")

    # The worker is back on the broker too: a new job is taken and run.
    with job_stack.client() as client:
        again = store_object(client, "after-restart.bin", b"small")["verifyJob"]
        assert finished_job(client, again, timeout=60)["status"] == "succeeded"


def test_the_job_routes_answer_503_while_redis_is_down(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    """While Redis is away, polling, listing and cancelling answer a 503 problem, as
    starting a job and /readyz do: a client retries; it is not told the server broke."""
    with open_job_stack(tmp_path, moto_endpoint, s3_bucket, workers=0) as stack:
        with stack.client() as client:
            create_key(client)
            job_id = store_object(client, "small.bin", b"data")["verifyJob"]
            assert get_job(client, job_id)["status"] == "queued"  # no worker
        stack.redis.stop()
        answers = {}
        for method, path in [
            ("POST", f"{JOBS}/verify"),
            ("GET", f"{JOBS}/{job_id}"),
            ("GET", JOBS),
            ("POST", f"{JOBS}/{job_id}/cancel"),
        ]:
            body = {"key": "small.bin"} if path.endswith("/verify") else None
            with stack.client() as client:  # a connection each: a 500 closes it
                response = client.request(method, path, json=body)
            answers[f"{method} {path}"] = (response.status_code, response.headers["content-type"])
    assert all(answer == (503, "application/problem+json") for answer in answers.values()), answers


def test_a_lost_workers_job_is_failed_by_the_stale_sweep(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    """A worker dies and none takes its place: the stale sweep fails the job (it would
    otherwise show `running` for ever); a worker that later takes the message back leaves
    the failed job alone."""
    with open_job_stack(tmp_path, moto_endpoint, s3_bucket, proxied=True, stale_after=2) as stack:
        assert stack.proxy is not None
        with stack.client() as client:
            create_key(client)
            stored, job_id = verify_held_mid_stream(stack, client)
            stack.workers[0].kill()
            stack.proxy.release()

            services = build_parts(stack.api.settings)
            submit = CeleryRunner(stack.api.settings, stack.services.jobs).submit

            def swept() -> bool:  # the periodic sweeps task's body, as beat runs it
                return job_id in run_sweeps(services, submit)["staleJobs"]

            wait_until(swept, "the sweep to fail the stale job")
            record = get_job(client, job_id)
            assert record["status"] == "failed", show(record)
            assert record["error"]["code"] == "job-stale", show(record)
            assert record["finishedAt"] is not None and record["attempts"] == 1

            # The message is still unacknowledged: a worker started after the visibility
            # timeout runs it, and the job, already failed, is left as it is.
            wait_until(
                lambda: seconds_since(record["startedAt"]) > VISIBILITY_TIMEOUT + 0.5,
                "the visibility timeout to pass",
                timeout=VISIBILITY_TIMEOUT + 5,
            )
            late = stack.start_worker()
            wait_until(lambda: bool(succeeded(late)), "the late worker to run the message")
            after = get_job(client, job_id)
        assert after["status"] == "failed" and after["attempts"] == 1, show(after)
        assert stored["verifyJob"] == job_id


def test_cancel_a_running_job(job_stack: JobStack, moto_s3: "S3Client") -> None:
    assert job_stack.proxy is not None
    bucket = job_stack.api.objects.bucket
    with job_stack.client() as client:
        stored, job_id = verify_held_mid_stream(job_stack, client)
        response = client.post(f"{JOBS}/{job_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "running"  # stopped at its next checkpoint
        job_stack.proxy.release(PACE)
        record = finished_job(client, job_id)
        assert record["status"] == "cancelled", show(record)
        assert record["error"] is None and record["finishedAt"] is not None
        assert record["progress"]["bytesDone"] < record["progress"]["bytesTotal"]
        problem(client.post(f"{JOBS}/{job_id}/cancel"), 409, "job-finished")
    # A verify job writes nothing: the object alone, and no upload left pending.
    listed = moto_s3.list_objects_v2(Bucket=bucket, Prefix="tenants/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [stored["storageKey"]]
    assert not moto_s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


# Batch encryption


@pytest.mark.skipif(
    JobKind.BATCH_ENCRYPT not in JOB_BODIES,
    reason="no batch-encrypt job body is registered in workers.registry.JOB_BODIES yet",
)
def test_a_batch_whose_worker_was_killed_seals_each_member_once(
    job_stack: JobStack, moto_s3: "S3Client"
) -> None:
    """SIGKILL to the worker with some members of a 60-member archive sealed and several
    in flight (small ones sealed in waves, larger ones streamed); a new worker resumes the
    job: each member is listed once in the manifest, stored once with its record, and
    decrypts to the member; no upload is left pending."""
    bucket = job_stack.api.objects.bucket
    members: dict[str, bytes] = {}
    for n in range(60):  # twenty small members, ten larger, and again
        if n % 30 < 20:
            members[f"small/{n:02d}.bin"] = random_bytes(512 + n * 997, seed=n)
        else:
            size = MiB + (n * 149 * KiB) % (3 * MiB)
            members[f"docs/{n:02d}.bin"] = b"".join(random_chunks(size, seed=n))
    archive = tar_archive(members)
    moto_s3.put_object(Bucket=bucket, Key="tenants/default/in/archive.tar", Body=archive)
    first = job_stack.workers[0]
    with job_stack.client() as client:
        job_id = start_batch(client, "in/archive.tar")
        killed_at = wait_for_job(
            client,
            job_id,
            lambda r: r["status"] == "running" and r["progress"]["itemsDone"] >= 5,
            "five members sealed",
            timeout=60,
        )
        first.kill()
        assert killed_at["progress"]["itemsDone"] < len(members), show(killed_at)
        wait_until(
            lambda: seconds_since(killed_at["startedAt"]) > VISIBILITY_TIMEOUT + 0.5,
            "the visibility timeout to pass",
            timeout=VISIBILITY_TIMEOUT + 5,
        )
        job_stack.start_worker()
        record = finished_job(client, job_id, timeout=90)
        assert record["status"] == "succeeded", show(record)
        assert record["attempts"] == 2, show(record)
        result = record["result"]
        assert result["counts"]["sealed"] == len(members), show(record)
        assert result["counts"]["failed"] == result["counts"]["refused"] == 0, show(record)
        progress = record["progress"]
        assert progress["itemsDone"] == progress["itemsTotal"] == len(members), show(record)

        manifest = read_object(client, result["manifestKey"]).json()  # a sealed message
        entries = manifest["members"]
        assert sorted(entry["path"] for entry in entries) == sorted(members)  # each once
        listed = moto_s3.list_objects_v2(Bucket=bucket, Prefix="tenants/default/out/")
        stored = sorted(entry["Key"] for entry in listed.get("Contents", []))
        expected = sorted(
            [entry["storageKey"] for entry in entries] + [result["manifestStorageKey"]]
        )
        assert stored == expected  # one object per member, and nothing else
        api = job_stack.api
        for key in stored:  # each with its record (a small member's in its metadata)
            assert object_record(api.records, api.objects, key).key == key
        for entry in entries:
            data = members[entry["path"]]
            assert entry["plaintextSha256"] == sha256(data)
            opened = read_object(client, entry["key"])
            assert opened.status_code == 200, opened.text
            assert opened.content == data, entry["path"]
    assert not moto_s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


# Jobs that take their worker down


def kill_pool_process(worker: CeleryWorker) -> int:
    """SIGKILL the worker's one pool process (as the kernel's OOM killer would); its pid."""
    pool = worker.pool_pids()
    assert len(pool) == 1, pool
    os.kill(pool[0], signal.SIGKILL)
    return pool[0]


def test_a_job_whose_process_dies_in_two_runs_is_failed_and_the_next_job_runs(
    job_stack: JobStack,
) -> None:
    """The pool process is killed during the job's first run and again during its second:
    the next delivery fails the job for good instead of running it a third time (a job
    that kills its process each time would otherwise be handed out for ever, ahead of
    every other job), and the worker goes on to the next job."""
    worker = job_stack.workers[0]
    proxy = job_stack.proxy
    assert proxy is not None
    with job_stack.client() as client:
        _, job_id = verify_held_mid_stream(job_stack, client)
        killed = [kill_pool_process(worker)]
        proxy.release(PACE)
        wait_for_job(
            client,
            job_id,
            lambda r: r["attempts"] == 2 and running_with_progress(r),
            "the job's second run",
            timeout=60,
        )
        proxy.hold()
        wait_until(proxy.holding, "the second run's download held at the proxy")
        killed.append(kill_pool_process(worker))
        proxy.release()
        record = finished_job(client, job_id, timeout=60)

        assert record["status"] == "failed", show(record)
        assert record["error"]["code"] == "job-killed-repeatedly", show(record)
        assert record["attempts"] == 2, show(record)
        assert killed[0] != killed[1]  # a new process for each run
        after = store_object(client, "after.bin", b"the next job")["verifyJob"]
        assert finished_job(client, after, timeout=60)["status"] == "succeeded"


GiB = 1024 * MiB
WORKER_MEMORY_LIMIT = GiB
PAX_HOG = 512 * MiB  # `tarfile` holds a pax header twice over while it reads it


def pax_hog_tar_gz() -> bytes:
    """A tar.gz of half a MiB: a 512 MiB pax header (which `tarfile` reads into memory
    whole), then an empty member."""
    compressor = zlib.compressobj(1, wbits=31)
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, PAX_HOG
    prefix = f"{PAX_HOG} comment=".encode()
    pieces = [header.tobuf(tarfile.GNU_FORMAT), prefix]
    out = [compressor.compress(piece) for piece in pieces]
    chunk = b"a" * MiB
    left = PAX_HOG - len(prefix) - 1
    while left:
        out.append(compressor.compress(chunk[: min(left, MiB)]))
        left -= min(left, MiB)
    member = tarfile.TarInfo("after")
    tail = b"\n" + bytes(-PAX_HOG % 512) + member.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
    out += [compressor.compress(tail), compressor.flush()]
    return b"".join(out)


def address_space_limit(pid: int) -> int | None:
    """The process's RLIMIT_AS (soft), in bytes; None if unlimited."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError(f"no address-space limit listed for process {pid}")


def test_a_job_that_needs_more_memory_than_its_process_may_use_fails_alone(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, moto_s3: "S3Client"
) -> None:
    """A pool process is held to SEALSTREAM_WORKER_MEMORY_LIMIT from its start. A job
    that needs more (a 512 MiB pax header, with the archive limits raised so that only
    the memory limit stands in its way) fails with job-out-of-memory; its process stays
    within the limit and lives on, and runs the next job."""
    with open_job_stack(tmp_path, moto_endpoint, s3_bucket, workers=0) as stack:
        stack.worker_env.update(
            {
                "SEALSTREAM_WORKER_MEMORY_LIMIT": str(WORKER_MEMORY_LIMIT),
                "SEALSTREAM_BATCH_MAX_HEADER_SIZE": str(2 * GiB),
                "SEALSTREAM_BATCH_MAX_EXPANSION": "1e12",
            }
        )
        worker = stack.start_worker()
        [pool] = worker.pool_pids()
        # Set by the pool process as it starts, which may be just after its worker is ready.
        wait_until(
            lambda: address_space_limit(pool) == WORKER_MEMORY_LIMIT,
            "the pool process to take its memory limit",
            timeout=10,
        )
        bucket = stack.api.objects.bucket
        moto_s3.put_object(
            Bucket=bucket, Key="tenants/default/in/hog.tar.gz", Body=pax_hog_tar_gz()
        )
        with stack.client() as client:
            create_key(client)
            record = finished_job(client, start_batch(client, "in/hog.tar.gz"), timeout=120)
            peak = PeakRss(pool).field("VmHWM")
            print(f"the pool process's peak RSS: {peak / MiB:.0f} MiB")

            assert record["status"] == "failed", show(record)
            assert record["error"]["code"] == "job-out-of-memory", show(record)
            assert record["attempts"] == 1, show(record)
            assert worker.pool_pids() == [pool]  # the process lived on
            after = store_object(client, "after.bin", b"the next job")["verifyJob"]
            assert finished_job(client, after, timeout=60)["status"] == "succeeded"
        assert peak < WORKER_MEMORY_LIMIT
