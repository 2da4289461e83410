"""The audit trail of one process: events appended to a buffer in memory, sealed into
their chain and written as segments by a background flusher.

Recording an event costs a lock and a list append: no I/O, no MAC, no serialisation,
so a stream never waits on the audit. The flusher wakes every `flush_interval` seconds,
or as soon as `flush_events` events wait, seals what waits into one segment, writes it
with a conditional write and hands its signed checkpoint to the sink. A write that fails
keeps its segment and is retried as it was; events keep collecting meanwhile, up to
`buffer_limit` (those past it are counted, and the count recorded once writing works
again). `available` says whether the store has taken a segment within `fail_after`
seconds of the first failure: the API refuses crypto requests when it has not.

Each process keeps a chain of its own, opened (and so registered, in the bucket and at
the sink) with a "chain-opened" event flushed at once, and ended by `close` with a
"chain-closed" event. A crash loses at most the events not yet flushed.

Refused requests without a valid token are not events of their own: they are counted
per source address, route and code, and recorded as one "refusals" event per window.
"""

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from audit.chain import CLOSED, ChainState, Event, segment_bytes, segment_name
from audit.signing import AuditSigner
from audit.sinks import CheckpointSink
from storage import ObjectExists, ObjectStore

logger = logging.getLogger(__name__)

MAX_REFUSAL_SOURCES = 10_000  # beyond it, refusals from new sources are counted together
OTHER_SOURCES = "other"
CLOSE_ATTEMPTS = 3


@dataclass(frozen=True)
class AuditOptions:
    """How a trail buffers and when it gives up; the settings fill it in."""

    enabled: bool = True
    flush_interval: float = 1.0
    flush_events: int = 1000
    fail_after: float = 30.0
    fail_open: bool = False
    buffer_limit: int = 100_000
    refusal_window: float = 60.0
    stdout: bool = False


@dataclass
class _Segment:
    name: str
    data: bytes
    checkpoint: dict[str, Any]
    events: list[Event]


