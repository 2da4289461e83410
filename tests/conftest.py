"""Shared fixtures: the moto S3 server, a fresh store of each backend per test, and a live
API server on each backend."""

import os
import ssl
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import httpx
import pytest

from keystore import LocalKek
from sealstream.server import create_app
from sealstream.settings import Settings
from sealstream.wiring import Parts
from storage import MIN_PART_SIZE, LocalStore, ObjectStore, S3Store
from storage.integrity import Records
from tests.support.services import AWS_TEST_ENVIRONMENT, api_server, moto_server

if TYPE_CHECKING:
    from fastapi import FastAPI
    from mypy_boto3_s3 import S3Client

# Small pages make a listing of a few dozen keys cross page boundaries.
TEST_PAGE_SIZE = 7

S3StoreFactory = Callable[..., S3Store]


# The modules holding the suite's longest tests (worker processes killed and waited out,
# servers started as processes, a distribution built and installed), longest first. They
# are started first, so that the xdist workers end together: started last, one of them
# kept a worker busy for its whole length after the other had run out of tests.
LONGEST_FIRST = (
    "test_jobs_celery.py",
    "test_client_distribution.py",
    "test_audit.py",
    "test_cli_serve.py",
    "test_serve_processes.py",
    "test_cli_commands.py",
    "test_jobs_fanout_workers.py",
    "test_jobs_store.py",
    "test_api_openapi.py",
    "test_api_object_reads.py",
    "test_api_transport.py",
    "test_jobs_queue_loss.py",
    "test_jobs_sentinel.py",
    "test_beat.py",
    "test_envelope_interop.py",
)


# A memory file system, where the machine has one: the local store syncs each object, its
# metadata and their directory to disk, milliseconds each on a disk, which thousands of
# tests' writes added up to minutes of waiting. What the tests check does not depend on it.
MEMORY_FILE_SYSTEM = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    """Temporary directories (tmp_path) in MEMORY_FILE_SYSTEM, unless told where."""
    told = config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT")
    if not told and MEMORY_FILE_SYSTEM.is_dir() and os.access(MEMORY_FILE_SYSTEM, os.W_OK):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(MEMORY_FILE_SYSTEM)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole modules of LONGEST_FIRST first, in its order; every module keeps its own order."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def aws_environment() -> Iterator[None]:
    """Dummy AWS credentials and region for this process, so no real account is ever used."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_TEST_ENVIRONMENT.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def moto_endpoint(aws_environment: None) -> Iterator[str]:
    """The URL of a moto server shared by the session."""
    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def moto_s3(moto_endpoint: str) -> "S3Client":
    """A plain boto3 client of the moto server, to arrange what a test needs."""
    return boto3.session.Session().client("s3", endpoint_url=moto_endpoint)


@pytest.fixture
def s3_bucket(moto_s3: "S3Client") -> str:
    """A new, empty bucket on the moto server."""
    name = f"test-{uuid.uuid4().hex}"
    moto_s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def make_s3_store(moto_endpoint: str, s3_bucket: str) -> S3StoreFactory:
    """Builds S3 stores on the test's bucket with small parts and pages; kwargs override."""

    def make(**options: Any) -> S3Store:
        settings: dict[str, Any] = {
            "endpoint_url": moto_endpoint,
            "part_size": MIN_PART_SIZE,
            "page_size": TEST_PAGE_SIZE,
        }
        settings.update(options)
        return S3Store(settings.pop("bucket", s3_bucket), **settings)

    return make


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh, empty store of each backend."""
    if request.param == "local":
        return LocalStore(tmp_path / "bucket")
    make: S3StoreFactory = request.getfixturevalue("make_s3_store")
    return make()


ADMIN_TOKEN = "test-admin-token-" + "x" * 24


@cache
def default_verification() -> ssl.SSLContext:
    """httpx's default certificate checks (certifi's roots), made once for every test
    client: loading the roots cost each client a tenth of a second on a loaded machine."""
    return httpx.create_ssl_context()


@dataclass
class Api:
    """A live API server of one backend, and what a test needs to talk to it."""

    url: str
    settings: Settings
    objects: ObjectStore
    records: Records  # the sealed records in `objects`
    parts: Parts  # the server's own

    @classmethod
    def of(cls, url: str, settings: Settings, app: "FastAPI") -> "Api":
        """The live server at `url` serving `app`, built from `settings`."""
        services = app.state.services
        return cls(url, settings, services.objects, services.records, services)

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url, headers=headers, timeout=60, verify=default_verification()
        )


TEST_SETTINGS: dict[str, Any] = {"admin_token": ADMIN_TOKEN, "key_cache_ttl": 0.5}


def local_settings(root: Path) -> Settings:
    """Settings for a server on the local-directory backend under `root`."""
    return Settings(storage_url=f"file://{root / 'storage'}", **TEST_SETTINGS)


@contextmanager
def live_api(settings: Settings) -> Iterator[Api]:
    """A live API server (uvicorn over HTTP) built from `settings`."""
    app = create_app(settings)
    with api_server(app, settings=settings) as url:
        yield Api.of(url, settings, app)


def api_settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for a server on the local-directory backend or the moto S3 server."""
    if backend == "local":
        return local_settings(tmp_path)
    kek_file = tmp_path / "kek"
    LocalKek.load_or_create(kek_file)  # mode 0600
    return Settings(
        storage_url=f"s3://{request.getfixturevalue('s3_bucket')}",
        s3_endpoint_url=request.getfixturevalue("moto_endpoint"),
        kek_file=kek_file,
        s3_part_size=MIN_PART_SIZE,
        **TEST_SETTINGS,
    )


