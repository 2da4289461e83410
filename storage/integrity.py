"""Records the service trusts, authenticated under a key only the service holds.

The bucket is not a root of trust: backup jobs, replication, other services and storage
admins may be able to write it. So every record the service acts on (tokens, keys,
object records, job records and reports, batch journals) is stored sealed: the record,
and an HMAC-SHA256 over it bound to the record's kind and its name (where it lives), so
that a record cannot be forged, altered, or moved to another name or tenant. A record
that fails is refused, never honoured. The key comes from the caller (keystore derives
it from the KEK); this module only knows how to use it.

    {"format": "sealstream-record/1", "kind": ..., "name": ..., "macKey": <key id>,
     "mac": <base64>, "record": {...}}

    mac = HMAC-SHA256(key, "sealstream-record/1" 0x00 || lp(kind) || lp(name)
                           || lp(key id) || canonical JSON of record)

`lp(x)` is a 4-byte big-endian length then x's UTF-8 bytes; the canonical JSON has sorted
keys, no whitespace and ASCII escapes, so a record parsed and written again keeps its MAC.
The `kind` and `name` fields are for people reading the bucket: what is checked is the
kind and name the caller expects. What a bucket writer can still do is delete records,
or put back an older authentic version of one (docs/security.md).
"""

import base64
import hmac
import json
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import Counter
from pydantic import BaseModel, ValidationError

from storage.base import ObjectInfo, ObjectStore, SmallObject
from storage.errors import ObjectNotFound, ObjectTooLarge, StorageError, StorageUnavailable

FORMAT = "sealstream-record/1"
KEY_LENGTH = 32
MAX_RECORD_BYTES = 16 * 1024 * 1024  # a key record of a thousand RSA-4096 versions is ~4 MiB

Model = TypeVar("Model", bound=BaseModel)

logger = logging.getLogger(__name__)


class RecordTampered(StorageError):
    """A stored record failed authentication: it is not one the service wrote there."""

    code = "record-tampered"


class RecordKey:
    """The key records are authenticated under, known by an id that does not reveal it.

    `derive` gives independent keys for other uses of the same secret (token hashing,
    token ids), so no key serves two purposes.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LENGTH:
            raise ValueError(f"a record key takes {KEY_LENGTH} bytes")
        self._key = key
        self.key_id = self.derive("key-id")[:8].hex()

    def __repr__(self) -> str:
        return f"RecordKey({self.key_id})"

    def derive(self, purpose: str) -> bytes:
        """A 32-byte key for `purpose`, independent of this one and of other purposes'."""
        return hmac.digest(self._key, b"sealstream/derive/" + purpose.encode(), "sha256")

    def mac(self, kind: str, name: str, canonical: bytes) -> bytes:
        message = b"".join(
            [FORMAT.encode(), b"\x00", *map(_length_prefixed, (kind, name, self.key_id)), canonical]
        )
        return hmac.digest(self._key, message, "sha256")


def seal(key: RecordKey, kind: str, name: str, record: BaseModel) -> bytes:
    """The stored form of `record` under `name`."""
    body = record.model_dump(mode="json")
    mac = key.mac(kind, name, canonical_json(body))
    document = {
        "format": FORMAT,
        "kind": kind,
        "name": name,
        "macKey": key.key_id,
        "mac": base64.b64encode(mac).decode("ascii"),
        "record": body,
    }
    return json.dumps(document, indent=1, sort_keys=True).encode()


def compact_seal(key: RecordKey, kind: str, name: str, record: BaseModel) -> str:
    """`record` sealed as `seal` does, with no whitespace and without the kind and name
    (the reader knows them): for a record kept in an object's metadata."""
    body = record.model_dump(mode="json")
    mac = key.mac(kind, name, canonical_json(body))
    document = {
        "format": FORMAT,
        "macKey": key.key_id,
        "mac": base64.b64encode(mac).decode("ascii"),
        "record": body,
    }
    return canonical_json(document).decode("ascii")


def unseal(key: RecordKey, kind: str, name: str, data: bytes, model: type[Model]) -> Model:
    """The record stored as `data` under `name`; `RecordTampered` unless it is one this
    key sealed there, as a `kind`, and is a valid `model`."""
    document = _document(data, name)
    if document.get("format") != FORMAT:
        raise RecordTampered("not a sealed record: not written by this service", name)
    if document.get("macKey") != key.key_id:
        raise RecordTampered(f"sealed under another key ({document.get('macKey')!r})", name)
    try:
        canonical = canonical_json(document.get("record"))
    except (ValueError, RecursionError):  # NaN or infinities: nothing this service writes
        raise RecordTampered("not a JSON record", name) from None
    try:
        mac = base64.b64decode(str(document.get("mac")), validate=True)
    except ValueError:
        mac = b""
    if not hmac.compare_digest(mac, key.mac(kind, name, canonical)):
        raise RecordTampered(f"failed authentication as a {kind} record", name)
    try:
        return model.model_validate_json(canonical)
    except ValidationError:
        # Authentic yet invalid: written by a version of the service with another schema.
        raise RecordTampered(f"an authentic {kind} record of another shape", name) from None


