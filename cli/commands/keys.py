"""`sealstream keys ...`: the key management API, one command per route."""

import json
from pathlib import Path
from typing import Any

import click

from cli.exits import EXIT_USAGE, CommandFailed
from cli.session import (
    Session,
    client_command,
    print_fields,
    print_json,
    print_table,
    secret_file,
)

KEY_FIELDS = (
    "kid", "kty", "alg", "keySize", "status", "primaryVersion", "keyOps", "exportable",
    "origin", "createdAt", "updatedAt", "expiresAt", "rotationPeriod", "deletionDate",
    "usageCount", "lastUsedAt", "publicJwk",
)  # fmt: skip
KEY_COLUMNS = ("kid", "kty", "alg", "status", "primaryVersion", "exportable", "createdAt")


@click.group(short_help="Manage keys: create, rotate, import, export...")
def keys() -> None:
    """Create, list, rotate, disable, delete, import and export keys."""


def _show_key(session: Session, key: dict[str, Any]) -> None:
    session.show(key, lambda: print_fields(key, KEY_FIELDS))


def _policy(
    kid: str,
    key_ops: tuple[str, ...],
    exportable: bool,
    expires_at: str | None,
    rotation_period: str | None,
) -> dict[str, Any]:
    """The policy fields of a new or imported key, as the API names them."""
    return {
        "kid": kid,
        "exportable": exportable,
        "keyOps": list(key_ops) or None,
        "expiresAt": expires_at,
        "rotationPeriod": rotation_period,
    }


def policy_options(command: Any) -> Any:
    """The options of a key's policy, shared by `create` and `import`."""
    options = (
        click.option(
            "--key-op",
            "key_ops",
            multiple=True,
            type=click.Choice(["encrypt", "decrypt"]),
            help="an operation the key allows (repeatable)  [default: both]",
        ),
        click.option("--exportable", is_flag=True, help="allow exporting its material"),
        click.option(
            "--expires-at", metavar="TIME", help="when it stops encrypting (ISO 8601, with offset)"
        ),
        click.option(
            "--rotation-period",
            metavar="DURATION",
            help="rotate it this often (ISO 8601 duration such as P30D, or seconds)",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


@keys.command()
@click.argument("kid")
@click.option(
    "--kty",
    default="oct",
    show_default=True,
    help="key type: oct, RSA, ML-KEM, EC, ML-DSA (AKP names either of those) or OKP",
)
@click.option(
    "--alg",
    help="algorithm: AES-256, RSA-OAEP-256, ML-KEM-768 or -1024 encrypt; ES256, ES384, "
    "PS256, PS384, ML-DSA-44, -65 or -87 sign (supported-algorithms lists them)",
)
@click.option("--key-size", type=int, help="RSA: 2048, 3072 or 4096")
@policy_options
@client_command
def create(
    session: Session, kid: str, kty: str, alg: str | None, key_size: int | None, **policy: Any
) -> None:
    """Generate a key named KID."""
    key = session.client.create_key(
        **_policy(kid, **policy), kty=kty, alg=alg, keySize=key_size
    ).document
    _show_key(session, key)


@keys.command("import")
@click.argument("kid")
@click.argument("jwk_file", metavar="JWK", type=click.File("rb"))
@policy_options
@client_command
def import_(session: Session, kid: str, jwk_file: Any, **policy: Any) -> None:
    """Import a key (BYOK) as KID: JWK is a file holding a private JWK (- for stdin)."""
    try:
        jwk = json.loads(jwk_file.read())
    except ValueError:
        raise CommandFailed("JWK is not JSON", EXIT_USAGE) from None
    if not isinstance(jwk, dict):
        raise CommandFailed("JWK is not a JSON object", EXIT_USAGE)
    _show_key(session, session.client.import_key(**_policy(kid, **policy), jwk=jwk).document)


@keys.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), help="keys per page  [default: 100]")
@click.option("--after", help="the page after this kid (the `next` of the previous page)")
@client_command
def list_(session: Session, limit: int | None, after: str | None) -> None:
    """List the tenant's keys, one page at a time."""
    page = session.client.list_keys(limit=limit, after=after).document
    session.show_page(page, "keys", KEY_COLUMNS)


