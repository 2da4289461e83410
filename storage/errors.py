"""The exceptions the storage package raises: one hierarchy, rooted at `StorageError`.

Backends translate their own failures (botocore errors, OS errors) into these classes, so
callers never see a backend-specific exception and can map each class to one answer
(missing object → 404, lost race → 409 or 412, unreachable storage → 503).

An error keeps apart what failed (`reason`) and the object it concerns (`key`, a storage
key or key prefix), so that whoever answers a client can name the object the way the
client did. A reason never holds a server path, a credential or a URL.
"""


class StorageError(Exception):
    """Base class of every error raised by the `storage` package; `str()` names the key."""

    def __init__(self, reason: str, key: str | None = None) -> None:
        super().__init__(reason if key is None else f"{key!r}: {reason}")
        self.reason = reason
        self.key = key


class ObjectNotFound(StorageError):
    """The key names no object."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object is no longer the version it was made against."""


class ObjectExists(PreconditionFailed):
    """A write asked to create the object only if absent, and the key was taken first."""


class BucketNotFound(StorageError):
    """The bucket (for a local store: its directory) does not exist."""


class InvalidObjectKey(StorageError, ValueError):
    """The key is one the backend cannot store safely."""


class InvalidMetadata(StorageError, ValueError):
    """User metadata that S3 would refuse or alter (names and values travel as HTTP headers)."""


class InvalidRange(StorageError, ValueError):
    """A byte range that does not lie within the object."""


class StorageUnavailable(StorageError):
    """The storage service could not be reached or kept failing after retries."""


class ObjectTooLarge(StorageError):
    """An object read whole (`ObjectStore.get_small`) is larger than the reader allows."""