@pytest.fixture(params=["local", "s3"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    """A live API server (uvicorn over HTTP) on each storage backend."""
    with live_api(api_settings(request.param, tmp_path, request)) as api:
        yield api


# Job tests: a redis-server, Celery worker processes, and a whole job stack


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """A Redis primary, its replica and a sentinel watching them as `MASTER`
    (tests/support/sentinel.py): the sentinel URL, and the ports of the three."""
    from tests.support.sentinel import sentinel_group

    with sentinel_group(tmp_path) as group:
        yield group


@pytest.fixture
def redis_server(tmp_path: Path) -> "Iterator[RedisServer]":
    """A `redis-server` of the test's own on a free port (fails if it is not installed)."""
    from tests.support.services import redis_server as start_redis

    with start_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def celery_worker(tmp_path: Path) -> "Iterator[Callable[[dict[str, str]], CeleryWorker]]":
    """Starts `celery -A workers.celery_app worker` processes with the given `SEALSTREAM_*`
    environment; each is stopped (SIGKILL at the latest) at the end of the test."""
    from contextlib import ExitStack

    from tests.support.services import celery_worker as start_worker

    with ExitStack() as workers:

        def start(env: dict[str, str]) -> "CeleryWorker":
            log = tmp_path / f"worker-{uuid.uuid4().hex[:8]}.log"
            return workers.enter_context(start_worker(env, log))

        yield start


@pytest.fixture
def job_stack(tmp_path: Path, moto_endpoint: str, s3_bucket: str) -> "Iterator[JobStack]":
    """A redis-server, an API server whose jobs go to Celery, and one Celery worker process
    that reaches the moto bucket through an `S3FaultProxy` (unpaced until a test paces it),
    sharing the bucket and KEK; the key `mySymKey` exists in the default tenant."""
    from tests.support.http import create_key
    from tests.support.jobs import job_stack as start_stack

    with start_stack(tmp_path, moto_endpoint, s3_bucket, proxied=True) as stack:
        with stack.client() as client:
            create_key(client)
        yield stack


if TYPE_CHECKING:
    from tests.support.jobs import JobStack
    from tests.support.services import CeleryWorker, RedisServer
