"""The server-side `sealstream` commands: `serve` runs the API, `upgrade-records` seals the
records of a store set up before records were sealed, `audit verify` checks the audit
trail, `audit public-key` prints the key that checks it and `audit new-signing-key`
replaces that key once its record is lost. Their options are the settings (cli.options
makes one option of each).

The `sealstream` command (cli.main) finds them through the entry-point group
`sealstream.commands`, so the client never imports the server. They are loaded to build
the command line of every `sealstream` call, so the server's modules (FastAPI, boto3,
Celery, uvicorn...) are imported only when one of them runs.
"""

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from pydantic import SecretStr

from cli.exits import EXIT_FAILED, EXIT_UNANCHORED, EXIT_USAGE, fail
from cli.options import build_model, model_options
from sealstream.settings import Settings, without_credentials

ENV_PREFIX = "SEALSTREAM_"
DEV_TOKEN = "dev-token"  # noqa: S105 - a file name: the generated admin token kept in a local store, for restarts


def _serve(**values: Any) -> None:
    from sealstream.processes import Launch, server_processes
    from sealstream.wiring import ConfigurationError

    settings = build_model(Settings, values)
    generated = None
    try:
        server_processes(settings)  # refused before a first start creates anything
        if settings.admin_token is None:
            # Here, once: every server process is handed this one.
            generated = _bootstrap_token(settings)
            settings = settings.model_copy(update={"admin_token": generated})
        launch = Launch(settings)
    except ConfigurationError as exc:
        fail(f"cannot start: {exc}", EXIT_USAGE)
    if generated is not None:
        _keep_dev_token(settings, generated)
    _announce(settings, generated, launch.processes)
    warn_if_exposed(settings)
    launch.run()


serve = click.Command(
    "serve",
    callback=_serve,
    params=model_options(Settings, ENV_PREFIX),
    short_help="Run the API.",
    help="Run the API. With no configuration: local storage in ./.sealstream, jobs "
    "in-process, a KEK generated beside the data, and an admin token derived from it (the "
    "same at every start), with a copy in .sealstream/dev-token for the `sealstream` client. "
    "Every option can also be set by its SEALSTREAM_* variable.",
)


def _upgrade_records(again: bool, dry_run: bool, **values: Any) -> None:
    from sealstream.upgrade import AlreadySealed, upgrade_records
    from sealstream.wiring import ConfigurationError

    settings = build_model(Settings, values)
    try:
        report = upgrade_records(settings, again=again, dry_run=dry_run)
    except (AlreadySealed, ConfigurationError) as exc:
        fail(f"cannot upgrade: {exc}", EXIT_FAILED)
    for line in report.lines():
        print(line)


# What it is told to do (`--again`, say) is said on its command line, never left in the
# environment: only the service's settings come from SEALSTREAM_* variables.
upgrade_records = click.Command(
    "upgrade-records",
    callback=_upgrade_records,
    params=[
        click.Option(
            ["--again"],
            is_flag=True,
            help="seal unsealed records found in a store whose records were all sealed "
            "already: someone else put them there, so review what this lists",
        ),
        click.Option(
            ["--dry-run"], is_flag=True, help="list what would be sealed, and seal nothing"
        ),
        *model_options(Settings, ENV_PREFIX),
    ],
    short_help="Seal the records of a store set up before records were sealed.",
    help="Seal the records of a store set up before records were sealed (the service "
    "refuses to start on one): run once with the service's settings and KEK, and review "
    "every record it lists, since sealing blesses whatever the bucket holds now "
    "(--dry-run lists them first, sealing nothing).",
)


def _bootstrap_token(settings: Settings) -> SecretStr:
    """The admin token of a server given none: with a local store, the one its KEK derives
    (the same at every start); else a new one."""
    from api.tokens import dev_admin_token, new_admin_token
    from sealstream.wiring import (
        local_storage_dir,
        open_kek,
        open_object_store,
        open_service_records,
    )

    if local_storage_dir(settings) is None:
        return SecretStr(new_admin_token())
    records = open_service_records(settings, open_object_store(settings), open_kek(settings))
    return SecretStr(dev_admin_token(records))


def _keep_dev_token(settings: Settings, token: SecretStr) -> None:
    """Keep a copy of a generated admin token in a local store (owner-only, like its KEK)
    for the `sealstream` client. The server never reads it back, and a supplied token is
    never written anywhere."""
    from sealstream.wiring import local_storage_dir

    storage_dir = local_storage_dir(settings)
    if storage_dir is None:
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    descriptor = os.open(storage_dir / DEV_TOKEN, flags, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token.get_secret_value() + "\n")


def _audit_verify(public_key: tuple[Path, ...], checkpoints: Path | None, **values: Any) -> None:
    from sealstream.auditing import verify_audit
    from sealstream.wiring import ConfigurationError

    settings = build_model(Settings, values)
    try:
        report = verify_audit(settings, public_key_files=public_key, checkpoints_file=checkpoints)
    except ConfigurationError as exc:
        fail(f"cannot verify: {exc}", EXIT_USAGE)
    for line in report.lines():
        print(line)
    if not report.ok:
        raise SystemExit(EXIT_FAILED)
    if not report.anchored:
        raise SystemExit(EXIT_UNANCHORED)


def _audit_public_key(**values: Any) -> None:
    from sealstream.auditing import audit_public_key
    from sealstream.wiring import ConfigurationError

    try:
        pem = audit_public_key(build_model(Settings, values))
    except ConfigurationError as exc:
        fail(f"cannot read the audit key: {exc}", EXIT_USAGE)
    sys.stdout.write(pem.decode("ascii"))


