"""The periodic sweeps: rotate keys that are due, destroy keys past their deletion date,
fail jobs whose worker was lost, and clear what rewrap jobs that died for good left
staged. Each is idempotent: running it twice does no harm."""

import logging
from datetime import timedelta

from workers.jobs import sweep_stale
from workers.rewrap import sweep_staging
from workers.services import WorkerServices

logger = logging.getLogger(__name__)


def run_sweeps(services: WorkerServices) -> dict[str, list[str]]:
    rotated = services.keys.rotate_due()
    destroyed = services.keys.destroy_due()
    stale_after = timedelta(seconds=services.settings.job_stale_after)
    stale = sweep_stale(services.jobs, stale_after)
    staging = sweep_staging(services, stale_after)
    if rotated or destroyed or stale or staging:
        logger.info(
            "sweeps: rotated %d keys, destroyed %d keys, failed %d stale jobs, "
            "cleared the staging of %d rewrap jobs",
            len(rotated),
            len(destroyed),
            len(stale),
            len(staging),
        )
    return {
        "rotated": [f"{tenant}/{kid}" for tenant, kid in rotated],
        "destroyed": [f"{tenant}/{kid}" for tenant, kid in destroyed],
        "staleJobs": stale,
        "clearedStaging": staging,
    }
