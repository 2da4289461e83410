"""The audit trail, read back: `GET /api/audit` (scope `audit:read`), filtered and paged.

A tenant sees its own tenant's events, of at most `TENANT_MAX_RANGE` at once (the last
`TENANT_DEFAULT_RANGE` unless it says otherwise); the operator sees every tenant's, over
any range, and the counts of refused requests that carried no valid token (which belong
to no tenant). Either way a page reads no more of the trail than the hours it shows.
Every event served has passed its MAC check.
"""

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from api.auth import require
from api.openapi import AUTHENTICATED, QUERY, answer, answers
from api.problems import Problem
from api.services import services
from api.tokens import Principal
from audit import AUDIT_KEY_PURPOSE
from audit.reading import (
    EARLIEST_YEAR,
    LATEST_YEAR,
    AuditQuery,
    InvalidCursor,
    query_events,
    within_years,
)

router = APIRouter(prefix="/api/audit", tags=["audit"])
Reader = Annotated[Principal, Depends(require("audit:read"))]
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]")
TENANT_DEFAULT_RANGE = timedelta(hours=24)
TENANT_MAX_RANGE = timedelta(days=7)


def _iso_text(value: object) -> object:
    """A time as the document declares it (RFC 3339 text), not a number pydantic would
    read as seconds since the epoch."""
    if not isinstance(value, str) or not _ISO_DATE.match(value):
        raise PydanticCustomError("invalid-time", "give a time as 2026-01-31T12:00:00Z")
    return value


Moment = Annotated[AwareDatetime, BeforeValidator(_iso_text)]


class AuditEvent(BaseModel):
    """One audit event as stored (fields absent when they do not apply)."""

    type: str = Field(
        description="request, refusals (401s counted per source), job, lifecycle, "
        "chain-opened, chain-closed or events-lost"
    )
    time: str
    chain: str
    seq: int
    model_config = {"extra": "allow"}


class AuditPage(BaseModel):
    """A page of events, oldest first; `next` is the `after` of the next page."""

    events: list[AuditEvent]
    next: str | None


@router.get(
    "",
    response_model=None,
    responses=answers({200: answer("A page of audit events.", AuditPage)}, AUTHENTICATED, QUERY),
)
async def list_audit_events(
    request: Request,
    principal: Reader,
    since: Moment | None = None,
    until: Moment | None = None,
    kid: str | None = None,
    token_id: Annotated[str | None, Query(alias="tokenId")] = None,
    outcome: Annotated[str | None, Query(description="success, failure, or a problem code")] = None,
    operation: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: str | None = None,
) -> dict[str, Any]:
    """Events from `since` (inclusive) to `until` (exclusive), oldest first. A tenant's
    range is at most 7 days (by default the last 24 hours, or the 24 hours on either side
    of the one bound given)."""
    svc = services(request)
    if any(moment is not None and not within_years(moment) for moment in (since, until)):
        raise Problem(
            422,
            "audit-time-out-of-range",
            f"give times from the year {EARLIEST_YEAR} to the year {LATEST_YEAR}",
        )
    if not principal.operator:
        since, until = _tenant_range(since, until)
    query = AuditQuery(
        tenant=None if principal.operator else principal.tenant,
        since=since,
        until=until,
        kid=kid,
        token_id=token_id,
        outcome=outcome,
        operation=operation,
        limit=limit,
        after=after,
    )
    key = svc.records.key.derive(AUDIT_KEY_PURPOSE)
    try:
        events, cursor = await run_in_threadpool(query_events, svc.objects, key, query)
    except InvalidCursor as error:
        raise Problem(422, "invalid-cursor", str(error)) from None
    return {"events": events, "next": cursor}


def _tenant_range(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """A tenant's bounded range: the one asked for, or 24 hours from (or to) a bound."""
    if since is None:
        until = until or datetime.now(UTC)
        since = until - TENANT_DEFAULT_RANGE
    elif until is None:
        until = since + TENANT_DEFAULT_RANGE
    if until - since > TENANT_MAX_RANGE:
        raise Problem(
            422,
            "audit-range-too-wide",
            f"a tenant reads at most {TENANT_MAX_RANGE.days} days of the audit trail at once: "
            "give since and until closer together",
        )
    return since, until
