"""LivePrefixes: prefilled prompt prefixes kept in the KV cache (LRU + pinned snapshots), matched by tokens."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from typing import NamedTuple

from kvfork.scheduler.sequence import SeqStatus, Sequence
from kvfork.snapshot.host import can_trim
from kvfork.snapshot.index import common_prefix

__all__ = ["LivePrefixes", "PrefixHit", "coalesce"]

# NOTE: a fork that leaves only a few prompt tokens to prefill computes them as a tiny ubatch, and
# llama.cpp's CPU kernels for 3-7 rows round differently from the same rows inside a long prompt:
# measured on gemma3-270m (q8_0 KV, flash attention), suffixes of 3-6 tokens (once 7) flipped a greedy
# token against a from-scratch run; 1-2 and 8-16 did not. So in exact mode such forks back off to leave
# this many (fast mode promises agreement up to rounding only, and forks as late as it can).
MIN_SUFFIX = 16


class PrefixHit(NamedTuple):
    """A live sequence whose first `n` cached tokens are the first `n` tokens of a prompt."""

    node: Sequence
    n: int


class LivePrefixes:
    """Idle prefilled sequences a new prompt may fork from instead of prefilling.

    Contract: only the engine loop thread uses it. LRU entries are evicted (released) beyond
    `capacity` or under cell pressure; pinned entries (explicit snapshots) stay until deleted.
    NOTE: a fork at n < node.n_in_kv is only offered where the model's sliding window still holds
    the positions the forked sequence needs (can_trim); otherwise only whole nodes are reused.
    """

    def __init__(self, capacity: int, n_swa: int, min_shared: int, *, exact: bool = False) -> None:
        self.capacity = capacity
        self.n_swa = n_swa
        self.min_shared = min_shared
        self.min_suffix = MIN_SUFFIX if exact else 0
        self._lru: OrderedDict[Sequence, None] = OrderedDict()
        self.pinned: dict[str, Sequence] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def best(self, tokens: Seq[int], extra: Seq[Sequence] = ()) -> PrefixHit | None:
        """The usable live prefix sharing the most tokens with `tokens` (at least min_shared, or a whole node)."""
        best: PrefixHit | None = None
        for node in [*extra, *self.pinned.values(), *self._lru]:
            if node.status is not SeqStatus.IDLE or node.released or node.n_in_kv == 0:
                continue
            n = common_prefix(node.tokens[: node.n_in_kv], tokens)
            whole = n == node.n_in_kv
            if n == 0 or not (whole or (n >= self.min_shared and can_trim(self.n_swa, node.n_in_kv, n))):
                continue
            n = self._back_off(node, n, len(tokens))
            if best is None or n > best.n:
                best = PrefixHit(node, n)
        if best is not None and best.node in self._lru:
            self._lru.move_to_end(best.node)
        return best

    def _back_off(self, node: Sequence, n: int, total: int) -> int:
        """Exact mode: fork earlier when the prompt would leave 2..MIN_SUFFIX-1 tokens to prefill (see MIN_SUFFIX)."""
        if 1 < total - n < self.min_suffix:
            m = total - self.min_suffix
            if m >= 1 and can_trim(self.n_swa, node.n_in_kv, m):
                return m
        return n

    def add(self, node: Sequence) -> list[Sequence]:
        """Keep `node` for later prompts; returns the nodes evicted to stay within capacity (to release)."""
        if node in self.pinned.values():
            return []
        self._lru[node] = None
        self._lru.move_to_end(node)
        evicted = []
        while len(self._lru) > self.capacity:
            evicted.append(self._evict())
        return evicted

    def pin(self, key: str, node: Sequence) -> None:
        """Keep `node` under `key` until `unpin` (an explicit snapshot); it leaves the LRU."""
        self._lru.pop(node, None)
        self.pinned[key] = node

    def unpin(self, key: str) -> Sequence | None:
        return self.pinned.pop(key, None)

    def evict_idle(self) -> Sequence | None:
        """Drop the least recently used node no fork shares (its cells free at once); None if there is none."""
        for node in self._lru:
            if node.n_children == 0:
                del self._lru[node]
                return node
        return None

    def _evict(self) -> Sequence:
        return self.evict_idle() or self._lru.popitem(last=False)[0]

    def all(self) -> list[Sequence]:
        return [*self._lru, *self.pinned.values()]


def coalesce(prompts: Seq[Seq[int]], live: Seq[int], min_shared: int) -> list[tuple[int, list[int]]]:
    """Group prompts that arrived together by a common token prefix worth prefilling once.

    `live[i]` is how many tokens of prompt i a live prefix already covers. Returns (prefix length,
    member indices) per group; a group of one (length 0) has nothing to share with the others.
    """
    remaining = list(range(len(prompts)))
    groups: list[tuple[int, list[int]]] = []
    while remaining:
        i = remaining.pop(0)
        partners = []
        for j in remaining:
            n = common_prefix(prompts[i], prompts[j])
            if n >= min_shared and n > max(live[i], live[j]):
                partners.append((j, n))
        if not partners:
            groups.append((0, [i]))
            continue
        length = min(n for _, n in partners)
        members = [i] + [j for j, _ in partners]
        remaining = [j for j in remaining if j not in members]
        groups.append((length, members))
    return groups
