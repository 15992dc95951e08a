"""Dispatcher: where each request's prompt comes from (live prefix, shared prefill, fresh) and its choices' fate."""

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
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.prefix_cache import PrefixHit, in_flight
from kvfork.server.choices import Choices
from kvfork.server.errors import APIError, cache_full
from kvfork.server.job import Job
from kvfork.server.metrics import ServerMetrics
from kvfork.server.segments import ReusePlacer

# NOTE: with a shared snapshot tier, a prefix this server computed at least this much of is written there
# as soon as it is prefilled (not only when evicted), so a replica given the same prefix moments later
# restores it (~2% of a prefill) instead of computing it again: prefill once per cluster (issue 20).
PUBLISH_MIN_TOKENS = 512
# NOTE: the fewest idle prefixes kept by default (ServerConfig.live_prefixes None): issue 21's closed loops
# (3 stages per session) reused 84% of prompt tokens at 8 sessions with 16 kept, 87% at 32 with 48
DEFAULT_LIVE_PREFIXES = 48

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["Dispatcher", "SnapshotInfo"]


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
    then: Callable[[KvSequence], None]
    fail: Callable[[Exception], None]
    keep: bool = True  # the node is a prefix others may fork, even in flight (not a reuse-mode prompt: approximate)


class Dispatcher:
    """The loop thread's bookkeeping: prefix nodes being prefilled, live prefixes, each choice's branch.

    A request's prompt becomes a node sequence (prefilled with max_tokens=0, forked from the best prefix
    in the scheduler's prefix cache), and each of its n choices is a branch forked from that node. A node
    enters the cache as it is submitted, so prompts that arrive together, or while it is prefilled, fork
    it where they part and compute the prefix they share once (Scheduler.fork of a prompt in flight).
    Contract: only the engine loop thread calls it, holding the engine lock.
    """

    def __init__(self, engine: Engine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.sched = engine.scheduler
        self.config = config
        self.metrics = metrics
        self.prefixes = engine.scheduler.prefixes  # NOTE: the one cache Engine.prefill and the Composer use too
        self.prefixes.min_shared = config.min_shared_tokens
        self.pinned: dict[str, KvSequence] = {}  # snapshot id -> its node, locked in the cache
        self.snapshots: dict[str, SnapshotInfo] = {}
        self._waiters: dict[KvSequence, _Waiter] = {}  # node being prefilled -> what to do with it
        self.choices = Choices(self.sched, metrics)
        self.reuse = ReusePlacer(self)
        self.choices.on_reply = self.reuse.keep_reply

    # -- placing work -------------------------------------------------------------------------------
    def plan(self, jobs: list[Job]) -> None:
        """Place new jobs. NOTE: each prompt enters the prefix cache as it is submitted, so jobs that
        arrive together (or while it is prefilled) fork it at the prefix they share: computed once."""
        for job in jobs:
            if self.choices.admit(job):
                continue  # cancelled before it started
            if job.composed:
                self.guard([job], functools.partial(self.reuse.place, job))
            else:
                self.guard([job], functools.partial(self._place, job))

    def snapshot(self, tokens: list[int], source: dict, done: Callable[[SnapshotInfo | Exception], None]) -> None:
        """Prefill `tokens` (forking what is live) and pin it under a new id; `done` gets the info or error."""
        def pin(node: KvSequence) -> None:
            info = SnapshotInfo(f"snap-{uuid.uuid4().hex[:16]}", node.n_in_kv, int(time.time()), source)
            self.prefixes.pin(node)
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
            self.trim_live()
        return node is not None

    def guard(self, jobs: list[Job], fn: Callable[[], None]) -> None:
        """Run `fn`; a KvforkError or APIError it raises fails `jobs` (the others go on)."""
        try:
            fn()
        except (KvforkError, APIError) as exc:
            self.choices.fail(jobs, exc)

    def _place(self, job: Job) -> None:
        """The job's choices fork its prompt: a prefix it matches whole (in flight too), or its own node."""
        if job.cancelled:
            return
        # NOTE: a decoder that computes its prompt's last tokens itself (Adapter.own_tokens > 1) would
        # recompute what a base node of the whole prompt holds: its node stops where the decoder starts
        cut = len(job.tokens)
        if job.adapter is not None and job.adapter.own_tokens > 1:
            cut = job.adapter.first_own(cut, True) or cut  # NOTE: 0: it computes the whole prompt itself
        head, tail = job.tokens[:cut], job.tokens[cut:]
        hit = self.prefixes.match(head)
        if hit is not None and hit.n == cut:
            self.choices.fork(job, hit.node, hit.n, append=tail)
            return
        self.prefill_then(head, job, lambda node: self.choices.fork(job, node, None, append=tail), hit=hit)

    def _prefill(self, tokens: list[int], waiter: _Waiter, hit: PrefixHit | None = None, exact: bool = False) -> None:
        """A node holding `tokens`: an idle prefix holding exactly them, or a new one forked from the best
        prefix (one in flight too), restored from the store, or prefilled (Scheduler.sequence_for decides).
        exact=True: always a new node (a pinned snapshot stays whole)."""
        hit = hit or self.prefixes.match(tokens)
        if not exact and hit is not None and hit.n == len(tokens) == hit.node.n_in_kv and not in_flight(hit.node):
            waiter.then(hit.node)
            return
        node = self.sched.sequence_for(list(tokens), hit)
        try:
            self.sched.submit(node, SamplingParams(max_tokens=0), share=waiter.keep)
        except BaseException:
            self.sched.release(node)
            raise
        self._waiters[node] = waiter

    def prefill_then(self, tokens: list[int], job: Job, then: Callable[[KvSequence], None],
                     hit: PrefixHit | None = None) -> None:
        """A node holding exactly `tokens` (live, or prefilled and billed to `job`), then `then(node)`."""
        def computed(node: KvSequence) -> None:
            job.computed += node.n_prompt_computed
            then(node)

        self._prefill(tokens, _Waiter([job], computed, functools.partial(self.choices.fail, [job])), hit=hit)

    def wait(self, seq: KvSequence, job: Job, then: Callable[[KvSequence], None], *, keep: bool) -> None:
        """Call `then(seq)` once the submitted `seq` is prefilled; its failure fails `job`."""
        self._waiters[seq] = _Waiter([job], then, functools.partial(self.choices.fail, [job]), keep)

    @property
    def live_cap(self) -> int:
        """`live_prefixes`, or by default the sequence ids max_running leaves, and at least 48 (what
        requests need of ids or cells is evicted for them anyway: the cap only bounds what stays)."""
        if self.config.live_prefixes is not None:
            return self.config.live_prefixes
        return max(DEFAULT_LIVE_PREFIXES, self.engine.config.n_seq_max - self.engine.config.max_running)

    def trim_live(self) -> None:
        """Keep at most `live_cap` idle prefixes of the cache's own (prompts in flight are not idle)."""
        cap = self.live_cap
        self.sched.evict_until(lambda: len(self.prefixes) <= cap, frees_cells=False)
        self.metrics.live_prefixes.set(len(self.prefixes))

    @property
    def composing(self) -> bool:
        """Whether a reuse-mode prompt is being prefilled now (safe to read from another thread: retried)."""
        for _ in range(10):
            try:
                return any(not w.keep for w in list(self._waiters.values()))
            except RuntimeError:  # NOTE: the loop thread changed the dict meanwhile
                continue
        return False

    # -- after each step ----------------------------------------------------------------------------
    def make_room(self) -> None:
        """Park idle prefixes in the store while work runs (Scheduler.park_idle); evict idle live prefixes while
        the next waiting sequence does not fit; fail it if nothing can run."""
        waiting, table = self.sched.waiting, self.sched.table
        # NOTE: with a store, idle prefixes wait in host RAM, not in every step's attention
        self.metrics.parked_prefixes.inc(self.sched.park_idle())
        # NOTE: beyond max_running a sequence waits for a place, not for room: evict nothing for it
        if waiting and self.sched.places() > 0:
            self.sched.evict_until(lambda: table.can_allocate(waiting[0]))
        # NOTE: fail the sequences that cannot start while nothing runs that could free room, one after
        # another (not just the first), so the step never finds nothing to run.
        while waiting and not self.sched.running and not any(table.can_allocate(s) for s in waiting):
            seq = waiting[0]
            self._fail_seq(seq, cache_full())
            if waiting and waiting[0] is seq:  # NOTE: nobody owned it: drop it all the same
                self.sched.cancel(seq)
                self.sched.release(seq)
        self.metrics.live_prefixes.set(len(self.prefixes))

    def after_step(self, finished: list[KvSequence]) -> None:
        """Send new text to every job, end finished choices, hand prefilled nodes to their waiters."""
        self.choices.emit_all(finished)  # NOTE: finished choices stay in the prefix cache (Choices._keeps)
        done = [seq for seq in finished if seq in self._waiters]
        for seq in done:
            self._node_done(seq)
        if finished:
            self.trim_live()  # NOTE: after every waiter forked, so the cap cannot free a node under them

    def _node_done(self, node: KvSequence) -> None:
        w = self._waiters.pop(node)
        if node.error is not None or node.finish_reason not in ("prefilled", None):
            self.sched.release(node)
            w.fail(node.error or KvforkError("the prefill was cancelled"))
        elif w.jobs and all(j.cancelled for j in w.jobs):
            if not w.keep:  # NOTE: a reuse-mode prompt its client left: nobody else may use it
                self.sched.release(node)
        else:
            if w.keep:
                self._publish(node)
            try:
                w.then(node)
            except (KvforkError, APIError) as exc:
                w.fail(exc)

    def _publish(self, node: KvSequence) -> None:
        store, lower = self.engine.store, self.prefixes.lower
        if store is None or store.shared is None or lower is None or node.n_prompt_computed < PUBLISH_MIN_TOKENS:
            return
        lower.demote(node)  # NOTE: a copy into the store (the node stays live); the shared write is write-behind

    # -- failures -----------------------------------------------------------------------------------
    def fail_all(self, exc: Exception) -> None:
        """Fail every job and drop every prefill in flight (a step broke, or the server stops)."""
        for node, w in list(self._waiters.items()):
            self.sched.cancel(node)
            self.sched.release(node)
            w.fail(exc)
        self._waiters.clear()
        self.choices.fail(list(self.choices.jobs), exc)

    def _fail_seq(self, seq: KvSequence, exc: Exception) -> None:
        if self.choices.owns(seq):
            self.choices.fail([self.choices.job_of(seq)], exc)
        elif seq in self._waiters:
            self.sched.cancel(seq)
            self.sched.release(seq)
            self._waiters.pop(seq).fail(exc)

