"""The parts a job needs, built from `Settings`: stores, keys, object spaces, job records."""

from dataclasses import dataclass
from datetime import timedelta

from keystore import KeyStore
from sealstream.settings import Settings
from sealstream.spaces import Spaces
from sealstream.wiring import configured, open_keystore, open_object_store
from storage import ObjectStore
from workers.jobs import JobStore, MemoryJobStore, RedisJobStore


@dataclass(frozen=True)
class WorkerServices:
    settings: Settings
    objects: ObjectStore  # the service's own store: key, object and job records
    keys: KeyStore
    spaces: Spaces
    jobs: JobStore


def open_job_store(settings: Settings, objects: ObjectStore) -> JobStore:
    ttl = timedelta(seconds=settings.job_ttl)
    if settings.redis_url:
        with configured("SEALSTREAM_REDIS_URL"):
            return RedisJobStore.from_url(settings.redis_url, objects, ttl)
    return MemoryJobStore(objects, ttl)


def build_worker_services(settings: Settings) -> WorkerServices:
    objects = open_object_store(settings)
    return WorkerServices(
        settings=settings,
        objects=objects,
        keys=open_keystore(settings, objects),
        spaces=Spaces(settings, objects),
        jobs=open_job_store(settings, objects),
    )
