"""The ASGI server the service runs on, chosen by figures: uvicorn (httptools), granian and
hypercorn, each serving the same app (`bench/echo_app.py`, one worker on uvloop, local
storage of its own), on the same two benches as bench/stream.py, alternated round by
round with the order reversed every other round:

1. one stream-back encrypt of `--gib` (its length declared, curl reading while it sends):
   MB/s, and the server's CPU seconds per GiB;
2. `--streams` concurrent stream-back encrypts of `--stream-mib` each, each piped into a
   decrypt: the aggregate MB/s, the server's CPU seconds per GiB encrypted or decrypted,
   and whether every plaintext came back whole.

The ceiling of each figure is the fastest server's, so each line reads as a share of
the best one measured in the same run. granian and hypercorn are not dependencies of
the service: install them into the virtual environment for this bench
(`.venv/bin/pip install granian hypercorn`). The figures measure speed only: the
transport guarantees the service's tests check (the connection guards of `api.serving`,
aborts, full duplex, Expect: 100-continue) are uvicorn's, with its protocol class.
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stream import (
    ECHO_APP,
    ENCRYPT_PATH,
    GIB,
    KID,
    MIB,
    Aggregate,
    Kind,
    Plaintext,
    PlaintextFile,
    Server,
    api_server,
    checked,
    in_turn,
    mb_per_s,
    reported_failure,
    streams_at_once,
    upload,
)

SERVERS = ("uvicorn", "granian", "hypercorn")


@dataclass
class Figures:
    """One ASGI server's rounds."""

    name: str
    one: Kind = field(default_factory=Kind)
    many: Aggregate = field(default_factory=Aggregate)
    failures: list[str] = field(default_factory=list)


@contextlib.contextmanager
def served_by(workdir: Path, name: str) -> Iterator[Server]:
    env = {"SEALSTREAM_STORAGE_URL": f"file://{workdir / name}"}
    with api_server(workdir, name, env, (sys.executable, "-m", ECHO_APP, name)) as server:
        yield server


def measure(workdir: Path, total: int, streams: int, stream_total: int, rounds: int) -> None:
    with contextlib.ExitStack() as stack:
        servers = [
            (stack.enter_context(served_by(workdir, name)), Figures(name)) for name in SERVERS
        ]
        data = PlaintextFile(Plaintext(total))
        stack.callback(data.close)
        stream_data = PlaintextFile(Plaintext(stream_total))
        stack.callback(stream_data.close)
        for number in range(rounds):
            for server, figures in in_turn(servers, number):
                figures.one.add(checked(upload(server, ENCRYPT_PATH, {"kid": KID}, data), "one"))
                done = streams_at_once(server, streams, stream_data)
                figures.many.add(done)
                figures.failures += done.failures
    report([figures for _, figures in servers], total, streams, stream_total, rounds)


def report(
    servers: list[Figures], total: int, streams: int, stream_total: int, rounds: int
) -> None:
    moved = 2 * streams * stream_total
    best_one = min(figures.one.fastest for figures in servers)
    best_many = min(figures.many.fastest for figures in servers)
    print(
        f"ASGI servers, one worker each on uvloop; {rounds} rounds alternated; each kind's "
        f"best round, and its share of the fastest server's"
    )
    print(
        f"  {'server':<10} {'one ' + f'{total / MIB:.0f} MiB stream-back':>28} "
        f"{f'{streams} streams of {stream_total / MIB:.0f} MiB, each into a decrypt':>52}"
    )
    for figures in servers:
        one, many = figures.one, figures.many
        verdict = "all correct" if not figures.failures else f"{len(figures.failures)} failed"
        print(
            f"  {figures.name:<10} {mb_per_s(total, one.fastest):6.0f} MB/s "
            f"({best_one / one.fastest:.2f}), {one.server_cpu / (total / GIB):.2f} s/GiB   "
            f"{mb_per_s(streams * stream_total, many.fastest):6.0f} MB/s "
            f"({best_many / many.fastest:.2f}), {many.cpu_per_gib(moved):.2f} s/GiB, {verdict}"
        )
        for failure in figures.failures[:3]:
            print(f"      failed: {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="one stream's size, GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--stream-mib", type=int, default=256, help="size of each, MiB")
    args = parser.parse_args()
    missing = [name for name in SERVERS if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"install {' and '.join(missing)} into the virtual environment first")
    with tempfile.TemporaryDirectory(prefix="bench-asgi-") as scratch:
        workdir = Path(scratch)
        with reported_failure(workdir):
            measure(workdir, int(args.gib * GIB), args.streams, args.stream_mib * MIB, args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine)")


if __name__ == "__main__":
    main()
