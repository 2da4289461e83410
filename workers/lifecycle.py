"""The periodic sweeps: rotate keys that are due; destroy keys past their deletion date,
and the material of retired key versions past theirs once nothing stored uses them; fail
jobs whose worker was lost; clear what header-only rewrap jobs left staged before
re-encryption replaced them; and finish object deletions a crash cut short. Each is
idempotent: running it twice does no harm."""

import logging
from datetime import timedelta
from typing import Any

from sealstream.wiring import Parts
from services.jobs import sweep_stale
from services.retirement import Retirements
from services.stored_objects import finish_deletions
from workers.reencrypt import clear_rewrap_staging

logger = logging.getLogger(__name__)


def run_sweeps(services: Parts) -> dict[str, Any]:
    rotated = services.keys.rotate_due()
    for tenant, kid in rotated:
        services.audit.lifecycle("scheduled-rotation", tenant=tenant, key=kid)
    destroyed = services.keys.destroy_due()
    for tenant, kid in destroyed:
        services.audit.lifecycle("destruction", tenant=tenant, key=kid)
    retired = Retirements(services.keys, services.records, services.spaces).destroy_due()
    for retired_version in retired:  # tenant/kid#version
        tenant, _, key = retired_version.partition("/")
        services.audit.lifecycle("version-destruction", tenant=tenant, key=key)
    stale_after = timedelta(seconds=services.settings.job_stale_after)
    stale = sweep_stale(services.jobs, stale_after)
    staging = clear_rewrap_staging(services)
    deletions = finish_deletions(services.records, services.spaces)
    if rotated or destroyed or retired or stale or staging or deletions:
        logger.info(
            "sweeps: rotated %d keys, destroyed %d keys and %d retired key versions, "
            "failed %d stale jobs, "
            "cleared %d objects and uploads that rewrap jobs staged, "
            "finished %d deletions cut short",
            len(rotated),
            len(destroyed),
            len(retired),
            len(stale),
            staging,
            deletions,
        )
    return {
        "rotated": [f"{tenant}/{kid}" for tenant, kid in rotated],
        "destroyed": [f"{tenant}/{kid}" for tenant, kid in destroyed],
        "destroyedVersions": retired,
        "staleJobs": stale,
        "clearedStaging": staging,
        "finishedDeletions": deletions,
    }
