"""The job contract that the API and the workers share: kinds, statuses and records of
jobs, one parameter model per kind, the stores records live in (Redis, or memory for the
embedded default), the failing of jobs whose worker was lost, the queuing again of jobs
whose task was lost, and the runner interface
the API hands jobs to."""

from services.jobs.memory_store import MemoryJobStore
from services.jobs.params import (
    AnyParams,
    ArchiveUploadParams,
    BatchChunkParams,
    BatchEncryptParams,
    JobParams,
    ObjectTarget,
    PrefixTarget,
    ReencryptParams,
    Target,
    VerifyParams,
    VersionTarget,
)
from services.jobs.records import (
    REPORT_KIND,
    REPORTS_PREFIX,
    JobKind,
    JobRecord,
    JobStatus,
    Progress,
    chunk_id,
)
from services.jobs.redis_store import RedisJobStore
from services.jobs.requeue import Submit, queue_or_park, queue_parked, requeue_waiting
from services.jobs.runner import JobRunner, QueueUnavailable, TaskNotReplicated
from services.jobs.stale import fail_if_stale, sweep_stale
from services.jobs.store import JobLease, JobStore

__all__ = [
    "REPORTS_PREFIX",
    "REPORT_KIND",
    "AnyParams",
    "ArchiveUploadParams",
    "BatchChunkParams",
    "BatchEncryptParams",
    "JobKind",
    "JobLease",
    "JobParams",
    "JobRecord",
    "JobRunner",
    "JobStatus",
    "JobStore",
    "MemoryJobStore",
    "ObjectTarget",
    "PrefixTarget",
    "Progress",
    "QueueUnavailable",
    "RedisJobStore",
    "ReencryptParams",
    "Submit",
    "Target",
    "TaskNotReplicated",
    "VerifyParams",
    "VersionTarget",
    "chunk_id",
    "fail_if_stale",
    "queue_or_park",
    "queue_parked",
    "requeue_waiting",
    "sweep_stale",
]
