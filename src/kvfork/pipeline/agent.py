"""Agent: one declarative step of a pipeline: what it reads, what it is told, how it samples."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import PipelineError

__all__ = ["Agent", "DEFAULT_FOLLOWUP"]

DEFAULT_FOLLOWUP = "Answer the points above and restate your position in a few sentences."


@dataclass(frozen=True)
class Agent:
    """One agent of a pipeline.

    Args:
        name: unique within the pipeline; other agents name it in their `inputs`.
        instruction: what the agent is asked in its first turn.
        role: the agent's own system prompt, or None to use the pipeline's shared one. An own role
            costs the agent its own prefill unless the pipeline opts in to layout "shared-first".
        inputs: names of documents (shared contexts) and of upstream agents whose output it reads.
            At most one document: it is the snapshot the agent forks from.
        sampling: SamplingParams fields (a mapping) or a SamplingParams; checked when the agent
            runs, so bad settings fail this agent only.
        turns: number of turns on the same branch (its KV is kept between them), e.g. debate rounds.
        peers: multi-turn agents that run in lockstep with this one; from the second turn on, this
            agent reads their previous replies. Peers must have the same number of turns.
        followup: the instruction of turns 2..n.
        adapter: the LoRA decoder (a name loaded with Engine.load_adapter, or in the file's [adapters])
            that decodes this agent's branch over the shared prefill; None: the base model.
    """

    name: str
    instruction: str
    role: str | None = None
    inputs: tuple[str, ...] = ("document",)
    sampling: Mapping[str, Any] | SamplingParams = field(default_factory=dict)
    turns: int = 1
    peers: tuple[str, ...] = ()
    followup: str = DEFAULT_FOLLOWUP
    adapter: str | None = None

    def __post_init__(self) -> None:
        # NOTE: lists are accepted for convenience (TOML arrays) and frozen into tuples here.
        for name in ("inputs", "peers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.name, str) or not self.name.strip():
            raise PipelineError(f"an agent needs a non-empty name, got {self.name!r}")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise PipelineError(f"agent {self.name!r} needs a non-empty instruction")
        if not isinstance(self.turns, int) or self.turns < 1:
            raise PipelineError(f"agent {self.name!r}: turns must be an integer >= 1, got {self.turns!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise PipelineError(f"agent {self.name!r}: adapter must be a non-empty name or None")
        if not isinstance(self.sampling, (Mapping, SamplingParams)):
            raise PipelineError(f"agent {self.name!r}: sampling must be a mapping or SamplingParams")

    def __hash__(self) -> int:  # NOTE: `sampling` may be a dict; the name is unique within a pipeline
        return hash(self.name)

    def params(self, defaults: SamplingParams | None = None) -> SamplingParams:
        """The agent's SamplingParams on top of `defaults`; raises InvalidParameter on bad settings."""
        if isinstance(self.sampling, SamplingParams):
            return self.sampling
        return (defaults or SamplingParams()).with_overrides(**dict(self.sampling))

    def upstream(self, documents: Mapping[str, str]) -> tuple[str, ...]:
        """The agents this one reads (its inputs that are not documents)."""
        return tuple(i for i in self.inputs if i not in documents)

    def document(self, documents: Mapping[str, str]) -> str | None:
        """The name of the document this agent forks from, or None."""
        docs = [i for i in self.inputs if i in documents]
        return docs[0] if docs else None
