"""The production topology on one machine, for the cluster test: each part in a network
namespace of its own (`tests/support/netns.py`), with its own address, as on hosts.

    client ─▶ lb (HAProxy, deploy/haproxy/haproxy.cfg) ─TLS passed through─▶ api1, api2
                                                          (sealstream serve --workers 2)
    api1, api2, worker1, worker2, beat1, beat2 ─▶ redis1 + redis2 (a primary and its replica,
        AOF on, watched by three sentinels on redis1, redis2 and sentinel), s3 (moto)

Each API host reaches S3 through the project's fault proxy (`tests/support/s3_proxy.py`),
run on the host itself, so that requests to S3 can be delayed.

Every process is started with `ip netns exec`, as the leader of its own process group,
so that killing a host (`Service.kill`) kills everything it ran, as a lost machine would.
"""

import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import httpx
import redis

from audit.sinks import CHECKPOINT_LINE_KEY
from keystore import LocalKek
from sealstream_client import SealstreamClient
from storage import MIN_PART_SIZE
from tests.conftest import ADMIN_TOKEN
from tests.support.load_balancer import RUNNING, haproxy, server_states, write_config
from tests.support.netns import Network, call_in, sweep_leftovers
from tests.support.project import REPO
from tests.support.s3_proxy import S3FaultProxy
from tests.support.services import AWS_TEST_ENVIRONMENT, self_signed_certificate

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BUCKET = "sealstream"
API_PORT = 8443
S3_PORT = 9000
REDIS_PORT = 6379
ROLES = (
    "lb", "api1", "api2", "worker1", "worker2", "beat1", "beat2", "redis1", "redis2", "sentinel",
    "s3",
)  # fmt: skip
REDIS_HOSTS = ("redis1", "redis2")
SENTINEL_HOSTS = ("redis1", "redis2", "sentinel")
SENTINEL_PORT = 26379
SENTINEL_MASTER = "jobs"
APIS = ("api1", "api2")
WORKERS = ("worker1", "worker2")
BEATS = ("beat1", "beat2")  # one schedules, the other stands by
API_PROCESSES = 2  # server processes per API host, as one per core of a two-core host

# Jobs as in production, but on a test's clock: the broker's visibility timeout is longer
# than any task, so a killed worker's job is finished by the stale-job sweep, which beat
# runs every few seconds, within a bounded time.
JOB_SETTINGS = {
    "SEALSTREAM_JOB_VISIBILITY_TIMEOUT": "3600",
    "SEALSTREAM_JOB_STALE_AFTER": "40",
    "SEALSTREAM_JOB_LEASE_TTL": "5",
    "SEALSTREAM_LIFECYCLE_INTERVAL": "5",
    "SEALSTREAM_JOB_REQUEUE_AFTER": "20",
    "SEALSTREAM_BEAT_LOCK_TTL": "10",
}
BEAT_TOOK_LOCK, BEAT_LOST_LOCK = "beat: took the lock", "beat: lost the lock"  # workers.beat
START_TIMEOUT = 90  # seconds: a loaded two-core machine starts Python slowly


class ClusterError(RuntimeError):
    """A part of the cluster did not start."""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(Exception):
            if condition():
                return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(0.2)


@dataclass
class Service:
    """A process of one host, started and restarted with the same command, its output
    appended to `log`."""

    name: str
    namespace: str
    command: list[str]
    env: dict[str, str]
    log: Path
    ready: Callable[["Service"], bool]
    process: "subprocess.Popen[bytes] | None" = None
    starts: int = 0
    revived: int = 0  # times it exited on its own and was started again
    lock: threading.RLock = field(default_factory=threading.RLock)

    def start(self) -> None:
        """Start the process and wait until it is ready."""
        self.spawn()
        wait_for(lambda: self.alive() and self.ready(self), f"{self.name} to be ready")

    def spawn(self) -> None:
        with self.lock:
            self.starts += 1
            with self.log.open("ab") as sink:
                sink.write(f"--- start {self.starts}\n".encode())
                sink.flush()
                self.process = subprocess.Popen(
                    ["ip", "netns", "exec", self.namespace, *self.command],
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def revive(self) -> bool:
        """Start the process again if it exited on its own (not killed by `kill` or
        `stop`), as a supervisor would; whether it did."""
        with self.lock:
            exited = self.process is not None and self.process.poll() is not None
            if exited:
                self.revived += 1
        if exited:
            self.spawn()
        return exited

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the host's whole process group: nothing gets to clean up."""
        with self.lock:
            if self.process is None:
                return
            self.signal(9)
            self.process.wait()
            self.process = None

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        with self.lock:
            if self.alive() and self.process is not None:
                self.signal(15)
                with suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=grace)
            self.kill()


