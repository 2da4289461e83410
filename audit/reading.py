"""Reading the stored trail back for `GET /api/audit`: the events of the segments in a
time range, each one's MAC checked (one that fails is refused and counted, never
served), filtered, ordered by time and paged with an opaque cursor.

Segments are filed under the hour of their events, and listed in the order of their
names, hour by hour: a query lists from the hour its range (or its cursor) starts in,
and stops once it holds a page of events that no later hour can come before, or at the
end of its range. A page thus reads the hours it shows, not the whole trail; and once it has read
`PAGE_SEGMENTS` segments, it ends at the next hour, with the events found so far (maybe
none) and a cursor that goes on from that hour.
"""

import base64
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from audit.alarms import raise_alarm
from audit.chain import (
    EVENTS_PREFIX,
    PLANTED,
    Event,
    OversizedSegment,
    SegmentName,
    event_mac,
    hour_of,
    read_segment,
    unb64,
)
from storage import ObjectNotFound, ObjectStore
from storage.integrity import RecordTampered, note_refusal

EARLIEST_YEAR, LATEST_YEAR = 1970, 9998  # beyond them, a range's hours cannot be reckoned
PAGE_SEGMENTS = 200


@dataclass(frozen=True)
class AuditQuery:
    """Which events a reader wants; None matches anything. `tenant` None: every tenant's
    (the operator's view)."""

    tenant: str | None
    since: datetime | None = None
    until: datetime | None = None
    kid: str | None = None
    token_id: str | None = None
    outcome: str | None = None  # "success", "failure", or a problem code
    operation: str | None = None
    limit: int = 100
    after: str | None = None  # the cursor a page ended with
    segments: int = PAGE_SEGMENTS  # read by one page, at most (but its first hour whole)

    def matches(self, event: Event) -> bool:
        moment = _time(event)
        key = str(event.get("key") or "")
        return (
            (self.tenant is None or event.get("tenant") == self.tenant)
            and (self.since is None or (moment is not None and moment >= self.since))
            and (self.until is None or (moment is not None and moment < self.until))
            and (self.kid is None or key == self.kid or key.startswith(self.kid + "#"))
            and (self.token_id is None or event.get("tokenId") == self.token_id)
            and (self.operation is None or event.get("operation") == self.operation)
            and (self.outcome is None or _outcome_matches(self.outcome, event))
        )


def query_events(
    store: ObjectStore, audit_key: bytes, query: AuditQuery
) -> tuple[list[Event], str | None]:
    """A page of the events `query` selects, in time order, and the cursor of the next
    page (None on the last)."""
    after = _decode_cursor(query.after)
    page = _Page(query.limit, after)
    last_hour = None if query.until is None else hour_of(query.until)
    seen: set[tuple[str, int]] = set()
    hour = None
    for read, name in enumerate(_listed(store, _first_hour(query, after))):
        if name.hour != hour:  # the hours before are read whole
            if page.full_before(name.hour) or (last_hour is not None and last_hour < name.hour):
                break
            if read >= query.segments:  # a partial page: the next goes on from this hour
                events = page.events()[: query.limit]
                return events, _encode_cursor((f"{name.hour}:00:00+00:00", "", -1))
            hour = name.hour
        page.add(e for e in _authentic(store, audit_key, name, seen) if query.matches(e))
    events = page.events()
    more = len(events) > query.limit
    return events[: query.limit], _encode_cursor(_order(events[query.limit - 1])) if more else None


class _Page:
    """The first `limit` + 1 events after the cursor, as far as read: one more than a
    page, to tell whether another follows."""

    def __init__(self, limit: int, after: tuple[str, str, int] | None) -> None:
        self._keep = limit + 1
        self._after = after
        self._found: list[Event] = []

    def add(self, events: Iterator[Event]) -> None:
        self._found += (e for e in events if self._after is None or _order(e) > self._after)
        if len(self._found) > 2 * self._keep:
            self._found = self.events()

    def events(self) -> list[Event]:
        return sorted(self._found, key=_order)[: self._keep]

    def full_before(self, hour: str) -> bool:
        """Whether the page is full of events earlier than `hour`, which no segment of
        that hour or later can precede."""
        found = self.events()
        return len(found) == self._keep and _hour(found[-1]) < hour