def _audit_new_signing_key(previous_public_key: tuple[Path, ...], **values: Any) -> None:
    from sealstream.auditing import new_signing_key
    from sealstream.wiring import ConfigurationError

    try:
        started = new_signing_key(build_model(Settings, values), previous_public_key)
    except ConfigurationError as exc:
        fail(f"cannot start a new signing key: {exc}", EXIT_FAILED)
    print(
        f"a new audit signing key is started ({started}): give auditors its public half, "
        "`sealstream audit public-key`"
    )


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

audit = click.Group(
    "audit",
    short_help="Check the audit trail, or print the key that checks it.",
    help="The audit trail (docs/audit.md): `verify` it, print its `public-key`, or start a "
    "`new-signing-key` once the stored one is lost.",
    commands=[
        click.Command(
            "verify",
            callback=_audit_verify,
            params=[
                click.Option(
                    ["--public-key"],
                    type=_FILE,
                    multiple=True,
                    help="PEM file of the audit public key (`sealstream audit public-key`): "
                    "check signatures and chains with it alone, without the KEK (event MACs "
                    "are not checked); repeat it for the keys a replaced key signed with",
                ),
                click.Option(
                    ["--checkpoints"],
                    type=_FILE,
                    help="log lines the 'stdout' checkpoint sink wrote (other lines are "
                    "skipped); unset: read the configured sink (Redis, or the checkpoint "
                    "bucket)",
                ),
                *model_options(Settings, ENV_PREFIX),
            ],
            short_help="Check the audit trail in the store.",
            help="Check the audit trail in the store: every chain's events, segments and "
            "signed checkpoints, and each chain's end against the checkpoints the sink "
            "holds. Exit 1 if anything was altered, removed, reordered, truncated, deleted "
            "or planted; 8 if it is intact but no checkpoints from a sink were checked "
            "(unanchored: a deleted tail or chain would not show); 0 only for a full pass.",
        ),
        click.Command(
            "public-key",
            callback=_audit_public_key,
            params=model_options(Settings, ENV_PREFIX),
            short_help="Print the audit signing key's public half (PEM).",
            help="Print the audit signing key's public half (PEM), for auditors to check the "
            "trail with `sealstream audit verify --public-key`; needs the KEK.",
        ),
        click.Command(
            "new-signing-key",
            callback=_audit_new_signing_key,
            params=[
                click.Option(
                    ["--previous-public-key"],
                    type=_FILE,
                    multiple=True,
                    help="PEM file of the lost key's public half, as exported before: "
                    "verify checks the older segments with it (repeatable)",
                ),
                *model_options(Settings, ENV_PREFIX),
            ],
            short_help="Start a new audit signing key where the stored one was lost.",
            help="Start a new audit signing key where the stored one's record is gone (the "
            "service refuses to make one on its own while the trail has segments: that is "
            "tampering). Recorded as an event of a chain of its own. Refused while the "
            "store has a signing key; needs the KEK.",
        ),
    ],
)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: localhost or a loopback address
    (a name may resolve to anything)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings) -> None:
    """A loud warning when plain HTTP crosses a network: served, or spoken to KMS."""
    if not settings.tls_cert and not is_loopback(settings.host):
        _warn(
            f"WARNING: serving plain HTTP on {settings.host!r}, which is not a loopback address.",
            "Tokens, key material and plaintext cross the network unencrypted. Serve HTTPS with",
            "--tls-cert and --tls-key (SEALSTREAM_TLS_CERT, SEALSTREAM_TLS_KEY), or keep the",
            "API on 127.0.0.1 behind a proxy that terminates TLS.",
        )
    kms = urlsplit(settings.kms_endpoint_url or "")
    if settings.kms_key_id and kms.scheme == "http" and not is_loopback(kms.hostname or ""):
        _warn(
            f"WARNING: KMS at {kms.hostname!r} over plain HTTP, not a loopback address.",
            "Every key the service unwraps, and its record key, cross the network unencrypted.",
            "Give SEALSTREAM_KMS_ENDPOINT_URL an https:// URL.",
        )


def _warn(*lines: str) -> None:
    print("\n".join(["!" * 78, *lines, "!" * 78]), file=sys.stderr, flush=True)


def _base_url(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{settings.host}:{settings.port}"


def _announce(settings: Settings, generated_token: SecretStr | None, processes: int) -> None:
    """Say where the service is and what it uses; every URL without its credentials, and
    the admin token only if it was generated here (a supplied one is never printed)."""
    from sealstream.wiring import local_storage_dir

    storage_dir = local_storage_dir(settings)
    if storage_dir is not None:
        storage = f"{storage_dir} (local directory)"
    else:
        storage = without_credentials(settings.storage_url)
        if settings.s3_endpoint_url:
            storage += f" at {without_credentials(settings.s3_endpoint_url)}"
    jobs = (
        f"Redis at {without_credentials(settings.redis_url)}"
        if settings.redis_url
        else "in-process"
    )
    token = (
        generated_token.get_secret_value()
        if generated_token is not None
        else "the one configured (SEALSTREAM_ADMIN_TOKEN)"
    )
    kept = (
        []
        if storage_dir is None or generated_token is None
        else [f"  kept in:      {storage_dir / DEV_TOKEN} (the `sealstream` client reads it)"]
    )
    lines = [
        "sealstream is starting",
        f"  URL:          {_base_url(settings)}",
        f"  storage:      {storage}",
        f"  jobs:         {jobs}",
        f"  processes:    {processes}",
        f"  admin token:  {token}",
        *kept,
        "  try:          sealstream keys list",
    ]
    print("\n".join(lines), flush=True)
