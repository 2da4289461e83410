"""The stream cap and the tenants' shares of it (`api.admission`): a stream heavier than
the share counts in full against the cap (up to all of it), so heavy streams of several
tenants never hold more memory together than the cap allows; each request gives back
exactly what it counted, however it came to count it."""

from collections.abc import Callable

import pytest

from api.admission import Streams
from api.problems import Problem
from sealstream.settings import Settings

UNIT = 1  # a weight of 1 per byte


def refused(take: Callable[[], None]) -> tuple[int, str]:
    with pytest.raises(Problem) as problem:
        take()
    return problem.value.status, problem.value.code


def test_heavy_streams_of_two_tenants_never_hold_more_than_the_cap() -> None:
    """With a cap of 6 and shares of 3, a PATCH of weight 7 (a huge upload's parts) takes
    the whole cap, and another tenant's is refused until it ends."""
    streams = Streams(6, UNIT, tenant_limit=3)
    with streams.holding("a") as first:
        first.take(7)
        assert (streams.active, streams.by_tenant["a"]) == (6, 3)
        with streams.holding("b") as second:
            assert refused(lambda: second.take(7)) == (503, "too-many-streams")
        with streams.holding("b") as second:
            assert refused(lambda: second.take(1)) == (503, "too-many-streams")
    with streams.holding("b") as second:
        second.take(7)
    assert (streams.active, dict(streams.by_tenant)) == (0, {})


def test_a_stream_heavier_than_the_share_leaves_the_others_what_is_left_of_the_cap() -> None:
    streams = Streams(6, UNIT, tenant_limit=3)
    with streams.holding("a") as heavy, streams.holding("b") as other:
        heavy.take(4)
        assert refused(lambda: other.take(3)) == (503, "too-many-streams")
        other.take(2)
        assert (streams.active, dict(streams.by_tenant)) == (6, {"a": 3, "b": 2})
    assert (streams.active, dict(streams.by_tenant)) == (0, {})


def test_a_request_gives_back_what_it_counted_as_it_grew_and_was_claimed() -> None:
    """As a stream is counted: one at its arrival, its tenant learned from its token,
    then more; the whole request's weight is what is capped, not each step's."""
    streams = Streams(6, UNIT, tenant_limit=3)
    with streams.holding() as held:
        held.count(1)
        held.claim("a")
        held.count(5)
        assert (streams.active, dict(streams.by_tenant)) == (6, {"a": 3})
        held.count(4)  # past the whole cap: counts as no more
        assert (streams.active, dict(streams.by_tenant)) == (6, {"a": 3})
    assert (streams.active, dict(streams.by_tenant)) == (0, {})
    with streams.holding() as unclaimed:
        unclaimed.count(2)
        with streams.holding("a") as own:
            own.take(3)
            assert refused(lambda: unclaimed.claim("a")) == (429, "too-many-tenant-streams")
    assert (streams.active, dict(streams.by_tenant)) == (0, {})


@pytest.mark.parametrize("cap", [1, 2])
def test_the_default_share_of_a_small_cap(cap: int) -> None:
    """A cap of 1 is one tenant's whole (no stream could run under a share of none); a
    cap of 2 gives each tenant one."""
    share = Settings.model_construct(max_streams=cap, max_streams_per_tenant=None).tenant_streams
    assert share == 1
    streams = Streams(cap, UNIT, share)
    with streams.holding("a") as first, streams.holding("b") as second:
        first.take(5)  # heavier than the cap: alone
        assert refused(lambda: second.take(1)) == (503, "too-many-streams")
    with streams.holding("a") as first, streams.holding("a") as again:
        first.take(1)
        if cap == 2:
            assert refused(lambda: again.take(1)) == (429, "too-many-tenant-streams")
            with streams.holding("b") as second:
                second.take(1)
        else:
            assert refused(lambda: again.take(1)) == (503, "too-many-streams")
    assert (streams.active, dict(streams.by_tenant)) == (0, {})
