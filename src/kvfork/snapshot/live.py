"""LiveSnapshots: the tier in the context itself; a prefill that extends a live snapshot forks it (zero-copy)."""

from __future__ import annotations

import numpy as np

from kvfork.scheduler.sequence import SeqStatus, Sequence
from kvfork.snapshot.host import can_trim
from kvfork.snapshot.index import common_prefix

__all__ = ["LiveSnapshots"]


class LiveSnapshots:
    """Prefilled snapshots still held in one engine's KV cache, searched by token prefix.

    Contract: used under the engine's lock. Released snapshots drop out on the next lookup; a hit is
    a fork, which holds the cells it shares under its own id (the snapshot may close before it).
    """

    def __init__(self, n_swa: int, min_tokens: int = 32) -> None:
        self.n_swa = n_swa
        self.min_tokens = min_tokens
        self._seqs: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self._seqs.append(seq)

    def longest(self, tokens: list[int]) -> tuple[Sequence, int] | None:
        """The live snapshot sharing the longest usable prefix with `tokens`, and that length.

        A live snapshot longer than the shared part is only usable where its cells can be cut
        there (a fork of its first n cells): not into a sliding window's past.
        """
        self._seqs = [s for s in self._seqs if not s.released and s.status is not SeqStatus.CLOSED]
        want = np.asarray(tokens)
        best: tuple[Sequence, int] | None = None
        for seq in self._seqs:
            if seq.n_pending or seq.status is not SeqStatus.IDLE or seq.seq_id is None:
                continue
            n = common_prefix(want, np.asarray(seq.tokens[: seq.n_in_kv]))
            if n < seq.n_in_kv and not can_trim(self.n_swa, seq.n_in_kv, n):
                continue
            if n >= self.min_tokens and (best is None or n > best[1]):
                best = (seq, n)
        return best
