"""Building the service's parts from `Settings`: object store, KEK, sealed records, key
store, tenant spaces, job store and audit trail (`build_parts`).

The API and the workers both start here, so they always agree on where keys live, how
their material is wrapped, and which key the records they trust are sealed under. A
setting that cannot make its part raises `ConfigurationError`, whose message starts with
the setting's name.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property, partial
from pathlib import Path
from urllib.parse import urlparse, urlsplit

import boto3
from botocore.exceptions import BotoCoreError

from audit import (
    AUDIT_KEY_PURPOSE,
    AuditOptions,
    AuditSigner,
    AuditTrail,
    BucketSink,
    CheckpointSink,
    RedisSink,
    StdoutSink,
)
from keystore import Kek, KekError, KeyStore, KmsKek, LocalKek
from keystore.recordkey import (
    StoreNeedsUpgrade,
    open_record_key,
)
from sealstream.settings import Settings
from services.archives import ArchiveLimits
from services.jobs import JobStore, MemoryJobStore, RedisJobStore
from services.jobs.redis_store import redis_client
from services.placement import Spaces
from services.replicas import Replicas
from services.resumable import Uploads
from services.upload_anchor import UploadAnchor
from storage import ObjectStore, StorageError, StorageUnavailable, open_store
from storage.integrity import Records

EMBEDDED_KEK_NAME = ".kek"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parts:
    """What every process of the service is built from, and what a job runs with."""

    settings: Settings
    objects: ObjectStore  # the service's own store
    records: Records  # the records kept there: keys, tokens, objects, job reports
    kek: Kek
    keys: KeyStore
    spaces: Spaces
    jobs: JobStore
    audit: AuditTrail  # this process's chain: record lifecycle actions with `audit.lifecycle`

    def uploads(self) -> Uploads:
        """The resumable uploads, as the settings time them: anchored in Redis if there
        is one; without it, refused (all but the sweep), as a bucket writer could put back
        an older state and have a frame's IV seal other bytes; unless the store is a local
        directory that holds the KEK itself, whose writers hold the KEK already."""
        return Uploads(
            self.records,
            self.keys,
            self.spaces,
            expiry=timedelta(seconds=self.settings.upload_expiry),
            lock_for=timedelta(seconds=self.settings.upload_lock_seconds),
            anchor=self.upload_anchor,
            need_anchor=not kek_beside_data(self.settings),
            max_open=self.settings.max_open_uploads,
        )

    @cached_property
    def upload_anchor(self) -> UploadAnchor | None:
        if not self.settings.redis_url:
            return None
        with configured("SEALSTREAM_REDIS_URL"):
            return UploadAnchor(
                redis_client(self.settings.redis_url, self.settings.redis_sentinel_master),
                redis_replicas(self.settings),
                vouched=self.settings.redis_durable,
            )


class ConfigurationError(Exception):
    """The settings cannot make a working service; the message says what to set."""


@contextmanager
def configured(setting: str) -> Iterator[None]:
    """Failures to build a part from `setting` (the environment variable's name) raised
    as `ConfigurationError`s that name it. The messages caught quote no URL."""
    try:
        yield
    except (ValueError, KekError, StorageError, BotoCoreError) as error:
        raise ConfigurationError(f"{setting}: {error}") from error


def open_object_store(settings: Settings, bucket: str | None = None) -> ObjectStore:
    endpoint = _endpoint("SEALSTREAM_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    with configured("SEALSTREAM_STORAGE_URL"):
        return open_store(
            settings.storage_url,
            endpoint_url=endpoint,
            bucket=bucket,
            part_size=settings.s3_part_size,
            max_in_flight=settings.s3_parts_in_flight,
            sign_payloads=settings.s3_sign_payloads,
        )


def open_bucket_store(settings: Settings, bucket: str) -> ObjectStore:
    """The store of a bucket named at run time (a tenant's, or one a sealed record
    names): a failure there is that bucket's, raised as storage raises it (one the local
    store does not hold is `BucketNotFound`), not the settings', which opening the
    service's own store has checked."""
    try:
        return open_object_store(settings, bucket)
    except ConfigurationError as error:
        if isinstance(error.__cause__, StorageError):
            raise error.__cause__ from None
        raise


