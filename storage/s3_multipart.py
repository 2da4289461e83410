"""The S3 multipart writer and its part-size schedule.

Parts are uploaded by a small thread pool while the caller keeps writing; at most
`max_in_flight` parts are outstanding and `write` blocks for a free slot, which is the
backpressure the streaming API relies on. Memory per writer stays ≈ (max_in_flight + 1)
× part size: the parts in flight plus the one being filled. An object smaller than its
first part never starts a multipart upload: `complete` stores it with one PUT.
"""

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import TYPE_CHECKING, Final, cast

from storage.base import MultipartWriter, ObjectInfo, UploadStarted
from storage.errors import ObjectExists, ObjectNotFound, PreconditionFailed, StorageError
from storage.s3_errors import s3_errors

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadRequestTypeDef,
        PutObjectRequestTypeDef,
        ResponseMetadataTypeDef,
    )

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
MAX_PART_SIZE = 5 << 30  # S3's ceiling for one part
MAX_PARTS = 10_000
PARTS_PER_SIZE_STEP = 1_000
DEFAULT_PART_SIZE = 8 * MIB
DEFAULT_MAX_IN_FLIGHT = 4
FIRST_BUFFER_BYTES = 64 * 1024  # the first part's buffer at first, grown as it fills
# Each part carries its CRC32C, which the server checks on arrival, and the upload declares
# it, so completing joins the parts' checksums (S3's composite checksum) instead of
# reading the whole object again for a full-object one (what S3 and moto compute for an
# upload that names no algorithm). CRC32C, not boto3's default CRC32: CPUs have an
# instruction for it, which botocore uses through awscrt, many times faster.
PART_CHECKSUM: Final = "CRC32C"


def part_size_for(part_number: int, first_part_size: int = DEFAULT_PART_SIZE) -> int:
    """The size of part `part_number` (1 to 10,000) of an upload.

    Parts start at `first_part_size` and double every 1,000 parts, capped at 5 GiB:
    ordinary objects keep small parts and so small buffers, while the 10,000 parts S3
    allows still add up to ≈ 8 TiB from an 8 MiB start (1,000 · 8 MiB · (2¹⁰ − 1)),
    beyond S3's 5 TiB object limit. From the 5 MiB minimum they add up to ≈ 4.9 TiB.
    """
    step = (part_number - 1) // PARTS_PER_SIZE_STEP
    return min(first_part_size << step, MAX_PART_SIZE)


