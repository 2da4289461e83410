"""`IdleGuard`: a wait on the client that lasts the timeout fails, and with a minimum rate
waits that bring too few bytes; nothing else does."""

import asyncio

import pytest

from api.idle import IdleGuard, TooSlow

TIMEOUT = 0.2


async def later(seconds: float, value: str = "done") -> str:
    await asyncio.sleep(seconds)
    return value


def test_a_wait_shorter_than_the_timeout_returns_its_value() -> None:
    async def run() -> list[str]:
        guard = IdleGuard(TIMEOUT)
        try:  # many short waits add up to far more than the timeout
            return [await guard.wait(later(TIMEOUT / 4, str(n))) for n in range(12)]
        finally:
            guard.close()

    assert asyncio.run(run()) == [str(n) for n in range(12)]


def test_a_wait_that_lasts_the_timeout_fails_with_timeout_error() -> None:
    async def run() -> str:
        guard = IdleGuard(TIMEOUT)
        try:
            await guard.wait(later(30 * TIMEOUT))
        except TimeoutError:
            return "timed out"
        finally:
            guard.close()
        return "waited it out"

    assert asyncio.run(run()) == "timed out"


def test_time_spent_outside_a_wait_does_not_count() -> None:
    async def run() -> str:
        guard = IdleGuard(TIMEOUT)
        try:
            await guard.wait(later(0))
            await asyncio.sleep(3 * TIMEOUT)  # the caller's own work: a slow storage write
            return await guard.wait(later(TIMEOUT / 4))
        finally:
            guard.close()

    assert asyncio.run(run()) == "done"


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def run() -> None:
        async def waiting() -> str:
            guard = IdleGuard(TIMEOUT)
            try:
                return await guard.wait(later(30 * TIMEOUT))
            finally:
                guard.close()

        task = asyncio.create_task(waiting())
        await asyncio.sleep(TIMEOUT / 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_waits_are_guarded_in_whichever_task_makes_them() -> None:
    """A body opened while a route runs may be read on by the task that sends the response."""

    async def run() -> str:
        guard = IdleGuard(TIMEOUT)

        async def wait_long() -> str:
            try:
                await guard.wait(later(30 * TIMEOUT))
            except TimeoutError:
                return "timed out"
            return "waited it out"

        try:
            await asyncio.create_task(guard.wait(later(0)))  # a first task waits, and ends
            await asyncio.sleep(TIMEOUT)  # the guard's checks find that task done
            return await asyncio.create_task(wait_long())
        finally:
            guard.close()

    assert asyncio.run(run()) == "timed out"


def test_a_cancellation_that_comes_with_the_guards_own_stays_a_cancellation() -> None:
    """The server shutting down just as a wait times out: the request is cancelled, not
    answered as if only its client had stalled."""

    async def cancelled_again_on_the_way_out() -> str:
        try:
            return await later(30 * TIMEOUT)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # a second cancellation, from elsewhere, lands meanwhile
            raise

    async def run() -> None:
        async def waiting() -> str:
            guard = IdleGuard(TIMEOUT)
            try:
                return await guard.wait(cancelled_again_on_the_way_out())
            finally:
                guard.close()

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(waiting())

    asyncio.run(run())


# A minimum rate

WINDOW = 0.4
RATE = 1000  # bytes a second


def receive(count: int, size: int, pause: float, work: float = 0) -> str:
    """Wait `count` times for `size` bytes that take `pause` seconds to come, doing
    `work` seconds of the caller's own between waits."""

    async def run() -> str:
        guard = IdleGuard(30 * WINDOW, min_rate=RATE, window=WINDOW)
        try:
            for _ in range(count):
                await guard.wait(later(pause))
                guard.delivered(size)
                await asyncio.sleep(work)
        except TooSlow:
            return "too slow"
        finally:
            guard.close()
        return "received"

    return asyncio.run(run())


def test_bytes_that_trickle_in_are_too_slow() -> None:
    """Each wait is far shorter than the timeout, but a window of them brings too little."""
    assert receive(count=40, size=1, pause=WINDOW / 8) == "too slow"


def test_bytes_that_keep_the_rate_are_received() -> None:
    # Twenty times the rate, so that a loaded machine stretching the waits changes nothing.
    assert receive(count=20, size=int(20 * RATE * WINDOW / 8), pause=WINDOW / 8) == "received"


def test_one_long_wait_that_brings_nothing_is_too_slow_before_the_timeout() -> None:
    assert receive(count=1, size=0, pause=30 * WINDOW) == "too slow"


def test_the_callers_own_work_does_not_count_against_the_client() -> None:
    """Few bytes over a long time, but the client had them there at once every time."""
    assert receive(count=10, size=1, pause=0, work=WINDOW / 4) == "received"
