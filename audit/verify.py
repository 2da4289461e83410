"""Checking a stored audit trail: every chain's segments, events, MACs, digests and
signed checkpoints, and the chains' ends against the checkpoints kept outside the bucket.

With the audit key (from the KEK) every event's MAC is checked; with the signing key's
public half alone, the hash chain is recomputed and compared with the signed checkpoint
that ends each segment (with each public key given: after a lost signing key was
replaced, the old key checks the old segments). Either way each problem found is
reported as one `Finding`:

- `altered`: an event or segment is not what was sealed and signed;
- `removed`: events missing inside a segment;
- `reordered`: events or segments out of their order;
- `missing-segment`: a gap between segments;
- `truncated`: a chain ends before the last checkpoint the sink holds for it;
- `deleted-chain`: a chain the sink knows of has no segment left, or the store has no
  chain at all although it has an audit signing key (whose public half checks it);
- `unanchored`: checkpoints from a sink were given, but none of them is this chain's
  (every chain publishes one at its first flush): the sink lost its data, or the chain
  was not written by this service;
- `forged-checkpoint`: a checkpoint whose signature does not verify;
- `planted`: an object among the segments that the service did not write (a name no
  segment has, one larger than any segment (not read), or a second object for one
  chain's segment whose signature does not verify), or an `alarm` event: a process
  found the name of its next segment taken.

A chain that ends without a "chain-closed" event is noted, not failed: its process is
running, or crashed (then its unflushed events are lost). Without checkpoints from a sink,
a deleted tail or chain cannot be told from that: the report is then `unanchored`, which
is not a full pass even with no finding.
"""

import hmac
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.chain import (
    ALARM,
    CLOSED,
    EVENTS_PREFIX,
    GENESIS,
    NAME_TAKEN,
    OversizedSegment,
    SegmentName,
    b64,
    event_mac,
    next_digest,
    read_segment,
    unb64,
)
from audit.signing import signed_by
from storage import ObjectNotFound, ObjectStore


@dataclass(frozen=True)
class Finding:
    chain: str
    problem: str
    detail: str

    def line(self) -> str:
        return f"{self.problem}: chain {self.chain}: {self.detail}"


UNANCHORED_VERDICT = (
    "intact but UNANCHORED: no checkpoints from a sink, so a deleted tail or a deleted "
    "chain cannot be told from a crash"
)


@dataclass
class Report:
    chains: int = 0
    events: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    anchored: bool = True  # checked against checkpoints from a sink

    @property
    def ok(self) -> bool:
        """No finding: structurally intact (a full pass only if also `anchored`)."""
        return not self.findings

    def problems(self) -> set[str]:
        return {finding.problem for finding in self.findings}

    def lines(self) -> list[str]:
        if not self.ok:
            verdict = f"{len(self.findings)} problems found"
        else:
            verdict = "intact" if self.anchored else UNANCHORED_VERDICT
        chains = f"{self.chains} chain{'' if self.chains == 1 else 's'}"
        summary = f"audit trail: {chains}, {self.events} events: {verdict}"
        return [*(f.line() for f in self.findings), *self.notes, summary]


@dataclass
class _Chain:
    """What walking one chain has established so far."""

    name: str
    next_seq: int = 0
    mac: bytes | None = b""  # None: unknown, after a gap
    digest: bytes | None = GENESIS
    last_type: str | None = None
    checkpoints: dict[int, str] = field(default_factory=dict)  # seq → mac, as signed


