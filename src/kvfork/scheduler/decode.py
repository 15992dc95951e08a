"""Decode: one planned llama_decode (a batch under one adapter set, row by sequence) and what running it gave."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kvfork.engine.adapters import Adapter
from kvfork.engine.batch import Batch
from kvfork.scheduler.kv_sequence import KvSequence

__all__ = ["Decode", "Outcome", "Row", "Sampled"]


class Row(NamedTuple):
    """One sequence's part of a decode: `take` tokens from n_in_kv on; `sample_at`: its batch index to
    sample from (None: it samples nothing in this step)."""

    seq: KvSequence
    take: int
    sample_at: int | None


@dataclass
class Decode:
    """One planned llama_decode: a batch under one adapter set (None: the bare base) and its rows."""

    adapter: Adapter | None
    batch: Batch = field(default_factory=Batch)
    rows: list[Row] = field(default_factory=list)


class Sampled(NamedTuple):
    token: int
    raw: np.ndarray | None  # the raw logits, read only when the turn asks for log-probabilities
    t: float  # when it was sampled (time to first token)


@dataclass
class Outcome:
    """What running one Decode gave: the sampled token per sequence, or the error that failed it."""

    decode: Decode
    sampled: dict[KvSequence, Sampled] = field(default_factory=dict)
    error: Exception | None = None
