"""Accounting: turns a run's snapshots and completions into the prefill bill with and without sharing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvfork.pipeline.definition import Pipeline
from kvfork.pipeline.result import AgentResult, PipelineResult, Status
from kvfork.result import Completion

if TYPE_CHECKING:
    from kvfork.pipeline.runner import _AgentRun

__all__ = ["SnapshotUse", "settle"]


@dataclass(eq=False)
class SnapshotUse:
    """One snapshot prefilled during a run, and the agents that forked from it."""

    n_tokens: int
    prefill_s: float
    forks: list[str] = field(default_factory=list)
    placed: int = 0  # of n_tokens, placed from segments instead of computed (reuse modes)

    @property
    def shared(self) -> bool:
        return len(self.forks) >= 2


def settle(
    pipeline: Pipeline, runs: Sequence[_AgentRun], uses: Sequence[SnapshotUse], share: bool, wall_s: float
) -> PipelineResult:
    """Per-agent and pipeline-wide prefill figures.

    NOTE: a snapshot forked by one agent only is that agent's own prefill (computed, not reused);
    a snapshot forked by several is prefilled once and counted in shared_prefill_tokens.
    """
    timed = [u for u in uses if u.prefill_s > 0 and not u.placed]
    rate = sum(u.n_tokens for u in timed) / sum(u.prefill_s for u in timed) if timed else 0.0
    agents: dict[str, AgentResult] = {}
    unshared = 0
    for run in runs:
        generations = _generations(run)
        prompt = sum(c.prompt_tokens for c in generations)
        reused = sum(c.reused_tokens for c in generations)
        computed = sum(c.computed_tokens for c in generations)
        shared = placed = 0
        if run.use is not None and run.completions:
            if run.use.shared:
                shared = run.use.n_tokens
            else:
                placed = run.use.placed  # NOTE: placed tokens were not computed: they count as reused
                own = run.use.n_tokens - placed
                reused, computed = reused - own, computed + own
        unshared += shared + computed + placed
        status: Status = "skipped" if run.skipped else ("failed" if run.error is not None else "ok")
        agents[run.agent.name] = AgentResult(
            name=run.agent.name,
            status=status,
            completions=tuple(run.completions),
            prompt_tokens=prompt,
            reused_tokens=reused,
            computed_tokens=computed,
            shared_tokens=shared,
            saved_s=shared / rate if rate > 0 else 0.0,
            error=run.error,
            tool_rounds=run.tool_rounds,
        )
    turn_computed = sum(c.computed_tokens for run in runs for c in _generations(run))
    return PipelineResult(
        name=pipeline.name,
        agents=agents,
        shared=share,
        wall_s=wall_s,
        shared_prefill_tokens=sum(u.n_tokens for u in uses if u.shared),
        computed_tokens=sum(u.n_tokens - u.placed for u in uses) + turn_computed,
        unshared_tokens=unshared,
        prefill_rate=rate,
    )


def _generations(run: _AgentRun) -> list[Completion]:
    """Every generation of an agent: its turns' final replies and its tool rounds' replies."""
    return [*run.completions, *(r.reply for r in run.tool_rounds)]