def _first_hour(query: AuditQuery, after: tuple[str, str, int] | None) -> str:
    """The hour to list from: that of the range's start, or of the cursor's event."""
    starts = [query.since] if query.since is not None else []
    if after is not None:
        moment = _parse_time(after[0])
        starts += [] if moment is None else [moment]
    return hour_of(max(starts)) if starts else ""


def authentic_events(store: ObjectStore, audit_key: bytes) -> Iterator[Event]:
    """Every event of the trail whose MAC checks, once each."""
    seen: set[tuple[str, int]] = set()
    for name in _listed(store, ""):
        yield from _authentic(store, audit_key, name, seen)


def _listed(store: ObjectStore, first_hour: str) -> Iterator[SegmentName]:
    """The segments' names in order, from those of `first_hour` on (all if "")."""
    start = f"{EVENTS_PREFIX}{first_hour}" if first_hour else ""
    for info in store.list(EVENTS_PREFIX, start_after=start):
        name = SegmentName.parse(info.key)
        if name is not None:
            yield name


def _authentic(
    store: ObjectStore, audit_key: bytes, name: SegmentName, seen: set[tuple[str, int]]
) -> list[Event]:
    """The segment's events whose MAC checks and that are not in `seen` (a segment copied
    under another name is not served twice); each added to `seen`. The service writes no
    segment with an event whose MAC fails: from the first such event on, the segment is
    refused (noted once), and one too large to be a segment is not read at all."""
    try:
        document = read_segment(store, name.key)
    except ObjectNotFound:
        return []
    except OversizedSegment as error:
        raise_alarm(PLANTED, "an object the service did not write is among the audit's: %s", error)
        return []
    fresh = []
    for event in [] if document is None else document["events"]:
        if not _mac_checks(event, audit_key):
            note_refusal("audit-event", RecordTampered("an audit segment", name.key))
            break
        seq = event.get("seq")
        place = (str(event.get("chain")), seq if isinstance(seq, int) else -1)
        if place not in seen:
            seen.add(place)
            fresh.append(event)
    return fresh


def _mac_checks(event: Event, audit_key: bytes) -> bool:
    try:
        return hmac.compare_digest(unb64(event.get("mac")), event_mac(audit_key, event))
    except ValueError:  # no canonical form (a NaN, say): the service never wrote it
        return False


def _time(event: Event) -> datetime | None:
    return _parse_time(str(event.get("time")))


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _hour(event: Event) -> str:
    moment = _time(event)
    return "" if moment is None else hour_of(moment)


def _order(event: Event) -> tuple[str, str, int]:
    seq = event.get("seq")
    return str(event.get("time")), str(event.get("chain")), seq if isinstance(seq, int) else -1


def _outcome_matches(outcome: str, event: Event) -> bool:
    status = event.get("status")
    failed = bool(event.get("aborted")) or (isinstance(status, int) and status >= 400)
    if outcome == "success":
        return isinstance(status, int) and not failed
    if outcome == "failure":
        return failed or event.get("outcome") in ("failed", "cancelled")
    return event.get("code") == outcome


def _encode_cursor(order: tuple[str, str, int]) -> str:
    text = f"{order[0]}|{order[1]}|{order[2]}"
    return base64.urlsafe_b64encode(text.encode()).decode("ascii")


class InvalidCursor(ValueError):
    """A page cursor this API did not give."""


def within_years(moment: datetime) -> bool:
    """Whether `moment` names an offset and falls in the years a query may name."""
    return moment.tzinfo is not None and EARLIEST_YEAR <= moment.year <= LATEST_YEAR


def _decode_cursor(cursor: str | None) -> tuple[str, str, int] | None:
    if cursor is None:
        return None
    try:
        moment, chain, seq = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        if not within_years(datetime.fromisoformat(moment)):
            raise ValueError(moment)
        return moment, chain, int(seq)
    except (ValueError, OverflowError):
        raise InvalidCursor("not a cursor this API gave") from None
