"""The `Range` header of a read from storage: the one byte range it asks for, if any.

Only the plaintext's length, which the authenticated layout gives, decides what is
satisfiable.
"""

import re

from api.problems import Problem

# One range-spec (RFC 9110 §14.1.2); the unit is case-insensitive, the digits ASCII only.
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# No message holds 10^18 bytes (2^32 frames of at most 16 MiB), so a position or length
# with more significant digits than this is taken as 10^18, past the end of any plaintext,
# rather than converted: Python refuses to convert thousands of digits.
_MAX_DIGITS = 18


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, or None to send everything.

    A header this server cannot honour as one range (bad syntax, several ranges) is
    ignored, as RFC 9110 allows; a well-formed range outside the plaintext is a 416.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip(" \t"))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    start, end = match.group(1), match.group(2)
    if start == "":  # suffix: the last N bytes
        length = _position(end)
        if length == 0 or total == 0:
            raise _unsatisfiable(total)
        return max(0, total - length), total - 1
    first = _position(start)
    last = _position(end) if end else None
    if last is not None and last < first:
        return None  # an invalid range-spec: ignored like any header we cannot honour
    if first >= total:
        raise _unsatisfiable(total)
    return first, total - 1 if last is None else min(last, total - 1)


def _position(digits: str) -> int:
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _unsatisfiable(total: int) -> Problem:
    return Problem(
        416,
        "range-not-satisfiable",
        f"the range lies outside the {total} bytes of plaintext",
        headers={"Content-Range": f"bytes */{total}"},
    )