@dataclass
class _Refusals:
    count: int
    first: str
    since: float


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class AuditTrail:
    """The audit trail of this process."""

    def __init__(
        self,
        store: ObjectStore,
        key_source: Callable[[], bytes],
        signer: AuditSigner,
        sink: CheckpointSink | None,
        options: AuditOptions,
        *,
        role: str,
    ) -> None:
        self.options = options
        self._store = store
        self._key_source = key_source
        self._key: bytes | None = None
        self._signer = signer
        self._sink = sink
        self._role = role
        self._state = ChainState(f"{role}-{uuid.uuid4().hex[:20]}")
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._buffer: list[Event] = []
        self._lost = 0
        self._refusals: dict[tuple[str, str, str], _Refusals] = {}
        self._pending: _Segment | None = None
        self._failing_since: float | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def chain(self) -> str:
        return self._state.chain

    def record(self, event: Event) -> None:
        """Append `event` (a dict of camelCase fields; `time` is added) to the buffer."""
        if not self.options.enabled or self._closed:
            return
        event["time"] = now_iso()
        with self._lock:
            if self._thread is None:
                self._open()
            if len(self._buffer) >= self.options.buffer_limit:
                self._lost += 1
                return
            self._buffer.append(event)
            full = len(self._buffer) >= self.options.flush_events
        if full:
            self._wake.set()

    def refused(self, client: str, route: str, code: str) -> None:
        """Count a request refused for want of a valid token."""
        if not self.options.enabled or self._closed:
            return
        with self._lock:
            if self._thread is None:
                self._open()
            source = (client, route, code)
            if source not in self._refusals and len(self._refusals) >= MAX_REFUSAL_SOURCES:
                source = (OTHER_SOURCES, route, code)
            counted = self._refusals.get(source)
            if counted is None:
                self._refusals[source] = _Refusals(1, now_iso(), time.monotonic())
            else:
                counted.count += 1

    def lifecycle(self, action: str, *, tenant: str, key: str | None = None, **detail: Any) -> None:
        """Record a lifecycle action (a scheduled rotation, a destruction...) on `key`
        (`kid` or `kid#version`) of `tenant`; `detail` holds further fields, never a secret."""
        self.record({"type": "lifecycle", "action": action, "tenant": tenant, "key": key, **detail})

    def job(self, action: str, *, tenant: str, job: str, kind: str, **detail: Any) -> None:
        """Record a job's start or end (`action`: "job-started", "job-ended")."""
        self.record(
            {
                "type": "job",
                "action": action,
                "tenant": tenant,
                "job": job,
                "jobKind": kind,
                **detail,
            }
        )

    def available(self) -> bool:
        """Whether the store has not been failing the audit for longer than allowed."""
        failing = self._failing_since
        return failing is None or time.monotonic() - failing < self.options.fail_after

    def refuses_requests(self) -> bool:
        """Whether requests that must be audited should be refused now."""
        return not self.options.fail_open and not self.available()

    def flush(self) -> bool:
        """Write what waits now; whether everything recorded so far is in the store."""
        with self._flushing:
            try:
                self._write_pending()
                segment = self._seal_waiting()
                if segment is not None:
                    self._pending = segment
                    self._write_pending()
            except Exception as error:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                logger.warning("the audit trail could not be written: %s", error)
                return False
            self._failing_since = None
            return True

    def close(self) -> None:
        """End the chain with a "chain-closed" event, written before this returns (if the
        store takes it within a few attempts)."""
        if self._closed:
            return
        if self._thread is not None:
            with self._lock:  # past the buffer's limit too: a chain's end is never lost
                self._buffer.append({"type": CLOSED, "time": now_iso(), "role": self._role})
            self._stopping.set()
            self._wake.set()
            self._thread.join()
            self._closed = True
            for _ in range(CLOSE_ATTEMPTS):
                if self.flush() and not self._buffer and self._pending is None:
                    break
        self._closed = True

    def _open(self) -> None:
        """Start the chain: its opening event, flushed first, registers it. Called under
        the lock."""
        self._buffer.append(
            {
                "type": "chain-opened",
                "time": now_iso(),
                "role": self._role,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
        self._thread = threading.Thread(target=self._run, name=f"audit-{self.chain}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.flush()
        while not self._stopping.is_set():
            self._wake.wait(self.options.flush_interval)
            self._wake.clear()
            if not self._stopping.is_set():
                self.flush()

    def _seal_waiting(self) -> _Segment | None:
        """The events waiting, sealed into the chain as one segment; None if none wait.
        The key and the signing key are got first, so that failing to get them loses
        nothing."""
        key = self._audit_key()
        self._signer.load()
        with self._lock:
            events, counts = self._buffer, self._take_refusals(self._stopping.is_set())
            if self._lost:
                counts.append({"type": "events-lost", "time": now_iso(), "count": self._lost})
            self._buffer, self._lost = [], 0
        # The counts go after the chain's opening and before its close, if these wait too.
        closing = bool(events) and events[-1]["type"] == CLOSED
        events[len(events) - closing : len(events) - closing] = counts
        if not events:
            return None
        first = self._state.seq + 1
        sealed = [self._state.seal(key, _without_nones(event)) for event in events]
        checkpoint = self._signer.sign(self._state.checkpoint(datetime.now(UTC)))
        # Filed under its first event's day: a query lists from the day before its start.
        name = segment_name(self.chain, first, datetime.fromisoformat(sealed[0]["time"]))
        return _Segment(name, segment_bytes(self.chain, sealed, checkpoint), checkpoint, sealed)

    def _write_pending(self) -> None:
        segment = self._pending
        if segment is None:
            return
        try:
            self._store.put(segment.name, segment.data, if_absent=True)
        except ObjectExists:
            # A retry of a write that landed, or someone else's object under our name.
            if self._store.get(segment.name) != segment.data:
                raise
        self._pending = None
        self._publish(segment)

    def _publish(self, segment: _Segment) -> None:
        if self.options.stdout:
            lines = (json.dumps({"sealstreamAudit": event}) for event in segment.events)
            print("\n".join(lines), file=sys.stdout, flush=True)
        if self._sink is not None:
            try:
                self._sink.publish(segment.checkpoint)
            except Exception as error:
                logger.warning("an audit checkpoint could not be published: %s", error)

    def _take_refusals(self, everything: bool) -> list[Event]:
        """The refusal counts whose window has ended (all of them with `everything`), as
        events. Called under the lock."""
        cutoff = time.monotonic() - self.options.refusal_window
        ended = [s for s, c in self._refusals.items() if everything or c.since <= cutoff]
        events = []
        for source in ended:
            counted = self._refusals.pop(source)
            client, route, code = source
            events.append(
                {
                    "type": "refusals",
                    "time": now_iso(),
                    "client": client,
                    "route": route,
                    "status": 401,
                    "code": code,
                    "count": counted.count,
                    "since": counted.first,
                }
            )
        return events

    def _audit_key(self) -> bytes:
        if self._key is None:
            self._key = self._key_source()
        return self._key


def _without_nones(event: Event) -> Event:
    return {name: value for name, value in event.items() if value is not None}
