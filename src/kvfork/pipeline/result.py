"""AgentResult and PipelineResult: what each agent said, what failed or was skipped, what sharing saved;
ToolRound and ToolUse: the tool calls of agents with tools."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from kvfork.result import Completion
from kvfork.reuse.report import ReuseReport

__all__ = ["AgentResult", "PipelineResult", "ToolRound", "ToolUse"]

Status = Literal["ok", "failed", "skipped"]
ToolProblem = Literal["unknown_tool", "malformed", "bad_arguments", "raised"]


@dataclass(frozen=True)
class ToolUse:
    """One call an agent made and what was sent back.

    error: None when the function ran and returned; "unknown_tool" (no tool of that name), "malformed"
    (the call could not be read: `arguments` holds its raw text), "bad_arguments" (they do not fit the
    function's parameters) or "raised" (the function raised: `result` says what). The agent reads
    `result` and goes on in every case.
    """

    id: str
    name: str
    arguments: str  # JSON text of the arguments object
    result: str
    error: ToolProblem | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ToolRound:
    """One reply with tool calls, the calls run, and what went back to the agent's branch.

    The next generation (the next round's `reply`, or the turn's final completion) computes
    appended_tokens + recomputed_tokens and reuses the rest of its branch's KV.
    """

    reply: Completion  # the generation that made the calls (its prompt: reused vs computed tokens)
    calls: tuple[ToolUse, ...]
    appended_text: str  # the reply's turn end, the tool results as the chat template lays them out, the next header
    appended_tokens: int
    recomputed_tokens: int = 0  # branch tokens computed again: the template re-rendered earlier text differently


@dataclass(frozen=True)
class AgentResult:
    """One agent's outcome.

    Prefill accounting over all its turns: prompt_tokens = reused_tokens + computed_tokens.
    shared_tokens are the reused tokens that came from a snapshot other agents share (the rest of
    reused_tokens are its own earlier turns, kept in its branch). computed_tokens include the
    agent's own snapshot prefill when it shares it with nobody. saved_s = shared_tokens at the
    snapshots' measured prefill rate.
    """

    name: str
    status: Status
    completions: tuple[Completion, ...] = ()
    prompt_tokens: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    shared_tokens: int = 0
    saved_s: float = 0.0
    error: str | None = None  # why it failed or was skipped
    tool_rounds: tuple[ToolRound, ...] = ()  # agents with tools: every reply that called tools, in order

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str:
        """The last reply ("" unless ok)."""
        return self.completions[-1].text if self.completions else ""

    @property
    def replies(self) -> tuple[str, ...]:
        return tuple(c.text for c in self.completions)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Every generated token of every turn, in order."""
        return tuple(t for c in self.completions for t in c.tokens)

    @property
    def completion_tokens(self) -> int:
        """Generated tokens of every turn and every tool round."""
        return sum(c.completion_tokens for c in self.completions) + sum(
            r.reply.completion_tokens for r in self.tool_rounds)

    @property
    def tool_calls(self) -> tuple[ToolUse, ...]:
        """Every tool call of every round, in order."""
        return tuple(u for r in self.tool_rounds for u in r.calls)

    @property
    def tool_problems(self) -> dict[str, int]:
        """How many calls went wrong, by kind (see ToolUse.error); empty when none did."""
        out: dict[str, int] = {}
        for use in self.tool_calls:
            if use.error is not None:
                out[use.error] = out.get(use.error, 0) + 1
        return out


@dataclass(frozen=True)
class PipelineResult:
    """Every agent's result, and the pipeline's prefill bill with and without sharing.

    computed_tokens = shared_prefill_tokens (each shared snapshot, prefilled once) + the agents'
    own computed tokens. unshared_tokens is what the same turns cost when every agent prefills its
    whole prompt itself (share=False). saved_s prices the difference at the measured prefill rate.
    """

    name: str
    agents: Mapping[str, AgentResult]
    shared: bool
    wall_s: float
    shared_prefill_tokens: int
    computed_tokens: int
    unshared_tokens: int
    prefill_rate: float  # tokens/s measured on this run's snapshot prefills (0 if unknown)
    reuse: Mapping[str, ReuseReport] = field(default_factory=dict)  # per agent, under a reuse mode

    @property
    def reuse_rate(self) -> float:
        """Share of the reuse-mode snapshots' tokens that were placed or forked rather than computed."""
        reports = {id(r): r for r in self.reuse.values()}.values()
        total = sum(r.prompt_tokens for r in reports)
        return sum(r.prompt_tokens - r.computed_tokens for r in reports) / total if total else 0.0

    def __getitem__(self, name: str) -> AgentResult:
        return self.agents[name]

    def __iter__(self) -> Iterator[AgentResult]:
        return iter(self.agents.values())

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.agents.values())

    @property
    def saved_tokens(self) -> int:
        return self.unshared_tokens - self.computed_tokens

    @property
    def saved_s(self) -> float:
        return self.saved_tokens / self.prefill_rate if self.prefill_rate > 0 else 0.0

    def summary(self) -> str:
        """A few lines on what sharing saved, for printing."""
        n_ok = sum(a.ok for a in self.agents.values())
        lines = [
            f"pipeline {self.name}: {n_ok}/{len(self.agents)} agents ok in {self.wall_s:.1f} s"
            f" ({'shared snapshots' if self.shared else 'no sharing'})",
            f"prefill tokens computed: {self.computed_tokens:,} (shared snapshots {self.shared_prefill_tokens:,});"
            f" without sharing: {self.unshared_tokens:,}",
        ]
        if self.prefill_rate > 0:
            lines.append(
                f"saved: {self.saved_tokens:,} prefill tokens = {self.saved_s:.1f} s"
                f" at the measured {self.prefill_rate:.0f} tok/s"
            )
        if self.reuse:
            modes = sorted({r.mode for r in self.reuse.values()})
            lines.append(f"reuse ({', '.join(modes)}): {100 * self.reuse_rate:.0f}% of the snapshots' tokens were not"
                         " computed (placed segments are approximate: see docs/reuse.md)")
        for a in self.agents.values():
            what = f"{a.completion_tokens} tokens, reused {a.reused_tokens:,} / computed {a.computed_tokens:,}"
            lines.append(f"  {a.name:16s} {a.status:8s} {what}" + (f"  [{a.error}]" if a.error else ""))
        return "\n".join(lines)
