"""What the streaming use cases share: request chunks gathered into batches of about a
frame, and work on a batch kept on the event loop only while it is short.

A frame is released only once authenticated whole, and sealed or opened a frame's worth
at a time, so chunks are batched by the frame. A batch of up to `INLINE_BYTES` is opened
on the loop itself; larger ones go to a worker thread, so the loop never stalls.
"""

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from anyio import to_thread

S = TypeVar("S")
T = TypeVar("T")

# A batch of up to this many bytes is opened on the event loop itself: AES-GCM over it
# costs less than the thread hop would in GIL hand-offs. Larger batches (frames over
# 2 MiB) go to a worker thread, so the loop never holds long.
INLINE_BYTES = 2 * 1024 * 1024


async def frame_batches(
    chunks: AsyncIterator[memoryview], size: int
) -> AsyncIterator[list[memoryview]]:
    """Chunks grouped into batches of at least `size` bytes (the last may be shorter)."""
    batch: list[memoryview] = []
    total = 0
    async for chunk in chunks:
        batch.append(chunk)
        total += len(chunk)
        if total >= size:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


async def off_loop_if_large(
    work: Callable[[S, Sequence[memoryview]], list[T]],
    subject: S,
    batch: Sequence[memoryview],
    frame_length: int,
) -> list[T]:
    """`work(subject, batch)`, on a worker thread when a batch is too large to run inline."""
    if frame_length <= INLINE_BYTES:
        return work(subject, batch)
    return await to_thread.run_sync(work, subject, batch)
