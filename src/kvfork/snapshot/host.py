"""HostSnapshot: a snapshot's KV bytes copied out of the llama context into host memory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kvfork.errors import SnapshotMismatch
from kvfork.prompt import ChatLayout
from kvfork.scheduler.prefix_cache import can_trim
from kvfork.scheduler.sequence import Sequence
from kvfork.snapshot.base import Snapshot
from kvfork.snapshot.layout import StateLayout

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["HostSnapshot"]


@dataclass(frozen=True)
class HostSnapshot:
    """The KV state of a token prefix, in host memory, with the layout it needs to be restored.

    `state` is llama.cpp's seq-state blob (llama_state_seq_get_data) for `tokens`, positions
    0..len(tokens)-1. It is immutable and not tied to any context: restore it into any engine with
    the same StateLayout, as many times as needed.
    """

    tokens: tuple[int, ...]
    state: bytes
    layout: StateLayout
    chat: ChatLayout | None = None
    created: float = 0.0  # unix time of the capture
    prefill_s: float = 0.0  # seconds the prefill of these tokens took, for savings estimates

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)

    @classmethod
    def capture(cls, snapshot: Snapshot) -> HostSnapshot:
        """Copy a live snapshot's cells out of its engine's context (the snapshot stays live)."""
        engine = snapshot._engine
        seq = snapshot._seq
        with engine._lock:
            if seq.released or seq.seq_id is None:
                raise SnapshotMismatch("cannot copy out a snapshot that was closed")
            tokens = tuple(seq.tokens[: seq.n_in_kv])
            state = engine.ctx.state_seq_get(seq.seq_id)
        return cls(tokens, state, StateLayout.of(engine), snapshot.layout, time.time(), snapshot.prefill_s)

    def restore(self, engine: Engine, keep: int | None = None) -> Snapshot:
        """A live Snapshot in `engine` holding these cells (or their first `keep` tokens).

        Other sequences of the engine's context are untouched. Raises SnapshotMismatch if the
        engine's model or KV layout differs, or if `keep` cuts into a sliding window's past;
        ContextOverflow if the context has no room.
        """
        t0 = time.perf_counter()
        seq = self.adopt(engine, keep)
        return Snapshot(engine, seq, self.chat, time.perf_counter() - t0)

    def adopt(self, engine: Engine, keep: int | None = None) -> Sequence:
        """The scheduler-level half of `restore`: a new Sequence of `engine` holding these cells."""
        self.layout.check(StateLayout.of(engine))
        if keep is not None and not 0 < keep <= self.n_tokens:
            raise SnapshotMismatch(f"keep={keep} is outside 1..{self.n_tokens}")
        if keep is not None and not can_trim(self.layout.n_swa, self.n_tokens, keep):
            raise SnapshotMismatch(
                f"cannot cut a {self.n_tokens:,}-token state back to {keep:,} tokens: the model's sliding"
                f" window ({self.layout.n_swa} tokens) no longer holds the positions needed; prefill instead"
            )
        with engine._lock:
            seq = engine.scheduler.adopt(list(self.tokens), self.state, keep)
            n_swa = self.layout.n_swa
            cut = keep is not None and keep < self.n_tokens
            if cut and n_swa > 0 and engine.ctx.seq_pos_min(seq.seq_id) > max(0, keep - n_swa):  # type: ignore[arg-type,operator]
                # NOTE: belt and braces for can_trim: the context itself says the window's past is gone.
                engine.scheduler.release(seq)
                raise SnapshotMismatch(f"the restored state lacks the sliding-window positions before {keep}")
        return seq

    # -- (de)serialization helpers for the file format ------------------------------------------
    def chat_dict(self) -> dict[str, Any] | None:
        return asdict(self.chat) if self.chat is not None else None

    @staticmethod
    def chat_from(data: dict[str, Any] | None) -> ChatLayout | None:
        if data is None:
            return None
        try:
            return ChatLayout(**data)
        except TypeError as exc:
            raise SnapshotMismatch(f"snapshot chat layout is not readable by this kvfork: {exc}") from exc
