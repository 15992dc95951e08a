"""Agent: one declarative step of a pipeline: what it reads, what it is told, how it samples."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import PipelineError, ToolError
from kvfork.pipeline.tools import Tool

__all__ = ["Agent", "DEFAULT_FOLLOWUP", "TOOL_CHOICES"]

DEFAULT_FOLLOWUP = "Answer the points above and restate your position in a few sentences."
TOOL_CHOICES: tuple[str, ...] = ("auto", "required", "none")


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
        tools: functions the agent may call: plain callables (a schema is derived from their signature,
            type hints and docstring, see Tool.of) or Tools. The model's chat template lays their
            definitions out (so agents with other tools, or none, fork another snapshot); each reply's
            calls are run and their results sent back on the same branch (its KV is kept), until a
            reply calls nothing: that reply is the turn's. Needs a model whose template knows tools.
        tool_choice: "auto" (the model decides), "required" (it must call one of them), "none" (the
            tools are not shown at all), or a tool's name (it must call that one). A required or named
            call is constrained by a grammar.
        reset_tool_choice: after a round of calls, later rounds of the turn are "auto" (as OpenAI's
            Agents SDK does, so a required call cannot loop); False keeps the choice every round.
        parallel_tool_calls: False: a required or named call's grammar allows one call per reply. Every
            call a reply holds is run, in order.
        max_tool_rounds: the most rounds of calls per turn; a reply that still calls tools after them
            fails the agent (ToolRoundsExceeded).
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
    tools: Sequence[Tool | Callable[..., Any]] = ()
    tool_choice: str = "auto"
    reset_tool_choice: bool = True
    parallel_tool_calls: bool = True
    max_tool_rounds: int = 8

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
        self._check_tools()

    def _check_tools(self) -> None:
        if self.tools is None:
            object.__setattr__(self, "tools", ())
        if callable(self.tools) or isinstance(self.tools, (str, Mapping)):
            raise ToolError(f"agent {self.name!r}: tools must be a sequence of callables or Tools")
        try:
            tools = tuple(Tool.of(t) for t in self.tools)
        except ToolError as exc:
            raise ToolError(f"agent {self.name!r}: {exc}") from None
        object.__setattr__(self, "tools", tools)
        names = [t.name for t in tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ToolError(f"agent {self.name!r}: two tools are named {dupes[0]!r}; give one another name"
                            " (Tool.of(fn, name=...))")
        choice = self.tool_choice
        if choice not in TOOL_CHOICES and choice not in names:
            raise ToolError(f"agent {self.name!r}: tool_choice must be one of {list(TOOL_CHOICES)} or a tool's"
                            f" name ({names}), got {choice!r}")
        if choice not in ("auto", "none") and not tools:
            raise ToolError(f"agent {self.name!r}: tool_choice {choice!r} needs tools")
        if not isinstance(self.max_tool_rounds, int) or self.max_tool_rounds < 1:
            raise ToolError(f"agent {self.name!r}: max_tool_rounds must be an integer >= 1,"
                            f" got {self.max_tool_rounds!r}")
        schema = self.sampling.json_schema if isinstance(self.sampling, SamplingParams) \
            else self.sampling.get("json_schema")
        if self.uses_tools and choice != "auto" and schema is not None:
            raise ToolError(f"agent {self.name!r}: a json_schema and a required tool call cannot both constrain"
                            " a reply")

    @property
    def tool_list(self) -> tuple[Tool, ...]:
        """The agent's tools, as Tools (callables are converted when the agent is built)."""
        return self.tools  # type: ignore[return-value]

    @property
    def uses_tools(self) -> bool:
        """Whether the agent's prompt shows tools and its replies are read for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The OpenAI-style definitions its prompt shows, in the agent's order; None without tools."""
        return [t.definition() for t in self.tool_list] if self.uses_tools else None

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
