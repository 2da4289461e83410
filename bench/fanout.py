"""Batch-encrypt fanned out across workers: the job over many small objects under a
prefix (10,000 of 512 B to 8 KiB by default), run by 1 and then 2 Celery worker
processes (one pool process each), and the scaling between them.

Prints, in one run: each worker count's objects per second (the job's whole time, from
its task being sent to its final record: the split, every chunk, the manifest), and the
ratio of 2 workers' rate to 1's next to its ceiling: 2 on a machine with two idle
cores, and how much more work two processes got through than one on this machine just
before and just after the jobs (SHA-256 over the same bytes in 1, then 2, processes at
once): other load, this process, redis-server and the storage take their share.

Each worker count seals into a prefix of its own, from workers started (and ready)
before the job is sent. Storage is a local directory shared by the workers (the embedded
default's backend), on a tmpfs when there is one so that the disk's flushes, which no
second worker makes faster, do not hide the scaling; or, with `--storage moto`, a moto
S3 server in its own process (itself one process: a ceiling of its own).
"""

import argparse
import hashlib
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import boto3
from stream import AWS_ENVIRONMENT, moto_server

from keystore import KeySpec, LocalKek
from sealstream.settings import Settings
from sealstream.wiring import Parts, build_parts
from services.jobs import BatchEncryptParams, JobKind, JobRecord, JobStatus
from tests.support.services import celery_worker, redis_server
from workers.runner import CeleryRunner

TENANT = "default"
KID = "bench-fanout"
HASHED = 256 * 1024 * 1024  # bytes each process hashes for the ceiling


def worker_env(settings: Settings) -> dict[str, str]:
    env = {
        "SEALSTREAM_STORAGE_URL": settings.storage_url,
        "SEALSTREAM_KEK_FILE": str(settings.kek_file),
        "SEALSTREAM_REDIS_URL": str(settings.redis_url),
        "SEALSTREAM_BATCH_CHUNK_MEMBERS": str(settings.batch_chunk_members),
    }
    if settings.s3_endpoint_url:
        env["SEALSTREAM_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


@contextmanager
def celery_workers(count: int, settings: Settings, workdir: Path) -> Iterator[None]:
    """`count` worker processes of one pool process each, once all are ready."""
    with ExitStack() as stack:
        for n in range(count):
            log = workdir / f"worker-{count}-{n}.log"
            stack.enter_context(celery_worker(worker_env(settings), log))
        yield


def put_sources(parts: Parts, count: int) -> int:
    """`count` objects of 512 B to 8 KiB under src/; their total size."""
    rng = random.Random(7)
    block = os.urandom(8192)
    total = 0
    for n in range(count):
        size = rng.randint(512, 8192)
        parts.objects.put(f"tenants/{TENANT}/src/{n:06d}.bin", block[:size])
        total += size
    return total


def params(parts: Parts, prefix: str) -> BatchEncryptParams:
    bucket, space = parts.objects.bucket, f"tenants/{TENANT}/"
    return BatchEncryptParams.model_validate(
        {
            "kid": KID,
            "mode": "members",
            "format": "auto",
            "encryptionContext": {},
            "frameLength": 64 * 1024,
            "overwrite": False,
            "source": {
                "bucket": bucket,
                "prefix": "src/",
                "storagePrefix": space + "src/",
            },
            "destination": {
                "bucket": bucket,
                "prefix": prefix,
                "storagePrefix": space + prefix,
            },
        }
    )


def timed_job(parts: Parts, settings: Settings, prefix: str, count: int) -> float:
    """Seconds from the job's task being sent to its final record."""
    record = JobRecord.new(JobKind.BATCH_ENCRYPT, TENANT, params(parts, prefix))
    parts.jobs.save(record)
    runner = CeleryRunner(settings, parts.jobs)
    start = time.perf_counter()
    runner.submit(record)
    while True:
        final = parts.jobs.load(record.id)
        if final is not None and final.status.finished:
            break
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    runner.close()
    result = final.result or {}
    sealed = result.get("counts", {}).get("sealed")
    if final.status is not JobStatus.SUCCEEDED or sealed != count:
        raise SystemExit(
            f"the job did not seal every object: {final.status} {final.error} {sealed}"
        )
    return seconds


def hashed(_: int) -> None:
    digest = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(HASHED >> 20):
        digest.update(block)


def parallel_capacity() -> float:
    """How much more 2 processes hash than 1 in the same time, on this machine now."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(hashed, [0, 0])  # both started and warm
        start = time.perf_counter()
        pool.map(hashed, [0])
        one = time.perf_counter() - start
        start = time.perf_counter()
        pool.map(hashed, [0, 1], chunksize=1)
        two = time.perf_counter() - start
    return 2 * one / two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--chunk-members", type=int, default=Settings().batch_chunk_members)
    parser.add_argument("--storage", choices=["local", "moto"], default="local")
    args = parser.parse_args()
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="bench-fanout-", dir=shm if shm.is_dir() else None))
    try:
        with ExitStack() as stack:
            redis_url = stack.enter_context(redis_server(workdir / "redis")).url
            kek = workdir / "kek"
            LocalKek.load_or_create(kek)
            storage: dict[str, Any] = {"storage_url": f"file://{workdir / 'storage'}"}
            if args.storage == "moto":
                url, _ = stack.enter_context(moto_server(workdir))
                os.environ.update(AWS_ENVIRONMENT)
                boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
                storage = {"storage_url": "s3://bench", "s3_endpoint_url": url}
            settings = Settings(
                **storage, kek_file=kek, redis_url=redis_url, admin_token="bench",
                batch_chunk_members=args.chunk_members,
            )  # fmt: skip
            parts = build_parts(settings)
            parts.keys.create(TENANT, KeySpec(kid=KID, kty="oct", alg="AES-256"))
            total = put_sources(parts, args.objects)
            average = total / args.objects
            print(f"{args.objects} objects ({average:.0f} B on average) under src/ on "
                  f"{args.storage}; chunks of {args.chunk_members}; "
                  f"{os.cpu_count()} CPUs")  # fmt: skip
            before = parallel_capacity()
            rates = {}
            for count in (1, 2):
                with celery_workers(count, settings, workdir):
                    seconds = timed_job(parts, settings, f"out-{count}/", args.objects)
                rates[count] = args.objects / seconds
                print(f"{count} worker(s): {seconds:7.1f} s, {rates[count]:7.1f} objects/s")
            after = parallel_capacity()
            print(f"scaling 2 workers / 1: {rates[2] / rates[1]:.2f}; ceiling 2.00 on two idle "
                  f"cores, and on this machine 2 processes hashed {before:.2f}x what 1 does "
                  f"before the jobs, {after:.2f}x after")  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
