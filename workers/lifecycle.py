"""The periodic sweeps: rotate keys that are due; destroy keys past their deletion date,
and the material of retired key versions past theirs once nothing stored uses them; fail
jobs whose worker was lost; queue again jobs whose task was lost, and queue the jobs
parked while the queue was unreachable; record the objects whose writer was lost before
it could; clear what header-only rewrap jobs left staged before
re-encryption replaced them; remove the temporary files that writes into a local
directory left when their process died; finish object deletions a crash cut short; and abort the
resumable uploads past their expiry, erasing their state (one whose every frame is
stored is completed instead, or recorded if a completion cut off made its object, and its
verify job started, as a request completing it would). Each is
idempotent: running it twice does no harm.

The sweeps fail closed on the audit, as the API does: they run only once the process's
audit trail has been written, and each destruction (of a key, of a retired version's
material, of an object whose deletion was cut short) is announced in the trail, and the
announcement written, before it is done. While the trail cannot be written (unless
`SEALSTREAM_AUDIT_FAIL_OPEN`), nothing is done, and the next sweep tries again.
"""

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from audit import AuditTrail
from keystore.store import Proceed
from sealstream.wiring import Parts
from services.jobs import (
    JobKind,
    JobRecord,
    Submit,
    VerifyParams,
    queue_or_park,
    queue_parked,
    requeue_waiting,
    sweep_stale,
)
from services.placement import client_key
from services.resumable import UploadState
from services.retirement import Retirements
from services.stored_objects import finish_deletions
from services.unfinished import finish_recording
from workers.reencrypt import clear_rewrap_staging

logger = logging.getLogger(__name__)


def run_sweeps(services: Parts, submit: Submit) -> dict[str, Any]:
    """Every sweep once; `submit` queues a job. What each did."""
    audit = services.audit
    if not audit.writable():
        logger.warning("sweeps held back: the audit trail cannot be written; trying again later")
        return {"auditUnavailable": True}
    rotated = services.keys.rotate_due()
    for tenant, kid in rotated:
        audit.lifecycle("scheduled-rotation", tenant=tenant, key=kid)
    destroyed = services.keys.destroy_due(_announced(audit, "destroying"))
    for tenant, kid in destroyed:
        audit.lifecycle("destruction", tenant=tenant, key=kid)
    retirements = Retirements(services.keys, services.records, services.spaces)
    retired = retirements.destroy_due(_announced(audit, "destroying-version"))
    for retired_version in retired:  # tenant/kid#version
        tenant, _, key = retired_version.partition("/")
        audit.lifecycle("version-destruction", tenant=tenant, key=key)
    stale_after = timedelta(seconds=services.settings.job_stale_after)
    stale = sweep_stale(services.jobs, stale_after)
    requeue_after = timedelta(seconds=services.settings.job_requeue_after)
    requeued = requeue_waiting(services.jobs, requeue_after, submit)
    unparked = queue_parked(services.jobs, submit)
    staging = clear_rewrap_staging(services)
    abandoned = _clear_abandoned(services)
    deletions = finish_deletions(
        services.records, services.spaces, _announced(audit, "finishing-deletion", object_key=True)
    )
    for note in deletions:
        audit.lifecycle(
            "deletion-finished", tenant=note.tenant, object=client_key(note.storage_key)
        )
    recorded = finish_recording(services.records, services.keys, services.spaces)
    swept = services.uploads().expire()
    expired = swept.expired
    for upload in expired:
        audit.lifecycle("upload-expired", tenant=upload.tenant, object=upload.key)
    verifying = [_verify(services, submit, upload) for upload in swept.completed]
    done = (
        *(rotated, destroyed, retired, stale, requeued, unparked, staging, abandoned),
        *(deletions, recorded),
    )
    if any((*done, expired, verifying)):
        logger.info(
            "sweeps: rotated %d keys, destroyed %d keys and %d retired key versions, "
            "failed %d stale jobs, queued again %d jobs and %d parked ones, "
            "cleared %d objects and uploads that rewrap jobs staged, "
            "removed %d temporary files of writers lost, "
            "finished %d deletions cut short, recorded %d objects their writer left, "
            "aborted %d expired resumable uploads and completed %d",
            len(rotated),
            len(destroyed),
            len(retired),
            len(stale),
            len(requeued),
            len(unparked),
            staging,
            abandoned,
            len(deletions),
            recorded,
            len(expired),
            len(verifying),
        )
    return {
        "rotated": [f"{tenant}/{kid}" for tenant, kid in rotated],
        "destroyed": [f"{tenant}/{kid}" for tenant, kid in destroyed],
        "destroyedVersions": retired,
        "staleJobs": stale,
        "requeuedJobs": requeued,
        "parkedJobsQueued": unparked,
        "clearedStaging": staging,
        "abandonedTemporaries": abandoned,
        "finishedDeletions": len(deletions),
        "recordedObjects": recorded,
        "expiredUploads": len(expired),
        "completedUploads": verifying,
    }


def _verify(services: Parts, submit: Submit, upload: UploadState) -> str:
    """Start the verify job of an upload's object the sweep completed (parked if the
    queue refuses it, for a later sweep to queue); its id."""
    record = JobRecord.new(JobKind.VERIFY, upload.tenant, VerifyParams.of(upload))
    queue_or_park(services.jobs, submit, record)
    return record.id


def _clear_abandoned(services: Parts) -> int:
    """Remove what writes into the stores left when their process died, once older than
    any live upload's pause can be."""
    expiry = timedelta(seconds=services.settings.local_temp_expiry)
    written_before = datetime.now(UTC) - expiry
    return sum(store.clear_abandoned(written_before) for store in services.spaces.every_store())


def _announced(audit: AuditTrail, action: str, *, object_key: bool = False) -> Proceed:
    """Whether a destruction may go ahead: once `action` on it is written in the trail.
    It names a key (`kid`, `kid#version`), or with `object_key` a stored object."""

    def proceed(tenant: str, name: str) -> bool:
        if object_key:
            written = audit.announce(action, tenant=tenant, object=client_key(name))
        else:
            written = audit.announce(action, tenant=tenant, key=name)
        if not written:
            logger.warning(
                "%s %s of tenant %s held back: the audit cannot be written", action, name, tenant
            )
        return written

    return proceed
