"""The chaos run of the cluster test: a seeded mix of operations sent through the load
balancer from the client namespace while faults hit the hosts, a ledger of what each
operation sent and what its client saw, and the proofs drawn from it at the end.

Operations: streams encrypted back to the client and piped straight into a decrypt,
streams into storage, reads of stored objects, key creation, reads and rotation, and
verify, batch-encrypt and reencrypt jobs, polled until they end. Data is generated as it
is sent (never a file on disk) and hashed on the way out and on the way back.
"""

import hashlib
import io
import math
import os
import random
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import httpx

from sealstream_client import ClientError
from tests.support.cluster import APIS, BEATS, BUCKET, REDIS_HOSTS, WORKERS, Cluster
from tests.support.data import MiB
from tests.support.load_balancer import server_sessions
from tests.support.netns import call_in, enter, threads_in

TENANT_PREFIX = "tenants/default/"
ARCHIVE = "in/archive.tar"
FINAL = frozenset({"succeeded", "failed", "cancelled"})
# Job failures that would mean stored data is not what was sent: any of them is data lost.
DATA_CODES = frozenset(
    {"tampered", "read-back-mismatch", "object-damaged", "object-unrecorded", "object-misplaced"}
)
KEYS = "/api/key-management/keys"
JOBS = "/api/jobs"
SMALLEST, LARGEST = MiB, 256 * MiB
OPERATION_THREADS = 3
DRAIN_TIMEOUT = 180  # seconds for operations in flight to end once the chaos is over
JOB_TIMEOUT = 150  # seconds for every job to reach a final state (stale after 40 s + sweeps)
S3_DELAY = 0.2  # seconds added to each request from an API host to S3 while delayed


class Generated:
    """`size` bytes made from a seed as they are sent, one MiB at a time, hashed on the
    way (`sha256` is the whole stream's digest, computed again if it was not all sent)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._hash = hashlib.sha256()
        self.sent = 0

    def _chunks(self) -> Iterator[bytes]:
        block = random.Random(self.seed).randbytes(MiB)
        for index in range(math.ceil(self.size / MiB)):
            chunk = index.to_bytes(8, "big") + block[8:]
            yield chunk[: self.size - index * MiB]

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks():
            self._hash.update(chunk)
            self.sent += len(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        if self.sent == self.size:
            return self._hash.hexdigest()
        whole = hashlib.sha256()
        for chunk in self._chunks():
            whole.update(chunk)
        return whole.hexdigest()


class Hashing:
    """A sink that keeps only the SHA-256 and length of what is written to it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes, /) -> int:
        self._hash.update(data)
        self.length += len(data)
        return len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


# The ledger


@dataclass
class Operation:
    kind: str
    target: str
    size: int = 0
    error: str | None = None  # what the client saw, if it failed
    lost: str | None = None  # set when the client saw success but data is not as sent


@dataclass
class Stored:
    """An attempt to store an object: its data's digest and whether the client saw 201."""

    key: str
    kid: str
    sha256: str
    size: int
    acknowledged: bool


@dataclass
class KeySeen:
    kid: str
    created: bool | None = None  # None: the client saw an error, it may exist or not
    rotations_acknowledged: int = 0
    rotations_tried: int = 0


@dataclass
class JobSeen:
    id: str
    kind: str
    target: str
    final: dict[str, Any] | None = None  # the record as first seen in a final state
    changed_after_final: list[str] = field(default_factory=list)


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # seconds into the run
    detail: str = ""
    wall: float = field(default_factory=time.time)


@dataclass
class Ledger:
    operations: list[Operation] = field(default_factory=list)
    stored: dict[str, Stored] = field(default_factory=dict)
    keys: dict[str, KeySeen] = field(default_factory=dict)
    jobs: dict[str, JobSeen] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


# Operations, each run on a thread of the client namespace


