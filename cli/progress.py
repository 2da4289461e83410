"""Progress on the terminal: a bar with bytes, throughput and ETA for a transfer, and bars
for a job's items and bytes. Drawn on stderr, and only when it is a terminal: nothing on a
pipe or in a log, nothing with `--quiet`. `rich` is imported only when a bar is drawn, so
that commands without one start fast."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


class Meter(Protocol):
    """Where a transfer reports the bytes it has moved, and its length once known."""

    def advance(self, count: int) -> None: ...

    def expect(self, total: int | None) -> None: ...


class _Silent:
    def advance(self, count: int) -> None:
        pass

    def expect(self, total: int | None) -> None:
        pass


class _Bar:
    def __init__(self, progress: "Progress", task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, count: int) -> None:
        self._progress.advance(self._task, count)

    def expect(self, total: int | None) -> None:
        self._progress.update(self._task, total=total)


def wanted(quiet: bool) -> bool:
    """Whether to draw progress: on a terminal, unless told to be quiet."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def transfer_bar(description: str, total: int | None, *, show: bool) -> Iterator[Meter]:
    """A bar for one transfer of `total` bytes (unknown: None), or a meter that draws
    nothing."""
    if not show:
        yield _Silent()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_stderr(), transient=True) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))


class JobBars:
    """A job's items and bytes as two bars, updated from its record."""

    def __init__(self, progress: "Progress | None") -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}

    def update(self, job: dict[str, Any]) -> None:
        if self._progress is None:
            return
        from rich.filesize import decimal

        done = job.get("progress") or {}
        for unit in ("items", "bytes"):
            count, total = done.get(f"{unit}Done") or 0, done.get(f"{unit}Total")
            shown = decimal if unit == "bytes" else str
            amount = f"{shown(count)}/{'?' if total is None else shown(total)} {unit}"
            description = f"{job.get('kind', 'job')} {job.get('status', '')}"
            if unit not in self._tasks:
                self._tasks[unit] = self._progress.add_task(description, amount=amount)
            self._progress.update(
                self._tasks[unit],
                completed=count,
                total=total,
                description=description,
                amount=amount,
            )


@contextmanager
def job_bars(*, show: bool) -> Iterator[JobBars]:
    """Bars for a job's progress, or an updater that draws nothing."""
    if not show:
        yield JobBars(None)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_stderr(), transient=True) as progress:
        yield JobBars(progress)


def _stderr() -> "Console":
    from rich.console import Console

    return Console(stderr=True)
