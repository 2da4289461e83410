"""Defaults sized to the machine: memory from the cgroup limits or the physical memory,
connections from the open-file limit."""

from pathlib import Path

import pytest

from sealstream import capacity
from sealstream.capacity import available_memory, connection_cap, stream_cap
from sealstream.settings import Settings

GiB = 1024**3
MiB = 1024**2


@pytest.fixture
def physical(monkeypatch: pytest.MonkeyPatch) -> int:
    memory = 16 * GiB
    monkeypatch.setattr(capacity, "physical_memory", lambda: memory)
    return memory


def cgroups(root: Path, membership: str, limits: dict[str, str]) -> Path:
    """A cgroup tree under `root` with these limit files, and a /proc/self/cgroup."""
    for path, value in limits.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(value + "\n")
    listing = root / "self-cgroup"
    listing.write_text(membership)
    return listing


def test_a_cgroup_v2_limit_counts(tmp_path: Path, physical: int) -> None:
    listing = cgroups(tmp_path, "0::/app/api\n", {"app/api/memory.max": str(2 * GiB)})
    assert available_memory(tmp_path, listing) == 2 * GiB


def test_a_limit_of_a_group_above_counts(tmp_path: Path, physical: int) -> None:
    limits = {"app/api/memory.max": "max", "app/memory.max": str(3 * GiB)}
    listing = cgroups(tmp_path, "0::/app/api\n", limits)
    assert available_memory(tmp_path, listing) == 3 * GiB


def test_a_cgroup_v1_limit_counts(tmp_path: Path, physical: int) -> None:
    limits = {"memory/docker/abc/memory.limit_in_bytes": str(GiB)}
    listing = cgroups(tmp_path, "5:cpu:/docker/abc\n4:memory:/docker/abc\n0::/\n", limits)
    assert available_memory(tmp_path, listing) == GiB


def test_without_a_limit_the_physical_memory_counts(tmp_path: Path, physical: int) -> None:
    limits = {"memory/memory.limit_in_bytes": str(2**63 - 4096), "memory.max": "max"}
    listing = cgroups(tmp_path, "4:memory:/\n0::/\n", limits)
    assert available_memory(tmp_path, listing) == physical
    assert available_memory(tmp_path, tmp_path / "no-such-file") == physical


def test_the_stream_cap_is_the_uploads_that_fit_in_half_the_memory() -> None:
    assert stream_cap(8 * MiB, 4, memory=2 * GiB) == 25  # 1 GiB / 40 MiB
    assert stream_cap(8 * MiB, 4, memory=64 * MiB) == 1  # never none


def test_the_settings_default_follows_the_part_size() -> None:
    settings = Settings(s3_part_size=16 * MiB, s3_parts_in_flight=3)
    assert settings.max_streams == stream_cap(16 * MiB, 3)
    assert Settings(max_streams=7).max_streams == 7


def test_the_connection_cap_is_half_the_open_file_limit() -> None:
    assert connection_cap(1024) == 512
    assert Settings().max_connections == connection_cap()
