"""The periodic sweeps: rotate keys that are due, destroy keys past their deletion date,
and fail jobs whose worker was lost. Each is idempotent: running it twice does no harm."""

import logging
from datetime import timedelta

from workers.jobs import sweep_stale
from workers.services import WorkerServices

logger = logging.getLogger(__name__)


def run_sweeps(services: WorkerServices) -> dict[str, list[str]]:
    rotated = services.keys.rotate_due()
    destroyed = services.keys.destroy_due()
    stale = sweep_stale(services.jobs, timedelta(seconds=services.settings.job_stale_after))
    if rotated or destroyed or stale:
        logger.info(
            "sweeps: rotated %d keys, destroyed %d keys, failed %d stale jobs",
            len(rotated),
            len(destroyed),
            len(stale),
        )
    return {
        "rotated": [f"{tenant}/{kid}" for tenant, kid in rotated],
        "destroyed": [f"{tenant}/{kid}" for tenant, kid in destroyed],
        "staleJobs": stale,
    }
