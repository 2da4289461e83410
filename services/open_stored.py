"""Open a stored object: read it back whole, its plaintext authenticated frame by frame,
to be checked against the object's upload record (`services.objects.check_against_record`).

The verify job and re-encryption read objects this way: one pass over the object, whose
header, met first, says which keyrings open it; every frame authenticated before its
plaintext is handed on; the plaintext's size and SHA-256 compared with the record once
the final frame has been read.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass

from envelope import Decryptor, Header, HeaderReader, Keyring, TruncatedMessage
from services.keys import required_context
from services.objects import check_placement
from storage import ObjectStore
from storage.readahead import ReadAhead

OnChunk = Callable[[int], None]  # told the size of each chunk read (progress, heartbeat)


@dataclass
class StoredMessage:
    """A stored object being read: its authenticated header, the decryptor reading it,
    and its plaintext, in pieces that have each passed their frame's tag."""

    header: Header
    decryptor: Decryptor
    plaintext: Iterator[bytes]


@contextmanager
def open_stored(
    store: ObjectStore,
    storage_key: str,
    size: int,
    keyrings_for: Callable[[Header], Sequence[Keyring]],
    tenant: str,
    on_chunk: OnChunk,
) -> Iterator[StoredMessage]:
    """The object's message opened with `keyrings_for(its header)`, which must name
    `tenant` as its owner, and no other place than `storage_key` (`check_placement`);
    `on_chunk(bytes read)` runs per chunk (a cancel point).

    Two threads: one reads the object and opens its frames, the caller's works on the
    plaintext. SHA-256, which every reader of a stored object runs, is the slowest step
    by far (about 2 GB/s on one core here, where AES-GCM runs at over 15), and hashlib
    releases the GIL while it works. A third thread for AES-GCM was measured slower: its
    hand-offs cost more than it took over.
    """
    with closing(store.read(storage_key, 0, size)) as chunks:
        decryptor, first = _opened(chunks, keyrings_for, tenant, on_chunk)
        assert decryptor.header is not None
        check_placement(decryptor.header, storage_key)
        with ReadAhead(_plaintext(first, decryptor, chunks, on_chunk)) as plaintext:
            yield StoredMessage(decryptor.header, decryptor, iter(plaintext))


def _opened(
    stream: Iterator[bytes],
    keyrings_for: Callable[[Header], Sequence[Keyring]],
    tenant: str,
    on_chunk: OnChunk,
) -> tuple[Decryptor, list[bytes]]:
    """A decryptor past the header, which is read from the front of `stream`, and the
    plaintext of the frames that came with it."""
    reader = HeaderReader()
    for chunk in stream:
        on_chunk(len(chunk))
        header = reader.feed(chunk)
        if header is not None:
            decryptor = Decryptor(
                keyrings_for(header), required_context=required_context({}, tenant)
            )
            return decryptor, decryptor.update(header.to_bytes() + reader.remainder)
    raise TruncatedMessage("the object ends inside its header")


def _plaintext(
    first: list[bytes], decryptor: Decryptor, stream: Iterator[bytes], on_chunk: OnChunk
) -> Iterator[bytes]:
    yield from first
    for chunk in stream:
        yield from decryptor.update(chunk)
        on_chunk(len(chunk))
