"""Redis Sentinel for jobs: a `sentinel://` Redis URL gives the job store the primary the
sentinels name, and it follows them through a failover (real `redis-server` and
`redis-sentinel` processes); a job whose record a failover lost is put back from its task
and runs; Celery's broker gets the same URL and the primary's name; credentials in any
part of such a URL are never shown."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from keystore import LocalKek
from sealstream.settings import Settings, without_credentials
from sealstream.wiring import open_records
from services.jobs import JobKind, JobRecord, JobStatus, RedisJobStore, VerifyParams
from services.jobs.redis_store import redis_client
from storage.local import LocalStore
from tests.support.data import MiB, random_chunks
from tests.support.http import create_key, problem
from tests.support.jobs import (
    JOBS,
    finished_job,
    job_stack,
    placeholder_job,
    show,
    store_object,
)
from tests.support.ports import LOCALHOST
from tests.support.sentinel import (
    MASTER,
    primary_port,
    process_id,
    role,
    waiting_for_replicas,
)
from tests.support.waiting import wait_until
from workers.celery_app import make_celery
from workers.runner import CeleryRunner

TTL_SECONDS = 600


def test_the_job_store_follows_the_primary_through_a_failover(
    sentinel: tuple[str, list[int]], tmp_path: Path
) -> None:
    url, (first, second, sentinel_port) = sentinel
    reports = open_records(LocalStore(tmp_path / "reports"), LocalKek(os.urandom(32)))
    jobs = RedisJobStore.from_url(url, reports, timedelta(seconds=TTL_SECONDS), MASTER)
    before = placeholder_job(JobKind.VERIFY, "default")
    jobs.save(before)
    assert jobs.load(before.id) == before
    replica = redis.Redis(host=LOCALHOST, port=second)
    wait_until(lambda: replica.exists(f"sealstream:job:{before.id}") == 1, "the replica to copy")
    replica.close()

    control = redis.Redis(host=LOCALHOST, port=sentinel_port)
    control.sentinel_failover(MASTER)
    control.close()
    wait_until(lambda: primary_port(sentinel_port) == second, "the sentinel to promote the replica")
    # Until the old primary is told it is a replica, it still takes writes that the
    # resync then drops: what Sentinel's asynchronous replication can lose.
    wait_until(lambda: role(first) == "slave", "the old primary to follow the new one")

    after = placeholder_job(JobKind.REENCRYPT, "default")
    wait_until(lambda: _saves(jobs, after), "a save on the new primary")
    assert jobs.load(before.id) == before and jobs.load(after.id) == after
    promoted = redis.Redis(host=LOCALHOST, port=second)
    assert promoted.exists(f"sealstream:job:{after.id}") == 1
    promoted.close()


def _saves(jobs: RedisJobStore, record: object) -> bool:
    try:
        jobs.save(record)  # type: ignore[arg-type]
    except redis.RedisError:
        return False
    return True


def test_a_job_whose_record_a_failover_lost_is_put_back_from_its_task_and_runs(
    sentinel: tuple[str, list[int]], tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    url, (first, second, sentinel_port) = sentinel
    with (
        job_stack(tmp_path, moto_endpoint, s3_bucket, sentinel=(url, MASTER)) as stack,
        stack.client() as client,
    ):
        create_key(client)
        stored = store_object(client, "kept.bin", random_chunks(MiB, seed=8))
        assert finished_job(client, stored["verifyJob"])["status"] == "succeeded"
        params = VerifyParams(
            bucket=stored["bucket"], key="kept.bin", storage_key=stored["storageKey"]
        )
        lost = JobRecord.new(JobKind.VERIFY, "default", params)
        replica = redis.Redis(host=LOCALHOST, port=second)
        wait_until(lambda: replica.exists("sealstream:jobs:default") == 1, "the replica to copy")
        # The replica cut off from its primary (as a partition leaves it), which then
        # takes the record; the failover promotes the replica, and the old primary's
        # resync drops the record. Its task reaches the new primary.
        replica.replicaof("NO", "ONE")
        stack.services.jobs.save(lost)
        control = redis.Redis(host=LOCALHOST, port=sentinel_port)
        control.sentinel_failover(MASTER)
        control.close()
        wait_until(lambda: primary_port(sentinel_port) == second, "the sentinel to promote it")
        assert replica.exists(f"sealstream:job:{lost.id}") == 0
        replica.close()
        wait_until(lambda: role(first) == "slave", "the old primary to follow the new one")
        gone = lambda: client.get(f"/api/jobs/{lost.id}").status_code == 404  # noqa: E731
        wait_until(gone, "the old primary's resync to drop the record")
        CeleryRunner(stack.api.settings, stack.services.jobs).submit(lost)

        worker = stack.workers[0]
        wait_until(lambda: "put back from its task" in worker.output(), "the worker", timeout=60)
        record = finished_job(client, lost.id, timeout=60)
        assert record["status"] == "succeeded" and record["attempts"] == 1, show(record)
        assert record["result"]["plaintextSha256"] == stored["plaintextSha256"]


def test_a_job_answered_202_survives_a_failover_right_after_the_answer(
    sentinel: tuple[str, list[int]], tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    url, (first, second, sentinel_port) = sentinel
    # No worker until after the failover: the job can run only from a task the promoted
    # replica has (no sweep runs here), not one a worker took from the old primary.
    with (
        job_stack(
            tmp_path, moto_endpoint, s3_bucket, sentinel=(url, MASTER), workers=0, min_replicas=1
        ) as stack,
        stack.client() as client,
        ThreadPoolExecutor(1) as pool,
    ):
        create_key(client)
        stored = store_object(client, "kept.bin", random_chunks(MiB, seed=9))
        # The replica held back (stopped, its link up) while the job is asked for, then let
        # go once the API waits for it: what it has not received when the answer comes, a
        # failover loses.
        replica = process_id(second)
        os.kill(replica, signal.SIGSTOP)
        try:
            answer = pool.submit(client.post, f"{JOBS}/verify", json={"key": "kept.bin"})
            wait_until(lambda: waiting_for_replicas(first), "the API to wait for the replica")
        finally:
            os.kill(replica, signal.SIGCONT)
        response = answer.result()
        assert response.status_code == 202, response.text
        os.kill(process_id(first), signal.SIGKILL)
        wait_until(lambda: primary_port(sentinel_port) == second, "the sentinel to promote it")

        job = f"{JOBS}/{response.json()['id']}"
        wait_until(lambda: client.get(job).status_code != 503, "the API to reach the new primary")
        found = client.get(job)
        assert found.status_code == 200, found.text
        stack.start_worker()
        record = finished_job(client, found.json()["id"], timeout=60)
        assert record["status"] == "succeeded", show(record)
        assert record["result"]["plaintextSha256"] == stored["plaintextSha256"]


def test_a_job_task_is_sent_once_the_replica_has_it(
    sentinel: tuple[str, list[int]], tmp_path: Path
) -> None:
    url, (first, second, sentinel_port) = sentinel
    settings = Settings(
        redis_url=url, redis_sentinel_master=MASTER, redis_min_replicas=1, redis_replica_timeout=4
    )
    reports = open_records(LocalStore(tmp_path / "reports"), LocalKek(os.urandom(32)))
    jobs = RedisJobStore.from_url(url, reports, timedelta(seconds=TTL_SECONDS), MASTER)
    runner = CeleryRunner(settings, jobs)
    record = placeholder_job(JobKind.VERIFY, "default")
    replica = process_id(second)
    os.kill(replica, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(runner.submit, record)
            wait_until(lambda: waiting_for_replicas(first), "the runner to wait for the replica")
            os.kill(replica, signal.SIGCONT)
            sent.result()
    finally:
        os.kill(replica, signal.SIGCONT)
    os.kill(process_id(first), signal.SIGKILL)
    wait_until(lambda: primary_port(sentinel_port) == second, "the sentinel to promote it")
    promoted = redis.Redis(host=LOCALHOST, port=second, decode_responses=True)
    tasks = cast(list[str], promoted.lrange("celery", 0, -1))
    promoted.close()
    runner.close()
    assert [record.id in task for task in tasks] == [True]


def test_what_no_replica_confirms_is_refused_503_and_no_job_is_left_to_run(
    sentinel: tuple[str, list[int]], tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    url, (first, second, _) = sentinel
    # No worker: the stored object's verify job stays queued, to be asked to cancel.
    with (
        job_stack(
            tmp_path, moto_endpoint, s3_bucket, sentinel=(url, MASTER), workers=0, min_replicas=1
        ) as stack,
        stack.client() as client,
    ):
        create_key(client)
        stored = store_object(client, "kept.bin", random_chunks(MiB, seed=10))
        os.kill(process_id(second), signal.SIGKILL)

        problem(
            client.post(f"{JOBS}/verify", json={"key": "kept.bin"}), 503, "redis-not-replicated"
        )
        cancel = client.post(f"{JOBS}/{stored['verifyJob']}/cancel")
        problem(cancel, 503, "redis-not-replicated")
        primary = redis.Redis(host=LOCALHOST, port=first)
        assert primary.llen("celery") == 1  # the stored object's verify task alone
        primary.close()
        listed = client.get(JOBS).json()["jobs"]
        others = [job for job in listed if job["id"] != stored["verifyJob"]]
        assert [(job["status"], job["error"]["code"]) for job in others] == [
            ("failed", "job-not-started")
        ], others


def test_a_sentinel_url_lists_sentinels_that_agree() -> None:
    client = redis_client("sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2/3", MASTER)
    pool: Any = client.connection_pool
    assert pool.service_name == MASTER
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["host"] for s in sentinels] == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    for bad in ("sentinel://a:1;redis://b:2", "sentinel://:x@a:1;sentinel://:y@b:1",
                "sentinel://a:1/1;sentinel://b:1/2", "sentinel://a:1/99"):  # fmt: skip
        with pytest.raises(ValueError, match="sentinel"):
            redis_client(bad, MASTER)


def test_celery_takes_the_sentinel_url_and_the_primary_name() -> None:
    url = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0"
    app = make_celery(Settings(redis_url=url, redis_sentinel_master=MASTER))
    assert app.conf.broker_url == url
    assert app.conf.broker_transport_options["master_name"] == MASTER


def test_credentials_in_any_sentinel_are_hidden() -> None:
    shown = without_credentials("sentinel://:s3cret@h1:26379;sentinel://u:s3cret@h2:26379/0")
    assert "s3cret" not in shown
    assert shown == "sentinel://***@h1:26379;sentinel://***@h2:26379/0"


def test_a_job_refused_503_is_reported_ended_and_never_runs_after_a_failover(
    sentinel: tuple[str, list[int]], tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    """A job its client was told did not start is marked failed in Redis only as far as
    the primary takes it: a failover to a replica that had its queued record brings it
    back queued. Its final report in the bucket, written before the 503, says it ended,
    and the worker that finds its task does not run it."""
    url, (_, second, _) = sentinel
    with (
        job_stack(
            tmp_path, moto_endpoint, s3_bucket, sentinel=(url, MASTER), workers=0, min_replicas=1
        ) as stack,
        stack.client() as client,
    ):
        create_key(client)
        store_object(client, "kept.bin", random_chunks(MiB, seed=11))
        os.kill(process_id(second), signal.SIGKILL)
        refused = client.post(f"{JOBS}/verify", json={"key": "kept.bin"})
        problem(refused, 503, "redis-not-replicated")
        [withdrawn] = [
            job
            for job in client.get(JOBS).json()["jobs"]
            if job["kind"] == "verify"
            and job["error"]
            and job["error"]["code"] == "job-not-started"
        ]
        # What the promoted replica would hold: the record as it was queued, and its task.
        unconfirmed = Settings.model_validate(
            {**stack.api.settings.model_dump(), "redis_min_replicas": 0}
        )
        jobs = RedisJobStore.from_url(
            url, stack.services.records, timedelta(seconds=TTL_SECONDS), MASTER
        )
        failed = jobs.load(withdrawn["id"])
        assert failed is not None and failed.status is JobStatus.FAILED
        queued = failed.model_copy(
            update={"status": JobStatus.QUEUED, "finished_at": None, "error": None}
        )
        jobs.save(queued)
        runner = CeleryRunner(unconfirmed, jobs)
        runner.submit(queued)
        runner.close()

        worker = stack.start_worker()
        wait_until(lambda: "its final report says it ended" in worker.output(), "the worker")
        again = jobs.load(queued.id)
        assert again is not None and (again.status, again.attempts) == (JobStatus.QUEUED, 0)
