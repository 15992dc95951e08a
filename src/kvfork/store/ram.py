"""RamTier: host-memory entries (snapshots, reuse segments) under a byte budget, least recently used evicted first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["RamTier"]


class _Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=_Sized)


class RamTier(Generic[K, V]):
    """An LRU map key -> value (a HostSnapshot, or anything with `nbytes`) whose bytes stay within `budget`.

    Contract: not thread-safe (the store locks around it). `put` hands back what it evicted so the
    store can demote it to disk instead of losing it.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[K]:
        """Keys from least to most recently used."""
        return list(self._items)

    def get(self, key: K) -> V | None:
        snap = self._items.get(key)
        if snap is not None:
            self._items.move_to_end(key)
        return snap

    def put(self, key: K, snap: V) -> list[tuple[K, V]]:
        """Insert as most recently used; return the evicted (key, snapshot) pairs, oldest first.

        A snapshot larger than the whole budget is not kept: it comes straight back as evicted.
        """
        if snap.nbytes > self.budget:
            return [(key, snap)]
        self.pop(key)
        self._items[key] = snap
        self.nbytes += snap.nbytes
        evicted = []
        while self.nbytes > self.budget:
            old_key, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            evicted.append((old_key, old))
        return evicted

    def pop(self, key: K) -> V | None:
        snap = self._items.pop(key, None)
        if snap is not None:
            self.nbytes -= snap.nbytes
        return snap
