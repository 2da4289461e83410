"""How a `sealstream` command stops: its exit statuses, and the one-line message on stderr
that goes with a failure. Server-side commands (reached through the entry-point group
`sealstream.commands`) stop the same way as the client commands."""

import sys
from typing import NoReturn

EXIT_FAILED = 1  # the request or the operation failed
EXIT_USAGE = 2  # bad options, or a configuration that cannot work
EXIT_ABORTED = 3  # a transfer broke off midway: its output is incomplete


class CommandFailed(Exception):
    """A client command stops: the message goes to stderr, the code is the exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int) -> NoReturn:
    """Stop the command: `message` on stderr, `exit_code` as the exit status."""
    print(f"sealstream: {message}", file=sys.stderr)
    raise SystemExit(exit_code)