def is_sealed(data: bytes) -> bool:
    """Whether `data` has the sealed form at all (authentic or not); for the upgrade of
    records written before they were sealed."""
    return sealed_by(data) is not None


def sealed_by(data: bytes) -> str | None:
    """The id of the key `data` says it is sealed under, if it has the sealed form at all
    (authentic or not)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None
    return str(document.get("macKey"))


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _document(data: bytes, name: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise RecordTampered("not a JSON record", name) from None
    if not isinstance(document, dict):
        raise RecordTampered("not a JSON record", name)
    return document


def _length_prefixed(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack(">I", len(encoded)) + encoded


# In no registry of its own: the API's metrics show it. Being a prometheus_client metric,
# it is counted in the files every server process shares when there are several, so one
# scrape sees the refusals of all.
REFUSED_RECORDS = Counter(
    "sealstream_records_refused",
    "Stored records (tokens, keys, objects, jobs) that failed authentication and were "
    "refused, by kind: alert on any",
    ["kind"],
    registry=None,
)


def note_refusal(kind: str, refusal: RecordTampered) -> None:
    """Log a refused record with where it was stored (for operators: an error a client
    sees never names it) and count it by kind in `REFUSED_RECORDS`."""
    logger.error("refused a %s record: %s", kind, refusal)
    REFUSED_RECORDS.labels(kind).inc()


class Records:
    """Sealed records in an object store: each read is authenticated (a refusal is noted
    with `note_refusal`), each write sealed.

    The key may be given, or found on first use (`key_source`, tried again at each use
    until it succeeds): finding it can take the store itself, which may be down when a
    process starts.
    """

    def __init__(
        self,
        store: ObjectStore,
        key_source: RecordKey | Callable[[], RecordKey],
        *,
        store_id: str | None = None,
    ) -> None:
        self.store = store
        self.store_id = store_id or store.bucket  # whose records these are
        self._key = key_source if isinstance(key_source, RecordKey) else None
        self._source = key_source
        self._lock = threading.Lock()

    @property
    def key(self) -> RecordKey:
        if self._key is None:
            with self._lock:
                if self._key is None and callable(self._source):
                    self._key = self._source()
        assert self._key is not None
        return self._key

    def put(
        self,
        kind: str,
        name: str,
        record: BaseModel,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
    ) -> ObjectInfo:
        data = seal(self.key, kind, name, record)
        return self.store.put(name, data, if_absent=if_absent, if_match=if_match)

    def get(self, kind: str, name: str, model: type[Model]) -> Model:
        """The record at `name`: `ObjectNotFound` if there is none, `RecordTampered` if
        it is not authentic."""
        return self.get_versioned(kind, name, model)[0]

    def get_versioned(self, kind: str, name: str, model: type[Model]) -> tuple[Model, str]:
        """The record at `name`, as `get`, and the etag of the version read: what a
        conditional write over it names."""
        stored = self._read(kind, name)
        return self.open(kind, name, stored.data, model), stored.etag

    def open(self, kind: str, name: str, data: bytes, model: type[Model]) -> Model:
        """`data`, read from `name` by other means, authenticated as `get` does."""
        try:
            return unseal(self.key, kind, name, data, model)
        except RecordTampered as refusal:
            note_refusal(kind, refusal)
            raise

    def all(
        self, kind: str, prefix: str, model: type[Model], suffix: str = ""
    ) -> Iterator[tuple[str, Model]]:
        """Every authentic record under `prefix` whose name ends with `suffix`, skipping
        (and logging) those that are not or cannot be read: for listings, where one bad
        record must not hide the rest. Storage that cannot be reached at all still fails
        the listing."""
        for info in self.store.list(prefix):
            if not info.key.endswith(suffix):
                continue
            try:
                yield info.key, self.get(kind, info.key, model)
            except (ObjectNotFound, RecordTampered):
                continue  # deleted since it was listed, or refused and counted
            except StorageUnavailable:
                raise
            except StorageError as error:
                logger.warning("skipping the %s record %s: %s", kind, info.key, error)

    def _read(self, kind: str, name: str) -> SmallObject:
        """The stored bytes of `name` and their etag, in one request, refused unread if
        larger than any record."""
        try:
            return self.store.get_small(name, MAX_RECORD_BYTES)
        except ObjectTooLarge as error:
            refusal = RecordTampered(f"{error}, larger than any record", name)
            note_refusal(kind, refusal)
            raise refusal from None
