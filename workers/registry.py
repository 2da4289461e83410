"""Which body runs each kind of job."""

from workers.batch import batch_encrypt
from workers.execution import JobBody
from workers.jobs import JobKind
from workers.rewrap import rewrap
from workers.verify import verify

JOB_BODIES: dict[JobKind, JobBody] = {
    JobKind.VERIFY: verify,
    JobKind.BATCH_ENCRYPT: batch_encrypt,
    JobKind.REWRAP: rewrap,
}
