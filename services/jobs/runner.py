"""How a started job reaches whoever runs it: the API saves a job's record and hands it
to a `JobRunner`, which the process was built with (Celery workers over Redis, or, for
the embedded default, threads of the API process itself). The API knows no more of it.
"""

from abc import ABC, abstractmethod

from services.jobs.records import JobRecord


class QueueUnavailable(Exception):
    """The job could not be queued: the broker cannot be reached."""


class TaskNotReplicated(QueueUnavailable):
    """The job's task was sent, but fewer Redis replicas than asked for confirmed it in
    time: a failover could lose it."""


class JobRunner(ABC):
    @abstractmethod
    def submit(self, record: JobRecord) -> None:
        """Queue a saved job record's job; `QueueUnavailable` if it cannot be."""

    @abstractmethod
    def close(self) -> None:
        """Stop taking jobs."""
