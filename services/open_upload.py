"""Open an uploaded message: its header read first, to find the tenant's key it names,
then its plaintext streamed back as each frame authenticates.

Chunks are gathered into batches of about a frame, since a frame is released only once
authenticated whole; a batch of up to `INLINE_BYTES` is opened on the event loop, larger
ones on a worker thread (`services.streams`). The next batch is read only once the
plaintext of the last one has been taken.
"""

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from anyio import to_thread

from envelope import Decryptor, Header, HeaderReader, Keyring, TruncatedMessage, start_decryption
from keystore import KeyRecord, KeyStore, Uses
from services.keys import KeyWatch, opening_keys, proven_by_proof, required_context
from services.streams import frame_batches, off_loop_if_large


@dataclass
class OpenedUpload:
    """An uploaded message whose header has authenticated: the key that opens it, and its
    plaintext, to be read once."""

    key: KeyRecord
    keyring: Keyring  # the version of `key` whose keyring opened it
    header: Header
    uses: Uses  # the key's, this message counted
    proven: bool  # whether it carries this service's proof of provenance
    plaintext: AsyncIterator[bytes]


async def open_upload(
    keys: KeyStore,
    tenant: str,
    chunks: AsyncIterator[memoryview],
    *,
    expected_kid: str | None,
    context: Mapping[str, str],
    refuse_unproven: bool,
) -> OpenedUpload:
    """Read the message's header from `chunks` and authenticate it with the tenant's key
    it names (which must be `expected_kid`, if given), demanding `context`'s pairs; and
    check its proof of provenance, refusing a message without one if `refuse_unproven`."""
    header, remainder = await _read_header(chunks)
    opening = await to_thread.run_sync(opening_keys, keys, tenant, header, expected_kid)
    start = partial(
        start_decryption,
        header,
        remainder,
        opening.keyrings,
        required_context=required_context(context, tenant),
    )
    decryptor, first = await to_thread.run_sync(start)
    assert decryptor.keyring is not None
    check = partial(proven_by_proof, keys, tenant, header, opening.key)
    verdict = await to_thread.run_sync(partial(check, refuse_unproven=refuse_unproven))
    uses = await to_thread.run_sync(opening.opened, decryptor.keyring)
    plaintext = _plaintext(first, decryptor, chunks, header.frame_length, opening.watch)
    proven = verdict.whole  # an upload is read whole
    return OpenedUpload(opening.key, decryptor.keyring, header, uses, proven, plaintext)


async def _read_header(chunks: AsyncIterator[memoryview]) -> tuple[Header, bytes]:
    """The header from the front of `chunks`, and the bytes that came after it."""
    reader = HeaderReader()
    async for chunk in chunks:
        header = reader.feed(chunk)
        if header is not None:
            return header, reader.remainder
    raise TruncatedMessage("the message ends inside its header")


async def _plaintext(
    first: list[bytes],
    decryptor: Decryptor,
    chunks: AsyncIterator[memoryview],
    frame_length: int,
    watch: KeyWatch,
) -> AsyncIterator[bytes]:
    for piece in first:
        yield piece
    async for batch in frame_batches(chunks, frame_length):
        await watch()
        for piece in await off_loop_if_large(_open, decryptor, batch, frame_length):
            yield piece
    decryptor.finish()


def _open(decryptor: Decryptor, batch: Sequence[memoryview]) -> list[bytes]:
    return [piece for chunk in batch for piece in decryptor.update(chunk)]
