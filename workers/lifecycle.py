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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

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
from services.stored_objects import DeletionNote, finish_deletions
from services.unfinished import finish_recording
from workers.reencrypt import clear_rewrap_staging

logger = logging.getLogger(__name__)


def run_sweeps(services: Parts, submit: Submit) -> dict[str, Any]:
    """Every sweep once; `submit` queues a job. What each did."""
    audit = services.audit
    if not audit.writable():
        logger.warning("sweeps held back: the audit trail cannot be written; trying again later")
        return {"auditUnavailable": True}
    guard = _Guard()
    rotated = guard.run("rotation", lambda: _rotate(services)) or []
    destroyed = guard.run("key destruction", lambda: _destroy_keys(services)) or []
    retired = guard.run("version destruction", lambda: _destroy_versions(services)) or []
    stale_after = timedelta(seconds=services.settings.job_stale_after)
    stale = guard.run("stale jobs", lambda: sweep_stale(services.jobs, stale_after)) or []
    requeue_after = timedelta(seconds=services.settings.job_requeue_after)
    requeued = (
        guard.run("requeueing", lambda: requeue_waiting(services.jobs, requeue_after, submit)) or []
    )
    unparked = guard.run("parked jobs", lambda: queue_parked(services.jobs, submit)) or []
    staging = guard.run("rewrap staging", lambda: clear_rewrap_staging(services)) or 0
    abandoned = guard.run("abandoned temporaries", lambda: _clear_abandoned(services)) or 0
    deletions = guard.run("deletions", lambda: _finish_deletions(services)) or []
    recorded = (
        guard.run(
            "recording", lambda: finish_recording(services.records, services.keys, services.spaces)
        )
        or 0
    )
    swept = guard.run("uploads", lambda: services.uploads().expire())
    expired = [] if swept is None else swept.expired
    for upload in expired:
        audit.lifecycle("upload-expired", tenant=upload.tenant, object=upload.key)
    completed = [] if swept is None else swept.completed
    for upload in completed:
        audit.lifecycle("upload-completed", tenant=upload.tenant, object=upload.key)
    verifying = [_verify(services, submit, upload) for upload in completed]
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
        "failedSweeps": guard.failed,
    }


T = TypeVar("T")


class _Guard:
    """Runs each sweep on its own: one that fails is logged and named, and the others
    still run (a key whose index cannot be read must not stop every tenant's sweeps)."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, name: str, sweep: Callable[[], T]) -> T | None:
        """What `sweep` returns; None if it failed."""
        try:
            return sweep()
        except Exception:  # any failure: the next sweeps must still run
            logger.exception("the %s sweep failed; the other sweeps go on", name)
            self.failed.append(name)
            return None


def _rotate(services: Parts) -> list[tuple[str, str]]:
    rotated = services.keys.rotate_due()
    for tenant, kid in rotated:
        services.audit.lifecycle("scheduled-rotation", tenant=tenant, key=kid)
    return rotated


def _destroy_keys(services: Parts) -> list[tuple[str, str]]:
    destroyed = services.keys.destroy_due(_announced(services.audit, "destroying"))
    for tenant, kid in destroyed:
        services.audit.lifecycle("destruction", tenant=tenant, key=kid)
    return destroyed


def _destroy_versions(services: Parts) -> list[str]:
    retirements = Retirements(services.keys, services.records, services.spaces)
    retired = retirements.destroy_due(_announced(services.audit, "destroying-version"))
    for retired_version in retired:  # tenant/kid#version
        tenant, _, key = retired_version.partition("/")
        services.audit.lifecycle("version-destruction", tenant=tenant, key=key)
    return retired


def _finish_deletions(services: Parts) -> list[DeletionNote]:
    announced = _announced(services.audit, "finishing-deletion", object_key=True)
    deletions = finish_deletions(services.records, services.spaces, announced)
    for note in deletions:
        services.audit.lifecycle(
            "deletion-finished", tenant=note.tenant, object=client_key(note.storage_key)
        )
    return deletions


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
