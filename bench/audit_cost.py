"""What the audit trail costs a stream: stream-back and to-storage MB/s with the audit on,
next to the same with it off, in the same run.

Starts two API servers as `bench/stream.py` does (uvicorn, one worker, local-directory
storage in a temporary directory each), one with `SEALSTREAM_AUDIT=true` (its defaults:
a flush a second, checkpoints to stdout) and one with it off. Each round sends, to each
server in turn (the order reversed every other round), the same upload of declared
length encrypted and streamed back, then the same upload encrypted into storage (its
verification job waited for, untimed, and the object deleted). Each ratio is judged
round by round, as `bench/stream.py` judges its own (the median of the rounds' ratios,
the best rounds' ratio beside it). Goal: audit-on at least 0.98 of audit-off, both ways.
Beside each, the ratio of the least server CPU per GiB any round took, off to on: what
the audit costs the server itself, which a busy machine blurs less than MB/s.
At the end the audit-on server's trail must hold an event for every request it was
sent; the audit-off server's must be empty.
"""

import argparse
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from stream import (
    ENCRYPT_PATH,
    KID,
    MIB,
    BenchError,
    Kind,
    Plaintext,
    PlaintextFile,
    Server,
    api_server,
    checked,
    in_turn,
    ratio,
    settled,
    upload,
    whole_reply,
)

from storage import LocalStore

EVENTS_PREFIX = "sealstream/audit/events/"  # audit.EVENTS_PREFIX


@dataclass
class Side:
    """One server, audit on or off, and its timings."""

    name: str
    server: Server
    back: Kind = field(default_factory=Kind)
    stored: Kind = field(default_factory=Kind)


@contextmanager
def two_servers(workdir: Path) -> Iterator[tuple[Side, Side]]:
    with ExitStack() as stack:
        sides = []
        for name, audit in (("audit-on", "true"), ("audit-off", "false")):
            env = {
                "SEALSTREAM_STORAGE_URL": f"file://{workdir / name}",
                "SEALSTREAM_AUDIT": audit,
            }
            sides.append(Side(name, stack.enter_context(api_server(workdir, name, env))))
        yield sides[0], sides[1]


def one_round(side: Side, number: int, declared: PlaintextFile, piped: Plaintext) -> None:
    total = piped.total
    back = checked(upload(side.server, ENCRYPT_PATH, {"kid": KID}, declared), "stream-back")
    if not whole_reply(ENCRYPT_PATH, back.downloaded, total):
        raise BenchError(f"{side.name}: {back.downloaded} B back for {total} B")
    side.back.add(back)
    metadata = {"kid": KID, "destination": {"key": f"bench/audit-{number}"}}
    into = checked(upload(side.server, ENCRYPT_PATH, metadata, piped), "to storage", 201)
    stored = settled(side.server, into, total)
    assert side.server.storage_dir is not None
    LocalStore(side.server.storage_dir).delete(stored["storageKey"])
    side.stored.add(into)


def segments(side: Side) -> int:
    assert side.server.storage_dir is not None
    return sum(1 for _ in LocalStore(side.server.storage_dir).list(EVENTS_PREFIX))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="upload size, MiB")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    total = args.mib * MIB
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as scratch:
        workdir = Path(scratch)
        piped = Plaintext(total)
        declared = PlaintextFile(piped)
        try:
            with two_servers(workdir) as (on, off):
                print(
                    f"two live servers, audit on and off: uvicorn, 1 worker each; client "
                    f"{' '.join(curl.stdout.split()[:2])}; {os.cpu_count()} cores, load "
                    f"average {os.getloadavg()[0]:.1f}"
                )
                for number in range(args.rounds):
                    for side in in_turn([on, off], number):
                        one_round(side, number, declared, piped)
                if segments(on) == 0 or segments(off) != 0:
                    raise BenchError("the audit-on trail is empty, or the audit-off one is not")
        except BenchError as exc:
            print(f"FAILED: {exc}")
            for log in sorted(workdir.glob("*.log")):
                print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-2000:]}")
            raise SystemExit(1) from None
        finally:
            declared.close()
    print(f"{total / MIB:.0f} MiB per upload, {args.rounds} rounds, each kind's best round")
    for what, kind_on, kind_off in (
        ("stream-back (length declared)", on.back, off.back),
        ("into local storage           ", on.stored, off.stored),
    ):
        print(f"  {what}  audit on  {kind_on.figures(total)}")
        print(f"  {' ' * len(what)}  audit off {kind_off.figures(total)}")
        print(
            f"  {' ' * len(what)}  ratio {ratio(kind_off, kind_on)}  (goal >= 0.98)   "
            f"server CPU ratio {kind_off.server_cpu / kind_on.server_cpu:.3f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other work on the machine)")


if __name__ == "__main__":
    main()
