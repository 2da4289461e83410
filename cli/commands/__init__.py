"""The client's commands, one module per part of the API. A new part of the API gets a
module here (a click group named after it, one command per route, each decorated with
`cli.session.client_command`) and one line in `COMMANDS`."""

import click

from cli.commands.archives import encrypt_archive, manifest
from cli.commands.crypto import decrypt, encrypt, reencrypt
from cli.commands.jobs import jobs
from cli.commands.keys import keys
from cli.commands.objects import objects
from cli.commands.signatures import resign, sign, verify
from cli.commands.tokens import tokens

COMMANDS: tuple[click.Command, ...] = (
    encrypt,
    decrypt,
    reencrypt,
    encrypt_archive,
    manifest,
    sign,
    verify,
    resign,
    keys,
    objects,
    tokens,
    jobs,
)
