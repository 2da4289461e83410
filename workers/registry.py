"""Which body runs each kind of job."""

from services.jobs import JobKind
from workers.batch import batch_encrypt
from workers.execution import JobBody
from workers.reencrypt import reencrypt
from workers.verify import verify

JOB_BODIES: dict[JobKind, JobBody] = {
    JobKind.VERIFY: verify,
    JobKind.BATCH_ENCRYPT: batch_encrypt,
    JobKind.REENCRYPT: reencrypt,
    JobKind.REWRAP: reencrypt,  # the deprecated name of the same job
}
