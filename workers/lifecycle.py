"""The periodic sweeps: rotate keys that are due, destroy keys past their deletion date,
fail jobs whose worker was lost, and clear what header-only rewrap jobs left staged
before re-encryption replaced them. Each is idempotent: running it twice does no harm."""

import logging
from datetime import timedelta
from typing import Any

from sealstream.wiring import Parts
from services.jobs import sweep_stale
from workers.reencrypt import clear_rewrap_staging

logger = logging.getLogger(__name__)


def run_sweeps(services: Parts) -> dict[str, Any]:
    rotated = services.keys.rotate_due()
    destroyed = services.keys.destroy_due()
    stale_after = timedelta(seconds=services.settings.job_stale_after)
    stale = sweep_stale(services.jobs, stale_after)
    staging = clear_rewrap_staging(services)
    if rotated or destroyed or stale or staging:
        logger.info(
            "sweeps: rotated %d keys, destroyed %d keys, failed %d stale jobs, "
            "cleared %d objects and uploads that rewrap jobs staged",
            len(rotated),
            len(destroyed),
            len(stale),
            staging,
        )
    return {
        "rotated": [f"{tenant}/{kid}" for tenant, kid in rotated],
        "destroyed": [f"{tenant}/{kid}" for tenant, kid in destroyed],
        "staleJobs": stale,
        "clearedStaging": staging,
    }
