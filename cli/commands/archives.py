"""Archives: `encrypt-archive` streams one in, each member sealed into an object of its
own under a prefix as it arrives (a progress bar on the bytes sent, a line per member
refused or failed), and `manifest` reads back the sealed manifest of such a prefix."""

import io
import json
from typing import Any

import click

from cli.commands.crypto import context_option, input_file
from cli.exits import EXIT_FAILED, CommandFailed
from cli.session import Session, client_command, print_fields, print_json

MANIFEST_NAME = "manifest.json"
RESULT_FIELDS = ("status", "jobId", "manifestKey", "format", "counts")

names_option = click.option(
    "--names",
    type=click.Choice(["plain", "encrypted"]),
    default="plain",
    show_default=True,
    help="'encrypted' hides each member's path in its object key (the manifest maps them)",
)


@click.command("encrypt-archive", short_help="Stream an archive into storage, member by member.")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option("--kid", help="the key to seal the members under (else the profile's kid)")
@click.option("--to-storage", "prefix", required=True, metavar="PREFIX", help="'' or ending in '/'")
@click.option("--bucket", help="the bucket")
@click.option("--overwrite", is_flag=True, help="replace existing objects and manifest")
@click.option(
    "--format",
    "archive_format",
    type=click.Choice(["auto", "tar", "tar.gz", "tar.bz2", "tar.xz", "zip"]),
    default="auto",
    show_default=True,
)
@names_option
@context_option("an encryption context pair bound to each member (repeatable)")
@client_command
def encrypt_archive(
    session: Session,
    input: str,
    kid: str | None,
    prefix: str,
    bucket: str | None,
    overwrite: bool,
    archive_format: str,
    names: str,
    context: dict[str, str],
) -> None:
    """Seal each member of the archive INPUT (a file, or - for stdin) into an object of
    its own under PREFIX as it is sent, with a sealed manifest. Exits non-zero unless
    the job succeeded."""
    key = session.kid(kid)
    finished: dict[str, Any] = {}
    job_id = None
    with input_file(session, input, "seal") as source:
        for line in session.client.encrypt_archive(
            key,
            source,
            prefix=prefix,
            bucket=bucket,
            overwrite=overwrite,
            archive_format=archive_format,
            encryption_context=context,
            names=names,
        ):
            if line["event"] == "started":
                job_id = line["jobId"]
            elif line["event"] == "finished":
                finished = line
            elif line.get("status") not in ("sealed", "skipped"):
                session.note(f"{line.get('status', line['event'])}: {line['path']}")
    if not finished:
        raise CommandFailed(f"the response was cut short; see job {job_id}")
    result = finished["result"] or {}
    document = {"status": finished["status"], "jobId": job_id, **result, "error": finished["error"]}
    session.show(document, lambda: print_fields(document, RESULT_FIELDS))
    if finished["status"] != "succeeded":
        error = finished["error"] or {}
        raise CommandFailed(f"{error.get('code')}: {error.get('detail')}", EXIT_FAILED)


@click.command(short_help="Read back the sealed manifest of an archive's prefix.")
@click.argument("prefix", metavar="PREFIX")
@click.option("--bucket", help="the bucket")
@client_command
def manifest(session: Session, prefix: str, bucket: str | None) -> None:
    """Decrypt and print PREFIX's manifest.json, as JSON."""
    sink = io.BytesIO()
    session.client.decrypt_object(prefix + MANIFEST_NAME, sink, bucket=bucket)
    print_json(json.loads(sink.getvalue()))
