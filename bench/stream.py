"""The live server's streaming memory and throughput, each figure next to its ceiling.

Starts the API (uvicorn, one worker, httptools and uvloop, as `sealstream serve` runs it,
on a free port, local-directory storage in a temporary directory, the admin token and a
key created through the API) with three bench-only routes (`bench/echo_app.py`): `POST
/bench/echo`, the file part streamed back through the same multipart reader and the same
duplex response as the encrypt route, with no crypto; `POST /bench/hold-echo`, the same
held and sent a frame at a time, with no crypto; and `POST /bench/aes-echo`, each chunk
sent back through AES-256-GCM alone, with no format. Then prints, in one run:

1. memory: the server's peak RSS (Linux VmHWM, reset through /proc/<pid>/clear_refs
   before each upload) while a 1 GiB and a 4 GiB upload are encrypted and streamed back,
   sent chunked (so each frame is held: the most a stream-back holds). Goal: the two
   peaks within 32 MiB of each other, both under 200 MiB.
2. stream-back: encrypt-to-client MB/s next to its ceiling, the same server echoing the
   same bytes (goal ratio >= 0.8), alternated in rounds whose order is reversed every
   other round; with each, the server process's CPU seconds per GiB (all threads;
   /proc/<pid>/stat), which says what the encryption costs the server apart from the
   client's share of the 2 cores. The goal's figure is for uploads that
   declare their length, as curl sends `-F file=@largeFile.bin`: the service then
   sends each chunk's ciphertext as soon as it is sealed. Beside it, in the same rounds,
   the echo through AES-GCM alone (no header, sequence numbers or tags): what the work
   every encrypting stream-back must do costs the echo, and how near the encrypt route
   comes to that. Then the same for chunked uploads, whose file length is unknown, so
   each frame is held until full (only then is it known not to be the final one), with
   the echo held the same way and no crypto as the step between. AES-256-GCM's speed
   varies widely from machine to machine (docs/benchmarks.md), and with it the ratios;
   its speed on one core is printed too.
3. to storage: encrypt-to-storage MB/s and server CPU per GiB on the local-directory
   backend, next to the disk (as many ciphertext-like bytes written and fsync'd, the
   faster of through the page cache and around it) and to the stream-back figure (our
   own overhead of storing; boto3 has no local-directory ceiling), with what bounds it
   short of the disk: the HTTP intake alone (`POST /bench/drain`, the file part read and
   dropped, in the same rounds) and SHA-256 on one core (the plaintext's digest, one
   pass no second core can share); then against an S3
   server (moto, its own process), encrypt-to-storage MB/s next to boto3's own
   `upload_fileobj` of the same bytes with the same part size and parts in flight,
   alternated in the same way (goal ratio >= 0.9). boto3's defaults hash each request
   body into its SigV4 signature over plain HTTP, and the service's do not
   (`storage.S3Store`), so boto3 also runs with bodies unsigned: the like-for-like
   ratio. moto is slow and memory-hungry, so this part uploads `--s3-mib` (256 MiB by
   default); a second API server, configured for S3, serves it, since one server has one
   default store. Each stored object's verification job (which the server runs itself)
   must succeed, and is waited for, untimed, before going on.
4. next to age: one stream encrypted through the service (streamed back, its length
   declared) and `age` (the Debian package) encrypting the same file to an X25519
   recipient into /dev/null, in alternated rounds; curl and age pinned to the same core.
   Goal: the service at least as fast (ratio >= 1.0). What bounds it, in the same
   rounds: the same stream echoed with no crypto, and what the server's CPU per GiB
   encrypting allows on its one core.
5. the `sealstream` command: `encrypt` of a file, and `decrypt` of its ciphertext, each
   streamed back to /dev/null, next to curl doing the same with the same file and server,
   alternated (goal ratio >= 0.9, of the transfers as each client times them); the
   whole runs, start-up included, and each client's CPU per GiB beside them. The command
   runs with its bytecode cached, as an installed one does.
6. across processes: 8 concurrent streams of 256 MiB (8 stream-back encrypts at once,
   each through its own curl reading a file, whose output is piped into a second curl
   that decrypts it through the API, whose output is piped into `cmp` against the file)
   against `sealstream serve --workers 1` and `--workers` = the usable cores, each with
   Redis for jobs and a local directory of its own, alternated round by round: each
   one's aggregate MB/s, whether every plaintext came back byte for byte, and the CPU
   seconds per GiB encrypted or decrypted of the server (all its processes), which shows
   its efficiency apart from the clients sharing the cores, and of the clients; then the
   scaling ratio, aggregate(cores) / aggregate(1) (goal >= 1.25 on 2 cores), and the CPU
   per GiB of N processes over one's (goal <= 1.10). Every client (curl, cmp) is pinned
   (`taskset`) to one core, so that they take the same share of the machine in every
   round, and the bench's own process does nothing while they run. The clients take
   about as much CPU per GiB as the server, so on a machine this small their core bounds
   the aggregate: the bench prints the bounds the CPU figures set, with the clients'
   core shared and on a host with cores to spare for them. With `--chart PATH` it then
   measures the aggregate at 1 to 16 streams against both servers, and draws a PNG of
   the aggregate against server processes and against concurrent streams.

Each kind's best round is printed, and each ratio is judged round by round: the median,
over the rounds, of the two kinds' ratio within a round (the best rounds' ratio beside
it). These machines' speed drifts over seconds, in phases the kinds of one round share.
Pairing rounds cancels that within a run, so a ratio judged round by round spreads less
than the ratio of two bests, which compares one kind's luckiest moment with another's.
From one run to the next the machine varies more (docs/benchmarks.md), so a run says
little alone, and the figures to quote are medians over many.

The client is curl, which reads the response while it sends. A chunked
upload is fed from a generator thread as `-F file=@/dev/stdin`: curl 7.88 reads all of a
`-F file=@-` stdin into memory before sending, while a named non-regular file is streamed
(chunked). An upload of declared length is `-F file=@/dev/fd/<n>`, an anonymous file in
memory (memfd) that curl sees as a regular file. No plaintext touches disk: data is
generated (a few random 1 MiB blocks, cycled), and moto's part files go to a tmpfs. The
machines are shared and noisy (2 cores), so only ratios measured in the same run mean
anything.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import boto3
import httpx
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keystore import LocalKek
from storage import DEFAULT_MAX_IN_FLIGHT, DEFAULT_PART_SIZE, LocalStore
from storage.local_files import UncachedFile
from tests.support.ports import LOCALHOST, free_port
from tests.support.services import redis_server

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")

MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK = MIB
# The bench server is run as a module rather than imported: bench/ is not a package.
ECHO_APP = "bench.echo_app"
ECHO_PATH = "/bench/echo"  # bench.echo_app.ECHO_PATH
HOLD_ECHO_PATH = "/bench/hold-echo"  # bench.echo_app.HOLD_ECHO_PATH
AES_ECHO_PATH = "/bench/aes-echo"  # bench.echo_app.AES_ECHO_PATH
DRAIN_PATH = "/bench/drain"  # bench.echo_app.DRAIN_PATH
ENCRYPT_PATH = "/api/crypto/stream/encrypt"
DECRYPT_PATH = "/api/crypto/stream/decrypt"
KID = "bench-stream"
CURL_MAX_SECONDS = 1800
JOB_WAIT_SECONDS = 600
PIPE_SIZE = MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CORES = len(os.sched_getaffinity(0))
# The clients of the scaling and age figures share one core, named, so that what they
# take of the machine is the same in every round.
CLIENT_CORE = max(os.sched_getaffinity(0))
PINNED_CLIENTS = ("taskset", "--cpu-list", str(CLIENT_CORE))
ROOT = Path(__file__).resolve().parent.parent
AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class BenchError(Exception):
    """The server or a client misbehaved: the figures would mean nothing."""


# Generated data


class Plaintext:
    """`total` bytes made by cycling a few random blocks; each instance its own blocks."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._blocks = [os.urandom(BLOCK) for _ in range(4)]

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        while sent < self.total:
            piece = self._blocks[(sent // BLOCK) % 4][: self.total - sent]
            sent += len(piece)
            yield piece


class PlaintextFile:
    """A `Plaintext` in an anonymous file in memory (memfd, never on disk), which curl
    sends as a regular file: with a Content-Length, as it sends `-F file=@path`. Its
    descriptor is inherited by curl and named `/dev/fd/<n>`."""

    def __init__(self, data: Plaintext) -> None:
        self.total = data.total
        self.fd = os.memfd_create("bench-plaintext")
        with open(self.fd, "wb", closefd=False) as file:
            for chunk in data.chunks():
                file.write(chunk)

    @property
    def path(self) -> str:
        return f"/dev/fd/{self.fd}"

    def close(self) -> None:
        os.close(self.fd)


class PlaintextStream(io.RawIOBase):
    """A read-only raw file over a `Plaintext`; buffered, a file object for boto3."""

    def __init__(self, data: Plaintext) -> None:
        self._chunks = data.chunks()
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "WriteableBuffer") -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    @classmethod
    def open(cls, data: Plaintext) -> io.BufferedReader:
        return io.BufferedReader(cls(data), buffer_size=BLOCK)


# Processes


def wait_until(ready: Callable[[], bool], process: "subprocess.Popen[bytes]", what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not come up within 60 s")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def running(
    command: list[str], env: dict[str, str], log: Path, ready_url: str, what: str
) -> Iterator["subprocess.Popen[bytes]"]:
    """`command` as a child process, up once `ready_url` answers; stopped on the way out."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: answers(ready_url), process, what)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all its threads, and of its live
    descendants (a supervisor's server processes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0  # gone meanwhile
    own = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return own + sum(cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            children += [int(word) for word in (task / "children").read_text().split()]
    return children


def client_cpu_seconds() -> float:
    """CPU time of this process and of its children waited for (the curl clients)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class Server:
    """A live API server the bench started, and what talking to it takes."""

    url: str
    token: str
    pid: int
    storage_dir: Path | None
    client_prefix: tuple[str, ...] = ()  # `taskset -c N`, to pin the clients to a core

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def settle(self, stored: dict[str, Any]) -> None:
        """Wait for the verification job an upload to storage started (it runs in the server,
        so it would eat into the next measurement) and require it to succeed."""
        job_id = stored.get("verifyJob")
        if job_id is None:
            return
        deadline = time.monotonic() + JOB_WAIT_SECONDS
        while time.monotonic() < deadline:
            response = httpx.get(
                f"{self.url}/api/jobs/{job_id}",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=30,
            )
            job = response.json()
            if job.get("status") == "succeeded":
                return
            if job.get("status") in ("failed", "cancelled"):
                raise BenchError(f"verification job {job_id} {job['status']}: {job.get('error')}")
            time.sleep(0.2)
        raise BenchError(f"verification job {job_id} still running after {JOB_WAIT_SECONDS} s")

    def create_key(self) -> None:
        response = httpx.post(
            f"{self.url}/api/key-management/keys",
            headers={"Authorization": f"Bearer {self.token}"},
            json={
                "kid": KID,
                "kty": "oct",
                "alg": "AES-256",
                "keyOps": ["encrypt", "decrypt"],
                "exportable": False,
            },
            timeout=30,
        )
        if response.status_code != 201:
            raise BenchError(f"creating the key: {response.status_code} {response.text}")


@contextlib.contextmanager
def api_server(
    workdir: Path,
    name: str,
    env: dict[str, str],
    command: tuple[str, ...] = (sys.executable, "-m", ECHO_APP),
    client_prefix: tuple[str, ...] = (),
) -> Iterator[Server]:
    """`command` serving the API (by default `bench.echo_app`: the service's app plus
    `/bench/echo`) in a process of its own, with a key made through it."""
    port = free_port()
    token = "bench-" + os.urandom(16).hex()
    env = {
        **env,
        "SEALSTREAM_HOST": LOCALHOST,
        "SEALSTREAM_PORT": str(port),
        "SEALSTREAM_ADMIN_TOKEN": token,
    }
    url = f"http://{LOCALHOST}:{port}"
    with running(list(command), env, workdir / f"{name}.log", f"{url}/healthz", name) as process:
        storage_url = env["SEALSTREAM_STORAGE_URL"]
        storage_dir = Path(storage_url[7:]) if storage_url.startswith("file://") else None
        server = Server(url, token, process.pid, storage_dir, client_prefix)
        server.create_key()
        yield server


# Memory


class PeakRss:
    """Peak resident set size of another process of this user, between reset and read."""

    def __init__(self, pid: int) -> None:
        self._proc = Path(f"/proc/{pid}")

    def reset(self) -> None:
        (self._proc / "clear_refs").write_text("5")  # VmHWM := current RSS

    def _field_mib(self, name: str) -> float:
        for line in (self._proc / "status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"no {name} in {self._proc}/status")

    def peak_mib(self) -> float:
        return self._field_mib("VmHWM")

    def current_mib(self) -> float:
        return self._field_mib("VmRSS")


# curl clients


@dataclass
class Transfer:
    """One curl request's outcome."""

    seconds: float
    status: int
    uploaded: int
    downloaded: int
    body: bytes = b""
    sent_sha256: str = ""
    received_sha256: str = ""
    errors: list[str] = field(default_factory=list)
    server_cpu: float = 0.0  # CPU seconds the server process spent meanwhile, all threads

    def mb_per_s(self, total: int) -> float:
        return total / self.seconds / 1e6


WRITE_OUT = (
    "%{stderr}\nbench-write-out %{http_code} %{size_upload} %{size_download} %{time_total}\n"
)


def curl_command(
    server: Server, path: str, metadata: dict[str, Any], output: str, source: str = "/dev/stdin"
) -> list[str]:
    return [
        *server.client_prefix,
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        str(CURL_MAX_SECONDS),
        "--header",
        f"Authorization: Bearer {server.token}",
        "--form",
        f"metadata={json.dumps(metadata, separators=(',', ':'))};type=application/json",
        "--form",
        f"file=@{source};type=application/octet-stream",
        "--output",
        output,
        "--write-out",
        WRITE_OUT,
        f"{server.url}{path}",
    ]


def _widen(pipe: IO[bytes] | None) -> None:
    if pipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _feed(
    data: Plaintext, pipe: IO[bytes], digest: "hashlib._Hash | None", errors: list[str]
) -> None:
    try:
        for chunk in data.chunks():
            if digest is not None:
                digest.update(chunk)
            pipe.write(chunk)
    except BrokenPipeError:
        errors.append("curl stopped reading its input early")
    finally:
        with contextlib.suppress(BrokenPipeError):
            pipe.close()


def _drain(pipe: IO[bytes], digest: "hashlib._Hash", counted: list[int]) -> None:
    while chunk := pipe.read(MIB):
        digest.update(chunk)
        counted[0] += len(chunk)


def _write_out(process: "subprocess.Popen[bytes]", errors: list[str]) -> tuple[int, int, int]:
    assert process.stderr is not None
    text = process.stderr.read().decode(errors="replace")
    status = uploaded = downloaded = 0
    for line in text.splitlines():
        if line.startswith("bench-write-out "):
            status, uploaded, downloaded = (int(word) for word in line.split()[1:4])
        elif line.strip():
            errors.append(f"curl: {line.strip()}")
    if process.wait(timeout=CURL_MAX_SECONDS) != 0:
        errors.append(f"curl exited with status {process.returncode}")
    return status, uploaded, downloaded


def upload(
    server: Server, path: str, metadata: dict[str, Any], data: Plaintext | PlaintextFile
) -> Transfer:
    """POST `data` as the form's file part, chunked from a pipe (a `Plaintext`) or with its
    length declared (a `PlaintextFile`); the response body is discarded (or kept if small)."""
    errors: list[str] = []
    keep = "destination" in metadata or path == DRAIN_PATH
    output = "-" if keep else os.devnull
    if isinstance(data, PlaintextFile):
        source, stdin, inherited = data.path, subprocess.DEVNULL, [data.fd]
    else:
        source, stdin, inherited = "/dev/stdin", subprocess.PIPE, []
    cpu_before = server.cpu_seconds()
    start = time.perf_counter()
    process = subprocess.Popen(
        curl_command(server, path, metadata, output, source),
        stdin=stdin,
        stdout=subprocess.PIPE if keep else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=inherited,
    )
    feeder = None
    if isinstance(data, Plaintext):
        assert process.stdin is not None
        _widen(process.stdin)
        feeder = threading.Thread(target=_feed, args=(data, process.stdin, None, errors))
        feeder.start()
    body = process.stdout.read() if process.stdout is not None else b""
    status, uploaded, downloaded = _write_out(process, errors)
    if feeder is not None:
        feeder.join()
    seconds = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu_before
    return Transfer(seconds, status, uploaded, downloaded, body, errors=errors, server_cpu=cpu)


def round_trip(server: Server, data: PlaintextFile) -> "RoundTrip":
    """Start encrypting `data` streamed back (its length declared, as a user's file),
    piped into a second curl that decrypts it, piped into `cmp` against `data`: the
    clients pinned as `server` says, and nothing of the bench's own in the way."""
    prefix = server.client_prefix
    encrypt = subprocess.Popen(
        curl_command(server, ENCRYPT_PATH, {"kid": KID}, "-", data.path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=[data.fd],
    )
    decrypt = subprocess.Popen(
        curl_command(server, DECRYPT_PATH, {"kid": KID}, "-"),
        stdin=encrypt.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    compare = subprocess.Popen(
        [*prefix, "cmp", "--silent", "-", data.path], stdin=decrypt.stdout, pass_fds=[data.fd]
    )
    assert encrypt.stdout is not None and decrypt.stdout is not None
    encrypt.stdout.close()  # the decrypting curl holds it now
    decrypt.stdout.close()  # and cmp this one
    return RoundTrip(encrypt, decrypt, compare)


@dataclass
class RoundTrip:
    """An encrypt, its decrypt and the comparison of what came out with what went in."""

    encrypt: "subprocess.Popen[bytes]"
    decrypt: "subprocess.Popen[bytes]"
    compare: "subprocess.Popen[bytes]"

    def failures(self) -> list[str]:
        """What went wrong, once all three have ended; nothing if the plaintext came back."""
        errors: list[str] = []
        status, _, _ = _write_out(self.encrypt, errors)
        decrypt_status, _, _ = _write_out(self.decrypt, errors)
        if status != 200 or decrypt_status != 200:
            errors.append(f"encrypt answered {status}, decrypt {decrypt_status}")
        if self.compare.wait(timeout=CURL_MAX_SECONDS) != 0:
            errors.append("the decrypted plaintext differs from what was sent")
        return errors


def checked(transfer: Transfer, what: str, expected_status: int = 200) -> Transfer:
    if transfer.status != expected_status or transfer.errors:
        detail = "; ".join(transfer.errors) or f"status {transfer.status}"
        raise BenchError(f"{what}: {detail}")
    return transfer


def settled(server: Server, transfer: Transfer, total: int) -> dict[str, Any]:
    """What an upload to storage answered, once it is known to hold all `total` bytes and
    its verification job has succeeded."""
    stored: dict[str, Any] = json.loads(transfer.body)
    if stored["plaintextSize"] != total:
        raise BenchError(f"stored {stored['plaintextSize']} B of {total} B")
    server.settle(stored)
    return stored


# The figures


def mb_per_s(total: int, seconds: float) -> float:
    return total / seconds / 1e6


def memory_figures(server: Server, sizes: list[int]) -> None:
    rss = PeakRss(server.pid)
    idle = rss.current_mib()
    print(
        f"1. memory: server peak RSS (VmHWM) while encrypting, streamed back (sent chunked, "
        f"so frames are held); idle {idle:.1f} MiB"
    )
    peaks = []
    for total in sizes:
        rss.reset()
        before = rss.current_mib()
        data = Plaintext(total)
        transfer = checked(upload(server, ENCRYPT_PATH, {"kid": KID}, data), "encrypt")
        if transfer.downloaded <= total:
            raise BenchError(f"encrypt returned {transfer.downloaded} B for {total} B")
        peak = rss.peak_mib()
        peaks.append(peak)
        print(
            f"  {total / GIB:5.2f} GiB   peak {peak:7.1f} MiB  (+{peak - before:5.1f} over "
            f"the {before:.1f} MiB before it)   {transfer.mb_per_s(total):6.0f} MB/s"
        )
    spread = max(peaks) - min(peaks)
    print(
        f"  peaks differ by {spread:.1f} MiB (goal <= 32 MiB); highest {max(peaks):.1f} MiB "
        "(goal < 200 MiB)"
    )


@dataclass
class Timed:
    """Each round's seconds for a kind of upload, in order, and the fastest of them."""

    each: list[float] = field(default_factory=list)

    @property
    def fastest(self) -> float:
        return min(self.each)

    def time(self, seconds: float) -> None:
        self.each.append(seconds)


def ratio(ceiling: Timed, ours: Timed) -> str:
    """Our speed as a share of the ceiling's, judged round by round (see the module's
    docstring), with the ratio of the two best rounds beside it."""
    by_round = statistics.median(c / o for c, o in zip(ceiling.each, ours.each, strict=True))
    return f"{by_round:.3f} (best rounds {ceiling.fastest / ours.fastest:.3f})"


@dataclass
class Kind(Timed):
    """A kind of upload's rounds, and the least server CPU any of them took."""

    server_cpu: float = float("inf")

    def add(self, transfer: Transfer) -> None:
        self.time(transfer.seconds)
        self.server_cpu = min(self.server_cpu, transfer.server_cpu)

    def figures(self, total: int) -> str:
        return (
            f"{mb_per_s(total, self.fastest):6.0f} MB/s "
            f"(server CPU {self.server_cpu / (total / GIB):4.2f} s/GiB)"
        )


@dataclass
class StreamBack:
    """Each kind of upload, alternated on one server: the file's length declared (curl
    sends a regular file with a Content-Length) or not (chunked, from a pipe)."""

    total: int
    echo: Kind = field(default_factory=Kind)
    aes_alone: Kind = field(default_factory=Kind)
    encrypt: Kind = field(default_factory=Kind)
    chunked_echo: Kind = field(default_factory=Kind)
    held: Kind = field(default_factory=Kind)
    chunked_encrypt: Kind = field(default_factory=Kind)
    local: Kind = field(default_factory=Kind)
    drain: Kind = field(default_factory=Kind)
    disk: Timed = field(default_factory=Timed)


def in_turn(kinds: list[T], number: int) -> list[T]:
    """The kinds of upload compared, in the order round `number` runs them: reversed every
    other round, so that none always runs first (straight after the last round's other
    work, such as an upload to storage and its verification) or last."""
    return kinds if number % 2 == 0 else kinds[::-1]


def whole_reply(path: str, downloaded: int, total: int) -> bool:
    """An echo returns every byte it was sent; an encryption more (header, frame overhead)."""
    return downloaded > total if path == ENCRYPT_PATH else downloaded == total


def stream_back_figures(server: Server, total: int, rounds: int, to_storage: bool) -> StreamBack:
    """With the length declared: the echo, the echo through AES-GCM alone and encrypt;
    sent chunked: the echo, the echo held a frame at a time and encrypt; and (if asked)
    encrypt to local storage; alternated, each round timed."""
    piped = Plaintext(total)
    declared = PlaintextFile(piped)
    timings = StreamBack(total)
    assert server.storage_dir is not None
    store = LocalStore(server.storage_dir)
    kinds: list[tuple[str, str, Kind, Plaintext | PlaintextFile]] = [
        (ECHO_PATH, "echo", timings.echo, declared),
        (AES_ECHO_PATH, "the AES-GCM echo", timings.aes_alone, declared),
        (ENCRYPT_PATH, "encrypt", timings.encrypt, declared),
        (ECHO_PATH, "echo, chunked", timings.chunked_echo, piped),
        (HOLD_ECHO_PATH, "the held echo", timings.held, piped),
        (ENCRYPT_PATH, "encrypt, chunked", timings.chunked_encrypt, piped),
    ]
    try:
        for number in range(rounds):
            for path, what, kept, data in in_turn(kinds, number):
                transfer = checked(upload(server, path, {"kid": KID}, data), what)
                if not whole_reply(path, transfer.downloaded, total):
                    raise BenchError(f"{what} returned {transfer.downloaded} B for {total} B")
                kept.add(transfer)
            if to_storage:
                store_once(server, store, timings, number, declared)
    finally:
        declared.close()
    print(
        f"2. stream-back, {total / MIB:.0f} MiB per upload, {rounds} rounds "
        "(the six alternated on one server, the order reversed every other round; "
        "each kind's best round)"
    )
    print(
        "  the file's length declared (curl -F file=@path): each chunk's ciphertext sent as sealed"
    )
    print(f"  sealstream encrypt -> client   {timings.encrypt.figures(total)}")
    print(f"  echo through AES-GCM alone     {timings.aes_alone.figures(total)}")
    print(f"  ceiling: echo, no crypto       {timings.echo.figures(total)}")
    print(
        f"  ratio {ratio(timings.echo, timings.encrypt)}  (goal >= 0.80)   "
        f"server CPU ratio {timings.echo.server_cpu / timings.encrypt.server_cpu:.3f}"
    )
    print(
        f"  AES-GCM alone {ratio(timings.echo, timings.aes_alone)} of the echo; "
        f"sealstream encrypt {ratio(timings.aes_alone, timings.encrypt)} of AES-GCM alone"
    )
    print("  sent chunked (curl -F file=@/dev/stdin from a pipe): each frame held until full")
    print(f"  sealstream encrypt -> client   {timings.chunked_encrypt.figures(total)}")
    print(f"  echo held a frame at a time    {timings.held.figures(total)}")
    print(f"  echo, no crypto                {timings.chunked_echo.figures(total)}")
    print(f"  ratio {ratio(timings.chunked_echo, timings.chunked_encrypt)}  (shown)")
    print(
        f"  held {ratio(timings.chunked_echo, timings.held)} of the echo; "
        f"sealstream encrypt {ratio(timings.held, timings.chunked_encrypt)} of the held echo"
    )
    aes = aes_gcm_seconds_per_gib()
    extra = (timings.encrypt.server_cpu - timings.echo.server_cpu) / (total / GIB)
    print(
        f"  AES-256-GCM alone, one core {GIB / aes / 1e6:7.0f} MB/s ({aes:.2f} s/GiB); "
        f"encrypt's server CPU over echo's: {extra:.2f} s/GiB"
    )
    return timings


def store_once(
    server: Server, store: LocalStore, timings: StreamBack, number: int, data: PlaintextFile
) -> None:
    """Encrypt `data` into local storage, its length declared as the stream-back figure's
    is, then write as many bytes to the disk; both timed, and the object deleted."""
    metadata = {"kid": KID, "destination": {"key": f"bench/stream-{number}"}}
    transfer = checked(upload(server, ENCRYPT_PATH, metadata, data), "encrypt to storage", 201)
    stored = settled(server, transfer, data.total)
    store.delete(stored["storageKey"])
    timings.local.add(transfer)
    drained = checked(upload(server, DRAIN_PATH, {"kid": KID}, data), "drain")
    if json.loads(drained.body)["size"] != data.total:
        raise BenchError(f"the drain read {drained.body!r} of {data.total} B")
    timings.drain.add(drained)
    assert server.storage_dir is not None
    timings.disk.time(disk_write_seconds(server.storage_dir, stored["ciphertextSize"]))


def aes_gcm_seconds_per_gib() -> float:
    """Seconds per GiB of AES-256-GCM alone over 1 MiB frames on one core (best of 3):
    the part of what encrypting adds to an echo that no code of ours can shed."""
    aead = AESGCM(os.urandom(32))
    blocks = [memoryview(os.urandom(MIB)) for _ in range(4)]
    out = bytearray(MIB + 16)
    rounds = 256  # 256 MiB
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for number in range(rounds):
            aead.encrypt_into(number.to_bytes(12, "big"), blocks[number % 4], None, out)
        best = min(best, time.process_time() - start)
    return best * GIB / (rounds * MIB)


def sha256_seconds_per_gib() -> float:
    """Seconds per GiB of SHA-256 on one core (best of 3): the plaintext's digest, which
    an object's record keeps, is one pass that no second core can share."""
    blocks = [memoryview(os.urandom(MIB)) for _ in range(4)]
    rounds = 256  # 256 MiB
    best = float("inf")
    for _ in range(3):
        digest = hashlib.sha256()
        start = time.process_time()
        for number in range(rounds):
            digest.update(blocks[number % 4])
        best = min(best, time.process_time() - start)
    return best * GIB / (rounds * MIB)


def disk_write_seconds(directory: Path, size: int) -> float:
    """Seconds to write `size` bytes of ciphertext-like data to a file there and fsync it,
    the faster of through the page cache and around it (O_DIRECT, as the local store
    writes where it can).

    The bytes are AES-GCM output over generated blocks: no plaintext goes to disk.
    """
    aead = AESGCM(os.urandom(32))
    blocks = [aead.encrypt(os.urandom(12), os.urandom(BLOCK), None)[:BLOCK] for _ in range(4)]
    path = directory / f".bench-disk-{os.getpid()}"
    fastest = float("inf")
    for uncached in (False, True):
        start = time.perf_counter()
        try:
            file = UncachedFile(path) if uncached else path.open("xb")
            for offset in range(0, size, BLOCK):
                file.write(memoryview(blocks[(offset // BLOCK) % 4])[: size - offset])
            if isinstance(file, UncachedFile):
                file.sync()
            else:
                file.flush()
                os.fsync(file.fileno())
            file.close()
            fastest = min(fastest, time.perf_counter() - start)
        finally:
            path.unlink(missing_ok=True)
    return fastest


def local_only_figures(server: Server, total: int, rounds: int) -> None:
    """`--only-local`: encrypt streamed back and encrypt into the local directory (with
    the disk and the intake beside it), alternated, then part 3's local figures."""
    data = PlaintextFile(Plaintext(total))
    timings = StreamBack(total)
    assert server.storage_dir is not None
    store = LocalStore(server.storage_dir)
    try:
        for number in range(rounds):
            encrypted = checked(upload(server, ENCRYPT_PATH, {"kid": KID}, data), "encrypt")
            timings.encrypt.add(encrypted)
            store_once(server, store, timings, number, data)
    finally:
        data.close()
    local_storage_figures(timings)


def local_storage_figures(timings: StreamBack) -> None:
    total, disk = timings.total, timings.disk
    print(f"3. to storage; local directory, {total / MIB:.0f} MiB, in the rounds of 2.")
    print(f"  sealstream encrypt -> storage  {timings.local.figures(total)}")
    print(
        "  ceiling: the disk, as many bytes written and fsync'd "
        f"{mb_per_s(total, disk.fastest):6.0f} MB/s   ratio {ratio(disk, timings.local)} "
        "(goal >= 0.80)"
    )
    disk_speed = mb_per_s(total, disk.fastest)
    intake = mb_per_s(total, timings.drain.fastest)
    sha256 = GIB / sha256_seconds_per_gib() / 1e6
    print(
        f"  what bounds it short of the disk: the HTTP intake alone (the file part read and "
        f"dropped) {timings.drain.figures(total)}, {intake / disk_speed:.2f} of the disk; "
        f"SHA-256 of the plaintext on one core {sha256:6.0f} MB/s, {sha256 / disk_speed:.2f} "
        "of the disk"
    )
    print(
        f"  next to stream-back encrypt {mb_per_s(total, timings.encrypt.fastest):6.0f} MB/s: "
        f"ratio {ratio(timings.encrypt, timings.local)} (our own overhead of storing); "
        f"server CPU {timings.local.server_cpu / timings.encrypt.server_cpu:.2f} times "
        "stream-back's (goal <= 1.50)"
    )


@dataclass
class Round:
    """Streams run at once: their seconds together, the CPU seconds the server and the
    clients took meanwhile, and what failed."""

    seconds: float
    server_cpu: float
    client_cpu: float
    failures: list[str]


def streams_at_once(server: Server, streams: int, data: PlaintextFile) -> Round:
    """`streams` round trips of `data` at once (see `round_trip`)."""
    server_before, client_before = server.cpu_seconds(), client_cpu_seconds()
    start = time.perf_counter()
    trips = [round_trip(server, data) for _ in range(streams)]
    failures = [failure for trip in trips for failure in trip.failures()]
    seconds = time.perf_counter() - start
    server_cpu = server.cpu_seconds() - server_before
    return Round(seconds, server_cpu, client_cpu_seconds() - client_before, failures)


@contextlib.contextmanager
def sealstream_serve(workdir: Path, name: str, workers: int, redis_url: str) -> Iterator[Server]:
    """`sealstream serve --workers N` as a user runs it (Redis for jobs, a local directory
    of its own for storage), the processes counted together; its clients pinned."""
    env = {
        "SEALSTREAM_STORAGE_URL": f"file://{workdir / name}",
        "SEALSTREAM_REDIS_URL": redis_url,
        "SEALSTREAM_WORKERS": str(workers),
    }
    command = (str(Path(sys.executable).with_name("sealstream")), "serve")
    with api_server(workdir, name, env, command, PINNED_CLIENTS) as server:
        yield server


@dataclass
class Aggregate(Timed):
    """Rounds of streams at once: their seconds, and the server's and the clients' CPU
    seconds in each."""

    cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)

    def add(self, done: Round) -> None:
        self.time(done.seconds)
        self.cpu.append(done.server_cpu)
        self.client_cpu.append(done.client_cpu)

    def cpu_per_gib(self, moved: int) -> float:
        return min(self.cpu) / (moved / GIB)

    def client_cpu_per_gib(self, moved: int) -> float:
        return min(self.client_cpu) / (moved / GIB)


def aggregate_bound(processes: int, server: float, clients: float | None) -> float:
    """The most MB/s encrypted (and as much decrypted) that CPU seconds per GiB moved of
    `server` and `clients` allow: the server on at most `processes` of the machine's
    cores; the clients, if given, on one core of their own, and all of it within the
    machine's cores. Without clients: a host whose cores are the server's alone."""
    moved_per_second = min(processes, CORES) / server
    if clients is not None:
        moved_per_second = min(moved_per_second, 1 / clients, CORES / (server + clients))
    return moved_per_second * GIB / 2 / 1e6


@dataclass
class Scaling:
    """What the scaling part measured, for its report and its chart."""

    streams: int
    total: int
    alone: Aggregate
    together: Aggregate
    # (server processes, concurrent streams) -> aggregate MB/s encrypted
    curve: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def moved(self) -> int:
        return 2 * self.streams * self.total  # each stream's bytes, encrypted then decrypted


def scaling_figures(
    workdir: Path, streams: int, total: int, rounds: int, single: float, chart: Path | None
) -> bool:
    """`streams` round trips at once against one server process and against one per core,
    alternated round by round; then, for `chart`, the aggregate against the number of
    streams at each."""
    failures: list[str] = []
    data = PlaintextFile(Plaintext(total))
    warm = PlaintextFile(Plaintext(16 * MIB))
    try:
        with (
            redis_server(workdir / "redis") as redis,
            sealstream_serve(workdir, "one", 1, redis.url) as one,
            sealstream_serve(workdir, "every", CORES, redis.url) as every,
        ):
            servers = [(one, Aggregate()), (every, Aggregate())]
            for server, _ in servers:  # every process up and warm before the rounds
                failures += streams_at_once(server, streams, warm).failures
            for number in range(rounds):
                for server, kept in in_turn(servers, number):
                    done = streams_at_once(server, streams, data)
                    kept.add(done)
                    failures += done.failures
            scaling = Scaling(streams, total, servers[0][1], servers[1][1])
            if chart is not None:
                failures += curve_points(scaling, [(1, one), (CORES, every)])
    finally:
        data.close()
        warm.close()
    report_scaling(scaling, rounds, single)
    if chart is not None:
        draw_scaling(scaling, chart)
        print(f"  chart: {chart}")
    correct = "all correct" if not failures else f"{len(failures)} failed"
    print(f"  {correct} (each decrypted stream compared byte for byte with what was sent)")
    for failure in failures:
        print(f"    failed: {failure}")
    return not failures


CURVE_STREAMS = (1, 2, 4, 8, 16)
CURVE_BYTES = 512 * MIB  # moved encrypted at each point, shared among its streams


def curve_points(scaling: Scaling, servers: list[tuple[int, Server]]) -> list[str]:
    """The aggregate at each number of streams in `CURVE_STREAMS`, against each server
    (its number of processes with it), alternated; one round each."""
    failures: list[str] = []
    for streams in CURVE_STREAMS:
        data = PlaintextFile(Plaintext(CURVE_BYTES // streams))
        try:
            for processes, server in servers:
                done = streams_at_once(server, streams, data)
                failures += done.failures
                moved = streams * data.total
                scaling.curve[processes, streams] = mb_per_s(moved, done.seconds)
        finally:
            data.close()
    return failures


def report_scaling(scaling: Scaling, rounds: int, single: float) -> None:
    alone, together, moved = scaling.alone, scaling.together, scaling.moved
    print(
        f"6. {scaling.streams} concurrent {scaling.total / MIB:.0f} MiB streams, each "
        "encrypted (streamed back, its length declared) and piped into a decrypt, piped "
        f"into cmp; `sealstream serve --workers 1` and `--workers {CORES}` (Redis for "
        f"jobs), alternated, {rounds} rounds; every client (curl, cmp) pinned to core "
        f"{CLIENT_CORE}; CPU per GiB encrypted or decrypted, the server's (all its "
        "processes) and the clients'"
    )
    for workers, kept in ((1, alone), (CORES, together)):
        aggregate = mb_per_s(scaling.streams * scaling.total, kept.fastest)
        print(
            f"  --workers {workers:<3} aggregate {aggregate:6.0f} MB/s encrypted + as much "
            f"decrypted; server CPU {kept.cpu_per_gib(moved):.2f} s/GiB, clients "
            f"{kept.client_cpu_per_gib(moved):.2f} s/GiB"
        )
    cpu_ratio = together.cpu_per_gib(moved) / alone.cpu_per_gib(moved)
    print(
        f"  scaling ratio aggregate({CORES}) / aggregate(1): {ratio(alone, together)} "
        f"(goal >= 1.25 here); server CPU per GiB, {CORES} processes / 1: {cpu_ratio:.2f} "
        "(goal <= 1.10)"
    )
    clients = alone.client_cpu_per_gib(moved)
    here_one = aggregate_bound(1, alone.cpu_per_gib(moved), clients)
    here_every = aggregate_bound(CORES, together.cpu_per_gib(moved), clients)
    print(
        f"  the bound these CPU figures set on this machine, the clients' core shared: "
        f"{here_one:6.0f} MB/s at --workers 1, {here_every:6.0f} at --workers {CORES}: a "
        f"scaling ratio of at most {here_every / here_one:.2f}"
    )
    spare_one = aggregate_bound(1, alone.cpu_per_gib(moved), None)
    spare_every = aggregate_bound(CORES, together.cpu_per_gib(moved), None)
    print(
        f"  on a host with cores to spare for the clients, the server's CPU per GiB bounds "
        f"the aggregate at {spare_one:6.0f} MB/s at --workers 1, {spare_every:6.0f} at "
        f"--workers {CORES}: a scaling ratio of {spare_every / spare_one:.2f}; one stream "
        f"alone {single:6.0f} MB/s"
    )


def draw_scaling(scaling: Scaling, chart: Path) -> None:
    """The aggregate against server processes and against concurrent streams, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    from matplotlib import pyplot

    moved = scaling.moved
    figure, (by_processes, by_streams) = pyplot.subplots(1, 2, figsize=(10, 4), dpi=100)
    processes = [1, CORES]
    measured = [
        mb_per_s(scaling.streams * scaling.total, kept.fastest)
        for kept in (scaling.alone, scaling.together)
    ]
    clients = scaling.alone.client_cpu_per_gib(moved)
    per_gib = [kept.cpu_per_gib(moved) for kept in (scaling.alone, scaling.together)]
    by_processes.plot(processes, measured, "o-", label="measured (clients on a shared core)")
    by_processes.plot(
        processes,
        [aggregate_bound(n, cpu, clients) for n, cpu in zip(processes, per_gib, strict=True)],
        "s:",
        label="bound: CPU per GiB, clients' core shared",
    )
    by_processes.plot(
        processes,
        [aggregate_bound(n, cpu, None) for n, cpu in zip(processes, per_gib, strict=True)],
        "^--",
        label="bound: CPU per GiB, cores to spare",
    )
    by_processes.set_xticks(processes)
    by_processes.set_xlabel("server processes (--workers)")
    by_processes.set_ylabel("aggregate MB/s encrypted (as much decrypted)")
    by_processes.set_title(f"{scaling.streams} streams of {scaling.total / MIB:.0f} MiB")
    by_processes.set_ylim(bottom=0)
    by_processes.legend(fontsize="small")
    for workers in processes:
        points = sorted((s, v) for (n, s), v in scaling.curve.items() if n == workers)
        if points:
            xs, ys = zip(*points, strict=True)
            by_streams.plot(xs, ys, "o-", label=f"--workers {workers}")
    by_streams.set_xscale("log", base=2)
    by_streams.set_xticks(list(CURVE_STREAMS), [str(n) for n in CURVE_STREAMS])
    by_streams.set_xlabel("concurrent streams, each into a decrypt")
    by_streams.set_ylabel("aggregate MB/s encrypted")
    by_streams.set_title(f"{CURVE_BYTES / MIB:.0f} MiB in all, shared among the streams")
    by_streams.set_ylim(bottom=0)
    by_streams.legend(fontsize="small")
    figure.suptitle(
        f"bench/stream.py on {CORES} cores, load average {os.getloadavg()[0]:.1f}", fontsize="small"
    )
    figure.tight_layout()
    figure.savefig(chart)
    pyplot.close(figure)


# The sealstream command next to curl

SEALSTREAM = str(Path(sys.executable).with_name("sealstream"))


@dataclass
class Clocked:
    """A client's rounds: whole runs (the process's start included), the transfers
    alone as the client times them (curl's time_total, the command's `seconds`), and the
    least CPU a run of the client took (its start included)."""

    wall: Timed = field(default_factory=Timed)
    transfer: Timed = field(default_factory=Timed)
    cpu: float = float("inf")

    def add(self, run: Callable[[], tuple[float, float]]) -> None:
        before = client_cpu_seconds()
        wall, transfer = run()
        self.cpu = min(self.cpu, client_cpu_seconds() - before)
        self.wall.time(wall)
        self.transfer.time(transfer)


def curl_seconds(
    server: Server, path: str, metadata: dict[str, Any], source: str, fds: tuple[int, ...] = ()
) -> tuple[float, float]:
    """One curl upload of the file `source` (open in `fds`), its response discarded: the
    run's seconds, and the transfer's."""
    start = time.perf_counter()
    done = subprocess.run(
        curl_command(server, path, metadata, os.devnull, source),
        capture_output=True,
        pass_fds=fds,
        timeout=CURL_MAX_SECONDS,
        check=False,
    )
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.decode().splitlines() if "bench-write-out" in line]
    if done.returncode != 0 or not lines or lines[-1].split()[1] != "200":
        raise BenchError(f"curl {path}: {done.stderr.decode(errors='replace')[-500:]}")
    return seconds, float(lines[-1].split()[4])


def command_environment(server: Server, bytecode: Path) -> dict[str, str]:
    """The command's environment: `server`, and its modules' bytecode cached in
    `bytecode`, as an installed command has it (pip compiles a package's modules when it
    installs it), even where PYTHONDONTWRITEBYTECODE is set, which would have every run
    compile the command's own modules anew."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return env | {
        "SEALSTREAM_URL": server.url,
        "SEALSTREAM_TOKEN": server.token,
        "PYTHONPYCACHEPREFIX": str(bytecode),
    }


def cli_seconds(
    env: dict[str, str], args: list[str], fds: tuple[int, ...] = ()
) -> tuple[float, float]:
    """One `sealstream ARGS --json -o /dev/null` (with the descriptors `fds` open): the
    run's seconds, and the transfer's as the command reports them."""
    start = time.perf_counter()
    done = subprocess.run(
        [SEALSTREAM, *args, "--json", "-o", os.devnull],
        capture_output=True,
        env=env,
        pass_fds=fds,
        timeout=CURL_MAX_SECONDS,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"sealstream {args[0]}: {done.stderr.decode(errors='replace')[-500:]}")
    return seconds, float(json.loads(done.stdout)["seconds"])


def cli_figures(server: Server, workdir: Path, total: int, rounds: int) -> None:
    """`sealstream encrypt` and `decrypt` of a file next to curl's, on the same file and
    server, alternated: the plaintext in memory (memfd), the ciphertext in a file, each
    response discarded."""
    plaintext = PlaintextFile(Plaintext(total))
    ciphertext = workdir / "cli-bench.enc"
    curl, ours, curl_open, ours_open = Clocked(), Clocked(), Clocked(), Clocked()
    env = command_environment(server, workdir / "bytecode")
    subprocess.run([SEALSTREAM, "encrypt", "--help"], env=env, capture_output=True, check=True)
    try:
        sealed = subprocess.run(
            curl_command(server, ENCRYPT_PATH, {"kid": KID}, str(ciphertext), plaintext.path),
            capture_output=True,
            pass_fds=[plaintext.fd],
            timeout=CURL_MAX_SECONDS,
            check=True,
        )
        if b"bench-write-out 200 " not in sealed.stderr:
            raise BenchError("curl could not seal the ciphertext to decrypt")
        fds = (plaintext.fd,)
        encrypt = ["encrypt", "--kid", KID, plaintext.path]
        kinds: list[tuple[Clocked, Callable[[], tuple[float, float]]]] = [
            (curl, lambda: curl_seconds(server, ENCRYPT_PATH, {"kid": KID}, plaintext.path, fds)),
            (ours, lambda: cli_seconds(env, encrypt, fds)),
            (curl_open, lambda: curl_seconds(server, DECRYPT_PATH, {}, str(ciphertext))),
            (ours_open, lambda: cli_seconds(env, ["decrypt", str(ciphertext)])),
        ]
        for number in range(rounds):
            for kept, run in in_turn(kinds, number):
                kept.add(run)
    finally:
        plaintext.close()
        ciphertext.unlink(missing_ok=True)
    print(
        f"5. the sealstream command next to curl, {total / MIB:.0f} MiB, {rounds} rounds "
        "(the transfer as each client times it; the whole run, start-up included, and the "
        "client's CPU per GiB, start-up included, beside it)"
    )
    for verb, theirs, mine in (("encrypt", curl, ours), ("decrypt", curl_open, ours_open)):
        print(
            f"  sealstream {verb}  {mb_per_s(total, mine.transfer.fastest):6.0f} MB/s   "
            f"whole run {mb_per_s(total, mine.wall.fastest):6.0f} MB/s   "
            f"CPU {mine.cpu / (total / GIB):4.2f} s/GiB"
        )
        print(
            f"  ceiling: curl       {mb_per_s(total, theirs.transfer.fastest):6.0f} MB/s   "
            f"whole run {mb_per_s(total, theirs.wall.fastest):6.0f} MB/s   "
            f"CPU {theirs.cpu / (total / GIB):4.2f} s/GiB"
        )
        print(
            f"  ratio {ratio(theirs.transfer, mine.transfer)}  (goal >= 0.90)   "
            f"whole runs {ratio(theirs.wall, mine.wall)}"
        )


def age_figures(server: Server, total: int, rounds: int) -> float:
    """One stream encrypted through the service next to `age` encrypting the same file
    to /dev/null, and next to the same stream echoed with no crypto (the most any
    stream-back through this server can go), alternated round by round, all clients on
    the same pinned core; the service's MB/s."""
    keys = subprocess.run(["age-keygen"], capture_output=True, text=True, check=True).stdout
    recipient = next(
        line.split(": ", 1)[1] for line in keys.splitlines() if line.startswith("# public key")
    )
    pinned = dataclasses.replace(server, client_prefix=PINNED_CLIENTS)
    data = PlaintextFile(Plaintext(total))
    ours, echo, theirs = Kind(), Kind(), Kind()
    try:
        for number in range(rounds):
            for kind in in_turn(["sealstream", "echo", "age"], number):
                if kind == "age":
                    command = ["age", "--recipient", recipient, "--output", os.devnull, data.path]
                    cpu_before, start = client_cpu_seconds(), time.perf_counter()
                    subprocess.run([*PINNED_CLIENTS, *command], pass_fds=[data.fd], check=True)
                    seconds = time.perf_counter() - start
                    cpu = client_cpu_seconds() - cpu_before
                    # age's own CPU, in the field that holds a server's
                    theirs.add(Transfer(seconds, 200, total, 0, server_cpu=cpu))
                    continue
                path, kept = (ENCRYPT_PATH, ours) if kind == "sealstream" else (ECHO_PATH, echo)
                kept.add(checked(upload(pinned, path, {"kid": KID}, data), f"{kind} next to age"))
    finally:
        data.close()
    version = subprocess.run(["age", "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"4. one {total / MIB:.0f} MiB stream next to age {version} encrypting the same file "
        f"(X25519 recipient) to /dev/null; {rounds} rounds alternated; curl and age on core "
        f"{CLIENT_CORE}"
    )
    print(f"  sealstream encrypt -> client   {ours.figures(total)}")
    age_cpu = theirs.server_cpu / (total / GIB)
    print(
        f"  age -> /dev/null               {mb_per_s(total, theirs.fastest):6.0f} MB/s "
        f"(its CPU {age_cpu:4.2f} s/GiB)"
    )
    print(f"  ratio {ratio(theirs, ours)}  (goal >= 1.0)")
    print(
        f"  what bounds it: the echo, no crypto, through the same server {echo.figures(total)}, "
        f"{ratio(theirs, echo)} of age. On a machine with a core for the server alone, each "
        "goes as fast as its CPU per GiB lets one core: sealstream at most "
        f"{age_cpu / (ours.server_cpu / (total / GIB)):.2f} of age, and no service "
        f"through this HTTP server at most {age_cpu / (echo.server_cpu / (total / GIB)):.2f}"
    )
    return mb_per_s(total, ours.fastest)


@contextlib.contextmanager
def moto_server(workdir: Path) -> Iterator[tuple[str, int]]:
    """A moto S3 server in its own process, its temporary files on a tmpfs when there is one."""
    port = free_port()
    url = f"http://{LOCALHOST}:{port}"
    shm = Path("/dev/shm")
    spool = Path(tempfile.mkdtemp(prefix="bench-moto-", dir=shm if shm.is_dir() else workdir))
    command = [str(Path(sys.executable).with_name("moto_server")), "-H", LOCALHOST, "-p", str(port)]
    env = {**AWS_ENVIRONMENT, "TMPDIR": str(spool)}
    try:
        with running(command, env, workdir / "moto.log", f"{url}/moto-api/", "moto_server") as moto:
            yield url, moto.pid
    finally:
        shutil.rmtree(spool, ignore_errors=True)


@dataclass
class S3Kind(Timed):
    """A kind of upload's rounds to S3, and the least CPU its uploader and moto took in one."""

    uploader_cpu: float = float("inf")
    moto_cpu: float = float("inf")

    def add(self, seconds: float, uploader_cpu: float, moto_cpu: float) -> None:
        self.time(seconds)
        self.uploader_cpu = min(self.uploader_cpu, uploader_cpu)
        self.moto_cpu = min(self.moto_cpu, moto_cpu)

    def figures(self, total: int, uploader: str) -> str:
        gib = total / GIB
        return (
            f"{mb_per_s(total, self.fastest):6.0f} MB/s (CPU s/GiB: {uploader} "
            f"{self.uploader_cpu / gib:4.2f}, moto {self.moto_cpu / gib:4.2f})"
        )


@dataclass
class S3Rounds:
    """Uploads of the same bytes to the same S3 server, by boto3 and through our API.

    boto3 runs twice over: with its defaults, which over plain HTTP hash every body into
    its SigV4 signature (the ceiling the goal names), and with bodies unsigned, as the
    service sends them unless told to sign (`SEALSTREAM_S3_SIGN_PAYLOADS`): like for like.
    """

    s3: "S3Client"
    s3_unsigned: "S3Client"
    bucket: str
    server: Server
    moto_pid: int
    data: Plaintext
    transfer_config: TransferConfig
    ours: S3Kind = field(default_factory=S3Kind)
    theirs: S3Kind = field(default_factory=S3Kind)
    theirs_unsigned: S3Kind = field(default_factory=S3Kind)

    def boto3_upload(self, number: int) -> None:
        self._boto3_upload(self.s3, self.theirs, f"bench/boto3-{number}")

    def boto3_unsigned_upload(self, number: int) -> None:
        self._boto3_upload(self.s3_unsigned, self.theirs_unsigned, f"bench/unsigned-{number}")

    def _boto3_upload(self, s3: "S3Client", kind: S3Kind, key: str) -> None:
        moto_before, client_before = cpu_seconds(self.moto_pid), client_cpu_seconds()
        start = time.perf_counter()
        s3.upload_fileobj(
            PlaintextStream.open(self.data), self.bucket, key, Config=self.transfer_config
        )
        kind.add(
            time.perf_counter() - start,
            client_cpu_seconds() - client_before,
            cpu_seconds(self.moto_pid) - moto_before,
        )
        if s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"] != self.data.total:
            raise BenchError("boto3 stored the wrong size")
        s3.delete_object(Bucket=self.bucket, Key=key)

    def our_upload(self, number: int) -> None:
        metadata = {"kid": KID, "destination": {"key": f"bench/stream-{number}"}}
        moto_before, client_before = cpu_seconds(self.moto_pid), client_cpu_seconds()
        transfer = checked(
            upload(self.server, ENCRYPT_PATH, metadata, self.data), "encrypt to S3", 201
        )
        self.ours.add(
            transfer.seconds,
            transfer.server_cpu + client_cpu_seconds() - client_before,
            cpu_seconds(self.moto_pid) - moto_before,
        )
        stored = settled(self.server, transfer, self.data.total)
        self.s3.delete_object(Bucket=self.bucket, Key=stored["storageKey"])


def boto3_client(endpoint: str, *, unsigned_bodies: bool = False) -> "S3Client":
    """A client of the moto server: boto3's defaults, or request bodies left unsigned."""
    return boto3.session.Session(
        aws_access_key_id=AWS_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_ENVIRONMENT["AWS_DEFAULT_REGION"],
    ).client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3=(
                {"addressing_style": "path", "payload_signing_enabled": False}
                if unsigned_bodies
                else {"addressing_style": "path"}
            ),
            max_pool_connections=DEFAULT_MAX_IN_FLIGHT + 4,
        ),
    )


def s3_figures(workdir: Path, total: int, rounds: int) -> None:
    with moto_server(workdir) as (endpoint, moto_pid):
        s3 = boto3_client(endpoint)
        bucket = "bench-stream"
        s3.create_bucket(Bucket=bucket)
        kek = workdir / "kek"
        LocalKek.load_or_create(kek)  # mode 0600
        kek.chmod(0o600)
        env = {
            **AWS_ENVIRONMENT,
            "SEALSTREAM_STORAGE_URL": f"s3://{bucket}",
            "SEALSTREAM_S3_ENDPOINT_URL": endpoint,
            "SEALSTREAM_KEK_FILE": str(kek),
            "SEALSTREAM_S3_PART_SIZE": str(DEFAULT_PART_SIZE),
            "SEALSTREAM_S3_PARTS_IN_FLIGHT": str(DEFAULT_MAX_IN_FLIGHT),
        }
        transfer_config = TransferConfig(
            multipart_threshold=DEFAULT_PART_SIZE,
            multipart_chunksize=DEFAULT_PART_SIZE,
            max_concurrency=DEFAULT_MAX_IN_FLIGHT,
        )
        with api_server(workdir, "api-s3", env) as server:
            uploads = S3Rounds(
                s3,
                boto3_client(endpoint, unsigned_bodies=True),
                bucket,
                server,
                moto_pid,
                Plaintext(total),
                transfer_config,
            )
            steps = [uploads.boto3_upload, uploads.our_upload, uploads.boto3_unsigned_upload]
            for number in range(rounds):
                for step in in_turn(steps, number):
                    step(number)
        ours, theirs, unsigned = uploads.ours, uploads.theirs, uploads.theirs_unsigned
    print(
        f"  S3: moto server, {total / MIB:.0f} MiB, {DEFAULT_PART_SIZE // MIB} MiB parts, "
        f"{DEFAULT_MAX_IN_FLIGHT} in flight, {rounds} rounds, the order reversed every other "
        "round (each kind's best round; CPU: least of any round)"
    )
    print(f"  sealstream encrypt -> storage  {ours.figures(total, 'server + curl')}")
    print(f"  ceiling: boto3 upload_fileobj  {theirs.figures(total, 'boto3')}")
    print(
        f"  ratio {ratio(theirs, ours)}  (goal >= 0.90; boto3's defaults sign "
        "each body over plain HTTP, the service's do not)"
    )
    print(f"  boto3, bodies unsigned         {unsigned.figures(total, 'boto3')}")
    print(f"  ratio {ratio(unsigned, ours)}  (like for like: bodies unsigned on both)")


@contextlib.contextmanager
def reported_failure(workdir: Path) -> Iterator[None]:
    """A `BenchError` printed with the tails of the servers' logs, then exit status 1."""
    try:
        yield
    except BenchError as exc:
        print(f"FAILED: {exc}")
        for log in sorted(workdir.glob("*.log")):
            print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-2000:]}")
        raise SystemExit(1) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="stream-back upload size, GiB")
    parser.add_argument(
        "--memory-gib",
        type=float,
        nargs="+",
        default=[1.0, 4.0],
        help="upload sizes whose peak RSS is compared, GiB",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--stream-mib", type=int, default=256, help="size of each, MiB")
    parser.add_argument("--s3-mib", type=int, default=256, help="upload size against moto")
    parser.add_argument("--skip-storage", action="store_true", help="no to-storage figures")
    parser.add_argument("--cli-mib", type=int, default=200, help="size for the command's figures")
    parser.add_argument("--only-cli", action="store_true", help="only the command's figures")
    parser.add_argument(
        "--only-local",
        action="store_true",
        help="only encrypting into the local directory, next to stream-back and the disk",
    )
    parser.add_argument(
        "--only-scaling",
        action="store_true",
        help="only the figures next to age and across processes",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        help="draw the scaling figures into this PNG (docs/scaling.png in docs/benchmarks.md)",
    )
    args = parser.parse_args()

    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as scratch:
        workdir = Path(scratch)
        env = {"SEALSTREAM_STORAGE_URL": f"file://{workdir / 'storage'}"}
        with reported_failure(workdir):
            with api_server(workdir, "api", env) as server:
                print(
                    f"live server pid {server.pid}: uvicorn, 1 worker, httptools + uvloop; "
                    f"client {' '.join(curl.stdout.split()[:2])}, reading while it sends; "
                    f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
                )
                if args.only_cli:
                    cli_figures(server, workdir, args.cli_mib * MIB, args.rounds)
                    return
                if args.only_local:
                    local_only_figures(server, int(args.gib * GIB), args.rounds)
                    return
                total = int(args.gib * GIB)
                if not args.only_scaling:
                    memory_figures(server, [int(gib * GIB) for gib in args.memory_gib])
                    timings = stream_back_figures(server, total, args.rounds, not args.skip_storage)
                if not (args.skip_storage or args.only_scaling):
                    local_storage_figures(timings)
                    s3_figures(workdir, args.s3_mib * MIB, args.rounds)
                single = age_figures(server, total, args.rounds)
                if not args.only_scaling:
                    cli_figures(server, workdir, args.cli_mib * MIB, args.rounds)
            ok = scaling_figures(
                workdir, args.streams, args.stream_mib * MIB, args.rounds, single, args.chart
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
