"""LRU cache of per-sequence teacher scores, keyed by (teacher, version, prompt, completion, top_k).

Keys hold a 32-byte blake2b digest of the token ids instead of the ids themselves, so an entry's
key costs the same for a 10-token and a 10k-token sequence.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import numpy as np

V = TypeVar("V")
CacheKey = tuple[str, str, int, bytes]


def cache_key(teacher: str, version: str, prompt_ids: Any, completion_ids: Any,
              top_k: int) -> CacheKey:
    p = np.asarray(prompt_ids, dtype=np.int64)
    c = np.asarray(completion_ids, dtype=np.int64)
    h = hashlib.blake2b(digest_size=32)
    h.update(np.int64(len(p)).tobytes())
    h.update(p.tobytes())
    h.update(c.tobytes())
    return (teacher, version, int(top_k), h.digest())


class LRUCache(Generic[V]):
    """Thread-safe LRU map with hit/miss counters; `max_entries` 0 disables it (always misses)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[CacheKey, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def get(self, key: CacheKey) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: CacheKey) -> V | None:
        """Like get, without counting a hit or miss or refreshing the entry."""
        with self._lock:
            return self._data.get(key)

    def put(self, key: CacheKey, value: V) -> None:
        if self.max_entries <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._data), "max_entries": self.max_entries,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