def verify_trail(
    store: ObjectStore,
    *,
    audit_key: bytes | None,
    public_keys: Sequence[Ed25519PublicKey],
    checkpoints: Iterable[dict[str, Any]] | None,
) -> Report:
    """Check every chain in `store` (MACs too if `audit_key` is given), each checkpoint
    against any of `public_keys`, and, if given, each chain's end against `checkpoints`
    from the sink."""
    report = Report(anchored=checkpoints is not None)
    segments: dict[str, list[SegmentName]] = defaultdict(list)
    for info in store.list(EVENTS_PREFIX):
        name = SegmentName.parse(info.key)
        if name is None:
            report.findings.append(
                Finding("-", "planted", f"{info.key} is not the name of a segment")
            )
            continue
        segments[name.chain].append(name)
    walked = {}
    for chain, names in sorted(segments.items()):
        walked[chain] = _walk(store, chain, names, audit_key, public_keys, report)
    report.chains = len(segments)
    if not segments and not checkpoints:  # with checkpoints, each chain is found deleted
        report.findings.append(
            Finding(
                "-",
                "deleted-chain",
                "no chain left in a store that has an audit signing "
                "key: the trail was deleted, or no server has run on it yet",
            )
        )
    if checkpoints is None:
        report.notes.append(
            "note: no checkpoints from a sink: a deleted tail or a deleted chain cannot be "
            "told from a crash"
        )
    else:
        _check_ends(walked, checkpoints, public_keys, report)
    for walk in walked.values():
        if walk.last_type != CLOSED:
            report.notes.append(f"note: chain {walk.name} has no close: running, or crashed")
    return report


def _walk(
    store: ObjectStore,
    chain_name: str,
    names: list[SegmentName],
    audit_key: bytes | None,
    public_keys: Sequence[Ed25519PublicKey],
    report: Report,
) -> _Chain:
    chain = _Chain(chain_name)

    def found(problem: str, detail: str) -> None:
        report.findings.append(Finding(chain_name, problem, detail))

    for name, document in _segments(store, chain_name, names, public_keys, found):
        if document is None or document.get("chain") != chain_name:
            found("altered", f"segment {name.first} is not a segment of this chain")
            chain.mac = chain.digest = None
            continue
        checkpoint = document["checkpoint"]
        signed = _signed(chain_name, checkpoint, public_keys)
        if not signed:
            found("altered", f"segment {name.first}: its checkpoint's signature does not verify")
        last = checkpoint.get("seq") if isinstance(checkpoint.get("seq"), int) else None
        if document.get("first") != name.first or last is None or last < name.first:
            found("altered", f"segment {name.first}: its bounds are not those it was written with")
            chain.mac = chain.digest = None
            continue
        if name.first > chain.next_seq:
            found("missing-segment", f"events {chain.next_seq} to {name.first - 1} are missing")
            chain.mac = chain.digest = None
        elif name.first < chain.next_seq:
            found("reordered", f"segment {name.first} overlaps the events before it")
        _check_events(chain, document["events"], name.first, last, audit_key, found)
        if any(not str(event.get("time")).startswith(name.hour) for event in document["events"]):
            found("altered", f"segment {name.first} is filed under another hour than its events")
        report.events += len(document["events"])
        if signed:
            chain.checkpoints[last] = str(checkpoint.get("mac"))
            if chain.digest is not None and b64(chain.digest) != checkpoint.get("digest"):
                found("altered", f"events {name.first} to {last} are not those that were signed")
            # Carry on from what was signed, so one bad segment does not taint the next.
            chain.mac, chain.digest = unb64(checkpoint.get("mac")), unb64(checkpoint.get("digest"))
        chain.next_seq = last + 1
    return chain


def _segments(
    store: ObjectStore,
    chain_name: str,
    names: list[SegmentName],
    public_keys: Sequence[Ed25519PublicKey],
    found: Any,
) -> Iterator[tuple[SegmentName, dict[str, Any] | None]]:
    """The chain's segments in order, each read once. Of several objects for one segment,
    the one whose checkpoint verifies is the segment, and the others are planted."""
    by_first: dict[int, list[SegmentName]] = defaultdict(list)
    for name in names:
        by_first[name.first].append(name)
    for first, candidates in sorted(by_first.items()):
        read = []
        for name in sorted(candidates, key=lambda n: n.key):
            try:
                read.append((name, read_segment(store, name.key)))
            except ObjectNotFound:
                continue  # deleted while listed: the gap shows at the next segment
            except OversizedSegment as error:
                found("planted", f"{error}: not a segment the service wrote")
        if len(read) > 1:
            read.sort(key=lambda pair: not _genuine(chain_name, pair[1], first, public_keys))
            for name, _ in read[1:]:
                found("planted", f"{name.key} is not a segment the service wrote")
        yield from read[:1]


