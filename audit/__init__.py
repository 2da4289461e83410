"""audit: the tamper-evident audit trail.

Each process records events into a trail of its own (`trail.AuditTrail`), whose flusher
seals them into a chain of MACed events and writes them as append-only segments to the
object store (`chain`), each ending in a checkpoint signed with the audit signing key
(`signing`) and also handed to a sink outside the bucket (`sinks`). `verify` checks a
stored trail; `reading` answers queries over it; `alarms` counts the signs that someone
else writes the trail's bucket.
"""

from audit.chain import EVENTS_PREFIX, Event
from audit.signing import AuditSigner, load_public_key, public_pem
from audit.sinks import BucketSink, CheckpointSink, RedisSink, StdoutSink, checkpoint_lines
from audit.trail import AuditOptions, AuditTrail
from audit.verify import Finding, Report, verify_trail

AUDIT_KEY_PURPOSE = "audit-events"

__all__ = [
    "AUDIT_KEY_PURPOSE",
    "EVENTS_PREFIX",
    "AuditOptions",
    "AuditSigner",
    "AuditTrail",
    "BucketSink",
    "CheckpointSink",
    "Event",
    "Finding",
    "RedisSink",
    "Report",
    "StdoutSink",
    "checkpoint_lines",
    "load_public_key",
    "public_pem",
    "verify_trail",
]
