"""A run's progress reported on a thread of its own, as it happens, rather than when the
thread reading the archive next comes up for air: that thread waits on its upload, which a
slow or paused client may hold back for as long as its deadlines allow, while members
sealed meanwhile are done and should be said to be.

`Reporter` takes what there is to say (`put`, from any thread: the sealers' outcomes,
the reader's refusals) through a queue of at most `depth` items, and hands it on to
`report` in batches, everything that waits at once, and no sooner than `pace` seconds
after the last report began, so that a busy run costs one report for many members (each
report is a hop to the response's event loop, a piece of the response and a write into
the manifest, which cost more than the small member they tell of) and an idle one reports
each member as it ends. A `put` waits while
`depth` items wait: a reporter held up (its client not reading) holds up the members,
never piles their lines up. Between batches, and at least every `interval` seconds,
it calls `progress`, which writes the job's record if it is due.

Whatever `report` or `progress` raises first is kept (`stopped`) and raised again on the
reading thread (`check`, and on leaving the `with` block): a cancel noticed as the
record is written, an uploader gone, the manifest failing. `report` is still called
after it, so that every member that ends is listed; `progress` no longer is.
"""

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Generic, Self, TypeVar

Item = TypeVar("Item")


class _Closing:
    """The last item: nothing is put after it."""


class Reporter(Generic[Item]):
    def __init__(
        self,
        report: Callable[[list[Item]], None],
        progress: Callable[[], None],
        *,
        depth: int,
        interval: float,
        pace: float = 0.0,
    ) -> None:
        self._report = report
        self._progress = progress
        self._interval = interval
        self._pace = pace
        self._reported_at = float("-inf")  # when the last report began
        self._queue: queue.Queue[Item | _Closing] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="sealstream-progress")
        self.stopped: BaseException | None = None

    def put(self, item: Item) -> None:
        """Hand on something to report, waiting while `depth` items wait."""
        self._queue.put(item)

    def check(self) -> None:
        """Raise what stopped the reporting, if anything has."""
        if self.stopped is not None:
            raise self.stopped

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Report what is left and stop; raise what stopped the reporting, unless the
        block is already left by an exception of its own."""
        self._queue.put(_Closing())
        self._thread.join()
        if error is None:
            self.check()

    def _run(self) -> None:
        closing = False
        while not closing:
            batch = self._next_batch()
            closing = bool(batch) and isinstance(batch[-1], _Closing)
            items = [item for item in batch if not isinstance(item, _Closing)]
            if items:
                self._reported_at = time.monotonic()
                self._attempt(self._report, items)
            if self.stopped is None:
                self._attempt(self._progress)

    def _next_batch(self) -> list[Item | _Closing]:
        """What waits, once there is something or `interval` seconds have passed, and
        what comes until `pace` seconds have passed since the last report began (the
        queue is emptied meanwhile: the members handing items on do not wait on it)."""
        try:
            batch = [self._queue.get(timeout=self._interval)]
        except queue.Empty:
            return []
        due = self._reported_at + self._pace
        while not isinstance(batch[-1], _Closing):
            try:
                batch.append(self._queue.get(timeout=max(0.0, due - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _attempt(self, call: Callable[..., None], *args: object) -> None:
        try:
            call(*args)
        except BaseException as error:  # raised again on the reading thread
            if self.stopped is None:
                self.stopped = error
