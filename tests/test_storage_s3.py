"""What only the S3 backend has: the part-size schedule, parts uploading in the background
(backpressure, failures, aborts in flight), payload signing, and errors from the service
and the network."""

import hashlib
import os
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from sealstream.settings import Settings
from sealstream.wiring import open_object_store
from storage import (
    DEFAULT_PART_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    BucketNotFound,
    InvalidObjectKey,
    ObjectNotFound,
    S3Store,
    StorageError,
    StorageUnavailable,
    part_size_for,
    s3_multipart,
)
from tests.support.ports import free_port

TIB = 1 << 40
GIB = 1 << 30

S3StoreFactory = Callable[..., S3Store]


class PartGate:
    """Holds every UploadPart request until opened: a slow S3, seen through botocore's own
    event hooks, so the writer's real code paths run unchanged."""

    def __init__(self, store: S3Store) -> None:
        self.holding = threading.Event()
        self._open = threading.Event()
        store.client.meta.events.register("before-send.s3.UploadPart", self._hold)

    def open(self) -> None:
        self._open.set()

    def _hold(self, **_: object) -> None:
        self.holding.set()
        self._open.wait(timeout=30)


@pytest.fixture
def slow_store(make_s3_store: S3StoreFactory) -> Iterator[tuple[S3Store, PartGate]]:
    store = make_s3_store(max_in_flight=1)
    gate = PartGate(store)
    yield store, gate
    gate.open()  # never leave an upload thread waiting


def test_ten_thousand_parts_reach_five_tib_within_s3_part_limits() -> None:
    sizes = [part_size_for(number) for number in range(1, MAX_PARTS + 1)]

    assert sum(sizes) >= 5 * TIB
    assert min(sizes) >= MIN_PART_SIZE and max(sizes) <= MAX_PART_SIZE


@pytest.mark.parametrize("first", [MIN_PART_SIZE, DEFAULT_PART_SIZE, 64 << 20, GIB])
def test_part_sizes_double_every_thousand_parts_up_to_the_cap(first: int) -> None:
    sizes = [part_size_for(number, first) for number in range(1, MAX_PARTS + 1)]

    assert sizes[0] == sizes[999] == first
    assert sizes[1000] == min(2 * first, MAX_PART_SIZE)
    assert sizes == sorted(sizes)
    assert min(sizes) >= MIN_PART_SIZE and max(sizes) <= MAX_PART_SIZE


def test_parts_below_the_s3_minimum_are_refused() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Store("bucket", part_size=MIN_PART_SIZE - 1)


def test_large_objects_go_up_in_parts_and_small_ones_in_one_put(
    make_s3_store: S3StoreFactory,
) -> None:
    store = make_s3_store()
    store.put("big", os.urandom(2 * MIN_PART_SIZE + 1))
    small = store.put("small", b"x" * (MIN_PART_SIZE - 1))

    assert store.head("big").etag.endswith("-3")  # S3's etag of a three-part upload
    assert "-" not in small.etag


def test_parts_carry_their_crc32c(make_s3_store: S3StoreFactory) -> None:
    # Declared part checksums make S3 check each part and complete the object from the
    # parts' checksums.
    store = make_s3_store()
    data = os.urandom(2 * MIN_PART_SIZE + 1)
    store.put("big", data)

    sent = store.client.get_object(Bucket=store.bucket, Key="big", ChecksumMode="ENABLED")
    assert (sent.get("ChecksumType"), sent.get("ChecksumCRC32C", "")[-2:]) == ("COMPOSITE", "-3")
    assert sent["Body"].read() == data


class SentBodies:
    """What each request that carries a body declared as its SigV4 payload hash, next to
    the SHA-256 of the body it sent, seen through botocore's own event hooks."""

    def __init__(self, store: S3Store) -> None:
        self.declared: dict[str, list[tuple[str, str]]] = {}
        store.client.meta.events.register("before-send.s3.*", self._note)

    def _note(self, request: Any, event_name: str, **_: object) -> None:
        if request.body:
            declared = request.headers["X-Amz-Content-SHA256"]  # bytes, once prepared
            declared = declared.decode() if isinstance(declared, bytes) else declared
            sent = hashlib.sha256(request.body).hexdigest()
            operation = event_name.rsplit(".", 1)[-1]
            self.declared.setdefault(operation, []).append((declared, sent))


def test_bodies_go_unsigned_by_default(make_s3_store: S3StoreFactory) -> None:
    store = make_s3_store()
    bodies = SentBodies(store)
    data = os.urandom(2 * MIN_PART_SIZE + 1)
    store.put("big", data)
    store.put("small", b"a record")

    assert sorted(bodies.declared) == ["CompleteMultipartUpload", "PutObject", "UploadPart"]
    assert {declared for sent in bodies.declared.values() for declared, _ in sent} == {
        "UNSIGNED-PAYLOAD"
    }
    assert len(bodies.declared["UploadPart"]) == 3
    assert store.get("big") == data  # moto took them, each part's CRC32C checked


def test_sign_payloads_hashes_every_body_into_its_signature(
    moto_endpoint: str, s3_bucket: str
) -> None:
    settings = Settings(
        storage_url=f"s3://{s3_bucket}",
        s3_endpoint_url=moto_endpoint,
        s3_part_size=MIN_PART_SIZE,
        s3_sign_payloads=True,
    )
    store = open_object_store(settings)
    assert isinstance(store, S3Store)
    bodies = SentBodies(store)
    data = os.urandom(MIN_PART_SIZE + 1)
    store.put("big", data)
    store.put("small", b"a record")

    signed = [pair for sent in bodies.declared.values() for pair in sent]
    assert len(bodies.declared["UploadPart"]) == 2
    assert all(declared == sent for declared, sent in signed)
    assert store.get("big") == data


