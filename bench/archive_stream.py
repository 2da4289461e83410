"""Archives streamed into `POST /api/crypto/stream/encrypt-archive`, next to their ceilings.

Prints, in one run, against a live server (its own process) on a moto S3 server (its own
process) and on a local directory:
- small members: a tar of `--members` members of 512 B to 8 KiB streamed in, in members
  per second, next to the ceiling: the same members put by 8 threads into the same
  storage (boto3 `put_object` into moto; files written into a directory beside the
  server's) (goal: ratio >= 0.8, floor 0.5); on a local directory also next to the
  same files written durably (each fsync'd, and its directory), as the store writes;
- large members: an uncompressed tar of 4 members of `--large-mib` MiB streamed in, in
  MB/s, next to encrypt-to-storage of one file of their total size into the same
  storage (goal: ratio >= 0.8). Both bodies are generated as they are sent: nothing of
  them is held whole, in memory or on disk.
Each figure is the best of `--rounds`, ours and the ceiling alternated; `--small-only`
leaves out the large members.
"""

import argparse
import io
import json
import os
import random
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from stream import (
    AWS_ENVIRONMENT,
    KID,
    MIB,
    BenchError,
    Plaintext,
    Server,
    api_server,
    boto3_client,
    moto_server,
)

from keystore import LocalKek

ARCHIVE_PATH = "/api/crypto/stream/encrypt-archive"
ENCRYPT_PATH = "/api/crypto/stream/encrypt"
THREADS = 8
BOUNDARY = "sealstream-bench-form"


def small_members(count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    return [(f"member-{n:04d}.bin", rng.randbytes(rng.randint(512, 8192))) for n in range(count)]


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_stream(members: list[tuple[str, int]]) -> Iterator[bytes]:
    """An uncompressed tar of generated members of these names and sizes, made as it is
    sent."""
    for name, size in members:
        info = tarfile.TarInfo(name)
        info.size = size
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        yield from Plaintext(size).chunks()
        yield bytes(-size % tarfile.BLOCKSIZE)
    yield bytes(2 * tarfile.BLOCKSIZE)


def form(metadata: dict[str, object], data: Iterable[bytes]) -> Iterator[bytes]:
    """A multipart form of a `metadata` part and a `file` part of `data`, streamed."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="metadata"\r\n'
        f"Content-Type: application/json\r\n\r\n{json.dumps(metadata)}\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="data"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from data
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def timed_post(
    server: Server, path: str, metadata: dict[str, object], data: Iterable[bytes]
) -> float:
    """Seconds to send `data` and read the whole answer; `BenchError` unless it worked."""
    headers = {
        "Authorization": f"Bearer {server.token}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    started = time.perf_counter()
    response = httpx.post(
        server.url + path, content=form(metadata, data), headers=headers, timeout=600
    )
    seconds = time.perf_counter() - started
    if response.status_code not in (200, 201):
        raise BenchError(f"{path}: {response.status_code} {response.text[:300]}")
    if path == ARCHIVE_PATH:
        finished = json.loads(response.text.splitlines()[-1])
        if finished.get("status") != "succeeded":
            raise BenchError(f"the archive job ended {finished}")
    return seconds


def streamed_archive(server: Server, archive: bytes, prefix: str) -> float:
    metadata: dict[str, object] = {"kid": KID, "destination": {"prefix": prefix, "overwrite": True}}
    return timed_post(server, ARCHIVE_PATH, metadata, [archive])


def in_threads(put: Callable[[str, bytes], object], members: list[tuple[str, bytes]]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda member: put(*member), members))
    return time.perf_counter() - started


def best_of(
    rounds: int, ours: Callable[[int], float], ceiling: Callable[[int], float]
) -> tuple[float, float]:
    mine, theirs = [], []
    for number in range(rounds):
        mine.append(ours(number))
        theirs.append(ceiling(number))
    return min(mine), min(theirs)


def report(label: str, unit: str, amount: float, ours: float, ceiling: float) -> None:
    print(
        f"  {label:<34} ours {amount / ours:8.1f} {unit}   ceiling {amount / ceiling:8.1f} "
        f"{unit}   ratio {ceiling / ours:.3f}"
    )


def small_figures(
    server: Server,
    put: Callable[[str, bytes], object],
    members: list[tuple[str, bytes]],
    rounds: int,
    label: str,
) -> None:
    archive = tar_of(members)
    ours, ceiling = best_of(
        rounds,
        lambda n: streamed_archive(server, archive, f"small-{n}/"),
        lambda n: in_threads(lambda name, data: put(f"ceiling-{n}/{name}", data), members),
    )
    report(label, "members/s", len(members), ours, ceiling)


def large_figures(server: Server, mib: int, rounds: int, label: str) -> None:
    members = [(f"large-{n}.bin", mib * MIB) for n in range(4)]
    total = 4 * mib * MIB
    archive: dict[str, object] = {"kid": KID}
    ours, ceiling = best_of(
        rounds,
        lambda n: timed_post(
            server,
            ARCHIVE_PATH,
            {**archive, "destination": {"prefix": f"large-{n}/", "overwrite": True}},
            tar_stream(members),
        ),
        lambda n: timed_post(
            server,
            ENCRYPT_PATH,
            {"kid": KID, "destination": {"key": f"whole-{n}"}},
            Plaintext(total).chunks(),
        ),
    )
    report(label, "MB/s", total / 1e6, ours, ceiling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--large-mib", type=int, default=256, help="size of each large member")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small-only", action="store_true", help="only the small members' figures")
    args = parser.parse_args()
    members = small_members(args.members)
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as scratch:
        workdir = Path(scratch)
        kek = workdir / "kek"
        LocalKek.load_or_create(kek)
        print(
            f"1. {args.members} small members (512 B to 8 KiB), {THREADS} threads for the ceiling"
        )
        local = workdir / "local"
        env = {"SEALSTREAM_STORAGE_URL": f"file://{local}", "SEALSTREAM_KEK_FILE": str(kek)}
        ceiling_dir = workdir / "ceiling"

        def write_file(name: str, data: bytes) -> None:
            path = ceiling_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        def write_durably(name: str, data: bytes) -> None:
            path = ceiling_dir / "durable" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as file:
                file.write(data)
                os.fsync(file.fileno())
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

        with api_server(workdir, "api-local", env) as server:
            small_figures(server, write_file, members, args.rounds, "local directory (files)")
            small_figures(
                server, write_durably, members, args.rounds, "local directory (fsync'd files)"
            )
            if not args.small_only:
                large_figures(
                    server, args.large_mib, args.rounds, f"local, 4 x {args.large_mib} MiB"
                )
        with moto_server(workdir) as (endpoint, _):
            s3 = boto3_client(endpoint)
            s3.create_bucket(Bucket="bench")
            env = {
                **AWS_ENVIRONMENT,
                "SEALSTREAM_STORAGE_URL": "s3://bench",
                "SEALSTREAM_S3_ENDPOINT_URL": endpoint,
                "SEALSTREAM_KEK_FILE": str(kek),
            }
            with api_server(workdir, "api-s3", env) as server:
                small_figures(
                    server,
                    lambda name, data: s3.put_object(Bucket="bench", Key=name, Body=data),
                    members,
                    args.rounds,
                    "moto (boto3 put_object)",
                )
                if not args.small_only:
                    large_figures(
                        server, args.large_mib, args.rounds, f"moto, 4 x {args.large_mib} MiB"
                    )


if __name__ == "__main__":
    main()
