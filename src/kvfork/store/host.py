"""HostSnapshot: a snapshot's KV bytes copied out of the llama context into host memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvfork.errors import SnapshotMismatch
from kvfork.prompt import ChatLayout
from kvfork.store.layout import StateLayout

__all__ = ["HostSnapshot"]


@dataclass(frozen=True)
class HostSnapshot:
    """The KV state of a token prefix, in host memory, with the layout it needs to be restored.

    `state` is llama.cpp's seq-state blob (llama_state_seq_get_data) for `tokens`, positions
    0..len(tokens)-1. It is immutable and not tied to any context: restore it into any engine with
    the same StateLayout, as many times as needed (`Snapshot.to_host` makes one, `Engine.restore`
    restores one).
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