def test_write_blocks_while_max_in_flight_parts_upload(
    slow_store: tuple[S3Store, PartGate],
) -> None:
    store, gate = slow_store
    part = os.urandom(MIN_PART_SIZE)
    writer = store.multipart("slow")
    writer.write(part)  # fills part 1, which takes the only upload slot
    assert gate.holding.wait(timeout=10)

    second = threading.Thread(target=writer.write, args=(part,))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "write() returned while no upload slot was free"

    gate.open()
    second.join(timeout=10)
    assert not second.is_alive()
    writer.complete()
    assert store.get("slow") == part * 2


def test_abort_waits_for_parts_in_flight_then_leaves_nothing(
    slow_store: tuple[S3Store, PartGate],
) -> None:
    store, gate = slow_store
    writer = store.multipart("slow")
    writer.write(os.urandom(MIN_PART_SIZE))
    assert gate.holding.wait(timeout=10)

    aborting = threading.Thread(target=writer.abort)
    aborting.start()
    aborting.join(timeout=0.3)
    assert aborting.is_alive(), "abort() did not wait for the part in flight"
    gate.open()
    aborting.join(timeout=10)

    assert not aborting.is_alive()
    assert store.pending_uploads() == []
    with pytest.raises(ObjectNotFound):
        store.head("slow")


def test_a_failed_part_fails_a_later_write_and_leaves_nothing(
    make_s3_store: S3StoreFactory,
) -> None:
    store = make_s3_store(max_in_flight=1, max_attempts=1)
    part = os.urandom(MIN_PART_SIZE)
    writer = store.multipart("doomed")
    writer.write(part)
    # The upload vanishes under the writer (as a bucket lifecycle rule would abort it).
    (upload,) = store.client.list_multipart_uploads(Bucket=store.bucket)["Uploads"]
    store.client.abort_multipart_upload(
        Bucket=store.bucket, Key="doomed", UploadId=upload["UploadId"]
    )

    # With one slot, each write waits for the previous part, so a failure shows by the third.
    with pytest.raises(StorageError):
        for _ in range(3):
            writer.write(part)

    with pytest.raises(StorageError):
        writer.complete()
    assert store.pending_uploads() == []
    assert list(store.list()) == []


def test_check_on_a_missing_bucket_raises_bucket_not_found(
    make_s3_store: S3StoreFactory,
) -> None:
    store = make_s3_store(bucket="no-such-bucket")

    with pytest.raises(BucketNotFound):
        store.check()
    with pytest.raises(BucketNotFound):
        store.put("k", b"x")


@pytest.mark.usefixtures("aws_environment")
def test_an_unreachable_endpoint_raises_storage_unavailable() -> None:
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1)

    with pytest.raises(StorageUnavailable):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.get("k")
    with pytest.raises(StorageUnavailable):
        list(store.list())
    with pytest.raises(StorageUnavailable):
        store.put("k", b"x")


@pytest.mark.usefixtures("aws_environment")
def test_an_unreachable_endpoint_is_named_without_its_credentials_or_the_key() -> None:
    """botocore quotes the request's URL: the endpoint's user:password@, and the key."""
    address = f"127.0.0.1:{free_port()}"
    store = S3Store("bucket", endpoint_url=f"http://user:s3cret@{address}", max_attempts=1)

    with pytest.raises(StorageUnavailable) as caught:
        store.get("tenants/acme/plans")
    assert caught.value.key == "tenants/acme/plans"
    assert (
        caught.value.reason
        == f'S3 is unavailable: Could not connect to the endpoint URL: "http://{address}"'
    )


def test_keys_longer_than_s3_allows_are_refused(make_s3_store: S3StoreFactory) -> None:
    with pytest.raises(InvalidObjectKey):
        make_s3_store().put("k" * 1025, b"x")


def answer_dated(store: S3Store, date: str) -> None:
    """Make every PutObject answer carry `date` as its Date header: a hostile endpoint,
    or someone on the path to a plain-HTTP one."""

    def rewrite(response_dict: dict[str, Any], **_: object) -> None:
        response_dict["headers"]["Date"] = date

    store.client.meta.events.register("before-parse.s3.PutObject", rewrite)


def test_a_put_answered_with_a_date_that_does_not_parse_is_stored_all_the_same(
    make_s3_store: S3StoreFactory,
) -> None:
    store = make_s3_store()
    answer_dated(store, "garbage")
    before = datetime.now(UTC).replace(microsecond=0)

    stored = store.put("small", b"a record")

    assert stored.size == 8
    assert before <= stored.last_modified <= datetime.now(UTC)
    assert store.get("small") == b"a record"


def test_a_first_part_is_buffered_as_it_fills_and_pieces_across_it_arrive_whole(
    make_s3_store: S3StoreFactory,
) -> None:
    store = make_s3_store()
    tracemalloc.start()
    try:
        with store.multipart("small") as writer:
            writer.write(b"s" * 4096)
            held = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(inclusive=True, filename_pattern=s3_multipart.__file__)]
            )
            writer.complete()
    finally:
        tracemalloc.stop()
    # Not a whole part's buffer (5 MiB here) for an object of 4 KiB.
    assert sum(stat.size for stat in held.statistics("filename")) < MIN_PART_SIZE // 4
    assert store.get("small") == b"s" * 4096

    data = os.urandom(MIN_PART_SIZE + 3 * 4099)
    with store.multipart("pieces") as writer:
        for start in range(0, len(data), 4099):
            writer.write(data[start : start + 4099])
        writer.complete()
    assert store.get("pieces") == data
    assert store.head("pieces").etag.endswith("-2")  # one full part, then the rest