class Driver:
    """Runs the operations of a chaos run against `the` cluster and keeps the ledger."""

    def __init__(self, the: Cluster, seed: int) -> None:
        self.the = the
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.started = time.monotonic()
        self._count = 0
        self._plan_lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, operation: Operation) -> Operation:
        with self.ledger.lock:
            self.ledger.operations.append(operation)
        return operation

    def _size(self, rng: random.Random) -> int:
        """Log-uniform between 1 MiB and 256 MiB: mostly small, some large."""
        exponent = rng.uniform(math.log2(SMALLEST), math.log2(LARGEST))
        return int(2**exponent) + rng.randrange(MiB)  # not a whole number of frames

    def next_seed(self) -> tuple[int, random.Random]:
        with self._plan_lock:
            self._count += 1
            seed = self.rng.randrange(2**32)
        return self._count, random.Random(seed)

    # Streams

    def stream_back(self, kid: str, size: int, seed: int) -> Operation:
        """Encrypt generated data back to the client, piped as it arrives into a decrypt
        whose plaintext is hashed: the digests must match, or a client saw an error."""
        operation = self.record(Operation("stream-back", kid, size))
        source = Generated(size, seed)
        read_end, write_end = os.pipe()
        reader, writer = os.fdopen(read_end, "rb"), os.fdopen(write_end, "wb")
        errors: list[str] = []
        namespace = self.the.network.client.namespace

        def encrypt() -> None:
            enter(namespace)
            try:
                self.the.client().encrypt(kid, source, writer)
            except (ClientError, OSError) as exc:
                errors.append("encrypt: " + describe(exc))
            finally:
                with suppress(OSError):
                    writer.close()

        sender = threading.Thread(target=encrypt, name="encrypt", daemon=True)
        sender.start()
        plaintext = Hashing()
        try:
            self.the.client().decrypt(iter(lambda: reader.read(MiB), b""), plaintext)
        except (ClientError, OSError) as exc:
            errors.append("decrypt: " + describe(exc))
        finally:
            reader.close()  # an encrypt still sending gets a broken pipe and stops
            sender.join(timeout=DRAIN_TIMEOUT)
        if sender.is_alive():
            self.ledger.violation(f"stream-back of {size} bytes: the encrypt never ended")
        if errors:
            operation.error = "; ".join(errors)
        elif plaintext.sha256 != source.sha256:
            operation.lost = f"decrypted {plaintext.length} bytes, not the {size} sent"
        return operation

    def store(self, kid: str, key: str, size: int, seed: int) -> Operation:
        operation = self.record(Operation("store", key, size))
        source = Generated(size, seed)
        acknowledged = False
        try:
            answer = self.the.client().encrypt_to_storage(kid, source, key=key)
            acknowledged = True
            self.watch_job(answer.verify_job or "", "verify (automatic)", key)
        except (ClientError, OSError) as exc:
            operation.error = describe(exc)
        with self.ledger.lock:
            self.ledger.stored[key] = Stored(key, kid, source.sha256, size, acknowledged)
        return operation

    def read_back(self, key: str, kind: str = "read") -> Operation:
        """Decrypt a stored object; a complete read must give what was sent."""
        stored = self.ledger.stored[key]
        operation = self.record(Operation(kind, key, stored.size))
        plaintext = Hashing()
        try:
            self.the.client().decrypt_object(key, plaintext)
        except (ClientError, OSError) as exc:
            operation.error = describe(exc)
            return operation
        if plaintext.sha256 != stored.sha256:
            operation.lost = f"read {plaintext.length} bytes that are not the {stored.size} sent"
        return operation

    # Keys and jobs

    def request(
        self, kind: str, target: str, method: str, path: str, body: Any = None
    ) -> dict[str, Any] | None:
        """A small JSON request; its answer, or None (recorded) if it failed."""
        operation = self.record(Operation(kind, target))
        try:
            with self.the.http() as http:
                response = http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            operation.error = describe(exc)
            return None
        if response.status_code >= 300:
            operation.error = f"{response.status_code} {response.text[:150]}"
            return None
        answer: dict[str, Any] = response.json()
        return answer

    def create_key(self, kid: str) -> None:
        seen = KeySeen(kid)
        with self.ledger.lock:
            self.ledger.keys[kid] = seen
        body = {"kid": kid, "kty": "oct", "alg": "AES-256", "keyOps": ["encrypt", "decrypt"]}
        answer = self.request("key-create", kid, "POST", KEYS, body)
        seen.created = True if answer is not None else None

    def rotate_key(self, kid: str) -> bool:
        seen = self.ledger.keys[kid]
        seen.rotations_tried += 1
        rotated = self.request("key-rotate", kid, "POST", f"{KEYS}/{kid}/rotate") is not None
        seen.rotations_acknowledged += rotated
        return rotated

    def start_job(self, kind: str, target: str, body: dict[str, Any]) -> None:
        record = self.request(f"job-{kind}", target, "POST", f"{JOBS}/{kind}", body)
        if record is not None:
            self.watch_job(record["id"], kind, target)

    def watch_job(self, job_id: str, kind: str, target: str) -> None:
        with self.ledger.lock:
            self.ledger.jobs[job_id] = JobSeen(job_id, kind, target)

    def poll_jobs(self, http: httpx.Client) -> int:
        """Look at every job not yet seen final; how many are still not final."""
        open_jobs = [job for job in list(self.ledger.jobs.values()) if job.final is None]
        for job in open_jobs:
            with suppress(httpx.HTTPError, ValueError):
                response = http.get(f"{JOBS}/{job.id}")
                if response.status_code == 200 and response.json()["status"] in FINAL:
                    job.final = response.json()
        return sum(job.final is None for job in self.ledger.jobs.values())

    def known_keys(self) -> list[str]:
        return [kid for kid, seen in self.ledger.keys.items() if seen.created]

    def acknowledged_objects(self) -> list[str]:
        return [key for key, stored in self.ledger.stored.items() if stored.acknowledged]

    # The mix

    def one_operation(self) -> None:
        number, rng = self.next_seed()
        kids = self.known_keys()
        objects = self.acknowledged_objects()
        choice = rng.choices(
            ["stream", "store", "read", "key", "verify", "batch", "rotate"],
            weights=[30, 30, 10, 8, 10, 5, 7],
        )[0]
        if not kids or choice == "key":
            self.create_key(f"chaos-key-{number}")
        elif choice == "stream":
            self.stream_back(rng.choice(kids), self._size(rng), rng.randrange(2**32))
        elif choice == "store" or not objects:
            key = f"chaos/{number}.bin"
            self.store(rng.choice(kids), key, self._size(rng), rng.randrange(2**32))
        elif choice == "read":
            self.read_back(rng.choice(objects))
        elif choice == "verify":
            target = rng.choice(objects)
            self.start_job("verify", target, {"key": target})
        elif choice == "batch":
            prefix = f"batch/{number}/"
            self.start_job(
                "batch-encrypt",
                prefix,
                {
                    "kid": rng.choice(kids),
                    "source": {"key": ARCHIVE},
                    "destination": {"prefix": prefix},
                },
            )
        else:
            kid = rng.choice(kids)
            if self.rotate_key(kid):
                self.start_job("reencrypt", "chaos/", {"kid": kid, "prefix": "chaos/"})


