"""Commits handed in by several threads at once, run in batches by whichever of them
gets there first, so that they share what each would otherwise pay alone (the local
store: one lock taken, one fsync of each directory for every rename in it).

A thread hands in its commit and waits to lead: the leader takes every commit waiting
(at most one per key, so that a batch never holds two commits of one key) and runs
them as one batch, while the commits handed in meanwhile gather for the next. A commit
returns, or raises its own error, only once the batch that ran it has ended.
"""

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(eq=False)
class Ticket(Generic[Item]):
    """One commit: what it is, and once its batch has run, whether it failed."""

    item: Item
    done: bool = False
    error: BaseException | None = None


class CommitGroup(Generic[Item]):
    """Runs `run_batch(tickets)`, which sets each ticket's `error` if its commit failed;
    an exception out of `run_batch` itself fails every commit of the batch."""

    def __init__(
        self,
        run_batch: Callable[[list[Ticket[Item]]], None],
        key: Callable[[Item], Hashable],
    ) -> None:
        self._run_batch = run_batch
        self._key = key
        self._waiting: list[Ticket[Item]] = []
        self._waiting_lock = threading.Lock()
        self._leading = threading.Lock()

    def commit(self, item: Item) -> None:
        """Run `item` in a batch; raise its error if it failed."""
        ticket = Ticket(item)
        with self._waiting_lock:
            self._waiting.append(ticket)
        while not ticket.done:
            with self._leading:
                if not ticket.done:
                    self._run(self._take())
        if ticket.error is not None:
            raise ticket.error

    def _take(self) -> list[Ticket[Item]]:
        """The waiting commits, the first of each key; the others wait for a later batch."""
        batch: list[Ticket[Item]] = []
        keys: set[Hashable] = set()
        with self._waiting_lock:
            later: list[Ticket[Item]] = []
            for ticket in self._waiting:
                key = self._key(ticket.item)
                (later if key in keys else batch).append(ticket)
                keys.add(key)
            self._waiting = later
        return batch

    def _run(self, batch: list[Ticket[Item]]) -> None:
        try:
            self._run_batch(batch)
        except BaseException as error:  # every commit of the batch fails with it
            for ticket in batch:
                if ticket.error is None:
                    ticket.error = error
        finally:
            for ticket in batch:
                ticket.done = True
