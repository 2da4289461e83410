"""One member of an archive sealed into an object of its own: a stream of its bytes in,
a complete, recorded object out, or nothing at all.

`MemberSealing` holds what every object of one run is sealed with (the key, the
context, the frame length); `seal` writes one object and may run on several threads at
once, each with a member of its own: it shares nothing between calls but the key store
and the records, which are thread-safe.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from keystore import KeyStore
from keystore.name_keys import NameKey
from services.keys import Sealing, start_sealing
from services.placement import Placement
from services.seal_to_storage import ObjectSealer, seal_stream
from storage.integrity import Records
from storage.records import ObjectRecord


@dataclass(frozen=True)
class MemberSealing:
    """How one run seals each object it writes."""

    keys: KeyStore
    records: Records
    tenant: str
    kid: str
    context: Mapping[str, str]
    frame_length: int
    # Where names are hidden: the records keep the plaintext's digest only as an HMAC.
    name_key: NameKey | None = None

    def open(self, placement: Placement, *, overwrite: bool) -> ObjectSealer:
        """A message at `placement`, to be written a piece at a time and completed (or
        aborted) by the caller."""
        return ObjectSealer(
            self._start(placement),
            placement,
            overwrite=overwrite,
            records=self.records,
            name_key=self.name_key,
        )

    def seal(
        self,
        placement: Placement,
        chunks: Iterable[bytes],
        *,
        overwrite: bool,
        after_chunk: Callable[[], None],
    ) -> ObjectRecord:
        """Seal `chunks` at `placement` as a message of its own, counted as one use of
        the key, and record it; on any failure (or an exception from `after_chunk`, a
        cancel), nothing is left: no object, no pending upload."""
        return seal_stream(
            self._start(placement),
            placement,
            chunks,
            overwrite=overwrite,
            records=self.records,
            after_chunk=after_chunk,
            name_key=self.name_key,
        )

    def _start(self, placement: Placement) -> Sealing:
        return start_sealing(
            self.keys,
            self.tenant,
            self.kid,
            self.context,
            self.frame_length,
            object_key=placement.storage_key,
        )
