"""PrefixIndex: longest-prefix matching of a token list against stored entries, via chained block hashes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from kvfork.scheduler.prefix_cache import common_prefix
from kvfork.store.keys import block_hashes

__all__ = ["PrefixIndex", "PrefixMatch"]


class PrefixMatch(NamedTuple):
    """A stored entry and how many leading tokens it shares with the request."""

    key: str
    n_shared: int
    n_tokens: int  # tokens in the stored entry (> n_shared: it must be trimmed)


class PrefixIndex:
    """Maps each full block hash to the entries whose tokens start with that block chain.

    Contract: not thread-safe (the store locks around it). Entries shorter than one block are
    never matched. A hash hit is confirmed by comparing the tokens themselves.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[bytes, dict[str, None]] = {}
        self._entries: dict[str, tuple[np.ndarray, list[bytes]]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, root: bytes, tokens: np.ndarray) -> None:
        if key in self._entries:
            return
        hashes = list(block_hashes(root, tokens, self.block_size))
        self._entries[key] = (tokens, hashes)
        for h in hashes:
            self._blocks.setdefault(h, {})[key] = None

    def remove(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is None:
            return
        for h in item[1]:
            bucket = self._blocks.get(h)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self._blocks[h]

    def matches(
        self, root: bytes, tokens: np.ndarray, usable: Callable[[int, int], bool] = lambda n, k: True
    ) -> Iterator[PrefixMatch]:
        """Yield the entries sharing a prefix with `tokens`, longest shared prefix first.

        `usable(n_entry_tokens, n_shared)` filters out matches the caller cannot use (a state that
        would have to be trimmed where trimming is not possible), so a shorter entry is offered next.
        """
        chain: list[bytes] = []
        for h in block_hashes(root, tokens, self.block_size):
            if h not in self._blocks:
                break
            chain.append(h)
        seen: set[str] = set()
        # NOTE: entries in the bucket of block d share >= (d+1)*block_size tokens; entries only in
        # shallower buckets share fewer, so walking buckets deepest first yields longest first.
        for h in reversed(chain):
            found = []
            for key in self._blocks[h]:
                if key in seen:
                    continue
                seen.add(key)
                stored = self._entries[key][0]
                shared = common_prefix(stored, tokens)
                if shared > 0 and usable(len(stored), shared):
                    found.append(PrefixMatch(key, shared, len(stored)))
            found.sort(key=lambda m: (-m.n_shared, m.n_tokens))
            yield from found
