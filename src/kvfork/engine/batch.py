"""Batch: the tokens of one llama_decode call, each tagged with its position and sequence id."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Batch"]


@dataclass
class Batch:
    """Plain-Python description of one decode; the engine copies it into a llama_batch.

    Tokens of many sequences may share a batch; `logits[i]` asks for the next-token distribution
    after token i (only the last token of each sequence that is about to sample needs it).
    """

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seq_ids: list[int] = field(default_factory=list)
    logits: list[bool] = field(default_factory=list)

    def add(self, token: int, pos: int, seq_id: int, logits: bool = False) -> int:
        """Append one token; return its index in the batch (the index to sample from)."""
        self.tokens.append(token)
        self.positions.append(pos)
        self.seq_ids.append(seq_id)
        self.logits.append(logits)
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)
