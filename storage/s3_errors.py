"""Translation of botocore's exceptions into the storage hierarchy.

Every S3 call runs inside `s3_errors`, so no botocore exception leaves the package.
Retries have already happened by then (botocore's standard retry mode), so a connection
failure or a 5xx that reaches this point means the service is unavailable.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

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
    key: str | None,
    *,
    missing: type[StorageError] = ObjectNotFound,
    conflict: type[StorageError] = ObjectExists,
) -> Iterator[None]:
    """Raise botocore failures as storage errors about `key` (a key or key prefix; None
    for the bucket itself).

    What a 404 and a 412 mean depends on the request: `missing` (a HEAD on a bucket
    cannot say more than 404) and `conflict` (which condition the write carried).
    """
    try:
        yield
    except ClientError as error:
        raise _client_error(error, key, missing, conflict) from error
    except ParamValidationError as error:
        raise StorageError(f"the S3 request is malformed: {error}", key) from error
    except BotoCoreError as error:
        raise StorageUnavailable(f"S3 is unavailable: {_without_urls(error)}", key) from error


def _client_error(
    error: ClientError,
    key: str | None,
    missing: type[StorageError],
    conflict: type[StorageError],
) -> StorageError:
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    reason = f"{code or status} {error.response.get('Error', {}).get('Message', '')}".strip()
    if code == "NoSuchBucket":
        return BucketNotFound(reason, key)
    if code in _MISSING_CODES:
        return missing(reason, key)
    if code in _CONFLICT_CODES:
        return conflict(reason, key)
    if code in _RANGE_CODES:
        return InvalidRange("the range lies outside the object", key)
    if status >= 500:
        return StorageUnavailable(reason, key)
    return StorageError(reason, key)


def _without_urls(error: BotoCoreError) -> str:
    """botocore's message with each URL it quotes cut down to scheme, host and port: the
    endpoint URL may carry credentials (`user:password@`), and the request's URL names
    the bucket and key."""
    fields = {
        name: _origin(value) if name.endswith("_url") and isinstance(value, str) else value
        for name, value in error.kwargs.items()
    }
    try:
        return error.fmt.format(**fields)
    except (KeyError, IndexError):
        return type(error).__name__


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
