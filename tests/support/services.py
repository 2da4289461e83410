"""Throwaway real services for the tests: each helper starts one on a local port, yields
where to reach it, and stops it on the way out."""

import datetime
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import redis
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from moto.server import ThreadedMotoServer
from starlette.types import ASGIApp

from api.serving import server_options
from sealstream.settings import Settings
from tests.support.ports import LOCALHOST, free_port

# Dummy credentials for the moto server. The config files are hidden so that a developer's
# own ~/.aws profile (endpoint, retries, real credentials) cannot leak into a test run.
AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto server speaking the AWS APIs over HTTP; yields its endpoint URL."""
    # Port 0: the server binds a port the kernel picks, so no other process can take it first.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def api_server(
    app: ASGIApp, tls: tuple[Path, Path] | None = None, settings: Settings | None = None
) -> Iterator[str]:
    """`app` served by uvicorn over real HTTP on a free local port, configured as
    `sealstream serve` configures it from `settings` (the defaults if None); yields its
    base URL.

    With `tls` (a certificate file and its key file) it serves HTTPS. uvicorn runs in a
    thread of the test process with logging left unconfigured, so its log records
    (access lines included) reach pytest's log capture.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOCALHOST, 0))  # bound here, so no other process can take the port
    port = listener.getsockname()[1]
    options = server_options(settings or Settings())
    if tls:
        options |= {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])}
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on", **options))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        https = tls or options["ssl_certfile"]
        yield f"{'https' if https else 'http'}://{LOCALHOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def self_signed_certificate(directory: Path, address: str = LOCALHOST) -> tuple[Path, Path]:
    """A certificate for the IP `address`, its own CA, and its key: (certificate file, key
    file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def terminate(process: "subprocess.Popen[str] | subprocess.Popen[bytes]") -> None:
    """Terminate a service process, killing it if it does not go within ten seconds."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class ServeProcess:
    """A `sealstream serve` process, what it printed on the way up (`banner`), and all it
    printed (`output`: the banner, then each line as it comes, read from the pipe all
    along: a pipe left unread fills, and the server then blocks on its next log line)."""

    url: str
    admin_token: str
    process: "subprocess.Popen[str]"
    banner: list[str]
    output: list[str]


@contextmanager
def sealstream_serve(
    cwd: Path, env: dict[str, str] | None = None, *args: str, scheme: str = "http"
) -> Iterator[ServeProcess]:
    """`sealstream serve` started as its own process in `cwd` (serving `scheme`: https
    when given a certificate); stopped with SIGTERM. Its admin token is the one `env`
    supplies, else the one it printed."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("sealstream")), "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    banner: list[str] = []
    output: list[str] = []
    reading = threading.Thread(target=_read_lines, args=(process.stdout, output), daemon=True)
    try:
        for line in process.stdout:
            banner.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                break
        else:
            raise RuntimeError("sealstream serve exited:\n" + "\n".join(banner))
        output.extend(banner)
        reading.start()
        token = (env or {}).get("SEALSTREAM_ADMIN_TOKEN") or next(
            line.split(":", 1)[1].strip() for line in banner if "admin token:" in line
        )
        yield ServeProcess(f"{scheme}://{LOCALHOST}:{port}", token, process, banner, output)
    finally:
        terminate(process)
        if reading.ident is not None:
            reading.join()  # the pipe ends with the process
        process.stdout.close()


def _read_lines(stream: IO[str], into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))


# Redis and Celery worker processes, for the job tests

REDIS_INSTALL_HINT = "redis-server is not installed (Debian: apt-get install redis-server)"
MEMORY_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None


class RedisServer:
    """A throwaway `redis-server` on a local port that syncs its append-only file before
    each answer, as resumable uploads need. It can be stopped and started again on the
    same port, coming back empty as a Redis that lost its data does."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_INSTALL_HINT)
        self._binary = binary
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # The append-only file in memory where there is a tmpfs: each write is synced
        # (as uploads need Redis to), at no disk's cost to the tests' time.
        self._data = Path(tempfile.mkdtemp(prefix="redis-", dir=MEMORY_DIR))

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start on a free port, or on the port it had before if it has run already."""
        ports = [self.port] * 3 if self.port else [free_port() for _ in range(5)]
        for port in ports:  # another process may take a port between probe and bind
            if self._launch(port):
                self.port = port
                return
        raise RuntimeError(f"redis-server did not start; see {self.directory}")

    def stop(self) -> None:
        """Stop the server and throw its append-only file away."""
        if self.process is None:
            return
        terminate(self.process)
        self.process = None
        shutil.rmtree(self._data, ignore_errors=True)

    def restart(self) -> None:
        """Stop, then start a new, empty server on the same port."""
        self.stop()
        self.start()

    def _launch(self, port: int) -> bool:
        self.starts += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        self._data.mkdir(exist_ok=True)
        log = self.directory / f"redis-{self.starts}.log"
        command = [
            self._binary,
            "--port", str(port),
            "--bind", LOCALHOST,
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--dir", str(self._data),
            "--logfile", str(log),
        ]  # fmt: skip
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        client = redis.Redis(host=LOCALHOST, port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if client.ping():
                        self.process = process
                        return True
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        process.kill()
        process.wait()
        return False


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A `redis-server` of its own in `directory` (logs); stopped on the way out."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class CeleryWorker:
    """A `celery worker` process (the leader of its own process group) and its log."""

    name: str
    process: "subprocess.Popen[bytes]"
    log: Path
    hostname: str = ""  # name@host, as remote control addresses it; known once ready

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pool_pids(self) -> list[int]:
        """The worker's child processes (its prefork pool), read from /proc."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid:  # the parent pid
                    children.append(int(stat.parent.name))
        return children

    def signal(self, signum: int) -> None:
        """Send `signum` to the worker and its pool processes."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the whole process group: the worker dies with no chance to clean up."""
        self.signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float = 10) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it takes longer than `grace` seconds
        (0: SIGKILL at once, for a worker whose Redis and bucket are thrown away next)."""
        if grace > 0 and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        self.kill()  # also any pool process left behind


@contextmanager
def celery_worker(
    env: dict[str, str],
    log: Path,
    *,
    pool: str = "prefork",
    loglevel: str = "INFO",
    stop_grace: float = 10,
) -> Iterator[CeleryWorker]:
    """`celery -A workers.celery_app worker` as its own process group, configured by `env`
    (`SEALSTREAM_*`) and the dummy AWS credentials, one task at a time; yields once it
    reports ready, and is stopped on the way out (see `CeleryWorker.stop`)."""
    name = f"sealstream-test-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "-P", pool, "-c", "1", "-n", f"{name}@%h", "-l", loglevel,
        "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SEALSTREAM_")}
    full_env = {**inherited, **AWS_TEST_ENVIRONMENT, "PYTHONUNBUFFERED": "1", **env}
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parents[2],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = CeleryWorker(name, process, log)
    try:
        deadline = time.monotonic() + 60
        ready = re.compile(rf"({re.escape(name)}@\S+) ready\.")
        while (found := ready.search(worker.output())) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{worker.output()[-4000:]}")
            time.sleep(0.05)
        worker.hostname = found.group(1)
        yield worker
    finally:
        worker.stop(stop_grace)