def local_storage_dir(settings: Settings) -> Path | None:
    """The directory of a `file://` storage URL, or None for S3."""
    url = urlparse(settings.storage_url)
    if url.scheme != "file":
        return None
    return Path(url.netloc + url.path).resolve()


def kek_beside_data(settings: Settings) -> bool:
    """Whether the KEK is a file inside the local storage directory (the embedded
    default's): then whoever can write the store can read the KEK too."""
    storage_dir = local_storage_dir(settings)
    if storage_dir is None or settings.kms_key_id:
        return False
    if settings.kek_file is None:
        return True
    return settings.kek_file.resolve().is_relative_to(storage_dir)


def open_kek(settings: Settings) -> Kek:
    """The KEK: AWS KMS, a KEK file, or (embedded default only) one generated beside the data."""
    if settings.kms_key_id:
        endpoint = _endpoint("SEALSTREAM_KMS_ENDPOINT_URL", settings.kms_endpoint_url)
        with configured("SEALSTREAM_KMS_KEY_ID"):
            client = boto3.client("kms", endpoint_url=endpoint)
        return KmsKek(settings.kms_key_id, client)
    if settings.kek_file is not None:
        with configured("SEALSTREAM_KEK_FILE"):
            return LocalKek.from_file(settings.kek_file)
    storage_dir = local_storage_dir(settings)
    if storage_dir is None:
        raise ConfigurationError(
            "SEALSTREAM_KEK_FILE: with S3 storage, set it or SEALSTREAM_KMS_KEY_ID"
        )
    with configured("SEALSTREAM_KEK_FILE"):
        return LocalKek.load_or_create(storage_dir / EMBEDDED_KEK_NAME)


def open_records(
    objects: ObjectStore, kek: Kek, *, store_id: str | None = None, upgrading: bool = False
) -> Records:
    """The service's own store, its records sealed under the record key the KEK gives for
    `store_id` (by default the store's bucket name).

    The key is looked for now, so that a KEK that is not the store's own, or a store that
    needs `sealstream upgrade-records`, stops a process at its start; a store that cannot
    be reached yet only defers that to the first request that needs a record.
    """
    store = store_id or objects.bucket
    source = partial(open_record_key, kek, objects, store, upgrading=upgrading)
    records = Records(objects, source, store_id=store)
    try:
        _ = records.key
    except StorageUnavailable as error:
        logger.warning("the record key will be looked for again on first use: %s", error)
    return records


def open_service_records(
    settings: Settings, objects: ObjectStore, kek: Kek, *, upgrading: bool = False
) -> Records:
    """`open_records` for a process that serves: a KEK that is not the store's own, or a
    store that needs upgrading, as a `ConfigurationError` naming what to fix."""
    kek_setting = "SEALSTREAM_KMS_KEY_ID" if settings.kms_key_id else "SEALSTREAM_KEK_FILE"
    try:
        return open_records(objects, kek, store_id=settings.store_id, upgrading=upgrading)
    except KekError as error:  # another KEK, a lost document, KMS refusing its key
        raise ConfigurationError(f"{kek_setting}: {error}") from error
    except StoreNeedsUpgrade as error:
        raise ConfigurationError(f"SEALSTREAM_STORAGE_URL: {error}") from error


def open_keystore(settings: Settings, records: Records, kek: Kek, audit: AuditTrail) -> KeyStore:
    """The key store; its usage counts shared through Redis if there is one, else kept
    in the key records; its rotations on a usage limit recorded in `audit`."""
    usage_redis = None
    if settings.redis_url:
        with configured("SEALSTREAM_REDIS_URL"):
            usage_redis = redis_client(settings.redis_url, settings.redis_sentinel_master)
    return KeyStore(
        records,
        kek,
        cache_ttl=settings.key_cache_ttl,
        usage_redis=usage_redis,
        usage_batch=settings.usage_batch,
        usage_flush_interval=settings.usage_flush_interval,
        usage_checkpoint_interval=settings.usage_checkpoint_interval,
        usage_max_rate=settings.usage_max_rate,
        on_usage_rotation=partial(_usage_rotation, audit),
        name_key_max_versions=settings.name_key_max_versions,
    )


