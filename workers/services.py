"""The parts a job needs, built from `Settings`: stores, sealed records, keys, object
spaces, job records."""

from dataclasses import dataclass
from datetime import timedelta
from functools import partial

from keystore import Kek, KeyStore
from sealstream.settings import Settings
from sealstream.wiring import (
    configured,
    open_kek,
    open_keystore,
    open_object_store,
    open_service_records,
)
from services.jobs import JobStore, MemoryJobStore, RedisJobStore
from services.placement import Spaces
from storage import ObjectStore
from storage.integrity import Records


@dataclass(frozen=True)
class WorkerServices:
    settings: Settings
    objects: ObjectStore  # the service's own store
    records: Records  # the records kept there: keys, tokens, objects, job reports
    kek: Kek
    keys: KeyStore
    spaces: Spaces
    jobs: JobStore


def open_job_store(settings: Settings, records: Records) -> JobStore:
    ttl = timedelta(seconds=settings.job_ttl)
    if settings.redis_url:
        with configured("SEALSTREAM_REDIS_URL"):
            return RedisJobStore.from_url(settings.redis_url, records, ttl)
    return MemoryJobStore(records, ttl)


def build_worker_services(settings: Settings) -> WorkerServices:
    objects = open_object_store(settings)
    kek = open_kek(settings)
    records = open_service_records(settings, objects, kek)
    return WorkerServices(
        settings=settings,
        objects=objects,
        records=records,
        kek=kek,
        keys=open_keystore(settings, records, kek),
        spaces=Spaces(objects, settings.tenant_buckets, partial(open_object_store, settings)),
        jobs=open_job_store(settings, records),
    )
