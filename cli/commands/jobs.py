"""`sealstream jobs ...`: list, show, watch and cancel jobs, and start the verify,
batch-encrypt and reencrypt jobs (`--wait` watches the job to its end).

Watching a job ends with its result, and the exit status says how it ended: 0 when it
succeeded, 1 when it failed or was cancelled.
"""

import time
from typing import Any

import click

from cli.commands.archives import names_option
from cli.commands.crypto import context_option
from cli.exits import EXIT_FAILED, CommandFailed
from cli.progress import job_bars, wanted
from cli.session import Session, client_command, print_fields

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
KINDS = ("verify", "batch-encrypt", "reencrypt", "rewrap")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
JOB_FIELDS = (
    "id", "kind", "status", "progress", "result", "error", "createdAt", "startedAt",
    "finishedAt",
)  # fmt: skip
JOB_COLUMNS = ("id", "kind", "status", "progress", "createdAt")
POLL_INTERVAL = 1.0  # seconds between two looks at a watched job
WATCH_LIMIT = 24 * 3600.0  # seconds a watch lasts at most, unless told otherwise


@click.group(short_help="List, watch, cancel and start jobs.")
def jobs() -> None:
    """List, watch and cancel jobs; start verify, batch-encrypt and reencrypt jobs."""


def _show_job(session: Session, job: dict[str, Any]) -> None:
    session.show(job, lambda: print_fields(_readable(job), JOB_FIELDS))


def _readable(job: dict[str, Any]) -> dict[str, Any]:
    """The job with its progress as `done/total` counts."""
    progress = job.get("progress") or {}
    return job | {"progress": _progress_text(progress)}


def _progress_text(progress: dict[str, Any]) -> str:
    def count(unit: str) -> str:
        total = progress.get(f"{unit}Total")
        return f"{progress.get(f'{unit}Done', 0)}/{'?' if total is None else total} {unit}"

    return f"{count('items')}, {count('bytes')}"


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="only jobs in this state")
@click.option("--kind", type=click.Choice(KINDS), help="only jobs of this kind")
@click.option("--limit", type=click.IntRange(1, 500), help="jobs per page  [default: 50]")
@click.option("--after", help="the page after this job id (the `next` of the previous page)")
@client_command
def list_(
    session: Session, status: str | None, kind: str | None, limit: int | None, after: str | None
) -> None:
    """List the tenant's jobs, newest first."""
    page = session.client.list_jobs(status=status, kind=kind, limit=limit, after=after).document
    session.show_page(page, "jobs", JOB_COLUMNS, [_readable(job) for job in page["jobs"]])


@jobs.command()
@click.argument("job_id", metavar="ID")
@client_command
def get(session: Session, job_id: str) -> None:
    """Show a job: its state, progress and result."""
    _show_job(session, session.client.get_job(job_id).document)


@jobs.command()
@click.argument("job_id", metavar="ID")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=WATCH_LIMIT,
    show_default=True,
    help="seconds to watch before giving up",
)
@client_command
def watch(session: Session, job_id: str, timeout: float) -> None:
    """Watch a job to its end, with bars for its items and bytes, then show its result."""
    _watch(session, job_id, timeout)


@jobs.command()
@click.argument("job_id", metavar="ID")
@client_command
def cancel(session: Session, job_id: str) -> None:
    """Cancel a job: a queued one at once, a running one at its next frame or member."""
    _show_job(session, session.client.cancel_job(job_id).document)


