"""`sealstream tokens ...`: issue, list and revoke API tokens (scope `admin`)."""

from typing import Any

import click

from cli.session import Session, client_command, print_fields, print_table, secret_file

TOKEN_FIELDS = ("token", "id", "tenant", "name", "scopes", "createdAt", "expiresAt", "revokedAt")
TOKEN_COLUMNS = ("id", "tenant", "name", "scopes", "createdAt", "expiresAt", "revokedAt")


@click.group()
def tokens() -> None:
    """Issue, list and revoke API tokens."""


def _show_token(session: Session, token: dict[str, Any]) -> None:
    session.show(token, lambda: print_fields(token, TOKEN_FIELDS))


@tokens.command()
@click.option("--tenant", required=True, help="the tenant the token acts for")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="a scope it carries (repeatable): keys:read, crypto:encrypt, admin... (docs/api.md)",
)
@click.option("--name", help="a name to tell it by")
@click.option("--expires-at", metavar="TIME", help="when it stops working (ISO 8601, with offset)")
@click.option(
    "--output",
    "-o",
    metavar="FILE",
    help="write the token to this new file (owner-only, for --token-file) instead of showing it",
)
@client_command
def create(
    session: Session,
    tenant: str,
    scopes: tuple[str, ...],
    name: str | None,
    expires_at: str | None,
    output: str | None,
) -> None:
    """Issue a token. Its string is shown this once (or written to --output): keep it now."""

    def issue() -> dict[str, Any]:
        return session.client.create_token(
            tenant=tenant, scopes=list(scopes), name=name, expiresAt=expires_at
        ).document

    if output is None:
        _show_token(session, issue())
        return
    with secret_file(output) as file:
        token = issue()
        file.write(f"{token.pop('token')}\n")
    session.note(f"the token {token['id']} written to {output}")
    _show_token(session, token)


@tokens.command("list")
@click.option("--tenant", help="only this tenant's tokens (the operator sees every tenant's)")
@client_command
def list_(session: Session, tenant: str | None) -> None:
    """List tokens (never their strings)."""
    page = session.client.list_tokens(tenant=tenant).document
    session.show(page, lambda: print_table(page.get("tokens", []), TOKEN_COLUMNS, "no tokens"))


@tokens.command()
@click.argument("token_id", metavar="ID")
@client_command
def revoke(session: Session, token_id: str) -> None:
    """Revoke a token by its id: it stops working at once."""
    _show_token(session, session.client.revoke_token(token_id).document)
