"""Completion: what one branch's turn produced, with what sharing saved it."""

from __future__ import annotations

from dataclasses import dataclass

from kvfork.engine.logprobs import TokenLogprob

__all__ = ["Completion"]


@dataclass(frozen=True)
class Completion:
    """One generated turn.

    prompt_tokens = reused_tokens (cells shared from a snapshot or kept from earlier turns, not
    computed again) + computed_tokens (prefilled for this turn).
    """

    text: str
    tokens: tuple[int, ...]
    finish_reason: str  # "stop" (end of generation or a stop string), "length", or "error"
    prompt_tokens: int
    reused_tokens: int
    computed_tokens: int
    ttft_s: float  # submit -> first token
    total_s: float  # submit -> done
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when SamplingParams.logprobs was set

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)
