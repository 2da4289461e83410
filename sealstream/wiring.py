"""Building the service's parts from `Settings`: object store, KEK and key store.

The API and the workers both start here, so they always agree on where keys live and
how their material is wrapped.
"""

from pathlib import Path
from urllib.parse import urlparse

import boto3

from keystore import Kek, KeyStore, KmsKek, LocalKek
from sealstream.settings import Settings
from storage import ObjectStore, open_store

EMBEDDED_KEK_NAME = ".kek"


class ConfigurationError(Exception):
    """The settings cannot make a working service; the message says what to set."""


def open_object_store(settings: Settings, bucket: str | None = None) -> ObjectStore:
    return open_store(
        settings.storage_url,
        endpoint_url=settings.s3_endpoint_url,
        bucket=bucket,
        part_size=settings.s3_part_size,
        max_in_flight=settings.s3_parts_in_flight,
        sign_payloads=settings.s3_sign_payloads,
    )


def local_storage_dir(settings: Settings) -> Path | None:
    """The directory of a `file://` storage URL, or None for S3."""
    url = urlparse(settings.storage_url)
    if url.scheme != "file":
        return None
    return Path(url.netloc + url.path).resolve()


def open_kek(settings: Settings) -> Kek:
    """The KEK: AWS KMS, a KEK file, or (embedded default only) one generated beside the data."""
    if settings.kms_key_id:
        client = boto3.client("kms", endpoint_url=settings.kms_endpoint_url)
        return KmsKek(settings.kms_key_id, client)
    if settings.kek_file is not None:
        return LocalKek.from_file(settings.kek_file)
    storage_dir = local_storage_dir(settings)
    if storage_dir is None:
        raise ConfigurationError(
            "with S3 storage, set SEALSTREAM_KEK_FILE or SEALSTREAM_KMS_KEY_ID"
        )
    return LocalKek.load_or_create(storage_dir / EMBEDDED_KEK_NAME)


def open_keystore(settings: Settings, objects: ObjectStore | None = None) -> KeyStore:
    return KeyStore(
        objects or open_object_store(settings),
        open_kek(settings),
        cache_ttl=settings.key_cache_ttl,
    )
