"""Pipeline: the declarative definition: documents, a shared system prompt, agents, the layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import PipelineError, ToolError
from kvfork.pipeline.agent import Agent
from kvfork.pipeline.graph import Graph

if TYPE_CHECKING:
    from kvfork.pipeline.planner import Plan
    from kvfork.pipeline.result import PipelineResult
    from kvfork.runtime import Engine

__all__ = ["Pipeline", "Layout", "LAYOUTS"]

Layout = Literal["exact", "shared-first"]
LAYOUTS: tuple[str, ...] = ("exact", "shared-first")


@dataclass(frozen=True)
class Pipeline:
    """Agents over shared documents, validated when built (raises PipelineError).

    Args:
        agents: the agents, in the order results are reported.
        documents: named shared contexts; a plain str is the document named "document".
        system: the shared system prompt of agents without their own role.
        layout: "exact" keeps every agent's prompt as written: an agent with its own role gets its
            own prefill. "shared-first" (opt-in) moves an agent's role into its own turn, after the
            shared system prompt and document, so it can fork from the shared snapshot.
        sampling: defaults under every agent's own sampling settings.
        chat: False prefills documents as plain text and appends turns as is.
        name: shown in reports.
    """

    agents: tuple[Agent, ...]
    documents: Mapping[str, str] = field(default_factory=dict)
    system: str | None = None
    layout: Layout = "exact"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chat: bool = True
    name: str = "pipeline"

    def __post_init__(self) -> None:
        if isinstance(self.documents, str):
            object.__setattr__(self, "documents", {"document": self.documents})
        object.__setattr__(self, "documents", dict(self.documents))
        object.__setattr__(self, "agents", tuple(self.agents))
        if isinstance(self.sampling, Mapping):
            object.__setattr__(self, "sampling", SamplingParams().with_overrides(**dict(self.sampling)))
        if self.layout not in LAYOUTS:
            raise PipelineError(f"layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        for doc_name, text in self.documents.items():
            if not isinstance(text, str):
                raise PipelineError(f"document {doc_name!r} must be text, got {type(text).__name__}")
        if not self.chat and any(a.role for a in self.agents):
            raise PipelineError("agents with a role need chat=True (a role is a system prompt)")
        if not self.chat and any(a.uses_tools for a in self.agents):
            raise ToolError("agents with tools need chat=True (the chat template lays the tools out)")
        if not self.chat and any(a.document(self.documents) is None for a in self.agents):
            raise PipelineError("with chat=False every agent must read a document (plain text has no empty prompt)")
        self.graph  # noqa: B018 -- NOTE: validate the DAG now, before anything can run

    @property
    def graph(self) -> Graph:
        """The validated DAG and its topological levels."""
        return Graph.build(self.agents, self.documents)

    def agent(self, name: str) -> Agent:
        for agent in self.agents:
            if agent.name == name:
                return agent
        raise KeyError(name)

    def with_layout(self, layout: Layout) -> Pipeline:
        """The same pipeline under another layout ("exact" or "shared-first")."""
        return Pipeline(self.agents, self.documents, self.system, layout, self.sampling, self.chat, self.name)

    def system_of(self, agent: Agent) -> str | None:
        """The system prompt the agent's snapshot is prefilled with under this layout."""
        if agent.role is not None and self.layout == "exact":
            return agent.role
        return self.system

    def run(self, engine: Engine, *, share: bool = True, **options: Any) -> PipelineResult:
        """Run on `engine`; share=False prefills every agent from scratch, one at a time (reference)."""
        from kvfork.pipeline.runner import Runner

        return Runner(engine, self, share=share, **options).run()

    def plan(self, engine: Engine) -> Plan:
        """The layout planner's report: common prefix, shareable fraction, what an opt-in would save."""
        from kvfork.pipeline.planner import plan

        return plan(engine, self)

    @staticmethod
    def of(document: str, agents: Sequence[Agent], **kwargs: Any) -> Pipeline:
        """Shorthand for a pipeline over a single document named "document"."""
        return Pipeline(tuple(agents), {"document": document}, **kwargs)
