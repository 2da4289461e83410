"""Alarms: signs that someone other than the service writes the audit trail's bucket.
Each is logged as an error and counted in `AUDIT_ALARMS`, by name."""

import logging

from prometheus_client import Counter

logger = logging.getLogger("audit.alarms")

# In no registry of its own: the API's metrics show it, like the refused records.
AUDIT_ALARMS = Counter(
    "sealstream_audit_alarms",
    "Signs that someone else writes the audit trail's bucket, by alarm: alert on any",
    ["alarm"],
    registry=None,
)


def raise_alarm(alarm: str, message: str, *args: object) -> None:
    logger.error(message, *args)
    AUDIT_ALARMS.labels(alarm).inc()
