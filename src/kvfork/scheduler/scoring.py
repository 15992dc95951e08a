"""next_token_logits: teacher-forced raw logits after a sequence's tokens (quality checks of reuse modes)."""

from __future__ import annotations

import numpy as np

from kvfork.engine.batch import Batch
from kvfork.errors import InvalidParameter
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.scheduler import Scheduler

__all__ = ["next_token_logits"]


def next_token_logits(scheduler: Scheduler, parent: KvSequence, tokens: list[int]) -> np.ndarray:
    """Rows of raw logits: row 0 after all of parent's cached tokens, row i after tokens[:i] too.

    NOTE: a fork of all but the parent's last cached token re-decodes that token (its logits are
    long gone), then the given tokens, every one with logits, in n_batch chunks; then it is freed.
    """
    if not tokens:
        raise InvalidParameter("no tokens to score")
    if parent.n_in_kv < 1:
        raise InvalidParameter("cannot score after an empty sequence")
    n = parent.n_in_kv
    backend = scheduler.backend
    seq = scheduler.fork(parent, n - 1) if n > 1 else KvSequence(tokens=[])
    seq.tokens = list(parent.tokens[: n]) + tokens[:-1]
    seq.n_in_kv = n - 1
    try:
        scheduler.allocate_now(seq, "to score tokens")
        backend.set_adapters(())  # NOTE: scored under the bare base model, whatever decoded last
        rows: list[np.ndarray] = []
        while seq.n_pending:
            batch = Batch()
            take = min(seq.n_pending, scheduler.n_batch)
            for i in range(seq.n_in_kv, seq.n_in_kv + take):
                batch.add(seq.tokens[i], i, seq.seq_id, True)  # type: ignore[arg-type]
            backend.decode(batch)
            rows += [backend.logits(j) for j in range(take)]
            seq.n_in_kv += take
        return np.stack(rows)
    finally:
        scheduler.release(seq)
