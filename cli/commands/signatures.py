"""`sealstream sign`, `sealstream verify` and `sealstream resign`: detached signatures
(JWS) of a file or stdin, made and checked by the service as the bytes stream through."""

from pathlib import Path

import click

from cli.commands.crypto import input_file
from cli.exits import EXIT_USAGE, CommandFailed
from cli.session import Session, client_command, print_fields


@click.command(short_help="Sign a file or stdin: a detached JWS.")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option("--kid", help="the signing key (else the profile's kid)")
@click.option("--output", "-o", default="-", help="where the JWS goes; - for stdout")
@client_command
def sign(session: Session, input: str, kid: str | None, output: str) -> None:
    """Sign INPUT (a file, or - for stdin) with the primary version of a signing key: the
    detached JWS (compact form) goes to --output."""
    key = session.kid(kid)
    with input_file(session, input, "sign") as source:
        signature = session.client.sign(key, source)
    _write_signature(session, signature, input, output)


def _write_signature(session: Session, signature: str, input: str, output: str) -> None:
    if output == "-":
        click.echo(signature)
    else:
        Path(output).write_text(signature + "\n")
        session.note(f"signature of {input} written to {output}")


def _read_signature(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None


@click.command(short_help="Check a detached JWS over a file or stdin.")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option(
    "--signature",
    "signature_file",
    required=True,
    metavar="FILE",
    help="a file holding the detached JWS",
)
@click.option("--kid", help="require the signature to be by this key")
@client_command
def verify(session: Session, input: str, signature_file: str, kid: str | None) -> None:
    """Check that the JWS in --signature signs INPUT (a file, or - for stdin). Exit 0 if it
    does; a signature that does not verify is signature-invalid (exit 1)."""
    signature = _read_signature(signature_file)
    with input_file(session, input, "verify") as source:
        verdict = session.client.verify(source, signature, kid=kid).document
    session.show(verdict, lambda: print_fields(verdict, ("valid", "kid", "alg")))


@click.command(short_help="Check a detached JWS over a file or stdin and sign it anew.")
@click.argument("input", default="-", metavar="[INPUT]")
@click.option(
    "--signature", "signature_file", required=True, metavar="FILE", help="the old detached JWS"
)
@click.option("--kid", help="the key to sign with now (else the profile's kid)")
@click.option("--source-kid", help="require the old signature to be by this key")
@click.option("--output", "-o", default="-", help="where the new JWS goes; - for stdout")
@client_command
def resign(
    session: Session,
    input: str,
    signature_file: str,
    kid: str | None,
    source_kid: str | None,
    output: str,
) -> None:
    """Check the JWS in --signature over INPUT (a file, or - for stdin) and, in the same
    pass, sign INPUT with another key: the new JWS goes to --output only if the old one
    verifies (else signature-invalid, exit 1)."""
    key = session.kid(kid)
    old = _read_signature(signature_file)
    with input_file(session, input, "resign") as source:
        signature = session.client.resign(key, source, old, source_kid=source_kid)
    _write_signature(session, signature, input, output)
