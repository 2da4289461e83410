"""What each kind of job is asked to do: one parameter model per kind, every object or
prefix already resolved to where it is stored (the tenant's prefix included).

Parameters are part of the sealed job record, so a worker runs exactly what the API
checked. They serialize as they always have, in camelCase (`storageKey`), and a field a
record written by an earlier release lacks is left out again rather than written as null.
"""

from typing import Any, Literal, Protocol, Self

from pydantic import ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from storage.documents import FrozenCamelModel

BatchMode = Literal["members", "whole"]
ArchiveFormat = Literal["auto", "tar", "tar.gz", "tar.bz2", "zip"]
UploadFormat = Literal["auto", "tar", "tar.gz", "tar.bz2", "tar.xz", "zip"]
Names = Literal["plain", "encrypted"]


class JobParams(FrozenCamelModel):
    """The parameters of a job, of whichever kind."""

    model_config = ConfigDict(extra="forbid")


def _absent_if_none() -> Any:
    """An optional field left out of the record when it is None."""
    return Field(None, exclude_if=lambda value: value is None)


class ObjectTarget(JobParams):
    """One stored object: the key the tenant named it by, and where it is stored."""

    bucket: str
    key: str
    storage_key: str


class PrefixTarget(JobParams):
    """Every object under a prefix: as the tenant named it ('' or ending in '/'), and
    where it is stored."""

    bucket: str
    prefix: str
    storage_prefix: str


Target = ObjectTarget | PrefixTarget


class VersionTarget(JobParams):
    """Every object the index of key versions lists under one version of the job's key,
    in whichever bucket."""

    version: int


class StoredPlace(Protocol):
    """Where an object is stored, as a placement or an upload's state says."""

    @property
    def bucket(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def storage_key(self) -> str: ...


class VerifyParams(ObjectTarget):
    """The verify job's: the stored object to read back and check."""

    @classmethod
    def of(cls, place: StoredPlace) -> Self:
        """The verify job's parameters for the object stored at `place`: one object
        made by a request (the API) or by the sweep (an upload it completed) alike."""
        return cls(bucket=place.bucket, key=place.key, storage_key=place.storage_key)


class BatchEncryptParams(JobParams):
    """The batch-encrypt job's: what to seal (an archive object, or a prefix), where its
    output goes (a prefix for members, a key for a whole archive), and how to seal it."""

    kid: str
    mode: BatchMode
    format: ArchiveFormat
    encryption_context: dict[str, str]
    frame_length: int
    overwrite: bool
    source: Target
    destination: Target
    # Records written before names could be hidden lack it: they are plain.
    names: Names = Field("plain", exclude_if=lambda value: value == "plain")
    # With hidden names, the name key version the API chose (`services.archives.naming`),
    # which every attempt and chunk of the job names with; records from before lack it.
    name_key_version: int | None = _absent_if_none()
    name_key_fingerprint: str | None = _absent_if_none()  # that version's, to refuse another

    @model_validator(mode="after")
    def targets_fit_mode(self) -> Self:
        whole = self.mode == "whole"
        objects = isinstance(self.source, ObjectTarget), isinstance(self.destination, ObjectTarget)
        if objects[1] != whole or (whole and not objects[0]):
            raise PydanticCustomError(
                "invalid-target", "members go under a prefix; a whole archive is one object"
            )
        return self


class BatchChunkParams(BatchEncryptParams):
    """A chunk's: its batch-encrypt job's parameters, the job it is a chunk of, and which
    of that job's chunks it is (what it seals is in the job's plan, kept in storage while
    the job runs: no member's name is in the chunk's record)."""

    parent: str
    index: int


class ArchiveUploadParams(JobParams):
    """The encrypt-archive job's, which the request uploading the archive runs: how to
    read the archive, where its members go, how their names become object keys and how
    they are sealed."""

    kid: str
    format: UploadFormat
    encryption_context: dict[str, str]
    frame_length: int
    overwrite: bool
    names: Names
    destination: PrefixTarget
    name_key_version: int | None = _absent_if_none()  # with hidden names, as batch-encrypt's
    name_key_fingerprint: str | None = _absent_if_none()


class ReencryptParams(JobParams):
    """The reencrypt job's (and its deprecated alias rewrap's): the key, the version the
    API saw as its primary, and one object, a prefix (in a bucket) or a version of the key
    (in every bucket), its fields alongside the others. Records written by rewrap jobs
    lack `keyVersion` and `rewrapped`."""

    kid: str
    key_version: int | None = _absent_if_none()
    rewrapped: bool = False
    bucket: str | None = _absent_if_none()
    key: str | None = _absent_if_none()
    storage_key: str | None = _absent_if_none()
    prefix: str | None = _absent_if_none()
    storage_prefix: str | None = _absent_if_none()
    version: int | None = _absent_if_none()

    @classmethod
    def of(
        cls, kid: str, key_version: int, rewrapped: bool, target: "Target | VersionTarget"
    ) -> Self:
        return cls.model_validate(
            {"kid": kid, "key_version": key_version, "rewrapped": rewrapped, **dict(target)}
        )

    @model_validator(mode="after")
    def one_target(self) -> Self:
        fields = (self.key, self.storage_key, self.prefix, self.storage_prefix)
        named_object = self.key is not None and self.storage_key is not None
        named_prefix = self.prefix is not None and self.storage_prefix is not None
        in_bucket = sum(f is not None for f in fields) == 2 and self.bucket is not None
        if self.version is not None:
            if any(f is not None for f in (*fields, self.bucket)):
                raise PydanticCustomError("invalid-target", "a version is in every bucket")
        elif named_object == named_prefix or not in_bucket:
            raise PydanticCustomError("invalid-target", "name one object or one prefix")
        return self

    @property
    def target(self) -> "Target | VersionTarget":
        """The object, prefix or key version the job re-encrypts."""
        if self.version is not None:
            return VersionTarget(version=self.version)
        if self.storage_key is not None:
            return ObjectTarget.model_validate(self.model_dump(include=_OBJECT_FIELDS))
        return PrefixTarget.model_validate(self.model_dump(include=_PREFIX_FIELDS))


_OBJECT_FIELDS = set(ObjectTarget.model_fields)
_PREFIX_FIELDS = set(PrefixTarget.model_fields)


AnyParams = (
    VerifyParams | BatchChunkParams | BatchEncryptParams | ReencryptParams | ArchiveUploadParams
)
