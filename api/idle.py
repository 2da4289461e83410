"""Stall detection for a request's waits on its client, with one timer per request.

A stream waits on its client once per chunk, each way: for the next piece of the body,
and for room to send the next piece of the response. `asyncio.timeout` around each wait
arms and cancels a timer every time, a cost every chunk of a stream would pay. An
`IdleGuard` instead notes when the wait in progress began, and a single timer looks at
that a few times per timeout; only a wait that has lasted the whole timeout is
cancelled, and it raises `TimeoutError` as `asyncio.timeout` would.

A guard given a minimum rate also fails a client that keeps a transfer alive by
trickling: once its waits add up to `window` seconds, the bytes they brought must average
`min_rate` a second, else the wait in progress, or the next, raises `TooSlow`. Only time
spent waiting on the client counts, never the caller's own work between waits (a slow
storage write holds the client back through backpressure; that is not its fault).
"""

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

CHECKS_PER_TIMEOUT = 4  # a stalled wait fails within 1¼ timeouts (or windows)


class TooSlow(TimeoutError):
    """The client's bytes came slower than the guard's minimum rate."""


class IdleGuard:
    """Fails any wait through `wait` that lasts `timeout` seconds, and with a `min_rate`
    (bytes a second, counted through `delivered`) waits that bring too few bytes; one
    wait at a time, and to be closed when the request is over."""

    def __init__(self, timeout: float, *, min_rate: float = 0, window: float = math.inf) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        self.window = window
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None  # the one waiting now, or last
        self._waiting_since: float | None = None
        self._cancelled = False
        self._too_slow = False  # what the cancellation was for
        self._timer: asyncio.TimerHandle | None = None
        self._waited = 0.0  # seconds of the finished waits of the current window
        self._bytes = 0  # and what they brought

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`await awaitable`; `TimeoutError` once it has waited `timeout` seconds."""
        # The waiting task is taken at each wait: a body opened while a route ran may be
        # read on by whichever task sends the response.
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an IdleGuard guards the waits of a running task")
        self._task = task
        if self._timer is None:
            self._arm()
        cancelling = task.cancelling()
        self._waiting_since = since = self._loop.time()
        try:
            return await awaitable
        except asyncio.CancelledError:
            # Ours, and no other cancellation besides (a server shutting down, say):
            # the same test as `asyncio.timeout`'s.
            if self._cancelled and task.uncancel() <= cancelling:
                self._cancelled = False
                raise (TooSlow if self._too_slow else TimeoutError) from None
            raise
        finally:
            self._waiting_since = None
            self._waited += self._loop.time() - since

    def delivered(self, size: int) -> None:
        """Count the `size` bytes the last wait brought; `TooSlow` if the window is over
        and they fall short, else a window that is over starts again."""
        self._bytes += size
        if self._waited < self.window:
            return
        if self._short_of_rate(self._waited):
            raise TooSlow
        self._waited = 0.0
        self._bytes = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _arm(self) -> None:
        period = min(self.timeout, self.window) / CHECKS_PER_TIMEOUT
        self._timer = self._loop.call_later(period, self._check)

    def _short_of_rate(self, waited: float) -> bool:
        return waited >= self.window and self._bytes < self.min_rate * waited

    def _check(self) -> None:
        task = self._task
        if task is None or task.done():
            self._timer = None  # rearmed by the next wait, if any
            return
        # Set only while the task is suspended inside `wait`: this callback runs on the
        # task's own loop, so the task cannot be anywhere else at this moment.
        since = self._waiting_since
        if since is not None and not self._cancelled:
            waiting = self._loop.time() - since
            self._too_slow = self._short_of_rate(self._waited + waiting)
            if self._too_slow or waiting >= self.timeout:
                self._cancelled = True
                task.cancel()
        self._arm()
