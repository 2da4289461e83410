"""The `sealstream` command. Its client commands (cli.commands) call a running API through
sealstream_client; the server's commands (`sealstream serve`...) are found through the
entry-point group `sealstream.commands` and loaded only when asked for, so the client
never imports the server and starts fast.

Every failure prints one line on stderr and exits with a status of cli.exits (listed in
docs/client.md).
"""

import sys
from importlib import import_module
from typing import TYPE_CHECKING

import click
from click.shell_completion import get_completion_class

from cli.commands import COMMANDS
from cli.exits import EXIT_INTERRUPTED, CommandFailed, fail

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

SERVER_COMMANDS = "sealstream.commands"  # the entry-point group of the commands other packages add
SHELLS = ("bash", "zsh", "fish")
COMPLETE_VARIABLE = "_SEALSTREAM_COMPLETE"


class Sealstream(click.Group):
    """The root command: the client's commands (cli.commands), then those of the
    entry-point group, each loaded only when it runs or its help is shown."""

    def _installed(self) -> "dict[str, EntryPoint]":
        # Imported here: reading the installed distributions' metadata takes longer than
        # the rest of the command's start, and a client command never needs it.
        from importlib.metadata import entry_points

        return {point.name: point for point in entry_points(group=SERVER_COMMANDS)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS, *self._installed()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        if cmd_name in COMMANDS:
            module, _, name = COMMANDS[cmd_name].partition(":")
            return _command(cmd_name, getattr(import_module(module), name))
        point = self._installed().get(cmd_name)
        return None if point is None else _command(cmd_name, point.load())


def _command(name: str, loaded: object) -> click.Command:
    if not isinstance(loaded, click.Command):
        raise CommandFailed(f"the command {name!r} is not a command")
    return loaded


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL. Load it from your shell's startup file:

    \b
      bash:  eval "$(sealstream completion bash)"      (in ~/.bashrc)
      zsh:   eval "$(sealstream completion zsh)"       (in ~/.zshrc)
      fish:  sealstream completion fish > ~/.config/fish/completions/sealstream.fish
    """
    script = get_completion_class(shell)
    assert script is not None  # every name in SHELLS has one
    root = click.get_current_context().find_root().command
    click.echo(script(root, {}, "sealstream", COMPLETE_VARIABLE).source())


def command_line() -> click.Group:
    root = Sealstream(
        "sealstream",
        help="sealstream: streaming envelope encryption. Every client command takes "
        "--url, --token (or --token-file, --token-command) and --profile; see "
        "docs/client.md for profiles, --json output and exit statuses.",
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    root.add_command(completion)
    return root


def main(argv: list[str] | None = None) -> None:
    try:
        command_line().main(
            args=sys.argv[1:] if argv is None else argv,
            prog_name="sealstream",
            complete_var=COMPLETE_VARIABLE,
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        fail("interrupted", EXIT_INTERRUPTED)
    except CommandFailed as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
