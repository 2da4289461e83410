"""Checking a stored audit trail: every chain's segments, events, MACs, digests and
signed checkpoints, and the chains' ends against the checkpoints kept outside the bucket.

With the audit key (from the KEK) every event's MAC is checked; with the signing key's
public half alone, the hash chain is recomputed and compared with the signed checkpoint
that ends each segment. Either way each problem found is reported as one `Finding`:

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
- `forged-checkpoint`: a checkpoint whose signature does not verify.

A chain that ends without a "chain-closed" event is noted, not failed: its process is
running, or crashed (then its unflushed events are lost). Without checkpoints from a sink,
a deleted tail or chain cannot be told from that, and the report says so.
"""

import hmac
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.chain import (
    CLOSED,
    EVENTS_PREFIX,
    GENESIS,
    SegmentName,
    b64,
    event_mac,
    next_digest,
    parse_segment,
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


@dataclass
class Report:
    chains: int = 0
    events: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def problems(self) -> set[str]:
        return {finding.problem for finding in self.findings}

    def lines(self) -> list[str]:
        verdict = "intact" if self.ok else f"{len(self.findings)} problems found"
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
    public_key: Ed25519PublicKey,
    checkpoints: Iterable[dict[str, Any]] | None,
) -> Report:
    """Check every chain in `store` (MACs too if `audit_key` is given) and, if given, its
    end against `checkpoints` from the sink."""
    report = Report()
    segments: dict[str, list[SegmentName]] = defaultdict(list)
    for info in store.list(EVENTS_PREFIX):
        name = SegmentName.parse(info.key)
        if name is None:
            report.notes.append(f"note: {info.key} is not a segment's name; skipped")
            continue
        segments[name.chain].append(name)
    walked = {}
    for chain, names in sorted(segments.items()):
        walked[chain] = _walk(store, chain, names, audit_key, public_key, report)
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
        _check_ends(walked, checkpoints, public_key, report)
    for walk in walked.values():
        if walk.last_type != CLOSED:
            report.notes.append(f"note: chain {walk.name} has no close: running, or crashed")
    return report


def _walk(
    store: ObjectStore,
    chain_name: str,
    names: list[SegmentName],
    audit_key: bytes | None,
    public_key: Ed25519PublicKey,
    report: Report,
) -> _Chain:
    chain = _Chain(chain_name)

    def found(problem: str, detail: str) -> None:
        report.findings.append(Finding(chain_name, problem, detail))

    for name in sorted(names, key=lambda n: n.first):
        try:
            document = parse_segment(store.get(name.key))
        except ObjectNotFound:
            continue  # deleted while listed: the gap shows at the next segment
        if document is None or document.get("chain") != chain_name:
            found("altered", f"segment {name.first} is not a segment of this chain")
            chain.mac = chain.digest = None
            continue
        checkpoint = document["checkpoint"]
        signed = checkpoint.get("chain") == chain_name and signed_by(public_key, checkpoint)
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
        report.events += len(document["events"])
        if signed:
            chain.checkpoints[last] = str(checkpoint.get("mac"))
            if chain.digest is not None and b64(chain.digest) != checkpoint.get("digest"):
                found("altered", f"events {name.first} to {last} are not those that were signed")
            # Carry on from what was signed, so one bad segment does not taint the next.
            chain.mac, chain.digest = unb64(checkpoint.get("mac")), unb64(checkpoint.get("digest"))
        chain.next_seq = last + 1
    return chain


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


def _check_ends(
    walked: dict[str, _Chain],
    checkpoints: Iterable[dict[str, Any]],
    public_key: Ed25519PublicKey,
    report: Report,
) -> None:
    """Each chain's end against the latest authentic checkpoint the sink holds for it."""
    latest: dict[str, dict[str, Any]] = {}
    checkpoints = list(checkpoints)
    for checkpoint in checkpoints:
        name = str(checkpoint.get("chain"))
        if not isinstance(checkpoint.get("seq"), int) or not signed_by(public_key, checkpoint):
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
