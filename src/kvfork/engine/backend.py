"""Backend: what the scheduler needs of a model and its KV cache, as a protocol (llama.cpp's context is one).

The scheduler and the branch table speak only this interface, so they can run on a fake backend in
unit tests (tests/support/fakes.py) as well as on `engine.llama.LlamaContext`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from kvfork.engine.batch import Batch
from kvfork.engine.sampling import SamplingParams

__all__ = ["Backend", "TokenSampler"]


class TokenSampler(Protocol):
    """One branch's sampler chain, bound to the backend that made it."""

    def accept(self, token: int) -> None:
        """Tell the penalties a token is in the history (prompt tokens, or a token chosen elsewhere)."""

    def sample(self, index: int) -> int:
        """Pick a token from the logits at batch index `index` of the last decode, and accept it."""

    def close(self) -> None: ...


class Backend(Protocol):
    """A model with one KV cache whose cells carry a set of sequence ids (llama.cpp's unified cache).

    Contract, as llama.cpp keeps it: `decode` writes one cell per batch token, tagged with its
    sequence id and position; a sequence attends to the cells tagged with its id. `seq_cp` adds an id
    to cells (a fork, no data copied); `seq_rm` removes one; a cell is free once no id holds it.
    Logits and samples refer to the last decode's batch indices and are gone after the next decode.
    A failed decode raises (ContextOverflow when out of cells) and may leave the ubatches before the
    failing one in the cache.
    """

    n_ctx: int
    n_batch: int
    n_swa: int  # the model's sliding window (0: full attention everywhere)
    # every batch shape and cell layout rounds alike (exact mode on kvfork's patched kernels): a prompt's
    # tokens compute the same bits in a chunk of any size
    invariant: bool

    def decode(self, batch: Batch) -> None: ...

    def logits(self, index: int) -> np.ndarray:
        """A copy of the raw logits at batch index `index` of the last decode (n_vocab floats)."""

    def sampler(self, params: SamplingParams, seed: int) -> TokenSampler: ...

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        """The (LoRA, scale) set every following decode applies; () for the bare model."""

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None: ...

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool: ...

    def state_seq_set(self, seq_id: int, data: bytes) -> None: ...

    def compact(self) -> None:
        """Move the used cells down into one run, keeping their order, ids, positions and data (no holes
        left below any of them, so the next tokens go above them all)."""

    def is_eog(self, token: int) -> bool:
        """Does `token` end generation (end of sequence or of turn)?"""

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (a piece may be part of a UTF-8 character)."""