# Faults


class Faults:
    """The faults of a run, each injected while operations are in flight, then healed."""

    def __init__(self, driver: Driver, rng: random.Random) -> None:
        self.driver, self.the, self.rng = driver, driver.the, rng

    def inject(self, kind: str, target: str, detail: str = "") -> None:
        fault = Fault(kind, target, round(self.driver.elapsed(), 1), detail)
        with self.driver.ledger.lock:
            self.driver.ledger.faults.append(fault)
        print(f"  {fault.at:7.1f}s  {kind} {target} {detail}", flush=True)

    def plan(self) -> list[Callable[[], None]]:
        faults = [
            self.kill_api,
            self.kill_worker,
            self.restart_redis,
            self.fail_over_redis,
            self.s3_unavailable,
            self.partition_api,
            self.slow_link,
            self.packet_loss,
            self.delay_s3,
            self.kill_beat,
        ]
        self.rng.shuffle(faults)
        return faults

    def _wait(self, condition: Callable[[], bool], timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(Exception):
                if condition():
                    return True
            time.sleep(0.2)
        return False

    def kill_api(self) -> None:
        """kill -9 of an API host with streams in flight through it, then a restart."""
        busy: list[str] = []

        def streams_on_an_api() -> bool:
            sessions = server_sessions(self.the.stats)
            busy[:] = [name for name in APIS if sessions.get(f"api{name[-1]}", 0) > 0]
            return bool(busy)

        self._wait(streams_on_an_api)
        target = self.rng.choice(busy or list(APIS))
        cut = server_sessions(self.the.stats).get(f"api{target[-1]}", 0)
        self.the.services[target].kill()
        self.inject("kill -9", target, f"{cut} connections in flight")
        time.sleep(3)
        self.the.services[target].start()

    def kill_worker(self) -> None:
        """kill -9 of a worker host while a job runs, then a restart."""
        self._wait(lambda: any(job.final is None for job in self.driver.ledger.jobs.values()))
        target = self.rng.choice(WORKERS)
        self.the.services[target].kill()
        running = sum(job.final is None for job in self.driver.ledger.jobs.values())
        self.inject("kill -9", target, f"{running} jobs not yet final")
        time.sleep(3)
        self.the.services[target].start()

    def kill_beat(self) -> None:
        """kill -9 of the beat host that schedules: the standby takes over once the lock
        expires. Restarted after the lock's TTL, it stands by in turn."""
        target = self.the.active_beat() or BEATS[0]
        self.the.services[target].kill()
        self.inject("kill -9", target, "the beat holding the lock")
        standby = next(name for name in BEATS if name != target)
        took = self._wait(lambda: self.the.active_beat() == standby, timeout=30)
        self.inject("takeover", standby, f"took the lock: {took}")
        self.the.services[target].start()

    def restart_redis(self) -> None:
        """The replica restarted in place (SIGTERM, then a start on its AOF)."""
        target = next(name for name in REDIS_HOSTS if name != self._primary())
        self.inject("restart", target, "the replica: SIGTERM, then a start on its AOF")
        self.the.services[target].stop()
        self.the.services[target].start()

    def fail_over_redis(self) -> None:
        """kill -9 of the Redis primary: the sentinels promote the replica; the old
        primary restarts on its AOF and they make it the new one's replica."""
        target = self._primary()
        self.the.services[target].kill()
        self.inject("kill -9", target, "the primary: a failover")
        promoted = self._wait(lambda: self._primary() != target, timeout=30)
        self.the.services[target].start()
        following = self._wait(lambda: self.the.redis_role(target) == "slave:up", timeout=60)
        self.inject(
            "failover",
            "redis",
            f"replica promoted: {promoted}, old primary following it: {following}",
        )

    def _primary(self) -> str:
        return call_in(self.the.network.hosts["sentinel"].namespace, self.the.redis_primary)

    def s3_unavailable(self) -> None:
        self.inject("link down", "s3", "5 s")
        self.the.network.set_link("s3", False)
        time.sleep(5)
        self.the.network.set_link("s3", True)

    def partition_api(self) -> None:
        target = self.rng.choice(APIS)
        self.inject("partition", target, "8 s")
        self.the.network.set_link(target, False)
        time.sleep(8)
        self.the.network.set_link(target, True)

    def slow_link(self) -> None:
        target = self.rng.choice(APIS)
        self.inject("slow link", f"{target} -> s3", "tbf 16mbit, 15 s")
        self.the.network.shape(target, "s3", "16mbit")
        time.sleep(15)
        self.the.network.unshape(target)

    def delay_s3(self) -> None:
        """Each request from an API host to S3 held back, through its fault proxy."""
        target = self.rng.choice(APIS)
        self.inject("delay", f"{target} -> s3", f"{S3_DELAY * 1000:.0f} ms a request, 15 s")
        proxy = self.the.proxies[target]
        proxy.slow_down(S3_DELAY)
        time.sleep(15)
        proxy.slow_down(0)

    def packet_loss(self) -> None:
        target = self.rng.choice(APIS)
        self.inject("packet loss", f"s3 -> {target}", "nftables 5 %, 15 s")
        self.the.network.drop(target, "s3", 5)
        time.sleep(15)
        self.the.network.undrop(target)


# A run


@dataclass
class Report:
    seed: int
    seconds: float
    ledger: Ledger
    proofs: Counter[str]
    revived: dict[str, int]  # processes that exited on their own, restarted by the supervisor

    def lost(self) -> list[Operation]:
        return [operation for operation in self.ledger.operations if operation.lost]

    def table(self) -> str:
        rows: dict[str, Counter[str]] = {}
        for operation in self.ledger.operations:
            row = rows.setdefault(operation.kind, Counter())
            row["tried"] += 1
            row["failed visibly"] += operation.error is not None
            row["data lost"] += operation.lost is not None
        lines = [
            f"cluster chaos run: seed {self.seed}, {self.seconds:.0f} s",
            f"{'operation':<22}{'tried':>7}{'failed visibly':>16}{'data lost':>11}",
        ]
        total: Counter[str] = Counter()
        for kind, row in sorted(rows.items()):
            total.update(row)
            lines.append(
                f"{kind:<22}{row['tried']:>7}{row['failed visibly']:>16}{row['data lost']:>11}"
            )
        lines.append(
            f"{'all':<22}{total['tried']:>7}{total['failed visibly']:>16}{total['data lost']:>11}"
        )
        lines.append(f"{'fault':<22}{'at':>7}  detail")
        for name, count in sorted(self.revived.items()):
            lines.append(f"{'exited, restarted':<22}{'':>7}  {name}: {count} times")
        for fault in self.ledger.faults:
            lines.append(f"{fault.kind + ' ' + fault.target:<22}{fault.at:>6.0f}s  {fault.detail}")
        lines.append("proofs:")
        lines.extend(f"  {what}: {count}" for what, count in sorted(self.proofs.items()))
        failures = [op for op in self.ledger.operations if op.error or op.lost]
        lines.append(f"what clients saw fail (the first {min(len(failures), 15)}):")
        lines.extend(
            f"  {op.kind} {op.target}: {op.lost or op.error}"[:160] for op in failures[:15]
        )
        lines.append(f"violations: {len(self.ledger.violations)}")
        lines.extend(f"  {violation}" for violation in self.ledger.violations)
        return "\n".join(lines)


def run(the: Cluster, seed: int, seconds: float) -> Report:
    """Operations for `seconds` (at least as long as it takes to inject every fault once),
    then the proofs; the report holds the ledger and what was proved."""
    driver = Driver(the, seed)
    faults = Faults(driver, random.Random(seed ^ 0xFA17))
    client_ns = the.network.client.namespace
    call_in(the.network.hosts["s3"].namespace, lambda: _put_archive(the, seed))
    stop = threading.Event()

    def operate() -> None:
        while not stop.is_set():
            driver.one_operation()

    def poll() -> None:
        with the.http() as http:
            while not stop.wait(1):
                driver.poll_jobs(http)

    with threads_in(client_ns, OPERATION_THREADS + 1) as pool:
        running = [pool.submit(operate) for _ in range(OPERATION_THREADS)]
        poller = pool.submit(poll)
        plan = faults.plan()
        spacing = seconds / len(plan)
        for index, fault in enumerate(plan):
            time.sleep(max(0.0, (index + 0.5) * spacing - driver.elapsed()))
            fault()
        time.sleep(max(0.0, seconds - driver.elapsed()))
        stop.set()
        for future in [*running, poller]:
            future.result(timeout=DRAIN_TIMEOUT)
        chaos_seconds = driver.elapsed()
        proofs = pool.submit(prove, driver).result()
    revived = {name: service.revived for name, service in the.services.items() if service.revived}
    return Report(seed, chaos_seconds, driver.ledger, proofs, revived)


def _put_archive(the: Cluster, seed: int) -> None:
    """A tar archive of a few generated members, put straight into the bucket as another
    system would drop it there, for the batch-encrypt jobs."""
    buffer = io.BytesIO()
    rng = random.Random(seed)
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for index in range(4):
            data = rng.randbytes(MiB + index)
            member = tarfile.TarInfo(f"member-{index}.bin")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    s3 = the.s3()
    s3.put_object(Bucket=BUCKET, Key=TENANT_PREFIX + ARCHIVE, Body=buffer.getvalue())


# The proofs, once the faults are healed


def prove(driver: Driver) -> Counter[str]:
    """Every proof of the run, its violations added to the ledger; counts of what was
    checked."""
    the, ledger = driver.the, driver.ledger
    proofs: Counter[str] = Counter()
    if not _eventually(the.all_servers_up, 60):
        ledger.violation("the load balancer does not see both API hosts up after the run")
    _prove_jobs(driver, proofs)
    _prove_objects(driver, proofs)
    _prove_keys(driver, proofs)
    _prove_audit(driver, proofs)
    return proofs


def _eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(Exception):
            if condition():
                return True
        time.sleep(0.5)
    return False


def _prove_jobs(driver: Driver, proofs: Counter[str]) -> None:
    """Every job reaches a final state, once: polled again, it has not changed; none is
    left queued or running; no verify found data that is not what was sent."""
    ledger = driver.ledger
    with driver.the.http() as http:
        _eventually(lambda: driver.poll_jobs(http) == 0, JOB_TIMEOUT)
        for job in ledger.jobs.values():
            if job.final is None:
                # A job answered for was confirmed by the replica a failover promotes: a
                # 404 is a job lost, as is one that never ends.
                answer = http.get(f"{JOBS}/{job.id}")
                ledger.violation(
                    f"job {job.id} ({job.kind} {job.target}) never reached a final state: "
                    f"{answer.status_code} {answer.text[:120]}"
                )
                continue
            again = http.get(f"{JOBS}/{job.id}").json()
            if (again["status"], again.get("error")) != (
                job.final["status"],
                job.final.get("error"),
            ):
                ledger.violation(f"job {job.id} changed after its final state: {again['status']}")
            code = (job.final.get("error") or {}).get("code")
            if code in DATA_CODES:
                ledger.violation(f"job {job.id} ({job.kind} {job.target}) found bad data: {code}")
            proofs[f"jobs {job.final['status']}"] += 1


def _prove_objects(driver: Driver, proofs: Counter[str]) -> None:
    """Every object in the bucket is whole and is what was sent; every acknowledged one
    is there; every pending upload is of a stream whose client saw an error (or of a job
    that failed), and the bucket's lifecycle rule then leaves none."""
    the, ledger = driver.the, driver.ledger
    s3_ns = the.network.hosts["s3"].namespace
    listed = call_in(s3_ns, lambda: _keys(the, "chaos/"))
    for key, stored in ledger.stored.items():
        if stored.acknowledged and key not in listed:
            ledger.violation(f"object {key} was acknowledged and is missing")
            driver.record(Operation("final-read", key, stored.size, lost="acknowledged, missing"))
    for key in listed:
        if key not in ledger.stored:
            ledger.violation(f"object {key} is in the bucket but was never sent")
            continue
        read = driver.read_back(key, kind="final-read")
        if read.error is not None:
            read.lost = f"in the bucket but unreadable: {read.error}"
        proofs["objects whole"] += read.lost is None
        proofs["objects stored though their client saw an error"] += not ledger.stored[
            key
        ].acknowledged
    failed_jobs = {
        job.target
        for job in ledger.jobs.values()
        if job.final and job.final["status"] != "succeeded"
    }
    pending = call_in(s3_ns, lambda: _pending(the))
    for key in pending:
        relative = key.removeprefix(TENANT_PREFIX)
        attempt = ledger.stored.get(relative)
        explained = (attempt is not None and not attempt.acknowledged) or any(
            relative.startswith(target) for target in failed_jobs
        )
        if not explained:
            ledger.violation(f"upload pending for {relative}, which no failed operation explains")
    proofs["uploads pending, then aborted by the lifecycle rule"] += len(pending)
    call_in(s3_ns, lambda: _lifecycle_rule(the))
    if call_in(s3_ns, lambda: _pending(the)):
        ledger.violation("uploads still pending after the lifecycle rule")


def _keys(the: Cluster, prefix: str) -> set[str]:
    pages = (
        the.s3()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix=TENANT_PREFIX + prefix)
    )
    return {
        item["Key"].removeprefix(TENANT_PREFIX)
        for page in pages
        for item in page.get("Contents", [])
    }


