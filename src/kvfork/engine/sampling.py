"""SamplingParams: how one branch picks its tokens (applied by llama.cpp's sampler chain)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

from kvfork.engine.logprobs import MAX_TOP_LOGPROBS
from kvfork.errors import InvalidParameter

__all__ = ["SamplingParams"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-branch generation settings.

    temperature 0 means greedy (argmax), the mode in which a forked branch is guaranteed to produce
    exactly the tokens of a from-scratch run. top_k 0, top_p 1 and min_p 0 disable those filters.
    seed None draws a fresh seed per branch.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and its k likeliest alternatives
    # constrained decoding: the reply is JSON matching this JSON Schema (a dict, or its JSON text;
    # {"type": "object"} for any JSON object), enforced by llama.cpp's grammar sampler
    json_schema: str | None = None
    grammar: str | None = None  # a GBNF grammar (rule "root") the reply must match; not with json_schema

    def __post_init__(self) -> None:
        if self.grammar is not None and (self.json_schema is not None or not isinstance(self.grammar, str)):
            raise InvalidParameter("grammar must be a GBNF string, and not given together with json_schema")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema, sort_keys=True))
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as exc:
                raise InvalidParameter(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidParameter("json_schema must be a JSON Schema object (a dict)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = (
            (isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens must be an integer >= 0"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (0.0 <= self.min_p < 1.0, "min_p must be in [0, 1)"),
            (0.0 < self.repeat_penalty <= 10.0, "repeat_penalty must be in (0, 10]"),
            (isinstance(self.repeat_last_n, int) and self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32),
             "seed must be in [0, 2**32)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
        )
        for ok, message in checks:
            if not ok:
                raise InvalidParameter(f"{message}; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_overrides(self, **overrides: Any) -> SamplingParams:
        """A copy with the given fields replaced; unknown names are an InvalidParameter."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidParameter(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)
