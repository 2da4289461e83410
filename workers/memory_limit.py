"""A hard memory limit for each Celery pool process.

Celery's `worker_max_memory_per_child` is checked only after a task ends: a job that
needs more memory than the machine has would take the machine down first, and the
kernel's OOM killer picks its victim (another job's process, Redis, the API). So each
pool process gets an address-space limit (RLIMIT_AS) when it starts: past it, an
allocation fails, the job gets a MemoryError and fails (`job-out-of-memory`), and the
process goes on to its next job. The limit counts address space, not resident memory
(thread stacks and malloc arenas count in full), which is why the default leaves each
process a share of the machine, and never less than `MIN_DEFAULT_LIMIT`.
"""

import resource

from sealstream.capacity import available_memory
from sealstream.settings import GIB, Settings

MIN_DEFAULT_LIMIT = GIB


def memory_limit(settings: Settings, processes: int) -> int:
    """The bytes of address space each of `processes` pool processes may use."""
    if settings.worker_memory_limit is not None:
        return settings.worker_memory_limit
    return max(available_memory() // max(processes, 1), MIN_DEFAULT_LIMIT)


def limit_address_space(limit: int) -> None:
    """Hold this process to `limit` bytes of address space, for good: the hard limit
    goes down too (never above one already set), so no job can raise it again."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
