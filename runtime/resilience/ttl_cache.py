"""A TTL cache for the product catalogue, on cachetools' TTLCache with the injected clock.

An entry is served while `now - stored_at < ttl_ms` (the seed's `elapsed < ttl`), read from the
Clock given (a VirtualClock in tests), never from the wall clock; expired and least recently
used entries beyond `maxsize` are dropped by cachetools. cachetools caches are not
thread-safe, so every access holds a lock; a load runs outside it (two threads missing the
same key may both load it; the later store wins, and both loads are the same product).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from cachetools import TTLCache

from ..timers import Clock

__all__ = ["CatalogCache", "ttl_cache"]

K = TypeVar("K")
V = TypeVar("V")


def ttl_cache(*, maxsize: int, ttl_ms: int, clock: Clock) -> TTLCache[K, V]:
    """A cachetools TTLCache measured in milliseconds on `clock`."""
    if ttl_ms < 1 or maxsize < 1:
        raise ValueError("a TTL cache needs ttl_ms >= 1 and maxsize >= 1")
    return TTLCache(maxsize=maxsize, ttl=ttl_ms, timer=clock.now_ms)


class CatalogCache(Generic[V]):
    """Products by id, loaded through `load` on a miss and kept for `ttl_ms`."""

    def __init__(
        self,
        load: Callable[[str], V],
        *,
        clock: Clock,
        ttl_ms: int = 300_000,
        maxsize: int = 10_000,
    ) -> None:
        self._load = load
        self._cache: TTLCache[str, V] = ttl_cache(maxsize=maxsize, ttl_ms=ttl_ms, clock=clock)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, product_id: str) -> V:
        """The cached product, or the loaded one (then cached)."""
        with self._lock:
            found = self._cache.get(product_id)
            if found is not None:
                self.hits += 1
                return found
            self.misses += 1
        product = self._load(product_id)
        with self._lock:
            self._cache[product_id] = product
        return product

    def invalidate(self, product_id: str) -> None:
        """Drop one product, for example after its price changed."""
        with self._lock:
            self._cache.pop(product_id, None)

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)
