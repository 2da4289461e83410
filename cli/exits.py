"""How a `sealstream` command stops: its exit statuses, and the one-line message on stderr
that goes with a failure. Server-side commands (reached through the entry-point group
`sealstream.commands`) stop the same way as the client commands.

The statuses are part of the command's interface (docs/client.md lists them): scripts
branch on them, so a number never changes its meaning.
"""

import sys
from typing import NoReturn

EXIT_FAILED = 1  # the request or the operation failed (a refusal with no status of its own)
EXIT_USAGE = 2  # bad options, or a configuration that cannot work
EXIT_ABORTED = 3  # a transfer broke off midway: its output is incomplete
EXIT_AUTH = 4  # the token is missing, invalid, revoked or expired, or lacks the scope (401, 403)
EXIT_NOT_FOUND = 5  # what the command names does not exist (404)
EXIT_CONFLICT = 6  # the state forbids it: exists already, disabled, finished (409)
EXIT_SERVER = 7  # the server failed or is unavailable (5xx)
EXIT_UNANCHORED = 8  # `audit verify`: intact, but no checkpoint from a sink anchored the check
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (128 + SIGINT, as shells report it)


class CommandFailed(Exception):
    """A command stops: the message goes to stderr, the code is the exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of_status(status: int) -> int:
    """The exit status for a refusal with HTTP `status`."""
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status >= 500:
        return EXIT_SERVER
    return EXIT_FAILED


def fail(message: str, exit_code: int) -> NoReturn:
    """Stop the command: `message` on stderr, `exit_code` as the exit status."""
    print(f"sealstream: {message}", file=sys.stderr)
    raise SystemExit(exit_code)