def _usage_rotation(audit: AuditTrail, tenant: str, kid: str, version: int) -> None:
    audit.lifecycle("usage-rotation", tenant=tenant, key=kid, primaryVersion=version)


def _endpoint(setting: str, url: str | None) -> str | None:
    """An endpoint URL, checked here: botocore's own refusal would quote it, credentials
    and all."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        usable = False
    if not usable:
        raise ConfigurationError(f"{setting}: give an http:// or https:// URL")
    return url


def redis_replicas(settings: Settings) -> Replicas:
    """The Redis replicas that must confirm what the service answers for, and how long
    it waits for them."""
    return Replicas(settings.redis_min_replicas, settings.redis_replica_timeout)


def open_job_store(settings: Settings, records: Records) -> JobStore:
    """Job records in Redis, or for the embedded default (no Redis) in this process."""
    ttl = timedelta(seconds=settings.job_ttl)
    if settings.redis_url:
        with configured("SEALSTREAM_REDIS_URL"):
            return RedisJobStore.from_url(
                settings.redis_url,
                records,
                ttl,
                settings.redis_sentinel_master,
                redis_replicas(settings),
            )
    return MemoryJobStore(records, ttl)


def open_checkpoint_sink(settings: Settings) -> CheckpointSink | None:
    """Where audit checkpoints go besides the bucket, as `SEALSTREAM_AUDIT_CHECKPOINTS` says."""
    match settings.audit_checkpoints:
        case "stdout":
            return StdoutSink()
        case "redis":
            if not settings.redis_url:
                raise ConfigurationError("SEALSTREAM_AUDIT_CHECKPOINTS: 'redis' needs a Redis URL")
            with configured("SEALSTREAM_REDIS_URL"):
                return RedisSink(redis_client(settings.redis_url, settings.redis_sentinel_master))
        case "bucket":
            bucket = settings.audit_checkpoint_bucket
            if not bucket or bucket == open_object_store(settings).bucket:
                raise ConfigurationError(
                    "SEALSTREAM_AUDIT_CHECKPOINT_BUCKET: 'bucket' needs a second bucket"
                )
            return BucketSink(open_object_store(settings, bucket))
    return None


def audit_options(settings: Settings) -> AuditOptions:
    return AuditOptions(
        enabled=settings.audit,
        flush_interval=settings.audit_flush_ms / 1000,
        flush_events=settings.audit_flush_events,
        fail_after=settings.audit_fail_after,
        fail_open=settings.audit_fail_open,
        buffer_limit=settings.audit_buffer_limit,
        buffer_bytes=settings.audit_buffer_bytes,
        segment_bytes=settings.audit_segment_bytes,
        refusal_window=settings.audit_refusal_window,
        stdout=settings.audit_stdout,
    )


def open_audit(settings: Settings, records: Records, kek: Kek, role: str) -> AuditTrail:
    """This process's audit trail, in the service's own store, keyed and signed from the KEK."""
    return AuditTrail(
        records.store,
        lambda: records.key.derive(AUDIT_KEY_PURPOSE),
        AuditSigner(records, kek),
        open_checkpoint_sink(settings),
        audit_options(settings),
        role=role,
    )


def archive_limits(settings: Settings) -> ArchiveLimits:
    """How far one job may go into an archive, as the settings say."""
    return ArchiveLimits(
        max_expansion=settings.batch_max_expansion,
        max_unpacked=settings.batch_max_unpacked,
        max_member_size=settings.batch_max_member_size,
        max_header_size=settings.batch_max_header_size,
        max_members=settings.batch_max_members,
    )


def build_parts(settings: Settings, role: str = "api") -> Parts:
    """The parts of a process; `role` ("api", "worker") names its audit chain."""
    objects = open_object_store(settings)
    kek = open_kek(settings)
    records = open_service_records(settings, objects, kek)
    audit = open_audit(settings, records, kek, role)
    return Parts(
        settings=settings,
        objects=objects,
        records=records,
        kek=kek,
        keys=open_keystore(settings, records, kek, audit),
        spaces=Spaces(objects, settings.tenant_buckets, partial(open_bucket_store, settings)),
        jobs=open_job_store(settings, records),
        audit=audit,
    )
