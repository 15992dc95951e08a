"""Planner: where each request's prompt comes from (live prefix, shared prefill, fresh) and its choices' fate."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvfork.config import ServerConfig
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import KvforkError
from kvfork.runtime import warm
from kvfork.runtime.snapshot import Snapshot
from kvfork.scheduler.prefix_cache import PrefixHit, can_trim, common_prefix
from kvfork.scheduler.sequence import Sequence
from kvfork.server.choices import Choices
from kvfork.server.coalesce import coalesce
from kvfork.server.errors import APIError
from kvfork.server.job import Job
from kvfork.server.metrics import ServerMetrics
from kvfork.server.segments import ReusePlacer

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["Planner", "SnapshotInfo"]


@dataclass(frozen=True)
class SnapshotInfo:
    """A pinned prefix made with POST /v1/snapshots; `source` keeps its prompt or messages for reuse."""

    id: str
    n_tokens: int
    created: int
    source: dict = field(compare=False)


@dataclass
class _Waiter:
    """Work that waits for a prefix node to be prefilled."""

    jobs: list[Job]
    then: Callable[[Sequence], None]
    fail: Callable[[Exception], None]
    keep: bool = True  # the node becomes a live prefix afterwards (not a reuse-mode prompt: approximate)


class Planner:
    """The loop thread's bookkeeping: prefix nodes being prefilled, live prefixes, each choice's branch.

    A request's prompt becomes a node sequence (prefilled with max_tokens=0, forked from the longest
    live prefix), and each of its n choices is a branch forked from that node. Prompts that arrive
    together with a common prefix first share a node of just that prefix (coalescing).
    Contract: only the engine loop thread calls it, holding the engine lock.
    """

    def __init__(self, engine: Engine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.sched = engine.scheduler
        self.config = config
        self.metrics = metrics
        self.prefixes = engine.scheduler.prefixes  # NOTE: the one cache Engine.prefill and the Composer use too
        self.prefixes.min_shared = config.min_shared_tokens
        self.pinned: dict[str, Sequence] = {}  # snapshot id -> its node, locked in the cache
        self.snapshots: dict[str, SnapshotInfo] = {}
        self._waiters: dict[Sequence, list[_Waiter]] = {}
        self.choices = Choices(self.sched, metrics)
        self.reuse = ReusePlacer(self)
        self.choices.on_reply = self.reuse.keep_reply

    # -- placing work -------------------------------------------------------------------------------
    def plan(self, jobs: list[Job]) -> None:
        """Place new jobs; those sharing a prefix no live node covers get one shared prefill of it."""
        pending: list[tuple[Job, int]] = []
        for job in jobs:
            if self.choices.admit(job):
                continue  # cancelled before it started
            if job.reuse is not None and job.reuse.mode != "exact" and job.pieces is not None:
                self._guard([job], functools.partial(self.reuse.place, job))
                continue
            hit = self.prefixes.match(job.tokens)
            if not self._join_in_flight(job, hit.n if hit else 0):
                pending.append((job, hit.n if hit else 0))
        jobs, live = [j for j, _ in pending], [n for _, n in pending]
        for length, members in coalesce([j.tokens for j in jobs], live, self.config.min_shared_tokens):
            group = [jobs[i] for i in members]
            if length == 0:
                self._guard(group, functools.partial(self._place, group[0]))
            else:
                self._guard(group, functools.partial(self._share, group, length))

    def _join_in_flight(self, job: Job, live: int) -> bool:
        """Wait on a prefix being prefilled now if it covers more of `job` than any live one; True if joined.

        NOTE: so requests that arrive a step apart still share. A node not yet computed past the common
        prefix is cut back to it (the jobs waiting on it re-place themselves on top once it is done);
        one computed past it is forked from once done, where the sliding window allows.
        """
        best, best_n = None, max(live, self.config.min_shared_tokens - 1)
        for node, waiters in self._waiters.items():
            if not all(w.jobs and w.keep for w in waiters):
                continue  # a snapshot being made stays whole; a reuse-mode prompt is approximate
            n = common_prefix(node.tokens, job.tokens)
            if n > best_n and (node.n_in_kv <= n or can_trim(self.prefixes.n_swa, len(node.tokens), n)):
                best, best_n = node, n
        if best is None:
            return False
        if best.n_in_kv <= best_n < len(best.tokens):
            del best.tokens[best_n:]
        self._waiters[best].append(_Waiter([job], functools.partial(self._place_on, job),
                                           functools.partial(self.choices.fail, [job])))
        return True

    def _place_on(self, job: Job, node: Sequence) -> None:
        self._place(job, hint=node)

    def _share(self, group: list[Job], length: int) -> None:
        """Prefill the group's common prefix once; then each job places itself on top of it."""
        def shared_done(node: Sequence) -> None:
            group[0].computed += node.n_prompt_computed  # NOTE: the shared prefill is billed once
            for job in group:
                self._guard([job], functools.partial(self._place, job, hint=node))

        fail = functools.partial(self.choices.fail, group)
        self._prefill(group[0].tokens[:length], _Waiter(group, shared_done, fail))

    def snapshot(self, tokens: list[int], source: dict, done: Callable[[SnapshotInfo | Exception], None]) -> None:
        """Prefill `tokens` (forking what is live) and pin it under a new id; `done` gets the info or error."""
        def pin(node: Sequence) -> None:
            info = SnapshotInfo(f"snap-{uuid.uuid4().hex[:16]}", node.n_in_kv, int(time.time()), source)
            if node in self.prefixes:
                self.prefixes.lock(node)
            else:
                self.prefixes.insert(node, locked=True)
            self.pinned[info.id] = node
            self.snapshots[info.id] = info
            if self.engine.store is not None:
                seconds = (node.t_done or time.perf_counter()) - node.t_submit
                warm.remember(self.engine.store, Snapshot(self.engine, node, None, seconds))
            done(info)

        try:
            self._prefill(tokens, _Waiter([], pin, done), exact=True)
        except KvforkError as exc:
            done(exc)

    def drop_snapshot(self, snapshot_id: str) -> bool:
        node = self.pinned.pop(snapshot_id, None)
        self.snapshots.pop(snapshot_id, None)
        if node is not None:
            self.prefixes.unlock(node)  # NOTE: still a useful prefix; the cache frees it when room is needed
            self._keep(node)
        return node is not None

    def _guard(self, jobs: list[Job], fn: Callable[[], None]) -> None:
        try:
            fn()
        except (KvforkError, APIError) as exc:
            self.choices.fail(jobs, exc)

    def _place(self, job: Job, hint: Sequence | None = None) -> None:
        if job.cancelled:
            return
        hit = self.prefixes.match(job.tokens, extra=(hint,) if hint is not None else ())
        if hit is not None and hit.n == len(job.tokens):
            self.choices.fork(job, hit.node, hit.n)
            return

        def own_done(node: Sequence) -> None:
            job.computed += node.n_prompt_computed
            if len(node.tokens) == len(job.tokens):
                self.choices.fork(job, node, None)
            else:  # NOTE: a later request cut this node back to the prefix they share: build on top of it
                self._place(job, hint=node)

        self._prefill(job.tokens, _Waiter([job], own_done, lambda exc: self.choices.fail([job], exc)), hit=hit)

    def _prefill(self, tokens: list[int], waiter: _Waiter, hit: PrefixHit | None = None, exact: bool = False) -> None:
        """A node holding `tokens`: forked from the best live prefix, restored from the store, or prefilled
        (Scheduler.sequence_for decides)."""
        hit = hit or self.prefixes.match(tokens)
        if hit is not None and hit.n == len(tokens) == hit.node.n_in_kv and not exact:
            waiter.then(hit.node)
            return
        node = self.sched.sequence_for(list(tokens), hit)
        try:
            self.sched.submit(node, SamplingParams(max_tokens=0))
        except BaseException:
            self.sched.release(node)
            raise
        self._waiters[node] = [waiter]

    def prefill_then(self, tokens: list[int], job: Job, then: Callable[[Sequence], None]) -> None:
        """A node holding exactly `tokens` (live, or prefilled and billed to `job`), then `then(node)`."""
        hit = self.prefixes.match(tokens)
        if hit is not None and hit.n == len(tokens) == hit.node.n_in_kv:
            then(hit.node)
            return

        def computed(node: Sequence) -> None:
            job.computed += node.n_prompt_computed
            then(node)

        self._prefill(tokens, _Waiter([job], computed, functools.partial(self.choices.fail, [job])), hit=hit)

    def wait(self, seq: Sequence, job: Job, then: Callable[[Sequence], None], *, keep: bool) -> None:
        """Call `then(seq)` once the submitted `seq` is prefilled; its failure fails `job`."""
        self._waiters[seq] = [_Waiter([job], then, functools.partial(self.choices.fail, [job]), keep)]

    def _keep(self, node: Sequence) -> None:
        """Keep a prefilled node in the prefix cache for later prompts, within `live_prefixes` of them."""
        if node not in self.prefixes:
            self.prefixes.insert(node)
        self.sched.evict_until(lambda: len(self.prefixes) <= self.config.live_prefixes, frees_cells=False)
        self.metrics.live_prefixes.set(len(self.prefixes))

    # -- after each step ----------------------------------------------------------------------------
    def make_room(self) -> None:
        """Evict idle live prefixes while the next waiting sequence does not fit; fail it if nothing can run."""
        waiting, table = self.sched.waiting, self.sched.table
        if waiting:
            self.sched.evict_until(lambda: table.can_allocate(waiting[0]))
        # NOTE: fail the sequences that cannot start while nothing runs that could free room, one after
        # another (not just the first), so the step never finds nothing to run.
        while waiting and not self.sched.running and not any(table.can_allocate(s) for s in waiting):
            seq = waiting[0]
            self._fail_seq(seq, APIError(503, "no room in the KV cache for this request now (snapshots or other"
                                              " requests hold it); retry", code="cache_full"))
            if waiting and waiting[0] is seq:  # NOTE: nobody owned it: drop it all the same
                self.sched.cancel(seq)
                self.sched.release(seq)
        self.metrics.live_prefixes.set(len(self.prefixes))

    def after_step(self, finished: list[Sequence]) -> None:
        """Send new text to every job, end finished choices, hand prefilled nodes to their waiters."""
        self.choices.emit_all(finished)
        for seq in finished:
            if seq in self._waiters:
                self._node_done(seq)

    def _node_done(self, node: Sequence) -> None:
        waiters = self._waiters.pop(node)
        if node.error is not None or node.finish_reason not in ("prefilled", None):
            self.sched.release(node)
            for w in waiters:
                w.fail(node.error or KvforkError("the prefill was cancelled"))
            return
        for w in waiters:
            if w.jobs and all(j.cancelled for j in w.jobs):
                if not w.keep:  # NOTE: a reuse-mode prompt its client left: nobody else may use it
                    self.sched.release(node)
                continue
            try:
                w.then(node)
            except (KvforkError, APIError) as exc:
                w.fail(exc)
        if node not in self.pinned.values() and all(w.keep for w in waiters):
            self._keep(node)  # NOTE: after the forks, so a full LRU cannot free it under them

    # -- failures -----------------------------------------------------------------------------------
    def fail_all(self, exc: Exception) -> None:
        """Fail every job and drop every prefill in flight (a step broke, or the server stops)."""
        for node, waiters in list(self._waiters.items()):
            self.sched.cancel(node)
            self.sched.release(node)
            for w in waiters:
                w.fail(exc)
        self._waiters.clear()
        self.choices.fail(list(self.choices.jobs), exc)

    def _fail_seq(self, seq: Sequence, exc: Exception) -> None:
        if self.choices.owns(seq):
            self.choices.fail([self.choices.job_of(seq)], exc)
        elif seq in self._waiters:
            self.sched.cancel(seq)
            self.sched.release(seq)
            for w in self._waiters.pop(seq):
                w.fail(exc)