class S3MultipartWriter(MultipartWriter):
    """Buffers one part at a time and ships each full part to an upload thread."""

    def __init__(
        self,
        client: "S3Client",
        bucket: str,
        key: str,
        *,
        metadata: dict[str, str],
        if_absent: bool,
        if_match: str | None,
        first_part_size: int,
        max_in_flight: int,
        describe: Callable[[str], ObjectInfo],
        on_upload: UploadStarted | None = None,
    ) -> None:
        super().__init__(key)
        self._client = client
        self._bucket = bucket
        self._metadata = metadata
        self._if_absent = if_absent
        self._if_match = if_match
        self._first_part_size = first_part_size
        self._max_in_flight = max_in_flight
        self._describe = describe
        self._on_upload = on_upload
        # The part being filled: allocated once at its full size and filled in place, since
        # growing it by appends would copy each part several times over.
        self._buffer = bytearray()
        self._filled = 0
        self._part_number = 1  # the part being filled
        self._upload_id: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._slots = threading.Semaphore(max_in_flight)
        self._in_flight: list[Future[CompletedPartTypeDef]] = []
        self._parts: list[CompletedPartTypeDef] = []

    def _write(self, view: memoryview) -> None:
        self._collect_finished_parts()
        offset = 0
        while offset < view.nbytes:
            self._check_part_count()
            self._make_room(view.nbytes - offset)
            room = len(self._buffer) - self._filled
            taken = view[offset : offset + room]
            self._buffer[self._filled : self._filled + taken.nbytes] = taken
            self._filled += taken.nbytes
            offset += taken.nbytes
            if self._filled == self._part_size():
                self._ship_buffer()

    def _make_room(self, wanted: int) -> None:
        """Room in the part being filled for up to `wanted` more bytes. A part's buffer
        is allocated at its full size, but the first part's only as it fills, doubling:
        most objects are far smaller than a part (records, markers, small members), and
        a whole part zeroed for each cost more CPU than sealing it. The doublings copy
        less than one part's worth, once an object."""
        if self._filled < len(self._buffer):
            return
        size = self._part_size()
        if self._part_number == 1:
            size = min(size, max(FIRST_BUFFER_BYTES, 2 * self._filled, self._filled + wanted))
        grown = bytearray(size)
        grown[: self._filled] = self._buffer  # full: all of it is filled
        self._buffer = grown

    def _part_size(self) -> int:
        return part_size_for(self._part_number, self._first_part_size)

    def _check_part_count(self) -> None:
        if self._part_number > MAX_PARTS:
            raise StorageError(f"the object outgrew the {MAX_PARTS} parts S3 allows", self.key)

    def _send_whole(self, metadata: dict[str, str]) -> bool:
        if self._upload_id is not None:
            return False  # its metadata went with the upload's start
        self._metadata = metadata
        return True

    def _complete(self) -> ObjectInfo:
        if self._upload_id is None:
            return self._put_whole(if_absent=self._if_absent)
        self._complete_upload()
        return self._describe(self.key)

    def _abort(self) -> None:
        self._buffer, self._filled = bytearray(), 0
        if self._executor is not None:
            # In-flight parts finish (or fail) before the abort, so none lands after it.
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._upload_id is not None:
            with suppress(ObjectNotFound), s3_errors(self.key):  # NoSuchUpload: already gone
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self.key, UploadId=self._upload_id
                )

    def _ship_buffer(self) -> None:
        """Hand the filled buffer to an upload thread."""
        del self._buffer[self._filled :]  # the last part may be short
        body, self._buffer, self._filled = self._buffer, bytearray(), 0
        self._submit(partial(self._upload_part, body=body))

    def _submit(self, send: Callable[[int], "CompletedPartTypeDef"]) -> None:
        """Run `send(part number)` for the next part on an upload thread once a slot is free."""
        if self._upload_id is None:
            self._start_upload()
        self._slots.acquire()  # the backpressure: blocks while max_in_flight parts upload
        self._collect_finished_parts()  # the slot may have been freed by a failure
        assert self._executor is not None
        future = self._executor.submit(send, self._part_number)
        # Released once the future is done, so whoever takes the slot next sees its outcome.
        future.add_done_callback(lambda _: self._slots.release())
        self._in_flight.append(future)
        self._part_number += 1

    def _collect_finished_parts(self) -> None:
        """Keep the results of finished uploads; raise the first failure among them."""
        for future in [future for future in self._in_flight if future.done()]:
            self._in_flight.remove(future)
            self._parts.append(future.result())

    def _start_upload(self) -> None:
        with s3_errors(self.key):
            response = self._client.create_multipart_upload(
                Bucket=self._bucket,
                Key=self.key,
                Metadata=self._metadata,
                ChecksumAlgorithm=PART_CHECKSUM,
            )
        self._upload_id = response["UploadId"]
        self._executor = ThreadPoolExecutor(
            max_workers=self._max_in_flight, thread_name_prefix="s3-part"
        )
        if self._on_upload is not None:
            # Before the first part: an id its keeper never heard of is an upload of
            # nothing but its start. Raising here aborts the upload (`_append`, `complete`).
            self._on_upload(self.key, self._upload_id)

    def _upload_part(self, part_number: int, body: bytearray) -> "CompletedPartTypeDef":
        """Runs on an upload thread."""
        assert self._upload_id is not None
        etag, checksum = upload_part(
            self._client, self._bucket, self.key, self._upload_id, part_number, body
        )
        return {"PartNumber": part_number, "ETag": etag, "ChecksumCRC32C": checksum}

    def _complete_upload(self) -> None:
        assert self._upload_id is not None and self._executor is not None
        if self._filled:
            self._ship_buffer()
        for future in self._in_flight:
            self._parts.append(future.result())
        self._in_flight.clear()
        self._executor.shutdown()
        parts = sorted(self._parts, key=lambda part: part["PartNumber"])
        request: CompleteMultipartUploadRequestTypeDef = {
            "Bucket": self._bucket,
            "Key": self.key,
            "UploadId": self._upload_id,
            "MultipartUpload": {"Parts": parts},
        }
        self._add_condition(request, if_absent=self._if_absent)
        self._check_condition()
        with self._condition_errors(if_absent=self._if_absent):
            self._client.complete_multipart_upload(**request)

    def _check_condition(self) -> None:
        """Check `if_match` before completing, as well as in the completion itself.

        S3 refuses to complete an upload whose If-Match no longer holds. moto (5.2) and
        some S3-compatible servers ignore If-Match there and would replace a newer
        version. Checked here as well, a replacement can then only slip in between this
        HEAD and the completion.
        """
        if self._if_match is None:
            return
        current = self._describe(self.key)  # ObjectNotFound if it was deleted
        if current.etag != self._if_match:
            raise PreconditionFailed(
                f"the object is no longer the version {self._if_match}", self.key
            )

    def _complete_if_absent(self) -> ObjectInfo | None:
        if self._upload_id is not None or self._if_match is not None:
            raise StorageError("only an object sent whole, unconditionally, can be", self.key)
        try:
            return self._put_whole(if_absent=True)
        except ObjectExists:
            return None

    def _put_whole(self, *, if_absent: bool) -> ObjectInfo:
        """Store an object smaller than one part (or empty) with a single PUT, described
        by its answer: a HEAD after it would double the round trips of every small
        object (records, markers, archive members)."""
        request: PutObjectRequestTypeDef = {
            "Bucket": self._bucket,
            "Key": self.key,
            "Body": as_body(self._buffer[: self._filled]),
            "Metadata": self._metadata,
        }
        self._add_condition(request, if_absent=if_absent)
        with self._condition_errors(if_absent=if_absent):
            response = self._client.put_object(**request)
        return ObjectInfo(
            key=self.key,
            size=self._filled,
            etag=response["ETag"].strip('"'),
            metadata=dict(self._metadata),
            last_modified=_answered_at(response["ResponseMetadata"]),
        )

    def _add_condition(
        self,
        request: "PutObjectRequestTypeDef | CompleteMultipartUploadRequestTypeDef",
        *,
        if_absent: bool,
    ) -> None:
        """Make the request that makes the object visible carry its condition."""
        if if_absent:
            request["IfNoneMatch"] = "*"
        if self._if_match is not None:
            request["IfMatch"] = entity_tag(self._if_match)

    def _condition_errors(self, *, if_absent: bool) -> AbstractContextManager[None]:
        """Errors of the request that makes the object visible: a 412 is the lost condition."""
        conflict = ObjectExists if if_absent else PreconditionFailed
        return s3_errors(self.key, conflict=conflict)


def _answered_at(answer: "ResponseMetadataTypeDef") -> datetime:
    """When S3 answered, by its Date header (to the second, as Last-Modified is); by the
    host's clock if it has none that parses: the object is stored either way."""
    date = answer.get("HTTPHeaders", {}).get("date")
    if date:
        with suppress(ValueError):
            return parsedate_to_datetime(date).astimezone(UTC)
    return datetime.now(UTC)


def upload_part(
    client: "S3Client", bucket: str, key: str, upload_id: str, number: int, body: bytes | bytearray
) -> tuple[str, str]:
    """Upload one part with its CRC32C; its etag and checksum."""
    with s3_errors(key):
        response = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=as_body(body),
            ChecksumAlgorithm=PART_CHECKSUM,
        )
    return response["ETag"], response["ChecksumCRC32C"]


def entity_tag(etag: str) -> str:
    """An etag as HTTP quotes it in If-Match; `ObjectInfo.etag` is kept unquoted."""
    return f'"{etag}"'


def as_body(buffer: bytes | bytearray) -> bytes:
    """The buffer as a request body, uncopied: botocore sends any bytes-like body (it
    validates bytes, bytearray and files) while the type stubs only name bytes."""
    return cast("bytes", buffer)
