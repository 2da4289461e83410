"""`ParallelSealing`: members sealed at once up to the limit and no further, a member's
reader never more than a few chunks ahead of its sealer, and every member's outcome
(record, failure, or the reading stopped) handed back to the reading thread."""

import threading
from typing import Any, cast

import pytest

from services.archives.sealing import (
    FEED_DEPTH,
    MemberSealing,
    ParallelSealing,
    ReadingStopped,
)
from services.placement import Placement
from storage.records import ObjectRecord
from tests.support.waiting import wait_until


class Sealer:
    """Stands in for `MemberSealing`: takes each member's chunks, holding each member
    until `release` is set, and counts the members in flight."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.taken: dict[str, list[bytes]] = {}

    def seal(self, placement: Any, chunks: Any, **_: Any) -> ObjectRecord:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            self.release.wait(10)
            self.taken[placement] = list(chunks)
        finally:
            with self.lock:
                self.in_flight -= 1
        if placement == "fails":
            raise OSError("the store failed")
        return cast(ObjectRecord, placement)


def parallel(sealer: Sealer, limit: int) -> ParallelSealing[str]:
    return ParallelSealing[str](cast(MemberSealing, sealer), limit)


def place(name: str) -> Placement:
    return cast(Placement, name)


def test_no_more_members_are_in_flight_than_the_limit() -> None:
    sealer = Sealer()
    names = [f"m{n}" for n in range(9)]
    started: list[str] = []
    with parallel(sealer, 3) as sealing:

        def read() -> None:
            for name in names:
                with sealing.start(name, place(name), overwrite=False) as feed:
                    feed.put(name.encode())
                started.append(name)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: len(started) == 3, "three members started")
        reader.join(0.5)
        assert started == names[:3]  # the fourth waits for a slot, its bytes unread
        sealer.release.set()
        reader.join(10)
        outcomes = list(sealing.drain())
    assert sealer.most == 3
    assert sorted(outcome.tag for outcome in outcomes) == names
    assert all(cast(Any, outcome.result()) == outcome.tag for outcome in outcomes)
    assert sealer.taken == {name: [name.encode()] for name in names}


def test_a_reader_waits_for_its_sealer_past_a_few_chunks() -> None:
    sealer = Sealer()
    with parallel(sealer, 1) as sealing:
        feed = sealing.start("big", place("big"), overwrite=False)
        handed: list[int] = []

        def read() -> None:
            with feed:
                for n in range(FEED_DEPTH + 3):
                    feed.put(bytes([n]))
                    handed.append(n)

        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: len(handed) == FEED_DEPTH, "the first chunks handed on")
        reader.join(0.5)
        assert reader.is_alive()  # held: its sealer takes nothing yet
        assert len(handed) == FEED_DEPTH
        sealer.release.set()
        reader.join(10)
        [outcome] = sealing.drain()
    assert cast(Any, outcome.result()) == "big"
    assert sealer.taken["big"] == [bytes([n]) for n in range(FEED_DEPTH + 3)]


def test_a_failure_or_a_stopped_reading_comes_back_with_its_member() -> None:
    sealer = Sealer()
    sealer.release.set()
    with parallel(sealer, 2) as sealing:
        with sealing.start("fails", place("fails"), overwrite=False) as feed:
            feed.put(b"x")
        with (
            pytest.raises(ValueError, match="the archive broke"),
            sealing.start("cut", place("cut"), overwrite=False) as feed,
        ):
            feed.put(b"y")
            raise ValueError("the archive broke")
        outcomes = {outcome.tag: outcome for outcome in sealing.drain()}
    with pytest.raises(OSError, match="the store failed"):
        outcomes["fails"].result()
    with pytest.raises(ReadingStopped):
        outcomes["cut"].result()
