"""The one settings object: every knob of the service, read from `SEALSTREAM_*` variables.

The same names are the options of `sealstream serve` (`--storage-url` for
`SEALSTREAM_STORAGE_URL`, and so on). URL settings may carry credentials
(`redis://:password@host`); `without_credentials` is how any of them is shown.
"""

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from limits import parse
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from audit.chain import MAX_SEGMENT_BYTES
from keystore.name_keys import DEFAULT_MAX_VERSIONS as DEFAULT_NAME_KEY_VERSIONS
from sealstream.capacity import connection_cap, keygen_threads, stream_cap

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB
ApiDocs = Literal["public", "token", "off"]
AuditCheckpoints = Literal["stdout", "redis", "bucket", "none"]
DEFAULT_PART_SIZE = 8 * MIB
DEFAULT_PARTS_IN_FLIGHT = 4
HIDDEN = "***"
# Query parameters whose values are secrets (redis-py takes `?password=`; a presigned
# S3 URL carries its signature and credential).
_SECRET_PARAMETER = re.compile(r"pass|secret|token|signature|credential", re.IGNORECASE)


def without_credentials(url: str) -> str:
    """`url` fit to print or log: its user name and password, and the values of query
    parameters that hold secrets, replaced by `***`. A list of URLs separated by `;` (the
    sentinels of a `sentinel://` Redis URL) is shown part by part."""
    if ";" in url:
        return ";".join(without_credentials(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return HIDDEN  # not a URL we can take apart, so not one to show
    _credentials, at, host = parts.netloc.rpartition("@")
    netloc = f"{HIDDEN}@{host}" if at else host
    shown = [(name, HIDDEN if _SECRET_PARAMETER.search(name) else value) for name, value in query]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(shown, safe="*")))


def memory_stream_cap(settings: dict[str, Any]) -> int:
    """The streams that fit in memory, with the part size and parts in flight set."""
    return stream_cap(
        settings.get("s3_part_size", DEFAULT_PART_SIZE),
        settings.get("s3_parts_in_flight", DEFAULT_PARTS_IN_FLIGHT),
    )


