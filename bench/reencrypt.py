"""Throughput of the reencrypt job next to a plain copy of the same object on the same storage.

Prints, for one stored object, on one S3 server (moto in its own process) and on the
local-directory backend:
- the reencrypt job's MB/s (the code a Celery worker runs: read the object, authenticate
  and open every frame, SHA-256 the plaintext, seal it under a fresh data key, open each
  new frame again, and write the new message over the object with a conditional upload);
- its ceiling, the I/O that re-encryption cannot avoid: the same object read and written
  back to its own key, with no crypto. On S3 that is boto3's `get_object`, its body
  streamed into `upload_fileobj` (boto3's defaults, bodies unsigned as the service sends
  them); on the local directory, the file copied beside itself, fsync'd and renamed over
  itself, as the local store writes;
- their ratio, the best of `--rounds` of each, alternated;
- the job's peak RSS above what the process held before it, next to the object's size:
  re-encryption streams, so it should not grow with the object;
- SHA-256's speed alone on one core, in the same rounds: re-encryption hashes every
  byte, which a copy does not, and no number of threads makes one stream's hash faster.
  The copy's time or SHA-256's alone, whichever is longer, is the least time any
  re-encryption can take, and gives the highest ratio possible.
Before each round the key is rotated, so that the object is due again.
"""

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from format import PeakRss
from stream import moto_server
from verify import KID, MIB, TENANT, aws_environment, services_for, sha256_seconds, store_object

from sealstream.memory import keep_freed_buffers
from sealstream.wiring import Parts
from services.jobs import JobKind, JobRecord, JobStatus, ReencryptParams
from storage import LocalStore
from workers.execution import run_job
from workers.registry import JOB_BODIES

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass
class Rounds:
    """The fastest of each kind of round, and the job's largest peak RSS growth."""

    reencrypt: float = float("inf")
    copy: float = float("inf")
    hashing: float = float("inf")  # SHA-256 alone over as many bytes, on one core
    peak_growth_mib: float = 0.0
    results: list[int] = field(default_factory=list)


def reencrypt_seconds(services: Parts, object_params: dict[str, str]) -> tuple[float, float, int]:
    """One reencrypt job over the object, after a rotation: its time, the process's peak
    RSS growth while it ran (MiB), and how many objects it re-encrypted."""
    rotated = services.keys.rotate(TENANT, KID)
    params = ReencryptParams.model_validate(
        {"kid": KID, "keyVersion": rotated.primary_version, "rewrapped": False, **object_params}
    )
    record = JobRecord.new(JobKind.REENCRYPT, TENANT, params)
    services.jobs.save(record)
    rss = PeakRss()
    rss.reset()
    before = rss.read_mib()
    start = time.perf_counter()
    run_job(record.id, services, JOB_BODIES)
    seconds = time.perf_counter() - start
    growth = rss.read_mib() - before
    finished = services.jobs.load(record.id)
    if finished is None or finished.status is not JobStatus.SUCCEEDED or not finished.result:
        raise SystemExit(f"the reencrypt job did not succeed: {finished}")
    return seconds, growth, int(finished.result["reencrypted"])


def s3_copier(endpoint: str, bucket: str, key: str) -> Callable[[], float]:
    config = Config(s3={"addressing_style": "path", "payload_signing_enabled": False})
    s3: S3Client = boto3.client("s3", endpoint_url=endpoint, config=config)

    def copy() -> float:
        """The object read with one GET and written back over itself by upload_fileobj."""
        start = time.perf_counter()
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        s3.upload_fileobj(body, bucket, key)
        return time.perf_counter() - start

    return copy


def local_copier(path: Path) -> Callable[[], float]:
    def copy() -> float:
        """The file copied beside itself, fsync'd, and renamed over itself."""
        start = time.perf_counter()
        temp = path.with_name(f".tmp-bench-{path.name}")
        with path.open("rb") as source, temp.open("wb") as target:
            shutil.copyfileobj(source, target, MIB)
            target.flush()
            os.fsync(target.fileno())
        temp.replace(path)
        return time.perf_counter() - start

    return copy


def measure(
    services: Parts,
    params: dict[str, str],
    copy: Callable[[], float],
    total: int,
    rounds: int,
) -> Rounds:
    figures = Rounds()
    for _ in range(rounds):
        figures.copy = min(figures.copy, copy())
        seconds, growth, reencrypted = reencrypt_seconds(services, params)
        figures.reencrypt = min(figures.reencrypt, seconds)
        figures.hashing = min(figures.hashing, sha256_seconds(total))
        figures.peak_growth_mib = max(figures.peak_growth_mib, growth)
        figures.results.append(reencrypted)
    if figures.results != [1] * rounds:
        raise SystemExit(f"each round should re-encrypt the object once: {figures.results}")
    return figures


def report(name: str, total: int, figures: Rounds, ceiling: str) -> None:
    least = max(figures.copy, figures.hashing)
    print(f"  {name}")
    print(f"    sealstream reencrypt job            {total / figures.reencrypt / 1e6:7.0f} MB/s")
    print(f"    ceiling: {ceiling:<27}{total / figures.copy / 1e6:7.0f} MB/s")
    print(f"    ratio {figures.copy / figures.reencrypt:.3f}")
    print(f"    SHA-256 alone, one core             {total / figures.hashing / 1e6:7.0f} MB/s")
    print(
        f"    least time any re-encryption can take {least:6.3f} s (the copy, or SHA-256 "
        f"alone if slower): ratio at most {figures.copy / least:.3f}; "
        f"the job at {least / figures.reencrypt:.3f} of it"
    )
    print(
        f"    job's peak RSS growth               {figures.peak_growth_mib:7.0f} MiB "
        f"(object: {total // MIB} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="size of the object")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    total = args.mib * MIB
    keep_freed_buffers()  # as a worker process does
    print(f"reencrypt, {args.mib} MiB object, 1 MiB frames, best of {args.rounds}")
    with tempfile.TemporaryDirectory(prefix="bench-reencrypt-") as scratch, aws_environment():
        workdir = Path(scratch)
        with moto_server(workdir) as (endpoint, _):
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            on_s3 = services_for("s3://bench", workdir, endpoint)
            params = store_object(on_s3, "bench/reencrypt.bin", total)
            copy = s3_copier(endpoint, "bench", params["storageKey"])
            figures = measure(on_s3, params, copy, total, args.rounds)
            report("S3 (moto server)", total, figures, "boto3 get + upload_fileobj")
        local = services_for(f"file://{workdir / 'local'}", workdir, None)
        params = store_object(local, "bench/reencrypt.bin", total)
        assert isinstance(local.objects, LocalStore)
        copy = local_copier(local.objects.root / params["storageKey"])
        figures = measure(local, params, copy, total, args.rounds)
        report("local directory", total, figures, "file copy, fsync, rename")


if __name__ == "__main__":
    main()
