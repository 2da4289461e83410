"""`sealstream name-key ...`: read and rotate the tenant's name key, which hides archive
members' names (scope `admin`)."""

from typing import Any

import click

from cli.session import Session, client_command, print_fields, print_table

VERSION_COLUMNS = ("version", "createdAt")


@click.group("name-key")
def name_key() -> None:
    """Read and rotate the tenant's name key (hidden archive member names)."""


def _show(session: Session, view: dict[str, Any]) -> None:
    def table() -> None:
        print_fields(view, ("tenant", "current"))
        print_table(view.get("versions", []), VERSION_COLUMNS, "no name key yet")

    session.show(view, table)


@name_key.command()
@client_command
def show(session: Session) -> None:
    """List the name key's versions; the newest is current."""
    _show(session, session.client.name_key().document)


@name_key.command()
@client_command
def rotate(session: Session) -> None:
    """Add a version and make it current. New runs hide names under it; objects and
    manifests of earlier versions stay readable, and a rerun into their prefix names
    under the version its manifest records."""
    _show(session, session.client.rotate_name_key().document)
