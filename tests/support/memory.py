"""A process's peak resident memory, for tests that bound what hostile input may cost
(Linux: VmHWM in /proc/<pid>/status, reset to the current RSS through clear_refs)."""

from pathlib import Path

KiB = 1024
MiB = 1024 * KiB


class PeakRss:
    """The peak resident memory of a process (this one by default) since `reset`."""

    def __init__(self, pid: int | None = None) -> None:
        self._proc = Path("/proc") / (str(pid) if pid is not None else "self")
        self.base = 0

    def reset(self) -> None:
        (self._proc / "clear_refs").write_text("5")  # VmHWM := the current RSS
        self.base = self.field("VmRSS")

    def growth(self) -> int:
        """Bytes the peak rose above the resident size at `reset`."""
        return self.field("VmHWM") - self.base

    def field(self, name: str) -> int:
        """A size field of /proc/<pid>/status (VmRSS, VmHWM, VmSize...), in bytes."""
        for line in (self._proc / "status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return int(value.split()[0]) * KiB  # the kernel's "kB" are KiB
        raise KeyError(f"no {name} in {self._proc}/status")
