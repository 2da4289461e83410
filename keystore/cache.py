"""A short cache of key records and the keyrings or signing keys unwrapped from them, so
that using a key does not read its record and unwrap its material every time.

An entry lives `ttl` seconds, so another process's change to a key (a disabled key, a
new version) is seen here within that time; this process's own changes drop the entry
at once (`invalidate`).
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cachetools import TTLCache

from envelope import Keyring, SigningKey
from keystore.records import KeyRecord, KeyVersion

Unwrapped = TypeVar("Unwrapped", Keyring, SigningKey)

DEFAULT_CACHE_TTL = 5.0
CACHE_SIZE = 4096


@dataclass
class CachedKey:
    """A record as read, and the keyrings or signing keys of its versions unwrapped so far."""

    record: KeyRecord
    keyrings: dict[int, Keyring] = field(default_factory=dict)
    signing_keys: dict[int, SigningKey] = field(default_factory=dict)

    def keyring(
        self, version: KeyVersion, unwrap: Callable[[KeyRecord, KeyVersion], Keyring]
    ) -> Keyring:
        """The version's keyring, unwrapped by `unwrap` the first time it is asked for."""
        return self._unwrapped(self.keyrings, version, unwrap)

    def signing_key(
        self, version: KeyVersion, unwrap: Callable[[KeyRecord, KeyVersion], SigningKey]
    ) -> SigningKey:
        """The version's signing key, unwrapped by `unwrap` the first time it is asked for."""
        return self._unwrapped(self.signing_keys, version, unwrap)

    def _unwrapped(
        self,
        cache: dict[int, Unwrapped],
        version: KeyVersion,
        unwrap: Callable[[KeyRecord, KeyVersion], Unwrapped],
    ) -> Unwrapped:
        found = cache.get(version.version)
        if found is None:
            found = unwrap(self.record, version)
            # Unlocked: two threads may both unwrap a version; either result serves.
            cache[version.version] = found
        return found


class KeyCache:
    """Cached keys by (tenant, kid); thread-safe."""

    def __init__(self, ttl: float, timer: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._entries: TTLCache[tuple[str, str], CachedKey] = TTLCache(
            maxsize=CACHE_SIZE, ttl=ttl, timer=timer
        )
        # Bumped by every invalidation, so a load that raced one is not cached.
        self._generation = 0

    def get(self, tenant: str, kid: str, load: Callable[[], KeyRecord]) -> CachedKey:
        """The cached key, or one made of the record `load` reads."""
        with self._lock:
            entry = self._entries.get((tenant, kid))
            generation = self._generation
        if entry is not None:
            return entry
        entry = CachedKey(load())
        with self._lock:
            if generation == self._generation:
                self._entries[(tenant, kid)] = entry
        return entry

    def invalidate(self, tenant: str, kid: str) -> None:
        with self._lock:
            self._entries.pop((tenant, kid), None)
            self._generation += 1