def _watch(session: Session, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with job_bars(show=wanted(session.quiet)) as bars:
        while True:
            job = session.client.get_job(job_id).document
            bars.update(job)
            if job.get("status") in FINISHED:
                break
            if time.monotonic() >= deadline:
                raise CommandFailed(f"job {job_id} still {job.get('status')} after {timeout:g} s")
            time.sleep(POLL_INTERVAL)
    _show_job(session, job)
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        reason = f": {error.get('code')}: {error.get('detail')}" if error else ""
        raise CommandFailed(f"job {job_id} {job['status']}{reason}", EXIT_FAILED)


def _started(session: Session, job: dict[str, Any], wait: bool) -> None:
    if wait:
        session.note(f"started {job['kind']} job {job['id']}")
        _watch(session, job["id"], WATCH_LIMIT)
    else:
        _show_job(session, job)


wait_option = click.option("--wait", is_flag=True, help="watch the job to its end")


@jobs.command()
@click.argument("key")
@click.option("--bucket", help="the object's bucket")
@wait_option
@client_command
def verify(session: Session, key: str, bucket: str | None, wait: bool) -> None:
    """Verify a stored object against what its upload recorded."""
    _started(session, session.client.start_job("verify", key=key, bucket=bucket).document, wait)


@jobs.command("batch-encrypt")
@click.option("--kid", help="the key to encrypt under (else the profile's kid)")
@click.option("--source-key", help="an archive object to encrypt the members of")
@click.option("--source-prefix", help="or every object under this prefix")
@click.option("--source-bucket", help="the source's bucket")
@click.option("--to-prefix", help="where the members go (mode members)")
@click.option("--to-key", help="where the whole archive goes (mode whole)")
@click.option("--to-bucket", help="the destination's bucket")
@click.option("--mode", type=click.Choice(["members", "whole"]), help="[default: members]")
@click.option(
    "--format",
    "archive_format",
    type=click.Choice(["auto", "tar", "tar.gz", "tar.bz2", "zip"]),
    help="the archive's format  [default: auto]",
)
@context_option("an encryption context pair for every object (repeatable)")
@click.option("--frame-length", type=int, help="frame length in bytes  [default: 1 MiB]")
@click.option("--overwrite", is_flag=True, help="replace existing objects")
@names_option
@wait_option
@client_command
def batch_encrypt(
    session: Session,
    kid: str | None,
    source_key: str | None,
    source_prefix: str | None,
    source_bucket: str | None,
    to_prefix: str | None,
    to_key: str | None,
    to_bucket: str | None,
    mode: str | None,
    archive_format: str | None,
    context: dict[str, str],
    frame_length: int | None,
    overwrite: bool,
    names: str,
    wait: bool,
) -> None:
    """Encrypt an archive's members (or every object under a prefix) one object each,
    with a manifest; or with --mode whole the archive as one object."""
    job = session.client.start_job(
        "batch-encrypt",
        kid=session.kid(kid),
        source=_drop_none(key=source_key, prefix=source_prefix, bucket=source_bucket),
        destination=_drop_none(key=to_key, prefix=to_prefix, bucket=to_bucket),
        mode=mode,
        format=archive_format,
        encryptionContext=context or None,
        frameLength=frame_length,
        overwrite=overwrite or None,
        names=None if names == "plain" else names,
    ).document
    _started(session, job, wait)


@jobs.command()
@click.option("--kid", help="the key whose objects move to its primary version")
@click.option("--key", "object_key", help="one object")
@click.option("--prefix", help="or every object under this prefix ('' for all)")
@click.option("--bucket", help="the objects' bucket")
@click.option("--rewrapped", is_flag=True, help="also the objects a former rewrap job moved")
@wait_option
@client_command
def reencrypt(
    session: Session,
    kid: str | None,
    object_key: str | None,
    prefix: str | None,
    bucket: str | None,
    rewrapped: bool,
    wait: bool,
) -> None:
    """Re-encrypt stored objects for the key's primary version (after a rotation)."""
    job = session.client.start_job(
        "reencrypt",
        kid=session.kid(kid),
        key=object_key,
        prefix=prefix,
        bucket=bucket,
        rewrapped=rewrapped or None,
    ).document
    _started(session, job, wait)


def _drop_none(**fields: str | None) -> dict[str, str]:
    return {name: value for name, value in fields.items() if value is not None}
