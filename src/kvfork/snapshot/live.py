"""LiveSnapshots: the tier in the context itself; a prefill that extends a live snapshot forks it (zero-copy)."""

from __future__ import annotations

import numpy as np

from kvfork.scheduler.sequence import SeqStatus, Sequence
from kvfork.snapshot.host import can_trim
from kvfork.snapshot.index import common_prefix

__all__ = ["LiveSnapshots"]


class LiveSnapshots:
    """Prefilled snapshots still held in one engine's KV cache, searched by token prefix.

    Contract: used under the engine's lock. Released snapshots drop out on the next lookup; a hit
    pins its parent (n_children) until the new sequence is freed, as any fork does.
    """

    def __init__(self, n_swa: int, min_tokens: int = 32) -> None:
        self.n_swa = n_swa
        self.min_tokens = min_tokens
        self._seqs: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self._seqs.append(seq)

    def extend(self, tokens: list[int]) -> Sequence | None:
        """A new sequence for `tokens` sharing the longest live prefix's cells, or None.

        The new sequence holds the shared part as forked cells and the rest as pending tokens.
        A live snapshot longer than the shared part is cut (seq_cp of its first cells only) where
        the cache allows it: not into a sliding window's past.
        """
        self._seqs = [s for s in self._seqs if not s.released and s.status is not SeqStatus.CLOSED]
        want = np.asarray(tokens)
        best: tuple[int, Sequence] | None = None
        for seq in self._seqs:
            if seq.n_pending or seq.status is not SeqStatus.IDLE or seq.seq_id is None:
                continue
            n = common_prefix(want, np.asarray(seq.tokens[: seq.n_in_kv]))
            if n < seq.n_in_kv and not can_trim(self.n_swa, seq.n_in_kv, n):
                continue
            if n >= self.min_tokens and (best is None or n > best[0]):
                best = (n, seq)
        if best is None:
            return None
        n, parent = best
        parent.n_children += 1
        return Sequence(tokens=list(tokens), parent=parent, n_shared=n, n_in_kv=n)
