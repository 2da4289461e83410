"""How much a key has been used: per version, the messages it sealed or opened and when
it was last used. Pure values; `keystore.usage` counts and shares them, `KeyRecord` keeps
them.

Counts only grow. Merging two views of one key takes each count's larger value
(`at_least`), so a view that missed some uses (an older copy of a record, a Redis that
lost its data) never lowers what another view saw.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

Operation = Literal["encrypt", "decrypt", "sign", "verify"]
# The uses a key's maxUsageLimit refuses: those that make something with it. Opening a
# message or checking a signature goes on, so that what the key made stays usable.
MAKING: frozenset[Operation] = frozenset({"encrypt", "sign"})

# Data keys or key material one AES key may wrap, each under a random 96-bit IV: half the
# 2^32 NIST SP 800-38D allows. The other half absorbs, many times over, the wraps that
# batched counting lets pass and the counts a crash or a lost Redis can drop.
WRAP_LIMIT = 2**31


def _later(first: datetime | None, second: datetime | None) -> datetime | None:
    if first is None or second is None:
        return first or second
    return max(first, second)


@dataclass(frozen=True)
class VersionUses:
    """One version's uses: messages sealed or opened (`uses`), of which sealed
    (`encrypts`: each one a data key wrapped under the version), and the last one's time."""

    uses: int = 0
    encrypts: int = 0
    last_used_at: datetime | None = None

    def plus(self, other: "VersionUses") -> "VersionUses":
        return VersionUses(
            self.uses + other.uses,
            self.encrypts + other.encrypts,
            _later(self.last_used_at, other.last_used_at),
        )

    def at_least(self, other: "VersionUses") -> "VersionUses":
        return VersionUses(
            max(self.uses, other.uses),
            max(self.encrypts, other.encrypts),
            _later(self.last_used_at, other.last_used_at),
        )

    def below(self, other: "VersionUses") -> bool:
        """Whether some count here is lower than `other`'s."""
        return self.uses < other.uses or self.encrypts < other.encrypts


@dataclass(frozen=True)
class Uses:
    """A key's uses, by version number."""

    versions: Mapping[int, VersionUses] = field(default_factory=dict)

    @classmethod
    def one(cls, version: int, operation: Operation, now: datetime) -> "Uses":
        return cls({version: VersionUses(1, int(operation == "encrypt"), now)})

    @property
    def total(self) -> int:
        return sum(version.uses for version in self.versions.values())

    @property
    def last_used_at(self) -> datetime | None:
        last = None
        for version in self.versions.values():
            last = _later(last, version.last_used_at)
        return last

    def of(self, version: int) -> VersionUses:
        return self.versions.get(version, VersionUses())

    def plus(self, other: "Uses") -> "Uses":
        return self._combined(other, VersionUses.plus)

    def at_least(self, other: "Uses") -> "Uses":
        return self._combined(other, VersionUses.at_least)

    def below(self, other: "Uses") -> bool:
        """Whether some version's count here is lower than `other`'s."""
        return any(self.of(number).below(uses) for number, uses in other.versions.items())

    def _combined(
        self, other: "Uses", combine: Callable[[VersionUses, VersionUses], VersionUses]
    ) -> "Uses":
        numbers: Iterable[int] = self.versions.keys() | other.versions.keys()
        return Uses({number: combine(self.of(number), other.of(number)) for number in numbers})
