"""`IdleGuard`: a wait on the client that lasts the timeout fails; nothing else does."""

import asyncio

import pytest

from api.idle import IdleGuard

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
