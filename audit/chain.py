"""The chained form of the audit trail: how events are sealed one after another, how a
flush becomes a segment in the object store, and the signed checkpoint that ends it.

Each event carries `prev` (the MAC of the event before it in its chain, "" for the first)
and `mac`, an HMAC-SHA256 under the audit key over the event without its `mac`:

    mac_n = HMAC(audit key, "sealstream-audit/1" 0x00 || canonical JSON of event_n)

Beside the MACs runs a plain hash chain, which anyone can recompute:

    digest_n = SHA-256(digest_(n-1) || canonical JSON of event_n, its mac included)

with digest_(-1) = 32 zero bytes. A checkpoint names a chain's last event (chain, seq,
mac, digest, time) and is signed with the audit signing key (Ed25519). Whoever holds the
signing key's public half alone can therefore check that the events up to a checkpoint
are the ones that were signed; whoever holds the KEK can also check every event's MAC.

A segment is what one flush writes, once, with a conditional write that never replaces
anything: `sealstream/audit/events/<YYYY-MM-DDTHH>/<chain>.<first seq>.<nonce>.json`,
holding its events, all of that hour (UTC), and the checkpoint of its last one. The
nonce is random for each segment, so that no one can put an object where a chain's next
segment will go.
"""

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from storage import ObjectStore
from storage.integrity import canonical_json

FORMAT = "sealstream-audit/1"
CHECKPOINT_FORMAT = "sealstream-audit-checkpoint/1"
EVENTS_PREFIX = "sealstream/audit/events/"
GENESIS = bytes(32)
CLOSED = "chain-closed"  # the type of a chain's last event, on a clean shutdown
ALARM = "alarm"  # the type of an event that says someone else writes the trail's bucket
NAME_TAKEN = "segment-name-taken"  # the alarm of a segment's name taken by someone else
SEQ_DIGITS = 12
NONCE_BYTES = 8
CHAIN_PATTERN = r"[a-z0-9-]{1,64}"
MAX_SEGMENT_BYTES = 4 * 1024 * 1024  # the most SEALSTREAM_AUDIT_SEGMENT_BYTES may be
MAX_EVENT_BYTES = 256 * 1024  # far above any event: each text field is bounded on record
MAX_CHECKPOINT_BYTES = 4 * 1024
# A segment holds at most MAX_SEGMENT_BYTES of events, or one event alone that is more.
LARGEST_SEGMENT = MAX_SEGMENT_BYTES + MAX_EVENT_BYTES + MAX_CHECKPOINT_BYTES
PLANTED = "planted-object"  # the alarm of an object too large to be a segment
_SEGMENT_NAME = re.compile(
    rf"^{re.escape(EVENTS_PREFIX)}(\d{{4}}-\d{{2}}-\d{{2}}T\d{{2}})/({CHAIN_PATTERN})"
    rf"\.(\d{{{SEQ_DIGITS}}})\.[0-9a-f]{{{2 * NONCE_BYTES}}}\.json$"
)

Event = dict[str, Any]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """The bytes of a base64 field, or b"" if it is not one (a tampered field fails its
    check rather than the reading)."""
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        return b""


def event_mac(key: bytes, event: Event) -> bytes:
    """The MAC of `event`, over everything but its own `mac`."""
    body = {name: value for name, value in event.items() if name != "mac"}
    return hmac.digest(key, FORMAT.encode() + b"\x00" + canonical_json(body), "sha256")


def next_digest(digest: bytes, event: Event) -> bytes:
    return hashlib.sha256(digest + canonical_json(event)).digest()


def checkpoint_message(checkpoint: dict[str, Any]) -> bytes:
    """What a checkpoint's signature covers: every field but the signature."""
    body = {name: value for name, value in checkpoint.items() if name != "signature"}
    return CHECKPOINT_FORMAT.encode() + b"\x00" + canonical_json(body)


@dataclass
class ChainState:
    """Where a chain stands: its last event's sequence number, MAC and digest."""

    chain: str
    seq: int = -1
    mac: bytes = b""
    digest: bytes = GENESIS

    def seal(self, key: bytes, event: Event) -> Event:
        """`event` as the chain's next: numbered, linked to the one before, MACed."""
        self.seq += 1
        sealed = {**event, "chain": self.chain, "seq": self.seq, "prev": b64(self.mac)}
        self.mac = event_mac(key, sealed)
        sealed["mac"] = b64(self.mac)
        self.digest = next_digest(self.digest, sealed)
        return sealed

    def checkpoint(self, time: datetime) -> dict[str, Any]:
        """The checkpoint of the chain's last event, unsigned."""
        return {
            "format": CHECKPOINT_FORMAT,
            "chain": self.chain,
            "seq": self.seq,
            "mac": b64(self.mac),
            "digest": b64(self.digest),
            "time": time.isoformat(),
        }


def hour_of(time: datetime) -> str:
    """The hour a segment of events of `time` is filed under (UTC)."""
    return f"{time.astimezone(UTC):%Y-%m-%dT%H}"


def segment_name(chain: str, first: int, hour: str) -> str:
    """A fresh name for the segment of `chain` from event `first` on, of events of `hour`."""
    nonce = secrets.token_hex(NONCE_BYTES)
    return f"{EVENTS_PREFIX}{hour}/{chain}.{first:0{SEQ_DIGITS}d}.{nonce}.json"


@dataclass(frozen=True)
class SegmentName:
    """What a segment's storage key says: its hour, chain and first sequence number."""

    key: str
    hour: str
    chain: str
    first: int

    @classmethod
    def parse(cls, key: str) -> "SegmentName | None":
        match = _SEGMENT_NAME.match(key)
        if match is None:
            return None
        return cls(key, match.group(1), match.group(2), int(match.group(3)))


def segment_bytes(chain: str, events: Sequence[Event], checkpoint: dict[str, Any]) -> bytes:
    document = {
        "format": FORMAT,
        "chain": chain,
        "first": events[0]["seq"],
        "events": list(events),
        "checkpoint": checkpoint,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class OversizedSegment(Exception):
    """An object under a segment's name larger than any segment the service writes."""


def read_segment(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The segment under `key` (as `parse_segment`); one larger than `LARGEST_SEGMENT`
    raises `OversizedSegment` unread, so a planted object costs a HEAD, not its bytes."""
    size = store.head(key).size
    if size > LARGEST_SEGMENT:
        raise OversizedSegment(f"{key} holds {size} bytes, more than any segment")
    return parse_segment(store.get(key))


def parse_segment(data: bytes) -> dict[str, Any] | None:
    """A segment's document, or None if it does not have a segment's shape."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None
    events = document.get("events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return None
    if not isinstance(document.get("checkpoint"), dict):
        return None
    return document
