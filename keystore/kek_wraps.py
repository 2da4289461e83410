"""Counting the wraps a local KEK makes, so that it never draws more random IVs than
AES-GCM allows under one key.

A local KEK wraps each key version's material with AES-GCM under a random 96-bit IV:
once per key version created, imported or rotated, on the whole store. One sealed
record, `sealstream/kek-wraps.json`, counts them. Each wrap is counted before it is
made, by compare-and-swap, and refused (`KekWornOut`) once the count reaches
`WRAP_LIMIT`. A missing count is taken again from the versions the key records hold:
someone who deletes it takes the count back at most to the versions still stored (those
of destroyed keys are forgotten), never to zero. A KMS KEK draws its own IVs and is not
counted.
"""

from collections.abc import Callable

from pydantic import Field

from keystore.counts import WRAP_LIMIT
from keystore.errors import ConcurrentUpdate, KekError
from keystore.persistence import UPDATE_ATTEMPTS, back_off
from storage import ObjectExists, ObjectNotFound, PreconditionFailed
from storage.documents import FrozenCamelModel
from storage.integrity import Records

RECORD_KIND = "kek-wraps"
RECORD_NAME = "sealstream/kek-wraps.json"


class KekWornOut(KekError):
    """The KEK has wrapped as much material as random IVs safely allow under one key."""

    code = "kek-worn-out"


class KekWrapCount(FrozenCamelModel):
    """The wraps the store's KEK has made."""

    wraps: int = Field(ge=0)


class WrapCounter:
    """The store's count of KEK wraps. `stored_versions()` counts the key versions the
    key records hold: the count to start again from when the record is missing."""

    def __init__(self, records: Records, stored_versions: Callable[[], int]) -> None:
        self._records = records
        self._stored_versions = stored_versions

    def count_one(self) -> None:
        """Count one wrap about to be made; `KekWornOut` once there have been too many."""
        for attempt in range(UPDATE_ATTEMPTS):
            etag, wraps = self._read()
            if wraps >= WRAP_LIMIT:
                raise KekWornOut(
                    f"the KEK has wrapped {wraps} key versions, as many as random IVs "
                    "safely allow: no key can be created, imported or rotated"
                )
            try:
                self._records.put(
                    RECORD_KIND,
                    RECORD_NAME,
                    KekWrapCount(wraps=wraps + 1),
                    if_absent=etag is None,
                    if_match=etag,
                )
            except (PreconditionFailed, ObjectExists, ObjectNotFound):
                back_off(attempt)
                continue
            return
        raise ConcurrentUpdate(
            f"the KEK's wrap count kept changing; gave up after {UPDATE_ATTEMPTS} tries"
        )

    def _read(self) -> tuple[str | None, int]:
        """The record's etag (None if there is none) and the count: the etag is read
        first, so a change between the two reads makes the conditional write fail."""
        try:
            etag = self._records.store.head(RECORD_NAME).etag
            return etag, self._records.get(RECORD_KIND, RECORD_NAME, KekWrapCount).wraps
        except ObjectNotFound:
            return None, self._stored_versions()
