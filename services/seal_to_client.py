"""Seal a stream to the client: the message sent back while the plaintext still arrives.

Each chunk is encrypted on the event loop as it arrives: the encryptor seals it straight
into its frame, so a step costs AES-GCM over one chunk, a fraction of a millisecond
whatever the frame length, and less than a hop to a worker thread would cost in GIL
hand-offs. When the plaintext's length is known ahead, each chunk's ciphertext is sent as
soon as it is sealed (`Encryptor.expect_length`); otherwise each frame is held until
full, since only then is it known not to be the final one. The next chunk is read only
once the previous one's ciphertext has been sent, so a slow reader holds back the upload.
"""

from collections.abc import AsyncIterator

from anyio import to_thread

from keystore import KeyStore
from services.keys import KeyWatch, Sealing


async def seal_to_client(
    keys: KeyStore,
    sealing: Sealing,
    chunks: AsyncIterator[bytes] | AsyncIterator[memoryview],
    expected_length: int | None,
) -> AsyncIterator[bytearray | memoryview]:
    """The message as `chunks` arrive: chunk by chunk if `expected_length`, the
    plaintext's length, can be planned on, frame by frame otherwise. The key is checked
    again as the stream runs (`KeyWatch`)."""
    encryptor = sealing.encryptor
    watch = KeyWatch.for_sealing(keys, sealing)
    if expected_length is not None:
        encryptor.expect_length(expected_length)
    async for chunk in chunks:
        # Asked first: asking is cheaper than awaiting the watch for every chunk.
        if watch.due():
            await watch()
        for piece in encryptor.update(chunk):
            yield piece
            # Sent, so spent: whoever reads this is done with a piece when it asks for
            # the next. uvicorn copies each piece of a chunked body, with its chunk-size
            # line, into one write before `send` returns; a slow reader in
            # tests/test_api_stream.py holds the server to that.
            encryptor.recycle(piece)
    # The final frame is sealed twice over (PendingFrame): up to two frames of AES-GCM.
    for piece in await to_thread.run_sync(encryptor.finish):
        yield piece
