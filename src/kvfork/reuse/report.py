"""ReuseReport: what composing one prompt reused, placed, corrected and computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ReuseReport", "SegmentOutcome"]

Action = Literal["computed", "placed", "corrected", "blended", "fallback"]


@dataclass(frozen=True)
class SegmentOutcome:
    """One segment of a composed prompt.

    computed: prefilled (exact mode, too short, or no cached KV); placed: shifted KV (shift mode);
    corrected: shifted KV plus the anchors' deviation (kvcomm); blended: first tokens recomputed,
    the rest shifted; fallback: kvcomm's gate refused, prefilled and kept as a new anchor.
    """

    name: str
    n_tokens: int
    action: Action
    n_reused: int  # tokens whose KV was placed instead of computed
    n_anchors: int = 0
    entropy: float | None = None


@dataclass
class ReuseReport:
    """prompt_tokens = prefix_tokens (exact, from a live snapshot) + reused_tokens (placed) + computed_tokens."""

    mode: str
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    seconds: float = 0.0
    segments: list[SegmentOutcome] = field(default_factory=list)

    @property
    def reuse_rate(self) -> float:
        """Share of the prompt not computed for this agent: exact prefix hits plus placed segments."""
        return (self.prefix_tokens + self.reused_tokens) / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode, "prompt_tokens": self.prompt_tokens, "prefix_tokens": self.prefix_tokens,
            "reused_tokens": self.reused_tokens, "computed_tokens": self.computed_tokens,
            "reuse_rate": round(self.reuse_rate, 4), "seconds": round(self.seconds, 4),
            "segments": [vars(s) for s in self.segments],
        }
