"""KvSequence: one branch's tokens, KV progress and generation state, as the scheduler sees it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvfork.engine.adapters import Adapter
from kvfork.engine.logprobs import TokenLogprob
from kvfork.engine.sampling import SamplingParams
from kvfork.scheduler.text import TurnText

__all__ = ["KvSequence", "SeqStatus"]


class SeqStatus(enum.Enum):
    IDLE = "idle"  # holds (or will hold) KV, nothing to do
    WAITING = "waiting"  # has work, waits for a sequence id or KV cells
    RUNNING = "running"  # has a sequence id; in the batch until its work is done
    CLOSED = "closed"  # its cells are freed


@dataclass(eq=False)
class KvSequence:
    """The unit the scheduler batches: a token history whose head is (or will be) in the KV cache.

    `tokens[:n_in_kv]` are in the cache under `seq_id`; `tokens[n_in_kv:]` are pending (to prefill).
    A sequence forked from `parent` shares the parent's first `n_shared` cells (zero-copy), so its
    own cells start at position n_shared.
    """

    tokens: list[int]
    parent: KvSequence | None = None
    n_shared: int = 0
    n_in_kv: int = 0
    seq_id: int | None = None
    status: SeqStatus = SeqStatus.IDLE
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=0))
    # generation state of the current turn
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    out: TurnText = field(default_factory=TurnText)  # the turn's text, cut at a stop string
    error: Exception | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when params.logprobs is set
    children: list[KvSequence] = field(default_factory=list, repr=False)  # forks sharing its first cells
    released: bool = False  # its owner let go; freed once its forks hold the cells they share
    one_shot: bool = False  # free as soon as the current turn ends (fan-out branches)
    adapter: Adapter | None = None  # the LoRA decoder of this branch (None: the bare base model)
    # accounting of the current turn
    n_turn_start: int = 0  # len(tokens) when the turn was submitted (Scheduler.withdraw drops what came after)
    n_prompt_computed: int = 0
    t_submit: float = 0.0
    t_first_token: float | None = None
    t_done: float | None = None

    @property
    def text(self) -> str:
        """The text generated in the current turn (up to a stop string)."""
        return self.out.text

    @property
    def n_children(self) -> int:
        return len(self.children)

    @property
    def n_pending(self) -> int:
        return len(self.tokens) - self.n_in_kv

    @property
    def n_own_tokens(self) -> int:
        """Tokens whose cells belong to this sequence alone (not shared with its parent)."""
        return len(self.tokens) - self.n_shared

    @property
    def wants_tokens(self) -> bool:
        return self.finish_reason is None and len(self.generated) < self.params.max_tokens

    def cells_needed(self) -> int:
        """Cells this sequence may still occupy: its own tokens plus what it may yet generate."""
        return self.n_own_tokens + max(0, self.params.max_tokens - len(self.generated))

    def next_run(self) -> tuple[Adapter | None, int]:
        """Who computes the next pending token (an adapter, or None: the bare base), and the index where
        that run of pending tokens ends (one decode applies one adapter set)."""
        if self.adapter is None:
            return None, len(self.tokens)
        switch = self.adapter.first_own(len(self.tokens) - len(self.generated), self.params.max_tokens > 0)
        if self.n_in_kv < switch:
            return None, min(switch, len(self.tokens))
        return self.adapter, len(self.tokens)

    def start_turn(self, params: SamplingParams) -> None:
        self.params = params
        self.n_turn_start = len(self.tokens)
        self.generated = []
        self.finish_reason = None
        self.out = TurnText(tuple(params.stop))
        self.error = None
        self.logprobs = []
        self.n_prompt_computed = 0
        self.t_submit = time.perf_counter()
        self.t_first_token = None
        self.t_done = None

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.t_done = time.perf_counter()