class Settings(BaseSettings):
    """Configuration of an API server or worker."""

    model_config = SettingsConfigDict(env_prefix="SEALSTREAM_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8080, ge=0, le=65535, description="port the API listens on")
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain to serve HTTPS with, given with its TLS key (both "
        "or neither); unset: plain HTTP, meant for 127.0.0.1 only",
    )
    tls_key: Path | None = Field(
        None, validate_default=True, description="PEM private key of the TLS certificate"
    )

    storage_url: str = Field(
        "file://./.sealstream",
        description="object storage: file:///dir (a local directory, as the embedded default) "
        "or s3://bucket",
    )
    s3_endpoint_url: str | None = Field(
        None, description="endpoint of an S3-compatible server (MinIO, Ceph...); unset: AWS"
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="server processes answering on the one listening socket, each restarted "
        "if it dies; more than one needs Redis for jobs. Unset: the CPUs this process may "
        "run on with Redis, 1 with in-process jobs",
    )
    redis_url: str | None = Field(
        None,
        description="Redis for the job queue, job records and resumable uploads' state "
        "generations: redis://host:port/db, or "
        "sentinel://host:port;sentinel://host:port/db for a primary that Redis Sentinel "
        "watches; unset: jobs run in the API process",
    )
    redis_sentinel_master: str = Field(
        "mymaster",
        min_length=1,
        description="with a sentinel:// Redis URL, the name the sentinels monitor the "
        "primary under",
    )
    redis_min_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="Redis replicas that must confirm a job accepted, its task, a cancel "
        "request and each resumable upload's generation (Redis WAIT) before the service "
        "answers for it, so that a failover after the answer does not lose it; not "
        "confirmed within SEALSTREAM_REDIS_REPLICA_TIMEOUT, 503 redis-not-replicated. "
        "0: no waiting (as a single Redis needs)",
    )
    redis_replica_timeout: float = Field(
        1.0,
        gt=0,
        le=4.0,
        description="seconds (at most 4, under the 5 s the service gives Redis to answer) "
        "to wait for SEALSTREAM_REDIS_MIN_REPLICAS replicas to confirm a write",
    )
    redis_durable: bool = Field(
        False,
        description="true: the operator vouches that the uploads' Redis never loses a write "
        "it answered, where the service cannot see it (CONFIG refused, as on managed Redis "
        "services). Otherwise resumable uploads on S3 need a Redis that says so: appendonly "
        "yes with appendfsync always, or Redis 7.2 or later with appendonly yes (each move "
        "waited for with WAITAOF); else 503 resumable-uploads-need-durable-redis. Vouched "
        "wrongly, a Redis that loses its last writes in a crash lets whoever can write the "
        "bucket have a frame's IV seal two plaintexts",
    )
    kek_file: Path | None = Field(
        None,
        description="file holding the 32-byte key-encryption key (raw, 64 hex digits or "
        "base64) that no one but its owner may read or write; a file named here must exist. "
        "Unset: with local storage, <storage dir>/.kek, generated on first start; with S3 "
        "storage, a KEK file or a KMS key id is required",
    )
    serve_unrecorded_objects: bool = Field(
        False,
        description="decrypt stored objects the service has no record of storing (put in the "
        "bucket by another ESDK client, say), on their own authentication; anyone who can "
        "write the bucket and holds an asymmetric key's public half can make such an object",
    )
    refuse_unproven_messages: bool = Field(
        False,
        description="refuse to decrypt or re-encrypt a message that carries no proof that "
        "this service wrote it (one written before proofs were, or by anyone holding an "
        "asymmetric key's public half); turn on once old messages have been re-encrypted",
    )
    store_id: str | None = Field(
        None,
        description="the name the store's records are bound to; unset: its bucket's name (a "
        "local directory's name). On a replica that takes over a store's records, set the "
        "original's",
    )
    kms_key_id: str | None = Field(
        None,
        description="AWS KMS key that wraps key material instead of a KEK file (it wins over one)",
    )
    kms_endpoint_url: str | None = Field(
        None, description="endpoint of a KMS-compatible server; unset: AWS"
    )
    admin_token: SecretStr | None = Field(
        None,
        description="bootstrap admin token (tenant default, every scope); unset: one is "
        "generated and printed at start",
    )
    api_docs: ApiDocs = Field(
        "public",
        description="who may read the API's documentation: 'public' serves /openapi.json, "
        "/docs and /redoc to anyone (they describe the API, never a tenant's data); 'token' "
        "serves /openapi.json to any valid token and no pages (a browser cannot send one); "
        "'off' serves none",
    )
    key_cache_ttl: float = Field(
        5.0,
        gt=0,
        le=300,
        description="seconds (at most 300) a key or token record is cached in a process",
    )
    max_json_body: int = Field(
        64 * 1024,
        ge=1024,
        description="largest JSON request body, and largest metadata part, in bytes (413 "
        "beyond; at least 1024)",
    )
    upload_expiry: int = Field(
        24 * 3600,
        ge=60,
        description="seconds a resumable upload (/api/uploads) may stay unfinished before the "
        "lifecycle sweep aborts it and erases its state",
    )
    local_temp_expiry: int = Field(
        7 * 24 * 3600,
        ge=3600,
        description="seconds after its last write that the lifecycle sweep removes a local "
        "directory's temporary file no live writer holds (what a server killed mid-upload "
        "left); longer than SEALSTREAM_UPLOAD_EXPIRY, as a resumable upload's file waits "
        "between its PATCHes",
    )
    upload_lock_seconds: float = Field(
        30.0,
        gt=0,
        description="seconds a resumable upload's PATCH holds its lock past its last stored "
        "write: a PATCH whose server died holds up the next one at most this long",
    )
    max_open_uploads: int = Field(
        200,
        ge=1,
        description="unfinished resumable uploads (/api/uploads) one tenant may have at once; "
        "past it, creating one is 429 too-many-open-uploads until one is finished, "
        "terminated or expired",
    )
    idle_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a transfer may stall (a request body with no byte arriving, or a "
        "streamed response the client does not read) before the request fails (408, or a "
        "cut-off stream) and what it had begun, an upload to storage included, is aborted",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a connection has to send a request's line and headers, from when "
        "the server starts waiting for them (the connection opened, or the last response "
        "ended); then the connection is closed, with a 408 if a request had begun",
    )
    min_body_rate: int = Field(
        1024,
        ge=0,
        description="bytes a second a request body must average over each body-rate window "
        "spent waiting for it, or the request fails like a stalled one (408 body-too-slow, or "
        "a cut-off stream); 0: no minimum",
    )
    body_rate_window: float = Field(
        30.0, gt=0, description="seconds of waiting over which the minimum body rate is averaged"
    )
    max_connections: int = Field(
        default_factory=connection_cap,
        ge=1,
        description="connections one process holds open at once; one more is answered 503 "
        "too-many-connections and closed. By default half the open-file limit",
    )
    transfer_threads: int = Field(
        16,
        ge=1,
        le=1024,
        description="streams into or out of object storage doing blocking work at once, "
        "each on a thread of a pool of their own; more wait their turn, so that transfers "
        "held up by a slow store cannot take the threads that authentication and key "
        "lookups need",
    )
    keygen_threads: int = Field(
        default_factory=keygen_threads,
        ge=1,
        le=64,
        description="RSA keys the server generates or imports at once (to create, rotate or "
        "import one), on threads of their own, so that a burst of them cannot take the "
        "threads that authentication and key reads use; more wait their turn. Shared "
        "evenly among the server's processes (each has at least one). By default half the "
        "CPUs",
    )
    keygen_rate: str = Field(
        "10/minute",
        description="RSA keys one tenant may generate or import in one process, over a "
        "moving window, as N/second, N/minute or N/hour; past it, 429 rate-limited",
    )
    job_ttl: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="seconds a job record stays in Redis after its last update (final "
        "reports stay in storage)",
    )
    job_visibility_timeout: int = Field(
        6 * 3600,
        ge=1,
        description="seconds before Redis hands an unacknowledged job to another worker; "
        "longer than the longest job",
    )
    job_stale_after: int = Field(
        6 * 3600 + 600,
        ge=1,
        description="seconds without progress after which a running job is marked failed",
    )
    job_requeue_after: int = Field(
        300,
        ge=1,
        description="seconds a job may stay queued before the sweep queues it again (a "
        "Redis failover can lose a queued task); a job is run once however often it is queued",
    )
    job_task_copy_ttl: int = Field(
        24 * 3600,
        ge=1,
        description="seconds after its job is queued (or queued again) that a task may put "
        "back the job's record if Redis lost it; longer than a task may wait in the queue. "
        "An older task finds no record and does nothing: an old task sent again cannot run "
        "an ended job whose report was deleted",
    )
    job_lease_ttl: float = Field(
        30.0,
        gt=0,
        description="seconds a worker's hold on a running job lasts unless renewed; after a "
        "worker dies, its job can be taken over this long after the task comes back",
    )
    usage_batch: int = Field(
        16,
        ge=1,
        le=100_000,
        description="uses of one key (messages sealed or opened) a process counts before it "
        "adds them to the count every process shares; with P processes at most P × this "
        "many encryptions pass a key's maxUsageLimit, and a process that dies loses at most "
        "this many uses of each key",
    )
    usage_flush_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="seconds (at most 60) a process keeps uses it counted before adding them "
        "to the shared count, however few",
    )
    usage_checkpoint_interval: float = Field(
        60.0,
        gt=0,
        description="with Redis: seconds between the copies of a key's usage count each "
        "process writes into the key's sealed record (also written whenever the count "
        "reaches one of the key's limits); what Redis losing its data can lose",
    )
    usage_max_rate: float = Field(
        10_000.0,
        gt=0,
        description="with Redis: the most uses a second of one key all processes together "
        "can make; a count in Redis further ahead of the key's sealed record than this rate "
        "allows since its last checkpoint is not believed (someone wrote Redis)",
    )
    key_expiration_warning: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="seconds before a key's expiresAt from which the answers that use it carry "
        "X-Key-Expiration-Warning",
    )
    beat_lock_ttl: float = Field(
        30.0,
        gt=0,
        description="seconds the lock of the beat that schedules the sweeps lasts unless "
        "renewed; a standby beat takes over this long after the active one is lost",
    )
    lifecycle_interval: float = Field(
        60.0, gt=0, description="seconds between key-rotation, key-destruction and stale-job sweeps"
    )
    tenant_buckets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="buckets besides the default one each tenant may name, as JSON "
        '{"tenant": ["bucket", ...]}; a tenant\'s objects always live under tenants/<tenant>/',
    )
    batch_max_expansion: float = Field(
        1000.0,
        ge=1,
        description="most bytes a batch-encrypt archive's members may unpack to, per byte of "
        "archive; more fails the job as a decompression bomb",
    )
    batch_max_unpacked: int = Field(
        TIB,
        ge=1,
        description="most bytes one batch-encrypt archive may unpack to, members, headers and "
        "padding together, whatever its size",
    )
    batch_max_member_size: int = Field(
        256 * GIB,
        ge=1,
        description="most bytes one member of a batch-encrypt archive may unpack to",
    )
    batch_max_header_size: int = Field(
        16 * MIB,
        ge=64 * KIB,
        description="largest archive header a batch-encrypt job reads into memory: one tar "
        "member's extended headers (pax records, GNU long names and links together) or a "
        "zip's index (its central directory, which takes about ten times its size in memory)",
    )
    batch_max_members: int = Field(
        100_000,
        ge=1,
        description="most members (files, directories, links...) of one batch-encrypt archive, "
        "or objects under its source prefix",
    )
    name_key_max_versions: int = Field(
        DEFAULT_NAME_KEY_VERSIONS,
        ge=1,
        le=10_000,
        description="most versions a tenant's name key may have: a rotation past it is "
        "refused (409 name-key-versions-exhausted); every version is kept, in a record read "
        "on every run that hides names",
    )
    batch_concurrency: int = Field(
        8,
        ge=1,
        le=64,
        description="members of one archive sealed and uploaded at once, by encrypt-archive and "
        "batch-encrypt, while the archive is read in order; each has an upload of its own, "
        "so a streamed archive counts as this many streams against max_streams",
    )
    batch_chunk_members: int = Field(
        500,
        ge=1,
        description="members per chunk of a batch-encrypt job over a prefix or a zip in storage: "
        "one with more is split into chunks that every worker takes a share of",
    )
    worker_memory_limit: int | None = Field(
        None,
        ge=256 * MIB,
        description="bytes of address space each Celery pool process may use (RLIMIT_AS); a "
        "job that needs more fails with job-out-of-memory. Unset: the machine's memory "
        "(or its cgroup's limit) shared among the pool's processes, at least 1 GiB each",
    )
    s3_part_size: int = Field(
        DEFAULT_PART_SIZE,
        ge=5 * MIB,
        description="bytes in each of a multipart upload's first parts (at least 5 MiB); "
        "later parts double every 1,000",
    )
    s3_parts_in_flight: int = Field(
        DEFAULT_PARTS_IN_FLIGHT,
        ge=1,
        le=32,
        description="parts of one multipart upload uploading at once (1 to 32)",
    )
    s3_sign_payloads: bool = Field(
        False,
        description="hash request bodies into their SigV4 signatures, for buckets whose "
        "policy refuses unsigned payloads; off, bodies are sent as UNSIGNED-PAYLOAD",
    )
    max_streams: int = Field(
        default_factory=memory_stream_cap,
        ge=1,
        description="encrypt and decrypt streams the server serves at once, a bound on "
        "the memory they hold, shared evenly among its processes (each takes at least "
        "one); past its share, a process answers 503 too-many-streams. By default as many "
        "uploads into S3, each (parts in flight + 1) × the part size, as fit in half the "
        "memory available: the cgroup limit if any, else the physical memory",
    )
    max_streams_per_tenant: int | None = Field(
        None,
        ge=1,
        description="streams one tenant may hold at once, counted as max_streams counts them "
        "and shared evenly among the server's processes likewise; past it, 429 "
        "too-many-tenant-streams, so that one tenant's slow streams leave the others "
        "streams to run. Unset: half of max_streams (rounded up). A server with a single "
        "tenant sets it to max_streams",
    )

    audit: bool = Field(
        True,
        description="keep the audit trail (docs/audit.md); off only to measure what it costs",
    )
    audit_flush_ms: int = Field(
        1000,
        ge=10,
        le=60_000,
        description="milliseconds between flushes of the audit buffer into storage, at most: "
        "what a crash can lose",
    )
    audit_flush_events: int = Field(
        1000, ge=1, description="audit events that make the buffer flush at once"
    )
    audit_fail_after: float = Field(
        30.0,
        gt=0,
        description="seconds the audit trail may fail to be written before crypto and key "
        "requests are refused with 503 audit-unavailable",
    )
    audit_fail_open: bool = Field(
        False,
        description="serve crypto and key requests even while the audit trail cannot be "
        "written (events wait in memory, up to the buffer limit, then are counted as lost)",
    )
    audit_buffer_limit: int = Field(
        100_000, ge=100, description="audit events a process holds while storage is failing"
    )
    audit_buffer_bytes: int = Field(
        32 * 1024 * 1024,
        ge=64 * 1024,
        description="bytes of audit events (as JSON) a process holds while storage is failing",
    )
    audit_segment_bytes: int = Field(
        1024 * 1024,
        ge=16 * 1024,
        le=MAX_SEGMENT_BYTES,
        description="bytes of audit events (as JSON) in one segment, at most: as many waiting "
        "make the buffer flush at once (readers take a larger object for a planted one)",
    )
    audit_stdout: bool = Field(
        False, description="also write each audit event as a JSON line to standard output"
    )
    audit_checkpoints: AuditCheckpoints = Field(
        "stdout",
        description="where each flush's signed checkpoint goes besides the bucket: 'stdout' "
        "(JSON lines for a log shipper), 'redis' (SEALSTREAM_REDIS_URL), 'bucket' "
        "(SEALSTREAM_AUDIT_CHECKPOINT_BUCKET) or 'none'",
    )
    audit_checkpoint_bucket: str | None = Field(
        None,
        description="the second bucket checkpoints go to with 'bucket' (on the same S3 "
        "endpoint; give it Object Lock), written by no one else",
    )
    audit_refusal_window: float = Field(
        60.0,
        gt=0,
        description="seconds over which requests refused for want of a valid token are "
        "counted into one audit event per source address",
    )

    @field_validator("keygen_rate")
    @classmethod
    def _a_rate(cls, rate: str) -> str:
        try:
            parse(rate)
        except ValueError:
            raise ValueError("give a rate as N/second, N/minute or N/hour") from None
        return rate

    @field_validator("local_temp_expiry")
    @classmethod
    def _past_upload_expiry(cls, expiry: int, info: ValidationInfo) -> int:
        # A resumable upload's file is held by no writer between its PATCHes.
        if expiry <= info.data.get("upload_expiry", 0):
            raise ValueError("give more seconds than SEALSTREAM_UPLOAD_EXPIRY")
        return expiry

    @field_validator("tls_key")
    @classmethod
    def _key_with_certificate(cls, key: Path | None, info: ValidationInfo) -> Path | None:
        if (key is None) != (info.data.get("tls_cert") is None):
            raise ValueError("a TLS certificate and its key go together: give both or neither")
        return key

    @property
    def tenant_streams(self) -> int:
        """The streams one tenant may hold at once in a process: `max_streams_per_tenant`,
        else half of `max_streams`, rounded up (so a cap of 1 leaves the tenant that one)."""
        return self.max_streams_per_tenant or -(-self.max_streams // 2)