def _genuine(
    chain_name: str, document: Any, first: int, public_keys: Sequence[Ed25519PublicKey]
) -> bool:
    return (
        isinstance(document, dict)
        and document.get("chain") == chain_name
        and document.get("first") == first
        and _signed(chain_name, document["checkpoint"], public_keys)
    )


def _signed(
    chain_name: str, checkpoint: dict[str, Any], public_keys: Sequence[Ed25519PublicKey]
) -> bool:
    return checkpoint.get("chain") == chain_name and any(
        signed_by(key, checkpoint) for key in public_keys
    )


def _check_events(
    chain: _Chain,
    events: list[dict[str, Any]],
    first: int,
    last: int,
    audit_key: bytes | None,
    found: Any,
) -> None:
    span = last - first + 1
    if span != len(events):  # checked first: `last` is untrusted, a range over it unbounded
        problem = "removed" if span > len(events) else "altered"
        found(problem, f"events {first} to {last}: {len(events)} where there should be {span}")
        chain.mac = chain.digest = None
        return
    seqs = [event.get("seq") for event in events]
    expected = list(range(first, last + 1))
    if seqs != expected:
        numbered = sorted(s for s in seqs if isinstance(s, int))
        if numbered == expected:
            found("reordered", f"events {first} to {last} are out of order")
        elif set(numbered) < set(expected):
            missing = len(set(expected) - set(numbered))
            found("removed", f"{missing} of events {first} to {last} are missing")
        else:
            found("altered", f"events {first} to {last} are not numbered as written")
        chain.mac = chain.digest = None
        return
    for event in events:
        if chain.mac is not None and event.get("prev") != b64(chain.mac):
            found("altered", f"event {event['seq']} does not follow the event before it")
        try:
            if audit_key is not None and not hmac.compare_digest(
                unb64(event.get("mac")), event_mac(audit_key, event)
            ):
                found("altered", f"event {event['seq']} failed authentication")
            if chain.digest is not None:
                chain.digest = next_digest(chain.digest, event)
        except ValueError:  # no canonical form (a NaN, say): the service never wrote it
            found("altered", f"event {event['seq']} is not a document the service writes")
            chain.digest = None
        chain.mac = unb64(event.get("mac"))
        chain.last_type = str(event.get("type"))
        if event.get("type") == ALARM:
            found("planted", f"event {event['seq']}: {_alarm(event)}")


def _alarm(event: dict[str, Any]) -> str:
    if event.get("alarm") == NAME_TAKEN:
        return f"its process found {event.get('object')} taken by an object it did not write"
    return f"its process raised the alarm {event.get('alarm')!r}"


def _check_ends(
    walked: dict[str, _Chain],
    checkpoints: Iterable[dict[str, Any]],
    public_keys: Sequence[Ed25519PublicKey],
    report: Report,
) -> None:
    """Each chain's end against the latest authentic checkpoint the sink holds for it."""
    latest: dict[str, dict[str, Any]] = {}
    checkpoints = list(checkpoints)
    for checkpoint in checkpoints:
        name = str(checkpoint.get("chain"))
        signed = any(signed_by(key, checkpoint) for key in public_keys)
        if not isinstance(checkpoint.get("seq"), int) or not signed:
            report.findings.append(
                Finding(name, "forged-checkpoint", "a checkpoint's signature does not verify")
            )
            continue
        if name not in latest or checkpoint["seq"] > latest[name]["seq"]:
            latest[name] = checkpoint
    for chain_name in sorted(set(walked) - set(latest)):
        report.findings.append(
            Finding(chain_name, "unanchored", "the sink holds no checkpoint of this chain")
        )
    for chain_name, checkpoint in sorted(latest.items()):
        seq = checkpoint["seq"]
        chain = walked.get(chain_name)
        if chain is None:
            report.findings.append(
                Finding(chain_name, "deleted-chain", f"no segment left of its {seq + 1} events")
            )
        elif seq >= chain.next_seq:
            report.findings.append(
                Finding(
                    chain_name,
                    "truncated",
                    f"ends at event {chain.next_seq - 1}, short of its checkpoint at {seq}",
                )
            )
        elif chain.checkpoints.get(seq, checkpoint["mac"]) != checkpoint["mac"]:
            report.findings.append(
                Finding(chain_name, "altered", f"event {seq} is not the one checkpointed")
            )
