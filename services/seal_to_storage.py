"""Seal a stream into a placement: the message written through a multipart upload, its
plaintext's SHA-256 taken on the way, and the object's record saved once storage has
made it visible.
"""

import hashlib
from collections.abc import Iterable
from contextlib import suppress

from services.keys import OBJECT_CONTEXT_KEY, Sealing
from services.objects import object_metadata, sealed_record
from services.placement import Placement
from storage import ObjectInfo, StorageError
from storage.integrity import Records
from storage.records import ObjectRecord, save_record


class ObjectSealer:
    """Writes one sealed message into storage: multipart upload, plaintext SHA-256, record.

    Nothing is visible until `complete()`; `abort()` (which the writer also does itself
    on any storage failure) leaves no object and no pending upload.
    """

    def __init__(
        self,
        sealing: Sealing,
        placement: Placement,
        *,
        overwrite: bool,
        records: Records,
    ) -> None:
        """`sealing` must have been started for this placement (`start_sealing`'s
        `object_key`): a message that names no place could be copied anywhere."""
        named = sealing.encryptor.header.context.get(OBJECT_CONTEXT_KEY)
        if named != placement.storage_key:
            raise ValueError("the sealing was not started for this object's storage key")
        self._sealing = sealing
        self._placement = placement
        self._records = records
        self._digest = hashlib.sha256()
        self._writer = placement.store.multipart(
            placement.storage_key, metadata=object_metadata(sealing), if_absent=not overwrite
        )

    def write(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        encryptor = self._sealing.encryptor
        for chunk in chunks:
            self._digest.update(chunk)
            for piece in encryptor.update(chunk):
                self._writer.write(piece)  # writers keep nothing of it past the call
                encryptor.recycle(piece)

    def complete(self) -> ObjectRecord:
        """Seal the final frame, make the object visible, and record it."""
        encryptor = self._sealing.encryptor
        for piece in encryptor.finish():
            self._writer.write(piece)
        info = self._writer.complete()
        try:
            return self._record(info)
        except BaseException:
            # An object without its record could never be verified: take it back.
            with suppress(StorageError):
                self._placement.store.delete(self._placement.storage_key)
            raise

    def _record(self, info: ObjectInfo) -> ObjectRecord:
        placement = self._placement
        record = sealed_record(
            self._sealing, placement.bucket, placement.storage_key, self._digest.hexdigest(), info
        )
        save_record(self._records, record)
        return record

    def abort(self) -> None:
        self._writer.abort()
