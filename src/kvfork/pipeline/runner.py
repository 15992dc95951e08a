"""Runner: executes a pipeline level by level, every ready agent's turn in one batched fan-out."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import KvforkError, ToolRoundsExceeded
from kvfork.pipeline.accounting import SnapshotUse, settle
from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import Pipeline
from kvfork.pipeline.result import PipelineResult, ToolRound
from kvfork.pipeline.reusing import PipelineReuse
from kvfork.pipeline.tool_session import ToolSession, tool_format
from kvfork.pipeline.turns import first_turn, next_turn
from kvfork.result import Completion
from kvfork.reuse.composer import Part
from kvfork.reuse.config import ReuseConfig
from kvfork.runtime import Engine
from kvfork.runtime.branch import Branch
from kvfork.runtime.snapshot import Snapshot
from kvfork.toolcalls import ToolFormat

__all__ = ["Runner"]

Key = tuple[str | None, str | None, str | None]  # (document name, system prompt, tool definitions): a snapshot each
Slot = tuple[str | None, ...]  # a Key, or ("private", agent name) when nothing is shared


@dataclass(eq=False)
class _AgentRun:
    """Mutable state of one agent during a run."""

    agent: Agent
    key: Key
    params: SamplingParams | None = None
    branch: Branch | None = None
    completions: list[Completion] = field(default_factory=list)
    use: SnapshotUse | None = None  # the snapshot it forked from
    error: str | None = None
    skipped: bool = False
    turn_sent: bool = False  # this turn's text is in the branch already (a composed first turn, or queued again)
    session: ToolSession | None = None  # an agent with tools: its conversation and tool rounds
    origin: Snapshot | None = None  # the snapshot its branch forks from again if a template re-renders
    owns_origin: bool = False  # a private (share=False) snapshot kept for that, closed with the agent

    @property
    def replies(self) -> tuple[str, ...]:
        return tuple(c.text for c in self.completions)

    @property
    def tool_rounds(self) -> tuple[ToolRound, ...]:
        return tuple(self.session.rounds) if self.session is not None else ()


class Runner:
    """Runs one pipeline on one engine.

    share=True: one snapshot per (document, system prompt), prefilled once; each level's ready
    agents fork it, send only their own part (upstream outputs + instruction) and decode together
    in one batch per turn. share=False: the reference: every agent prefills its whole prompt itself
    (the same tokens) and runs alone, one after another.

    Agents with tools fork a snapshot whose prefix holds their tool definitions (agents with the same
    tools share it). While a reply calls tools, the runner runs the Python functions, appends the
    results to the same branch (ToolSession: only the template's new tokens are computed) and
    generates again, every asking agent of the batch together; the rounds land in AgentResult.tool_rounds.

    NOTE: Engine.prefill also takes prefixes from the engine's SnapshotStore and from snapshots the
    caller still holds open in the same context (the live tier), in both modes; for a share=False
    reference use an engine without a store and without open snapshots of the same text. The bill
    counts every snapshot as fully computed, so savings from those tiers are not claimed here.
    """

    def __init__(self, engine: Engine, pipeline: Pipeline, *, share: bool = True,
                 reuse: ReuseConfig | str | None = None) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.share = share
        # NOTE: reuse (opt-in, approximate) places a document's KV under system prompts other than the
        # one it was first computed after (agents with their own role); see kvfork.reuse.
        self.reuse = PipelineReuse(engine, pipeline, ReuseConfig.of(reuse)) if share else None
        self._runs: dict[str, _AgentRun] = {}
        self._snapshots: dict[Slot, Snapshot] = {}
        self._uses: dict[Slot, SnapshotUse] = {}
        self._users_left: dict[Key, int] = {}
        self._broken: dict[Slot, KvforkError] = {}
        self._tool_format: ToolFormat | None = None

    def run(self) -> PipelineResult:
        """Run every level; failures stay with their agent, downstream agents are skipped."""
        graph = self.pipeline.graph  # NOTE: raises PipelineError before anything runs
        t0 = time.perf_counter()
        self._tool_format = tool_format(self.engine, self.pipeline, self.reuse is not None and self.reuse.active)
        for agent in self.pipeline.agents:
            # NOTE: the definitions as written (not sorted): a template may lay them out in their own order
            tools = agent.tool_definitions
            key = (agent.document(self.pipeline.documents), self.pipeline.system_of(agent),
                   json.dumps(tools) if tools else None)
            self._runs[agent.name] = _AgentRun(agent, key)
            self._users_left[key] = self._users_left.get(key, 0) + 1
        try:
            for level in graph.levels:
                ready = []
                for name in level:
                    run = self._runs[name]
                    blocked = [u for u in graph.inputs[name] if self._runs[u].error is not None]
                    if blocked:
                        run.skipped = True
                        run.error = f"skipped: input {blocked[0]!r} did not finish ({self._runs[blocked[0]].error})"
                        self._done(run)
                    else:
                        ready.append(run)
                self._run_level(ready)
        finally:
            for run in self._runs.values():
                if run.branch is not None:
                    run.branch.close()
                if run.owns_origin and run.origin is not None:
                    run.origin.close()
            for snapshot in self._snapshots.values():
                snapshot.close()
        wall = time.perf_counter() - t0
        result = settle(self.pipeline, list(self._runs.values()), list(self._uses.values()), self.share, wall)
        if self.reuse is not None and self.reuse.reports:
            result = dataclasses.replace(result, reuse=dict(self.reuse.reports))
        return result

    # -- one level -------------------------------------------------------------------------------
    def _run_level(self, ready: list[_AgentRun]) -> None:
        for run in ready:
            try:
                run.params = run.agent.params(self.pipeline.sampling)
            except KvforkError as exc:
                self._fail(run, exc)
        for turn in range(1, max((r.agent.turns for r in ready), default=0) + 1):
            active = [r for r in ready if r.error is None and r.agent.turns >= turn]
            items = [(r, self._turn_text(r, turn, ready)) for r in active]
            if self.share:
                order: dict[Key, int] = {}
                for run in active:
                    order.setdefault(run.key, len(order))
                items.sort(key=lambda item: order[item[0].key])  # NOTE: stable: one snapshot's readers together
                batches = self._batches(items)
            else:
                batches = ([item] for item in items)
            for batch in batches:
                self._generate([item for item in batch if self._fork(item[0])])
                self._tool_rounds([run for run, _ in batch])
                for run, _ in batch:
                    if run.error is None and run.agent.turns == turn:
                        self._done(run)

    def _batches(self, items: list[tuple[_AgentRun, str]]) -> Iterator[list[tuple[_AgentRun, str]]]:
        """Cut one turn into batches that fit the free sequence ids (snapshots and branches hold one each).

        NOTE: computed lazily: the previous batch's finished branches and unneeded snapshots are freed
        before the next batch is cut, so e.g. many map-reduce chunks run a few snapshots at a time.
        """
        while items:
            free = self.engine.config.n_seq_max - len(self._snapshots)
            free -= sum(r.branch is not None for r in self._runs.values())
            batch: list[tuple[_AgentRun, str]] = []
            opening: set[Key] = set()
            for run, text in items:
                opens = run.branch is None and run.key not in self._snapshots and run.key not in opening
                cost = 0 if run.branch is not None else 1 + opens
                if batch and cost > free:
                    break
                batch.append((run, text))
                free -= cost
                if opens:
                    opening.add(run.key)
            items = items[len(batch):]
            yield batch

    def _turn_text(self, run: _AgentRun, turn: int, ready: list[_AgentRun]) -> str:
        if turn == 1:
            ups = run.agent.upstream(self.pipeline.documents)
            return first_turn(self.pipeline, run.agent, {u: self._runs[u].replies for u in ups})
        # NOTE: a peer may already have taken this turn (share=False runs one agent at a time): read turn-1.
        replies = {r.agent.name: r.completions[turn - 2].text for r in ready if len(r.completions) >= turn - 1}
        return next_turn(self.pipeline, run.agent, replies)

    def _generate(self, items: list[tuple[_AgentRun, str]], *, tool_round: bool = False) -> None:
        """One batched turn for `items`; a submission error is narrowed down to the agent(s) causing it.

        tool_round: the branches hold their tool results already (send_tokens); `items`' text is unused.
        """
        if not items:
            return
        before = [len(r.branch.tokens) for r, _ in items]  # type: ignore[union-attr]
        # NOTE: a composed first turn is in the branch's prompt already: nothing to send.
        branches = [r.branch if r.turn_sent or tool_round else r.branch.send(text)  # type: ignore[union-attr]
                    for r, text in items]
        for r, _ in items:
            r.turn_sent = False
        params = [r.session.params(r.params) if r.session is not None else r.params for r, _ in items]  # type: ignore[arg-type]
        try:
            completions = self.engine.generate_branches(branches, params)  # type: ignore[arg-type]
        except KvforkError as exc:
            # NOTE: generate_branches rolls every branch back when a submission fails, before anything
            # runs; then the batch is safe to split and retry, so one bad agent cannot sink the rest.
            rolled_back = all(len(b.tokens) == n for b, n in zip(branches, before, strict=True))  # type: ignore[union-attr]
            if len(items) == 1 or not rolled_back:
                for run, _ in items:
                    self._fail(run, exc)
                return
            for run, _ in items:
                run.turn_sent = True  # NOTE: the rollback queued their text again: not to be sent twice
            half = len(items) // 2
            self._generate(items[:half], tool_round=tool_round)
            self._generate(items[half:], tool_round=tool_round)
            return
        for (run, text), completion in zip(items, completions, strict=True):
            if run.session is not None and not tool_round:
                run.session.user(run.branch.layout, text)  # type: ignore[union-attr,arg-type]
            run.completions.append(completion)
            if completion.error is not None:
                self._fail(run, KvforkError(completion.error))

    # -- tools -----------------------------------------------------------------------------------
    def _tool_rounds(self, runs: list[_AgentRun]) -> None:
        """While replies call tools: run the calls, send the results back on the same branches (only the
        new tokens are computed), and generate again, every asking agent in one batch."""
        active = [r for r in runs if r.session is not None and r.error is None and r.branch is not None]
        while active:
            asking = []
            for run in active:
                try:
                    if self._tool_round(run):
                        asking.append(run)
                except KvforkError as exc:
                    self._fail(run, exc)
            self._generate([(r, "") for r in asking], tool_round=True)
            active = [r for r in asking if r.error is None]

    def _tool_round(self, run: _AgentRun) -> bool:
        """Run the last reply's calls and queue the results; False when it called nothing (the turn's answer)."""
        session = run.session
        read = session.calls(run.completions[-1])  # type: ignore[union-attr]
        if read is None:
            return False
        if session.turn_rounds >= run.agent.max_tool_rounds:  # type: ignore[union-attr]
            raise ToolRoundsExceeded(f"agent {run.agent.name!r} still called tools after max_tool_rounds="
                                     f"{run.agent.max_tool_rounds} rounds; raise it, or ask for an answer in the"
                                     " instruction")
        uses = session.run(*read)  # type: ignore[union-attr]
        follow = session.follow_up()  # type: ignore[union-attr]
        recomputed = 0
        if follow.refork:
            # NOTE: the branch is not a prefix of what the template renders: compute the agent's part again.
            recomputed = len(run.branch.tokens) - run.origin.n_tokens  # type: ignore[union-attr]
            run.branch.close()  # type: ignore[union-attr]
            run.branch = run.origin.fork(adapter=run.agent.adapter)  # type: ignore[union-attr]
        run.branch.send_tokens(follow.tokens)  # type: ignore[union-attr]
        session.rounds.append(ToolRound(run.completions.pop(), tuple(uses), follow.text,  # type: ignore[union-attr]
                                        len(follow.tokens), recomputed))
        return True

    # -- snapshots and branches --------------------------------------------------------------------
    def _fork(self, run: _AgentRun) -> bool:
        """Give `run` a branch (on its first turn); False if its snapshot could not be prefilled."""
        if run.branch is not None:
            return True
        slot: Slot = run.key if self.share else ("private", run.agent.name)
        if slot in self._broken:  # NOTE: one failed prefill (e.g. a document over n_ctx) fails all its readers
            self._fail(run, self._broken[slot])
            return False
        if self.reuse is not None and self.reuse.active:
            turn = self.reuse.first_turn(run.agent, run.key[1])
            if turn is not None:
                return self._fork_composed(run, turn)
        snapshot = self._snapshots.get(slot)
        if snapshot is None:
            doc_name, system, _ = run.key
            text = self.pipeline.documents[doc_name] if doc_name is not None else ""
            try:
                if self.reuse is not None and self.reuse.active and doc_name is not None:
                    snapshot = self.reuse.snapshot(doc_name, system, text, system or "")
                else:
                    snapshot = self.engine.prefill(text, system=system, chat=self.pipeline.chat,
                                                   tools=run.agent.tool_definitions)
            except KvforkError as exc:
                self._broken[slot] = exc
                self._fail(run, exc)
                return False
            self._snapshots[slot] = snapshot
            placed = snapshot.reuse.reused_tokens if snapshot.reuse is not None else 0
            self._uses[slot] = SnapshotUse(snapshot.n_tokens, snapshot.prefill_s, placed=placed)
        try:
            run.branch = snapshot.fork(adapter=run.agent.adapter)
        except KvforkError as exc:  # NOTE: an unknown adapter, or one that cannot read this snapshot
            self._fail(run, exc)
            return False
        if snapshot.reuse is not None and self.reuse is not None:
            self.reuse.reports[run.agent.name] = snapshot.reuse
        run.use = self._uses[slot]
        run.use.forks.append(run.agent.name)
        if run.key[2] is not None:
            run.session = ToolSession(self.engine, run.agent, self._tool_format,  # type: ignore[arg-type]
                                      self.pipeline.documents.get(run.key[0] or ""), run.key[1])
            run.origin, run.owns_origin = snapshot, not self.share
        if not self.share:
            # NOTE: a private snapshot's cells stay pinned by its one branch; its id is freed with it.
            private = self._snapshots.pop(slot)
            if not run.owns_origin:
                private.close()
        return True

    def _fork_composed(self, run: _AgentRun, turn: list[Part]) -> bool:
        """The agent's own snapshot: document, its first turn and upstream replies placed; then a branch."""
        doc_name, system, _ = run.key
        text = self.pipeline.documents[doc_name] if doc_name is not None else ""
        try:
            snapshot = self.reuse.snapshot(doc_name, system, text, run.agent.name, turn)  # type: ignore[union-attr]
        except KvforkError as exc:
            self._fail(run, exc)
            return False
        try:
            run.branch = snapshot.fork(adapter=run.agent.adapter)
        except KvforkError as exc:
            snapshot.close()
            self._fail(run, exc)
            return False
        run.turn_sent = True
        self.reuse.reports[run.agent.name] = snapshot.reuse  # type: ignore[union-attr,assignment]
        run.use = SnapshotUse(snapshot.n_tokens, snapshot.prefill_s, placed=snapshot.reuse.reused_tokens)  # type: ignore[union-attr]
        run.use.forks.append(run.agent.name)
        self._uses[("composed", run.agent.name)] = run.use
        snapshot.close()  # NOTE: the branch keeps its cells pinned; nobody else forks this one
        return True

    def _fail(self, run: _AgentRun, exc: BaseException) -> None:
        run.error = f"{type(exc).__name__}: {exc}"
        self._done(run)

    def _done(self, run: _AgentRun) -> None:
        """The agent will take no more turns: free its branch, and its snapshot once nobody needs it."""
        if self.reuse is not None and self.reuse.active and run.error is None and run.completions:
            self.reuse.keep_reply(run.agent, run.branch)
        if run.branch is not None:
            run.branch.close()
            run.branch = None
        if run.owns_origin and run.origin is not None:
            run.origin.close()
            run.origin = None
        self._users_left[run.key] -= 1
        if self.share and self._users_left[run.key] == 0 and run.key in self._snapshots:
            self._snapshots.pop(run.key).close()