@dataclass
class Cluster:
    """The hosts, their services, and what a client needs to reach the load balancer."""

    network: Network
    directory: Path
    certificate: Path
    services: dict[str, Service] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # the settings every host shares
    proxies: dict[str, S3FaultProxy] = field(default_factory=dict)  # an API host's way to S3

    @property
    def url(self) -> str:
        return f"https://{self.network.front_address}:{API_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.network.hosts['s3'].address}:{S3_PORT}"

    @property
    def redis_url(self) -> str:
        """The sentinels, as the service takes them: it asks them for the primary."""
        hosts = self.network.hosts
        return (
            ";".join(f"sentinel://{hosts[name].address}:{SENTINEL_PORT}" for name in SENTINEL_HOSTS)
            + "/0"
        )

    def redis_primary(self) -> str:
        """The Redis host the sentinels name as the primary (ask from a thread in the
        sentinel host's namespace)."""
        address = self.network.hosts["sentinel"].address
        client = redis.Redis(host=address, port=SENTINEL_PORT, socket_timeout=2)
        try:
            found = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        finally:
            client.close()
        assert isinstance(found, tuple)
        primary = found[0].decode() if isinstance(found[0], bytes) else found[0]
        return next(name for name in REDIS_HOSTS if self.network.hosts[name].address == primary)

    @property
    def stats(self) -> Path:
        return self.directory / "haproxy.sock"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.certificate)

    def client(self, timeout: float = 30) -> SealstreamClient:
        """The project's full-duplex client of the load balancer; use it from a thread in
        the client namespace (`netns.threads_in`)."""
        return SealstreamClient(self.url, ADMIN_TOKEN, timeout=timeout, ssl_context=self.tls())

    def http(self, timeout: float = 30) -> httpx.Client:
        """An httpx client of the load balancer, for small requests; use it from threads
        in the client namespace."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.Client(base_url=self.url, verify=self.tls(), headers=headers, timeout=timeout)

    def s3(self) -> "S3Client":
        """A boto3 S3 client of the moto server, for the checks; use it from threads in
        the s3 namespace."""
        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        ).client("s3", endpoint_url=self.s3_endpoint)

    def redis_role(self, host: str) -> str:
        """`master`, or `slave:up` / `slave:down` (its link to the primary), of a Redis
        host."""
        address = self.network.hosts[host].address

        def role() -> str:
            client = redis.Redis(host=address, port=REDIS_PORT, socket_timeout=2)
            try:
                info = client.info("replication")
            finally:
                client.close()
            if info["role"] == "master":
                return "master"
            return f"slave:{info['master_link_status']}"

        return call_in(self.network.hosts[host].namespace, role)

    def audit_verify(self) -> "subprocess.CompletedProcess[str]":
        """`sealstream audit verify` over the trail in the bucket, run on the s3 host,
        checked against the checkpoints every process printed to its log (as a log
        shipper would have collected them)."""
        shipped = self.directory / "checkpoints.log"
        with shipped.open("w") as sink:
            for log in sorted((self.directory / "logs").glob("*.log")):
                sink.writelines(
                    line for line in log.open(errors="replace") if CHECKPOINT_LINE_KEY in line
                )
        command = [str(Path(sys.executable).with_name("sealstream")), "audit", "verify",
                   "--checkpoints", str(shipped)]  # fmt: skip
        return subprocess.run(
            ["ip", "netns", "exec", self.network.hosts["s3"].namespace, *command],
            cwd=REPO,
            env=_environment(self.env),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def active_beat(self) -> str:
        """The beat host holding the lock, by its log since it last started: the one whose
        last word on the lock was that it took it (the later, by the log's timestamps,
        should both say so)."""
        holding = {}
        for name in BEATS:
            lines = self.services[name].output().rsplit("--- start", 1)[-1].splitlines()
            said = [line for line in lines if BEAT_TOOK_LOCK in line or BEAT_LOST_LOCK in line]
            if said and BEAT_TOOK_LOCK in said[-1]:
                holding[name] = said[-1]  # starts with Celery's "[YYYY-MM-DD HH:MM:SS,mmm"
        return max(holding, key=lambda name: holding[name]) if holding else ""

    def all_servers_up(self) -> bool:
        return set(server_states(self.stats).values()) == {RUNNING}

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.kill()
        for proxy in self.proxies.values():
            proxy.close()


def _environment(extra: dict[str, str]) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}
    return {**inherited, **AWS_TEST_ENVIRONMENT, "PYTHONUNBUFFERED": "1", **extra}


def _printed(text: str) -> Callable[[Service], bool]:
    return lambda service: text in service.output().rsplit("--- start", 1)[-1]


@contextmanager
def cluster(directory: Path) -> Iterator[Cluster]:
    """The whole cluster, up and healthy; every process and namespace is gone on the way
    out, whatever happened."""
    sweep_leftovers()
    with ExitStack() as exits:
        network = Network(ROLES, front="lb")
        exits.callback(network.delete)
        certificate, key = self_signed_certificate(directory, network.front_address)
        the = Cluster(network, directory, certificate)
        exits.callback(the.stop)
        _start(the, key)
        stop = threading.Event()
        supervisor = threading.Thread(target=_supervise, args=(the, stop), daemon=True)
        supervisor.start()
        exits.callback(supervisor.join)
        exits.callback(stop.set)
        yield the


def _supervise(the: Cluster, stop: threading.Event) -> None:
    """Start again any process that exits on its own, as `restart: unless-stopped` does
    in docker-compose.yml (a Celery worker exits when Redis refuses its writes)."""
    while not stop.wait(1):
        for service in list(the.services.values()):
            service.revive()


def _start(the: Cluster, tls_key: Path) -> None:
    hosts, directory = the.network.hosts, the.directory
    (directory / "logs").mkdir(exist_ok=True)
    kek_file = directory / "kek"
    LocalKek.load_or_create(kek_file)

    def add(
        name: str,
        command: list[str],
        env: dict[str, str],
        ready: Callable[[Service], bool],
        host: str | None = None,
    ) -> None:
        service = Service(
            name, hosts[host or name].namespace, command, _environment(env),
            directory / "logs" / f"{name}.log", ready,
        )  # fmt: skip
        the.services[name] = service
        service.start()

    python = sys.executable
    s3_address = hosts["s3"].address
    add("s3", [str(Path(python).with_name("moto_server")), "-H", s3_address, "-p", str(S3_PORT)],
        {}, lambda _: _create_bucket(the))  # fmt: skip
    _start_redis(the, add)
    common = {
        "SEALSTREAM_STORAGE_URL": f"s3://{BUCKET}",
        "SEALSTREAM_S3_ENDPOINT_URL": the.s3_endpoint,
        "SEALSTREAM_KEK_FILE": str(kek_file),
        "SEALSTREAM_REDIS_URL": the.redis_url,
        "SEALSTREAM_REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
        "SEALSTREAM_S3_PART_SIZE": str(MIN_PART_SIZE),
        # What the service answers for waits for the replica, which a failover promotes.
        "SEALSTREAM_REDIS_MIN_REPLICAS": "1",
        **JOB_SETTINGS,
    }
    the.env = common
    for name in APIS:
        address = hosts[name].address
        proxy = call_in(hosts[name].namespace, partial(_started_proxy, the.s3_endpoint))
        the.proxies[name] = proxy
        add(
            name,
            [str(Path(python).with_name("sealstream")), "serve", "--host", address,
             "--port", str(API_PORT), "--tls-cert", str(the.certificate),
             "--tls-key", str(tls_key), "--workers", str(API_PROCESSES)],
            {**common, "SEALSTREAM_ADMIN_TOKEN": ADMIN_TOKEN,
             "SEALSTREAM_S3_ENDPOINT_URL": proxy.url},
            _ready(the, hosts[name].namespace, address),
        )  # fmt: skip
    for name in WORKERS:
        add(
            name,
            [python, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "prefork",
             "-c", "1", "-n", f"{name}@%h", "-l", "INFO", "--without-heartbeat",
             "--without-gossip", "--without-mingle"],
            common,
            _printed(" ready."),
        )  # fmt: skip
    for name in BEATS:
        add(
            name,
            [python, "-m", "celery", "-A", "workers.celery_app", "beat", "-l", "INFO",
             "--schedule", str(directory / f"{name}-schedule")],
            common,
            _printed("beat: Starting"),
        )  # fmt: skip
    config, _ = write_config(
        directory, f"{the.network.front_address}:{API_PORT}",
        [f"{hosts[name].address}:{API_PORT}" for name in APIS],
    )  # fmt: skip
    add("lb", [haproxy(), "-db", "-f", str(config)], {}, lambda _: the.all_servers_up())


def _started_proxy(upstream: str) -> S3FaultProxy:
    """A fault proxy to `upstream`, started from a thread in the host's namespace: its
    socket and the threads it starts (namespaces are per thread) belong there."""
    return S3FaultProxy(upstream).__enter__()


def _create_bucket(the: Cluster) -> bool:
    def create() -> bool:
        the.s3().create_bucket(Bucket=BUCKET)
        return True

    return call_in(the.network.hosts["s3"].namespace, create)


Adder = Callable[..., None]


def _start_redis(the: Cluster, add: Adder) -> None:
    """A primary (redis1) and its replica (redis2), both with AOF, and three sentinels.
    Either server refuses writes while no replica copies it (`min-replicas-to-write`), so
    that a primary cut off from the others stops taking writes it would lose."""
    hosts = the.network.hosts
    primary = hosts["redis1"].address
    for name in REDIS_HOSTS:
        directory = the.directory / name
        directory.mkdir(exist_ok=True)
        replica = ["--replicaof", primary, str(REDIS_PORT)] if name != "redis1" else []
        add(
            name,
            ["redis-server", "--bind", hosts[name].address, "--port", str(REDIS_PORT),
             "--protected-mode", "no", "--appendonly", "yes", "--save", "",
             "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
             "--dir", str(directory), *replica],
            {},
            _redis_answers(the, name, REDIS_PORT),
        )  # fmt: skip
    for index, name in enumerate(SENTINEL_HOSTS, 1):
        config = the.directory / f"sentinel{index}.conf"
        config.write_text(
            f"port {SENTINEL_PORT}\nbind {hosts[name].address}\nprotected-mode no\n"
            f"sentinel monitor {SENTINEL_MASTER} {primary} {REDIS_PORT} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} 2000\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
        )
        add(
            f"sentinel{index}",
            ["redis-sentinel", str(config)],
            {},
            _redis_answers(the, name, SENTINEL_PORT),
            host=name,
        )
    wait_for(lambda: the.redis_role("redis2") == "slave:up", "the replica to catch up")


def _redis_answers(the: Cluster, host: str, port: int) -> Callable[[Service], bool]:
    address = the.network.hosts[host].address

    def ping() -> bool:
        client = redis.Redis(host=address, port=port, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    return lambda _: call_in(the.network.hosts[host].namespace, ping)


def _ready(the: Cluster, namespace: str, address: str) -> Callable[[Service], bool]:
    """Whether the API at `address` answers /readyz with 200, asked from its own host."""

    def readyz() -> bool:
        context = ssl.create_default_context(cafile=the.certificate)
        context.check_hostname = False  # the certificate names the load balancer
        url = f"https://{address}:{API_PORT}/readyz"
        return httpx.get(url, verify=context, timeout=2).status_code == 200

    return lambda _: call_in(namespace, readyz)
