"""The audit trail of one process: events appended to a buffer in memory, sealed into
their chain and written as segments by a background flusher.

Recording an event costs a lock, a list append and the measure of its JSON: no I/O, no
MAC, so a stream never waits on the audit. Text too long to record (a context key over
`MAX_NAME_BYTES`, any other field over `MAX_TEXT_BYTES`) is kept as a MAC of it, and at
most `MAX_CONTEXT_KEYS` context keys are kept, so an event is small whatever a client
sends. The flusher wakes every `flush_interval` seconds, or as soon as `flush_events`
events or `segment_bytes` bytes wait, seals what waits into segments (each of at most
`segment_bytes`, unless one event alone is more, and of one hour's events), writes them
with conditional writes and hands their signed checkpoints to the sink. A write that
fails keeps its segments and is retried as they were; events keep collecting meanwhile,
up to `buffer_limit` events or `buffer_bytes` bytes (those past either are counted, and
the count recorded once writing works again). `available` says whether the store has
taken a segment within `fail_after` seconds of the first failure: the API refuses crypto
requests when it has not.

A segment's name is fresh and random. Should it be taken all the same by an object this
process did not write, someone writes the audit's bucket: that is an alarm (logged,
counted in `audit.alarms.AUDIT_ALARMS`, and recorded in the chain as an `alarm` event that `verify`
reports), and the segment goes under another fresh name.

What runs outside a request asks more: `writable` writes what waits first, and
`announce` writes the event of a lifecycle action before the action is taken; jobs and
the lifecycle sweeps wait while the store does not take them.

Each process keeps a chain of its own, opened (and so registered, in the bucket and at
the sink) with a "chain-opened" event flushed at once, and ended by `close` with a
"chain-closed" event. A crash loses at most the events not yet flushed.

Refused requests without a valid token are not events of their own: they are counted
per source address, route and code, and recorded as one "refusals" event per window.
"""

import hashlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from audit.alarms import raise_alarm
from audit.chain import (
    ALARM,
    CLOSED,
    NAME_TAKEN,
    ChainState,
    Event,
    hour_of,
    segment_bytes,
    segment_name,
)
from audit.signing import AuditSigner
from audit.sinks import CheckpointSink
from storage import ObjectExists, ObjectStore

logger = logging.getLogger(__name__)

MAX_REFUSAL_SOURCES = 10_000  # beyond it, refusals from new sources are counted together
OTHER_SOURCES = "other"
CLOSE_ATTEMPTS = 3
MAX_CONTEXT_KEYS = 32  # beyond them, context keys are counted in `contextKeysOmitted`
MAX_NAME_BYTES = 64  # a context key longer than this, as JSON, is recorded as its MAC
MAX_TEXT_BYTES = 1024  # any other text field likewise
DIGEST_PREFIX = "hmac-sha256:"
_DIGEST_CHARS = len(DIGEST_PREFIX) + 32
SEALING_BYTES = 256  # what sealing adds to an event: its chain, seq, prev and mac
NAME_ATTEMPTS = 3  # fresh names tried for one segment, each taken by someone else


class SegmentNameTaken(Exception):
    """Every fresh name tried for a segment was taken by an object this process did not
    write."""


@dataclass(frozen=True)
class AuditOptions:
    """How a trail buffers and when it gives up; the settings fill it in."""

    enabled: bool = True
    flush_interval: float = 1.0
    flush_events: int = 1000
    fail_after: float = 30.0
    fail_open: bool = False
    buffer_limit: int = 100_000
    buffer_bytes: int = 32 * 1024 * 1024
    segment_bytes: int = 1024 * 1024
    refusal_window: float = 60.0
    stdout: bool = False


@dataclass
class _Segment:
    name: str
    hour: str
    data: bytes
    checkpoint: dict[str, Any]
    events: list[Event]


@dataclass(frozen=True)
class _Digested:
    """Text too long to record, held as its SHA-256 until sealing MACs it."""

    sha256: bytes


