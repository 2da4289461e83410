"""The client's commands, one module per part of the API. A new part of the API gets a
module here (a click group named after it, one command per route, each decorated with
`cli.session.client_command`) and a line in `COMMANDS` for each top-level command: its
name and where it is defined, `module:attribute`. A command's module is imported only when
that command runs or a listing of the commands is shown, so that a command starts
without loading the others."""

COMMANDS: dict[str, str] = {
    "encrypt": "cli.commands.crypto:encrypt",
    "decrypt": "cli.commands.crypto:decrypt",
    "reencrypt": "cli.commands.crypto:reencrypt",
    "encrypt-archive": "cli.commands.archives:encrypt_archive",
    "manifest": "cli.commands.archives:manifest",
    "sign": "cli.commands.signatures:sign",
    "verify": "cli.commands.signatures:verify",
    "resign": "cli.commands.signatures:resign",
    "keys": "cli.commands.keys:keys",
    "objects": "cli.commands.objects:objects",
    "tokens": "cli.commands.tokens:tokens",
    "name-key": "cli.commands.name_keys:name_key",
    "jobs": "cli.commands.jobs:jobs",
}
