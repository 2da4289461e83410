"""Translation of botocore's exceptions into the storage hierarchy.

Every S3 call runs inside `s3_errors`, so no botocore exception leaves the package.
Retries have already happened by then (botocore's standard retry mode), so a connection
failure or a 5xx that reaches this point means the service is unavailable.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from storage.errors import (
    BucketNotFound,
    InvalidRange,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
)

# HEAD answers carry no body, so a missing key is reported by status alone ("404").
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "NoSuchUpload", "404"})
# S3 answers a failed If-None-Match or If-Match with 412, or with 409 while a competing
# write is in flight.
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
_RANGE_CODES = frozenset({"InvalidRange", "416"})


@contextmanager
def s3_errors(
    subject: str,
    *,
    missing: type[StorageError] = ObjectNotFound,
    conflict: type[StorageError] = ObjectExists,
) -> Iterator[None]:
    """Raise botocore failures as storage errors about `subject` (a key or bucket).

    What a 404 and a 412 mean depends on the request: `missing` (a HEAD on a bucket
    cannot say more than 404) and `conflict` (which condition the write carried).
    """
    try:
        yield
    except ClientError as error:
        raise _client_error(error, subject, missing, conflict) from error
    except ParamValidationError as error:
        raise StorageError(f"S3 request about {subject!r} is malformed: {error}") from error
    except BotoCoreError as error:
        raise StorageUnavailable(f"S3 is unavailable: {error}") from error


def _client_error(
    error: ClientError,
    subject: str,
    missing: type[StorageError],
    conflict: type[StorageError],
) -> StorageError:
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    message = f"{subject!r}: {code or status} {error.response.get('Error', {}).get('Message', '')}"
    if code == "NoSuchBucket":
        return BucketNotFound(message)
    if code in _MISSING_CODES:
        return missing(message)
    if code in _CONFLICT_CODES:
        return conflict(message)
    if code in _RANGE_CODES:
        return InvalidRange(message)
    if status >= 500:
        return StorageUnavailable(message)
    return StorageError(message)
