"""Frozen configuration dataclasses, validated when built."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from kvfork.errors import InvalidParameter

__all__ = ["EngineConfig", "default_threads"]

FlashAttn = Literal["auto", "on", "off"]


def default_threads() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes and runs its one llama context.

    n_ctx is the number of KV cells shared by every snapshot and branch (a unified cache): a
    3,500-token prefix forked to 8 branches of 200 tokens needs about 3,500 + 8*200 cells, not 8*3,700.
    """

    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 32
    n_threads: int = field(default_factory=default_threads)
    flash_attn: FlashAttn = "auto"
    chat_template: str | None = None  # a template (or llama.cpp template name) overriding the GGUF's own
    verbose: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise InvalidParameter(f"n_ctx must be at least 16, got {self.n_ctx}")
        if not 1 <= self.n_ubatch <= self.n_batch:
            raise InvalidParameter(f"need 1 <= n_ubatch <= n_batch, got n_ubatch={self.n_ubatch}, n_batch={self.n_batch}")
        # NOTE: llama.cpp caps sequence ids at LLAMA_MAX_SEQ (256); one id is kept for each live snapshot.
        if not 2 <= self.n_seq_max <= 256:
            raise InvalidParameter(f"n_seq_max must be in [2, 256], got {self.n_seq_max}")
        if self.n_threads < 1:
            raise InvalidParameter(f"n_threads must be >= 1, got {self.n_threads}")
        if self.flash_attn not in ("auto", "on", "off"):
            raise InvalidParameter(f"flash_attn must be 'auto', 'on' or 'off', got {self.flash_attn!r}")
