"""Content keys: chained block hashes over (previous hash, block tokens), seeded by the state layout.

Block i's hash covers every token up to the end of block i, so two token lists share block hash i
exactly when (barring sha256 collisions) they share their first (i+1)*block_size tokens. Seeding the
chain with StateLayout.root keeps entries of different models or KV layouts apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["as_array", "block_hashes", "entry_key"]


def as_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous little-endian int32 array (the bytes that are hashed and stored)."""
    return np.ascontiguousarray(np.asarray(tokens, dtype="<i4"))


def block_hashes(root: bytes, tokens: np.ndarray, block_size: int) -> Iterator[bytes]:
    """Yield the chained hash of each full block of `tokens`, lazily (a lookup stops at the first miss)."""
    raw = memoryview(tokens.tobytes())
    step = 4 * block_size
    prev = root
    for start in range(0, (len(tokens) // block_size) * step, step):
        prev = hashlib.sha256(prev + raw[start : start + step]).digest()
        yield prev


def entry_key(root: bytes, tokens: np.ndarray) -> str:
    """The key of a stored entry: sha256 hex over the layout root and all its token ids."""
    return hashlib.sha256(root + tokens.tobytes()).hexdigest()
