"""Defaults sized to the machine a process runs on: its memory, its open-file limit and
its CPUs.

Memory is the smallest of the physical memory and every memory limit of the process's
control groups (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`, its own group's and
those of the groups above it), so that a container's limit counts rather than the host's.
"""

import os
import resource
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

# Streams may hold at most this share of the memory; the rest is the process's own
# (its code, key caches, connections, the allocator's slack) and the machine's.
STREAM_MEMORY_SHARE = 0.5
# Connections may hold at most this share of the open-file limit; the rest is for
# storage (local files, S3 connections), Redis, logs and the listening socket.
CONNECTION_FILE_SHARE = 0.5


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory(
    cgroup_root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")
) -> int:
    """Bytes of memory this process may use: its control groups' limit if any is lower
    than the physical memory, else the physical memory."""
    limits = [physical_memory()]
    for limit_file in _memory_limit_files(cgroup_root, membership):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))  # "max" (v2) means no limit
    return min(limits)


def stream_memory(part_size: int, parts_in_flight: int) -> int:
    """The most one stream holds: an upload into S3, (parts in flight + 1) parts."""
    return (parts_in_flight + 1) * part_size


def stream_cap(part_size: int, parts_in_flight: int, memory: int | None = None) -> int:
    """Streams that fit in `STREAM_MEMORY_SHARE` of the memory, each counted at the most
    one holds (`stream_memory`)."""
    budget = (available_memory() if memory is None else memory) * STREAM_MEMORY_SHARE
    return max(1, int(budget // stream_memory(part_size, parts_in_flight)))


def connection_cap(open_files: int | None = None) -> int:
    """Connections that fit in `CONNECTION_FILE_SHARE` of the open-file limit."""
    if open_files is None:
        open_files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, int(open_files * CONNECTION_FILE_SHARE))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, which a container's cpuset or
    `taskset` narrows, where `os.cpu_count` counts the whole machine's."""
    return len(os.sched_getaffinity(0))


def keygen_threads() -> int:
    """Half the CPUs: key generation is CPU-bound, and requests need the rest."""
    return max(1, (os.cpu_count() or 1) // 2)


def _memory_limit_files(cgroup_root: Path, membership: Path) -> Iterator[Path]:
    """The limit files of the process's groups and of every group above them; v1
    hierarchies list their controllers (`memory`), the v2 one none."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers and "memory" not in controllers.split(","):
            continue
        if controllers:
            hierarchy, name = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            hierarchy, name = cgroup_root, "memory.max"
        directory = hierarchy / group.lstrip("/")
        for level in (directory, *directory.parents):
            yield level / name
            if level == hierarchy:
                break
