"""Where a tenant's encrypted objects may live: its own prefix, in buckets it is allowed.

A request names an object by a key relative to the tenant's space (and optionally a
bucket); the stored key is `tenants/<tenant>/<key>`, so no key a client sends can reach
another tenant's objects or the service's own records. Keys that could be read as paths
elsewhere (`..`, a leading `/`, control characters) are refused outright.
"""

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from storage import InvalidObjectKey, ObjectStore

MAX_KEY_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BucketNotAllowed(Exception):
    """The tenant may not use this bucket."""

    code = "bucket-not-allowed"


class ObjectRef(BaseModel):
    """An object as a request names it."""

    model_config = ConfigDict(extra="forbid")

    key: str
    bucket: str | None = Field(None, min_length=3, max_length=63)


@dataclass(frozen=True)
class Placement:
    """Where a named object is stored."""

    store: ObjectStore
    bucket: str
    key: str  # relative to the tenant's space, as the client named it
    storage_key: str  # where it is stored


TENANTS_ROOT = "tenants/"


def tenant_prefix(tenant: str) -> str:
    return f"{TENANTS_ROOT}{tenant}/"


def client_key(storage_key: str) -> str | None:
    """The key a client names a stored object (or prefix) by: its storage key without the
    tenant's prefix. None for keys outside every tenant's space: the service's own."""
    if not storage_key.startswith(TENANTS_ROOT):
        return None
    _tenant, separator, key = storage_key.removeprefix(TENANTS_ROOT).partition("/")
    return key if separator else None


def check_object_key(key: str) -> None:
    """Refuse keys that are empty, too long, or could be read as a path escape."""
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidObjectKey(f"object keys take 1 to {MAX_KEY_BYTES} bytes")
    if key.startswith("/") or "\\" in key or _CONTROL.search(key):
        raise InvalidObjectKey(
            "object keys may not start with '/' or hold '\\' or control characters"
        )
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise InvalidObjectKey("object keys may not have empty, '.' or '..' segments")


class Spaces:
    """Resolves object references for tenants; keeps one store per bucket.

    `tenant_buckets` names the buckets, besides the default store's, that each tenant may
    use; `open_store(bucket)` opens the store of one of them, once, on first use.
    """

    def __init__(
        self,
        default: ObjectStore,
        tenant_buckets: Mapping[str, Sequence[str]],
        open_store: Callable[[str], ObjectStore],
    ) -> None:
        self._tenant_buckets = tenant_buckets
        self._open_store = open_store
        self._default = default
        self._stores: dict[str, ObjectStore] = {default.bucket: default}
        self._lock = threading.Lock()

    def place(self, tenant: str, ref: ObjectRef) -> Placement:
        check_object_key(ref.key)
        store = self.store(tenant, ref.bucket)
        return Placement(store, store.bucket, ref.key, tenant_prefix(tenant) + ref.key)

    def store(self, tenant: str, bucket: str | None) -> ObjectStore:
        """The store of `bucket` (the default one if None), if the tenant may use it."""
        if bucket is None or bucket == self._default.bucket:
            return self._default
        if bucket not in self._tenant_buckets.get(tenant, []):
            raise BucketNotAllowed(f"this tenant may not use bucket {bucket!r}")
        return self._open(bucket)

    def own_store(self, bucket: str) -> ObjectStore:
        """The store of `bucket`, whichever tenant may use it now: for the service's own
        reading and cleanup of what it put there (a bucket its sealed records name, never
        a request)."""
        return self._default if bucket == self._default.bucket else self._open(bucket)

    def tenant_stores(self, tenant: str) -> list[ObjectStore]:
        """The default store and that of every other bucket the tenant may use."""
        others = [b for b in self._tenant_buckets.get(tenant, []) if b != self._default.bucket]
        return [self._default, *(self._open(bucket) for bucket in others)]

    def every_store(self) -> list[ObjectStore]:
        """The default store and that of every bucket some tenant may use (for sweeps)."""
        buckets = {b for allowed in self._tenant_buckets.values() for b in allowed}
        return [self._default, *(self._open(b) for b in sorted(buckets - {self._default.bucket}))]

    def _open(self, bucket: str) -> ObjectStore:
        with self._lock:
            if bucket not in self._stores:
                self._stores[bucket] = self._open_store(bucket)
            return self._stores[bucket]
