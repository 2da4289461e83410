"""Which body runs each kind of job."""

from services.jobs import JobKind
from workers.execution import JobBody
from workers.fanout import batch_chunk, batch_job
from workers.reencrypt import reencrypt
from workers.verify import verify

JOB_BODIES: dict[JobKind, JobBody] = {
    JobKind.VERIFY: verify,
    JobKind.BATCH_ENCRYPT: batch_job,
    JobKind.BATCH_CHUNK: batch_chunk,
    JobKind.REENCRYPT: reencrypt,
    JobKind.REWRAP: reencrypt,  # the deprecated name of the same job
}
