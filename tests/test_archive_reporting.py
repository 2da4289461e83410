"""services.archives.reporting.Reporter, the thread that reports an archive run's members
as they end: everything waiting goes in one batch, every item is reported even after
the reporting stopped, what stopped it is raised on the reading thread, and a reporter
held up holds up those who hand it items."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from services.archives.reporting import Reporter
from tests.support.waiting import wait_until

WITHIN = 30  # seconds a thread of the test may take to get where it is awaited
INTERVAL = 3600.0  # no progress call comes from the interval during a test


class Gone(Exception):
    """What the test's report raises: its reader has gone."""


class Recorder:
    """A report and a progress that keep what they were called with; the report waits
    while `hold` is clear, and raises `Gone` once `fail` is set."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.progress_calls = 0
        self.hold = threading.Event()
        self.hold.set()
        self.fail = threading.Event()
        self.reporting = threading.Event()  # a report has begun

    def report(self, items: list[int]) -> None:
        self.reporting.set()
        assert self.hold.wait(WITHIN)
        self.batches.append(items)
        if self.fail.is_set():
            raise Gone("the uploader stopped reading")

    def progress(self) -> None:
        self.progress_calls += 1


@contextmanager
def reporting(recorder: Recorder, depth: int = 4) -> Iterator[Reporter[int]]:
    with Reporter(recorder.report, recorder.progress, depth=depth, interval=INTERVAL) as reporter:
        yield reporter


def test_what_waits_while_a_report_runs_goes_in_the_next_batch_in_order() -> None:
    recorder = Recorder()
    recorder.hold.clear()
    with reporting(recorder, depth=8) as reporter:
        reporter.put(1)
        assert recorder.reporting.wait(WITHIN)
        for item in (2, 3, 4):
            reporter.put(item)
        recorder.hold.set()
    assert recorder.batches == [[1], [2, 3, 4]]
    assert recorder.progress_calls >= 2  # after each batch


def test_each_item_is_reported_after_a_report_fails_and_the_failure_raised_once_done() -> None:
    recorder = Recorder()
    recorder.fail.set()
    with pytest.raises(Gone), reporting(recorder) as reporter:
        reporter.put(1)
        wait_until(lambda: reporter.stopped is not None, "the report to fail")
        with pytest.raises(Gone):  # the reading thread learns of it at its next check
            reporter.check()
        reporter.put(2)
        reporter.put(3)
    assert [item for batch in recorder.batches for item in batch] == [1, 2, 3]
    assert recorder.progress_calls == 0  # the run is ending: no record is written


def test_a_failure_of_the_block_itself_is_not_replaced_by_the_reporters() -> None:
    recorder = Recorder()
    recorder.fail.set()
    with pytest.raises(KeyError), reporting(recorder) as reporter:
        reporter.put(1)
        raise KeyError("the reading's own")
    assert recorder.batches == [[1]]


def test_a_reporter_held_up_holds_up_whoever_hands_it_more_than_its_depth() -> None:
    recorder = Recorder()
    recorder.hold.clear()
    handed = threading.Event()
    with reporting(recorder, depth=2) as reporter:
        reporter.put(1)
        assert recorder.reporting.wait(WITHIN)  # taken: the report of it is held up
        reporter.put(2)
        reporter.put(3)  # the queue is full

        def hand_one_more() -> None:
            reporter.put(4)
            handed.set()

        sealer = threading.Thread(target=hand_one_more)
        sealer.start()
        # Not a measure of time: however long it is given, the item is not taken.
        assert not handed.wait(0.5), "handed on past the depth while the reporter waits"
        recorder.hold.set()
        sealer.join(WITHIN)
        assert handed.is_set()
    assert [item for batch in recorder.batches for item in batch] == [1, 2, 3, 4]