@dataclass
class _Waiting:
    event: Event
    size: int  # its JSON's bytes, with what sealing adds


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
        self._buffer: list[_Waiting] = []
        self._buffered = 0  # bytes
        self._lost = 0
        self._refusals: dict[tuple[str, str, str], _Refusals] = {}
        self._pending: list[_Segment] = []
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
        waiting = _waiting({**_bounded(event), "time": now_iso()})
        with self._lock:
            if self._thread is None:
                self._open()
            if (
                len(self._buffer) >= self.options.buffer_limit
                or self._buffered + waiting.size > self.options.buffer_bytes
            ):
                self._lost += 1
                return
            self._append(waiting)
            full = (
                len(self._buffer) >= self.options.flush_events
                or self._buffered >= self.options.segment_bytes
            )
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

    def writable(self) -> bool:
        """Whether the store takes the trail now: everything waiting is written before
        this answers. True without writing with the audit off or failing open."""
        if not self.options.enabled or self.options.fail_open:
            return True
        with self._lock:
            if self._thread is None and not self._closed:
                self._open()
        return self.flush()

    def announce(self, action: str, *, tenant: str, key: str | None = None, **detail: Any) -> bool:
        """Record a lifecycle action about to be taken and write it now; whether it may
        be taken: only once it is in the store, unless the audit is off or fails open.
        An announcement not followed by its outcome is an action that was not taken."""
        self.lifecycle(action, tenant=tenant, key=key, **detail)
        return self.writable()

    def flush(self) -> bool:
        """Write what waits now; whether everything recorded so far is in the store."""
        with self._flushing:
            try:
                self._write_pending()
                self._pending = self._seal_waiting()
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
                self._append(_waiting({"type": CLOSED, "time": now_iso(), "role": self._role}))
            self._stopping.set()
            self._wake.set()
            self._thread.join()
            self._closed = True
            for _ in range(CLOSE_ATTEMPTS):
                if self.flush() and not self._buffer and not self._pending:
                    break
        self._closed = True

    def _open(self) -> None:
        """Start the chain: its opening event, flushed first, registers it. Called under
        the lock."""
        self._append(
            _waiting(
                {
                    "type": "chain-opened",
                    "time": now_iso(),
                    "role": self._role,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                }
            )
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

    def _append(self, waiting: _Waiting) -> None:
        """Called under the lock."""
        self._buffer.append(waiting)
        self._buffered += waiting.size

    def _seal_waiting(self) -> list[_Segment]:
        """The events waiting, sealed into the chain as segments. The key and the signing
        key are got first, so that failing to get them loses nothing."""
        key = self._audit_key()
        self._signer.load()
        with self._lock:
            waiting, counts = self._buffer, self._take_refusals(self._stopping.is_set())
            if self._lost:
                counts.append({"type": "events-lost", "time": now_iso(), "count": self._lost})
            self._buffer, self._buffered, self._lost = [], 0, 0
        # The counts go after the chain's opening and before its close, if these wait too.
        closing = bool(waiting) and waiting[-1].event["type"] == CLOSED
        waiting[len(waiting) - closing : len(waiting) - closing] = map(_waiting, counts)
        return [self._sealed(key, run) for run in _runs(waiting, self.options.segment_bytes)]

    def _sealed(self, key: bytes, run: list[_Waiting]) -> _Segment:
        first = self._state.seq + 1
        sealed = [self._state.seal(key, _sealable(key, waiting.event)) for waiting in run]
        checkpoint = self._signer.sign(self._state.checkpoint(datetime.now(UTC)))
        hour = _hour(run[0].event)
        data = segment_bytes(self.chain, sealed, checkpoint)
        return _Segment(segment_name(self.chain, first, hour), hour, data, checkpoint, sealed)

    def _write_pending(self) -> None:
        while self._pending:
            segment = self._pending[0]
            self._write(segment)
            self._pending.pop(0)
            self._publish(segment)

    def _write(self, segment: _Segment) -> None:
        """Write `segment`, under a fresh name for each one someone else took."""
        for _ in range(NAME_ATTEMPTS):
            try:
                self._store.put(segment.name, segment.data, if_absent=True)
                return
            except ObjectExists:
                if self._holds(segment):
                    return  # a retry of a write that landed
                self._name_taken(segment)
        raise SegmentNameTaken(f"{NAME_ATTEMPTS} fresh names were taken by someone else")

    def _holds(self, segment: _Segment) -> bool:
        """Whether the object under the segment's name is the segment (read only if its
        size is: someone else's object may be of any size)."""
        if self._store.head(segment.name).size != len(segment.data):
            return False
        return self._store.get(segment.name) == segment.data

    def _name_taken(self, segment: _Segment) -> None:
        """The alarm for a segment's name taken by someone else, and a fresh name."""
        taken = segment.name
        segment.name = segment_name(self.chain, int(segment.events[0]["seq"]), segment.hour)
        raise_alarm(
            NAME_TAKEN,
            "the audit segment name %s was taken by an object this process did not write: "
            "someone else writes the audit trail's bucket; the chain goes on under %s",
            taken,
            segment.name,
        )
        with self._lock:  # recorded even while closing: the alarm must reach the chain
            alarm = {"type": ALARM, "time": now_iso(), "alarm": NAME_TAKEN, "object": taken}
            self._append(_waiting(alarm))

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


def _bounded(event: Event) -> Event:
    """`event` with over-long text held as digests, and its context keys capped."""
    bounded = dict(event)
    for name, value in event.items():
        if isinstance(value, str) and len(value) * 12 > MAX_TEXT_BYTES:  # else short enough
            bounded[name] = _text(value, MAX_TEXT_BYTES)
    names = event.get("contextKeys")
    if isinstance(names, list):
        bounded["contextKeys"] = [_text(name, MAX_NAME_BYTES) for name in names[:MAX_CONTEXT_KEYS]]
        if len(names) > MAX_CONTEXT_KEYS:
            bounded["contextKeysOmitted"] = len(names) - MAX_CONTEXT_KEYS
    return bounded


def _text(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) * 12 > limit and _json_length(value) > limit:
        return _Digested(hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest())
    return value


def _json_length(text: str) -> int:
    """The length of `text` as a JSON string, quotes left out (without encoding it, in
    the common case)."""
    if text.isascii() and text.isprintable():
        return len(text) + text.count('"') + text.count("\\")
    return len(json.dumps(text)) - 2


def _digest_placeholder(value: object) -> str:
    if not isinstance(value, _Digested):
        raise TypeError(f"an audit event cannot hold {type(value).__name__}")
    return "x" * _DIGEST_CHARS


# One encoder for every measure: making one per event costs more than the encoding.
_MEASURE = json.JSONEncoder(separators=(",", ":"), default=_digest_placeholder)


def _waiting(event: Event) -> _Waiting:
    return _Waiting(event, len(_MEASURE.encode(event)) + SEALING_BYTES)


def _sealable(key: bytes, event: Event) -> Event:
    """`event` as sealed: no empty fields, and each digest of over-long text MACed, so that
    no reader of the trail can test guesses of the text against it."""
    sealable = {}
    for name, value in event.items():
        if isinstance(value, list):
            sealable[name] = [_digest(key, item) for item in value]
        elif value is not None:
            sealable[name] = _digest(key, value)
    return sealable


def _digest(key: bytes, value: Any) -> Any:
    if not isinstance(value, _Digested):
        return value
    mac = hmac.digest(key, b"sealstream-audit/long-text\x00" + value.sha256, "sha256")
    return DIGEST_PREFIX + mac[:16].hex()


def _hour(event: Event) -> str:
    return hour_of(datetime.fromisoformat(event["time"]))


def _runs(waiting: list[_Waiting], limit: int) -> Iterator[list[_Waiting]]:
    """`waiting` cut into runs of one hour's events and at most `limit` bytes (unless one
    event alone is more)."""
    run: list[_Waiting] = []
    size = 0
    for item in waiting:
        if run and (size + item.size > limit or _hour(item.event) != _hour(run[0].event)):
            yield run
            run, size = [], 0
        run.append(item)
        size += item.size
    if run:
        yield run
