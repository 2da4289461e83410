"""`sealstream objects ...`: the tenant's stored objects, listed and deleted."""

import click

from cli.session import Session, client_command

OBJECT_COLUMNS = ("key", "kid", "keyVersion", "plaintextSize", "size", "state", "createdAt")


@click.group(short_help="List and delete stored objects.")
def objects() -> None:
    """List and delete the objects stored in the tenant's space."""


@objects.command("list")
@click.option("--prefix", help="only the objects whose keys start with this")
@click.option("--after", help="the page after this key (the `next` of the previous page)")
@click.option("--limit", type=click.IntRange(1, 1000), help="objects per page  [default: 100]")
@click.option("--bucket", help="the bucket  [default: the tenant's]")
@client_command
def list_(
    session: Session, prefix: str | None, after: str | None, limit: int | None, bucket: str | None
) -> None:
    """List stored objects in key order, with the key version each is sealed under."""
    page = session.client.list_objects(
        prefix=prefix, after=after, limit=limit, bucket=bucket
    ).document
    session.show_page(page, "objects", OBJECT_COLUMNS)


@objects.command()
@click.argument("key")
@click.option("--bucket", help="the bucket  [default: the tenant's]")
@client_command
def delete(session: Session, key: str, bucket: str | None) -> None:
    """Delete a stored object, with its record."""
    session.client.delete_object(key, bucket=bucket)
    session.show({"key": key, "deleted": True}, lambda: session.note(f"deleted {key}"))