# The routes that take a kid alone and answer the key: command, client method, help.
_ACTIONS = (
    ("get", "get_key", "Show a key's metadata (and public JWK)."),
    ("rotate", "rotate_key", "Add a version to the key and make it primary."),
    ("disable", "disable_key", "Stop the key encrypting and decrypting until it is enabled."),
    ("enable", "enable_key", "Enable a disabled key."),
    ("cancel-deletion", "cancel_key_deletion", "Keep a key pending deletion (disabled)."),
)


def _action(name: str, method: str, help_text: str) -> click.Command:
    def run(session: Session, kid: str) -> None:
        _show_key(session, getattr(session.client, method)(kid).document)

    return click.command(name, help=help_text)(click.argument("kid")(client_command(run)))


for _name, _method, _help in _ACTIONS:
    keys.add_command(_action(_name, _method, _help))


@keys.command()
@click.argument("kid")
@click.option(
    "--pending-window-days",
    type=click.IntRange(1, 30),
    help="days before it is destroyed  [default: 7]",
)
@client_command
def delete(session: Session, kid: str, pending_window_days: int | None) -> None:
    """Schedule the key's destruction: unusable at once, destroyed after the window."""
    _show_key(
        session, session.client.delete_key(kid, pending_window_days=pending_window_days).document
    )


@keys.command()
@click.argument("kid")
@click.option(
    "--exportable",
    type=click.BOOL,
    required=True,
    help="false turns exporting off, for good (turning it on is refused)",
)
@client_command
def patch(session: Session, kid: str, exportable: bool) -> None:
    """Change a key's policy: `--exportable false` (one-way)."""
    _show_key(session, session.client.update_key(kid, exportable=exportable).document)


@keys.command()
@click.argument("kid")
@click.option("--version", type=click.IntRange(min=1), help="the version  [default: the primary]")
@click.option(
    "--output", "-o", default="-", help="a new file (owner-only) to write it to; - for stdout"
)
@client_command
def export(session: Session, kid: str, version: int | None, output: str) -> None:
    """Print one version of an exportable key as a private JWK (its kid is `KID#version`,
    the key name the AWS Encryption SDK's raw keyring takes)."""
    if output == "-":
        print_json(session.client.export_key(kid, version=version).document)
        return
    with secret_file(output) as file:
        jwk = session.client.export_key(kid, version=version).document
        json.dump(jwk, file, indent=2)
    session.note(f"key material of {jwk.get('kid', kid)} written to {Path(output)}")


@keys.command()
@click.argument("kid")
@click.option("--version", type=click.IntRange(min=1), required=True, help="the key version")
@click.option("--after", help="the page after this (the `next` of the previous page)")
@click.option("--limit", type=click.IntRange(1, 1000), help="objects per page  [default: 100]")
@client_command
def objects(session: Session, kid: str, version: int, after: str | None, limit: int | None) -> None:
    """List the stored objects sealed under one version of the key."""
    page = session.client.list_key_version_objects(kid, version, after=after, limit=limit).document
    session.show_page(page, "objects", ("key", "bucket", "createdAt"))


@keys.command()
@click.argument("kid")
@click.argument("version", type=click.IntRange(min=1))
@click.option(
    "--confirm",
    metavar="KID#VERSION",
    required=True,
    help="the version's name, to confirm that what it sealed outside storage may become unreadable",
)
@click.option(
    "--pending-window-days",
    type=click.IntRange(1, 30),
    help="days before its material is destroyed  [default: 7]",
)
@client_command
def retire(
    session: Session, kid: str, version: int, confirm: str, pending_window_days: int | None
) -> None:
    """Retire VERSION of the key, once no stored object uses it: it seals and opens
    nothing from then on, and its material is destroyed after the window."""
    retired = session.client.retire_key_version(
        kid, version, confirm=confirm, pending_window_days=pending_window_days
    ).document
    _show_key(session, retired)


@keys.command("cancel-retirement")
@click.argument("kid")
@click.argument("version", type=click.IntRange(min=1))
@client_command
def cancel_retirement(session: Session, kid: str, version: int) -> None:
    """Put retired VERSION of the key back in use, before its material is destroyed."""
    _show_key(session, session.client.cancel_key_version_retirement(kid, version).document)


@keys.command()
@client_command
def algorithms(session: Session) -> None:
    """List the key types and algorithms a key may have."""
    document = session.client.supported_algorithms().document
    rows = document.get("algorithms", [])
    columns = tuple(rows[0]) if rows else ()
    session.show(document, lambda: print_table(rows, columns, "none"))
