"""Throughput of a resumable upload (tus, `/api/uploads`) next to the plain encrypt into
storage (`POST /api/crypto/stream/encrypt` with a destination) of the same file into the
same server and storage, in one run (goal: ratio >= 0.9).

Both are sent by curl from a file in memory (memfd: no plaintext on disk), the plain one
as `-F file=@...`, the resumable one as one creating POST and one PATCH of the whole file
(`-T`), so the figures compare the server's two paths, not two clients. Rounds alternate
the two, each waiting for the verify job its upload started; each round's ratio is
printed, then the best of each, with the load average (the machine may be shared).
The server runs in a process of its own on the local-directory backend.
"""

import argparse
import base64
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from stream import (
    KID,
    BenchError,
    Plaintext,
    PlaintextFile,
    Server,
    api_server,
    curl_command,
)

MIB = 1 << 20
UPLOADS = "/api/uploads"


def plain_seconds(server: Server, data: PlaintextFile, key: str) -> float:
    metadata = {"kid": KID, "destination": {"key": key, "overwrite": True}}
    command = curl_command(server, "/api/crypto/stream/encrypt", metadata, "-", data.path)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, pass_fds=(data.fd,), check=False)
    seconds = time.perf_counter() - started
    stored = json.loads(done.stdout or b"{}")
    if "verifyJob" not in stored:
        raise BenchError(f"the plain upload failed: {done.stdout[:300]!r} {done.stderr[-300:]!r}")
    server.settle(stored)
    return seconds


def resumable_seconds(server: Server, data: PlaintextFile, key: str) -> float:
    auth = {"Authorization": f"Bearer {server.token}", "Tus-Resumable": "1.0.0"}
    metadata = ",".join(
        f"{name} {value}"
        for name, value in (
            ("kid", _b64(KID)),
            ("destination", _b64(key)),
            ("overwrite", _b64("true")),
        )
    )
    started = time.perf_counter()
    created = httpx.post(
        server.url + UPLOADS,
        headers={**auth, "Upload-Length": str(data.total), "Upload-Metadata": metadata},
        timeout=30,
    )
    if created.status_code != 201:
        raise BenchError(f"creating the upload: {created.status_code} {created.text}")
    command = [
        *server.client_prefix,
        "curl",
        "--silent",
        "--show-error",
        "--request",
        "PATCH",
        "--upload-file",
        data.path,
        *(part for name, value in auth.items() for part in ("--header", f"{name}: {value}")),
        "--header",
        "Upload-Offset: 0",
        "--header",
        "Content-Type: application/offset+octet-stream",
        "--dump-header",
        "-",
        "--output",
        "/dev/null",
        server.url + created.headers["location"],
    ]
    done = subprocess.run(command, capture_output=True, pass_fds=(data.fd,), check=False)
    seconds = time.perf_counter() - started
    lines = done.stdout.decode("latin-1").lower().splitlines()
    jobs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("x-verify-job:")]
    statuses = [line for line in lines if line.startswith("http/")]  # after a 100 Continue
    if not statuses or " 204" not in statuses[-1] or not jobs:
        raise BenchError(f"the PATCH failed: {lines[:3]} {done.stderr[-300:]!r}")
    server.settle({"verifyJob": jobs[0]})
    return seconds


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the file uploaded")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    total = args.mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-resumable-") as work:
        workdir = Path(work)
        env = {"SEALSTREAM_STORAGE_URL": f"file://{workdir / 'storage'}"}
        with api_server(workdir, "api", env) as server:
            data = PlaintextFile(Plaintext(total))
            try:
                plain, resumable = [], []
                for round_ in range(args.rounds):
                    plain.append(plain_seconds(server, data, f"bench/plain-{round_}"))
                    resumable.append(resumable_seconds(server, data, f"bench/tus-{round_}"))
            finally:
                data.close()
    best_plain, best_resumable = min(plain), min(resumable)
    print(f"file: {args.mib} MiB, local-directory backend, best of {args.rounds} rounds")
    print(f"load average (1, 5, 15 min): {', '.join(f'{load:.2f}' for load in os.getloadavg())}")
    for round_, (one, other) in enumerate(zip(plain, resumable, strict=True), start=1):
        print(
            f"round {round_}: plain {total / one / 1e6:6.1f} MB/s, resumable "
            f"{total / other / 1e6:6.1f} MB/s, ratio {one / other:5.2f}"
        )
    print(f"plain encrypt to storage: {total / best_plain / 1e6:8.1f} MB/s")
    print(f"resumable (tus) upload:   {total / best_resumable / 1e6:8.1f} MB/s")
    print(f"ratio resumable / plain:  {best_plain / best_resumable:8.2f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
