"""Memory of batch-encrypt's hostile inputs: sealstream's readers next to what they replaced.

Prints, for each archive (generated here, a few hundred bytes to 19 MiB), the peak RSS
rise (Linux VmHWM, reset before each read) of
- sealstream's reader (`services.archives.open_archive`, the default limits unless the
  row says otherwise), reading members until the archive ends or is refused;
- its ceiling, the reader batch-encrypt used before, on the same bytes: `tarfile`'s
  streaming mode (each header dropped once read), or `zipfile` opening the archive.
A benign tar.gz comes first: there the two should cost the same.

Then the manifest of a million members, written as batch-encrypt writes it now (a member
at a time, through SHA-256) next to building it whole as it did before (a list of the
entries, then one JSON document).

Each step runs once, in a process of its own (a fresh interpreter, so that no memory an
earlier step freed is reused unseen); figures are MiB above its resident size once the
input is in hand. Memory does not vary from run to run the way time does.
"""

import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sealstream.settings import Settings
from sealstream.wiring import archive_limits
from services.archives import InvalidArchive, MemberKind, open_archive
from storage import LocalStore
from workers.manifest import json_object

MIB = 1024 * 1024
BOMB = 64 * MIB
MEMBERS = 1_000_000


class PeakRss:
    """Peak resident set size of this process since `reset()`, above what it was then."""

    PROC = Path("/proc/self")

    def reset(self) -> None:
        (self.PROC / "clear_refs").write_text("5")  # VmHWM := the current RSS
        self._base = self._field("VmRSS")

    def rise_mib(self) -> float:
        return (self._field("VmHWM") - self._base) / 1024

    def _field(self, name: str) -> int:
        for line in (self.PROC / "status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
        raise RuntimeError(f"no {name} in /proc/self/status")


def tar(mode: str, info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT) as archive:  # type: ignore[call-overload]
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def pax_bomb() -> bytes:
    """A pax header of 64 MiB in front of an empty member, in tar.bz2."""
    info = tarfile.TarInfo("member")
    info.pax_headers = {"comment": "a" * BOMB}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info)
    return buffer.getvalue()


def long_name_bomb() -> bytes:
    """A GNU long name of 64 MiB, in tar.bz2."""
    return tar("w:bz2", tarfile.TarInfo("a" * BOMB))


def zip_index() -> bytes:
    """A zip whose central directory lists one directory entry 350,000 times (16 MiB)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("d/", b"")
    data = buffer.getvalue()
    start = data.index(b"PK\x01\x02")
    end = data.index(b"PK\x05\x06")
    entry, eocd = data[start:end], bytearray(data[end:])
    index = entry * 350_000
    eocd[12:16] = len(index).to_bytes(4, "little")  # the central directory's size
    return data[:start] + index + bytes(eocd)


def benign() -> bytes:
    """64 MiB that gzip cannot shrink (a random MiB, repeated beyond its window)."""
    return tar("w:gz", tarfile.TarInfo("random.bin"), os.urandom(MIB) * 64)


def read_with_sealstream(data: bytes, settings: Settings) -> str:
    with tempfile.TemporaryDirectory() as directory:
        store = LocalStore(Path(directory))
        store.put("archive", data)
        try:
            with open_archive(store, "archive", "auto", archive_limits(settings)) as source:
                for member in source.members():
                    if member.kind is MemberKind.FILE:
                        with member.open() as stream:
                            while stream.read(MIB):
                                pass
        except InvalidArchive as refusal:
            return refusal.code
    return "read"


def read_as_before(data: bytes) -> str:
    """`tarfile`'s streaming mode or `zipfile`, as batch-encrypt read archives before."""
    try:
        if data.startswith(b"PK"):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return f"read ({len(archive.infolist())} entries)"
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
            for info in archive:
                archive.members.clear()  # type: ignore[attr-defined]
                stream = archive.extractfile(info)
                while stream is not None and stream.read(MIB):
                    pass
    except (tarfile.TarError, zipfile.BadZipFile) as error:
        return f"refused ({error})"
    return "read"


def measure(step: Callable[..., str], *args: Any) -> tuple[float, str]:
    """`step(*args)` run in a process of its own: its peak RSS rise, and what it said."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_measured, (step, *args))


def _measured(step: Callable[..., str], *args: Any) -> tuple[float, str]:
    peak = PeakRss()
    peak.reset()
    outcome = step(*args)
    return peak.rise_mib(), outcome


def manifest_entries() -> Iterator[dict[str, Any]]:
    for n in range(MEMBERS):
        yield {
            "path": f"photos/{n:07d}.jpg",
            "key": f"out/photos/{n:07d}.jpg",
            "storageKey": f"tenants/acme/out/photos/{n:07d}.jpg",
            "plaintextSize": 1_000_000 + n,
            "plaintextSha256": f"{n:064x}",
            "ciphertextSize": 1_000_200 + n,
            "keyVersion": 1,
        }


def manifest_streamed() -> str:
    digest = hashlib.sha256()
    for piece in json_object({"jobId": "job"}, {"members": manifest_entries()}):
        digest.update(piece)
    return digest.hexdigest()[:12]


def manifest_whole() -> str:
    manifest = {"jobId": "job", "members": list(manifest_entries())}
    return hashlib.sha256(json.dumps(manifest, indent=1).encode()).hexdigest()[:12]


def main() -> None:
    defaults = Settings()
    no_ratio = defaults.model_copy(update={"batch_max_expansion": 1e12})
    rows = [
        ("benign tar.gz, 64 MiB of random bytes", benign(), defaults),
        ("pax header of 64 MiB, tar.bz2", pax_bomb(), defaults),
        ("the same, expansion unlimited", pax_bomb(), no_ratio),
        ("GNU long name of 64 MiB, tar.bz2, expansion unlimited", long_name_bomb(), no_ratio),
        ("zip index of 350,000 entries", zip_index(), defaults),
    ]
    print("| archive | bytes | sealstream MiB | outcome | before MiB | outcome |")
    print("|---|---|---|---|---|---|")
    for name, data, settings in rows:
        ours, ours_outcome = measure(read_with_sealstream, data, settings)
        theirs, their_outcome = measure(read_as_before, data)
        cells = [name, f"{len(data):,}", f"{ours:.0f}", ours_outcome]
        cells += [f"{theirs:.0f}", their_outcome]
        print("| " + " | ".join(cells) + " |")
    streamed, _ = measure(manifest_streamed)
    whole, _ = measure(manifest_whole)
    print(f"\nmanifest of {MEMBERS:,} members: streamed {streamed:.0f} MiB, whole {whole:.0f} MiB")


if __name__ == "__main__":
    main()
