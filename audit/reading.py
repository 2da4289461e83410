"""Reading the stored trail back for `GET /api/audit`: the events of the segments in a
time range, each one's MAC checked (one that fails is refused and counted, never
served), filtered, ordered by time and paged with an opaque cursor.

A query lists the segments of the days its range covers (segments are filed under the
day of their first event), so a narrow range reads little; an open range, or one of more
than a month, reads the whole trail.
"""

import base64
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from audit.chain import EVENTS_PREFIX, Event, SegmentName, event_mac, parse_segment, unb64
from storage import ObjectNotFound, ObjectStore
from storage.integrity import RecordTampered, note_refusal

MAX_DAYS_LISTED_ONE_BY_ONE = 31


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
    found = sorted(
        (
            event
            for event in authentic_events(store, audit_key, _prefixes(query))
            if query.matches(event)
        ),
        key=_order,
    )
    if after is not None:
        found = [event for event in found if _order(event) > after]
    page = found[: query.limit]
    more = len(found) > query.limit
    return page, _encode_cursor(_order(page[-1])) if more and page else None


def authentic_events(
    store: ObjectStore, audit_key: bytes, prefixes: list[str] | None = None
) -> Iterator[Event]:
    """Every event stored under `prefixes` (the whole trail if None) whose MAC checks, once
    each: a segment copied under another name is not served twice."""
    seen: set[tuple[str, int]] = set()
    for prefix in prefixes or [EVENTS_PREFIX]:
        for info in store.list(prefix):
            if SegmentName.parse(info.key) is None:
                continue
            try:
                document = parse_segment(store.get(info.key))
            except ObjectNotFound:
                continue
            for event in [] if document is None else document["events"]:
                if not _authentic(event, audit_key):
                    note_refusal("audit-event", RecordTampered("an audit event", info.key))
                    continue
                seq = event.get("seq")
                place = (str(event.get("chain")), seq if isinstance(seq, int) else -1)
                if place not in seen:
                    seen.add(place)
                    yield event


def _authentic(event: Event, audit_key: bytes) -> bool:
    try:
        return hmac.compare_digest(unb64(event.get("mac")), event_mac(audit_key, event))
    except ValueError:  # no canonical form (a NaN, say): the service never wrote it
        return False


def _prefixes(query: AuditQuery) -> list[str] | None:
    """The day prefixes a bounded range covers, if few enough to list one by one."""
    if query.since is None or query.until is None or query.until <= query.since:
        return None
    # A segment is filed under its first event's day, and may run past midnight.
    first = query.since.astimezone(UTC).date() - timedelta(days=1)
    last = query.until.astimezone(UTC).date()
    if (last - first).days >= MAX_DAYS_LISTED_ONE_BY_ONE:
        return None
    return [_day_prefix(first + timedelta(days=n)) for n in range((last - first).days + 1)]


def _day_prefix(day: date) -> str:
    return f"{EVENTS_PREFIX}{day:%Y-%m-%d}/"


def _time(event: Event) -> datetime | None:
    try:
        return datetime.fromisoformat(str(event.get("time")))
    except ValueError:
        return None


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


def _decode_cursor(cursor: str | None) -> tuple[str, str, int] | None:
    if cursor is None:
        return None
    try:
        moment, chain, seq = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return moment, chain, int(seq)
    except ValueError:
        raise InvalidCursor("not a cursor this API gave") from None