def _pending(the: Cluster) -> list[str]:
    uploads = the.s3().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    return [upload["Key"] for upload in uploads]


def _lifecycle_rule(the: Cluster) -> None:
    """What the bucket's `AbortIncompleteMultipartUpload` rule does once its delay has
    passed (moto does not run lifecycle rules)."""
    s3 = the.s3()
    for upload in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


def _prove_keys(driver: Driver, proofs: Counter[str]) -> None:
    """Every key record reads back with the versions its rotations made, and its material
    unseals: a small round trip under it."""
    ledger = driver.ledger
    with driver.the.http() as http:
        for seen in ledger.keys.values():
            response = http.get(f"{KEYS}/{seen.kid}")
            if seen.created is None and response.status_code == 404:
                continue  # its creation failed visibly and did not happen
            if response.status_code != 200:
                ledger.violation(f"key {seen.kid}: {response.status_code} {response.text[:200]}")
                continue
            versions = len(response.json()["versions"])
            low, high = 1 + seen.rotations_acknowledged, 1 + seen.rotations_tried
            if not low <= versions <= high:
                ledger.violation(f"key {seen.kid} has {versions} versions, not {low} to {high}")
            operation = driver.stream_back(seen.kid, 64 * 1024 + 7, seed=len(seen.kid))
            operation.kind = "final-key-check"
            if operation.error is not None:
                operation.lost = f"key {seen.kid} does not seal and open: {operation.error}"
            proofs["keys intact"] += operation.lost is None


def _prove_audit(driver: Driver, proofs: Counter[str]) -> None:
    """`sealstream audit verify` passes over the trail every process kept, checked
    against the checkpoints they printed."""
    verified = driver.the.audit_verify()
    lines = (verified.stdout + verified.stderr).strip().splitlines()
    if verified.returncode != 0:
        driver.ledger.violation(f"audit verify exited {verified.returncode}: {lines[:10]}")
    notes = [line for line in lines if line.startswith("note: chain")]
    proofs[f"audit verify: exit {verified.returncode}"] += 1
    proofs["audit chains not closed (their process running, or killed)"] += len(notes)
    proofs.update(f"audit verify said: {line}"[:150] for line in lines if line not in notes)
