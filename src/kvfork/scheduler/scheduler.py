"""Scheduler: owns the queues; each step batches every running sequence's next tokens into one decode."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq

from kvfork.config import EngineConfig
from kvfork.engine.adapters import Adapter
from kvfork.engine.backend import Backend, TokenSampler
from kvfork.engine.logprobs import token_logprob
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import ContextOverflow, KvforkError, SnapshotMismatch
from kvfork.scheduler.branches import BranchTable
from kvfork.scheduler.decode import Decode, Outcome, Row, Sampled
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus
from kvfork.scheduler.prefix_cache import MIN_SHARED, PrefixCache, PrefixHit, in_flight

__all__ = ["Scheduler"]


class Scheduler:
    """schedule -> run (one llama_decode per adapter set over all running sequences, then sample) -> postprocess.

    Contract: one thread drives it (the engine holds a lock around every call). Sequences enter with
    `submit`, wait until the BranchTable has an id and cells for them and one of max_running places is
    free, run until their pending tokens are in the cache and their turn is finished, then go back to
    IDLE (keeping their cells) until `release`. Sequences that are decoding get one token each per step
    before any prefill chunk is added, so a long prefill never starves them; the rest of the n_batch
    budget goes to prefills.
    """

    def __init__(self, backend: Backend, config: EngineConfig) -> None:
        self.backend = backend
        self.n_batch = config.n_batch
        self.exact = config.exact
        self.max_running = config.max_running
        self.table = BranchTable(backend, config.n_seq_max)
        # what new prompts may share
        self.prefixes = PrefixCache(backend.n_swa, exact=config.exact, invariant=backend.invariant)
        self.waiting: deque[KvSequence] = deque()
        self.running: list[KvSequence] = []
        self._samplers: dict[KvSequence, TokenSampler] = {}
        self._active: Adapter | None = None  # the adapter set of the last decode

    # -- building sequences ----------------------------------------------------------------
    def fork(self, parent: KvSequence, n: int | None = None, *, adapter: Adapter | None = None) -> KvSequence:
        """A new sequence sharing `parent`'s first `n` cached tokens (default: all of them), decoded by
        `adapter` (None: the base model).

        Cells are tagged at admission. With n < parent.n_in_kv the child starts from the parent's
        first n tokens only; on sliding-window models the caller must check that the window still
        holds the positions the child needs (see prefix_cache.can_trim).
        A prompt in flight (prefix_cache.in_flight) can be forked at any of its tokens: the fork waits
        until the prompt's chunks reach that point (they stop there, see `schedule`), then is admitted.
        """
        if parent.status is SeqStatus.CLOSED or parent.released:
            raise SnapshotMismatch("cannot fork a released snapshot or branch")
        flying = in_flight(parent)
        if parent.status in (SeqStatus.WAITING, SeqStatus.RUNNING) and not flying:
            raise SnapshotMismatch("cannot fork a branch while it is generating")
        reach = len(parent.tokens) if flying else parent.n_in_kv
        if n is not None and not 0 < n <= reach:
            raise SnapshotMismatch(f"cannot fork at {n} tokens: the parent holds {reach} in the cache")
        if flying:
            n = reach if n is None else n
            child = KvSequence(tokens=list(parent.tokens[:n]), parent=parent, n_shared=n, n_in_kv=n)
        elif n is None or n == parent.n_in_kv:
            n = parent.n_in_kv
            # NOTE: tokens the parent has not put in the cache yet (a last sampled token) become the child's own.
            child = KvSequence(tokens=list(parent.tokens), parent=parent, n_shared=n, n_in_kv=n)
        else:
            child = KvSequence(tokens=list(parent.tokens[:n]), parent=parent, n_shared=n, n_in_kv=n)
        child.adapter = adapter
        parent.children.append(child)
        return child

    def sequence_for(self, tokens: list[int], hit: PrefixHit | None = None) -> KvSequence:
        """A new sequence for `tokens` that computes as little as the cache's tiers allow.

        A fork of the prefix cache's best match (zero-copy), or a restore from its lower tier where that
        covers at least twice as many tokens (and MIN_SHARED more), or a fresh sequence. Where the tier
        covers MIN_SHARED more but not twice as many, the fork gets the tier's cells after the match
        placed onto it (LowerTier.place_after). The tokens not covered are left pending: submit it to
        compute them.
        `hit`: a match the caller already made (the server matches with its own candidates too).
        NOTE: a restore copies every cell it brings back, a fork shares them: restoring a document the
        context holds, to save prefilling a question after it, would hold the document twice (measured
        with a plain "MIN_SHARED more" rule: the load test peaked at 7,907 of 8,192 cells and served 369
        requests in 5 minutes; 5,554 cells and 415 requests with this one).
        """
        hit = hit if hit is not None else self.prefixes.match(tokens)
        lower = self.prefixes.lower
        n_live = hit.n if hit is not None else 0
        n_low = lower.longest(tokens) if lower is not None else 0
        if lower is not None and n_low >= max(2 * n_live, n_live + MIN_SHARED):
            restored = lower.restore(tokens)
            if restored is not None:
                return restored
            if hit is not None and hit.node not in self.prefixes:  # NOTE: the restore's eviction took it
                hit = self.prefixes.match(tokens)
        if hit is None:
            return KvSequence(tokens=list(tokens))
        seq = self.fork(hit.node, hit.n)
        if lower is not None and n_low >= hit.n + MIN_SHARED and not in_flight(hit.node):
            # NOTE: the tier covers more, but less than twice the live match: fork what is live and copy
            # in only the stored cells after it (a session's own part after a shared system prompt)
            seq.tokens = list(tokens[: hit.n])
            # NOTE: exact mode leaves a fork at least min_suffix tokens to compute, as `match` does
            upto = len(tokens) - self.prefixes.min_suffix if self.prefixes.min_suffix else len(tokens)
            lower.place_after(seq, tokens[:upto])
        seq.tokens = list(tokens)
        return seq

    def adopt(self, tokens: list[int], state: bytes, keep: int | None = None) -> KvSequence:
        """A sequence whose cells come from a state blob (a restored snapshot) instead of a prefill.

        `state` must hold the cells of `tokens` (positions 0..len-1); `keep` trims it to its first
        `keep` tokens. Raises ContextOverflow when no sequence id or cells are free for it.
        """
        seq = KvSequence(tokens=list(tokens))
        # NOTE: idle prefix-cache entries make room, as they do for a prefill (a restore that found no room
        # fell back to prefilling all of it: measured on the third document a replica restored)
        self._evict_for(seq)
        self.allocate_now(seq, f"to restore {len(tokens):,} tokens")
        try:
            self.settle()
            self.backend.state_seq_set(seq.seq_id, state)  # type: ignore[arg-type]
            if keep is not None and keep < len(tokens):
                self.table.drop_cells(seq.seq_id, keep, -1)  # type: ignore[arg-type]
                del seq.tokens[keep:]
        except BaseException:
            self.table.release(seq)
            raise
        seq.n_in_kv = len(seq.tokens)
        return seq

    def allocate_now(self, seq: KvSequence, purpose: str) -> None:
        """Give `seq` its id and cells at once, outside the queue (cells are about to be written for it).

        Raises ContextOverflow, naming `purpose`, when no sequence id or cells are free for it.
        """
        self.table.check_fits(seq)
        if not self.table.can_allocate(seq):
            raise ContextOverflow(f"no free sequence id or KV cells {purpose}; close snapshots or branches,"
                                  " or raise n_ctx / n_seq_max")
        self.table.allocate(seq)

    def submit(self, seq: KvSequence, params: SamplingParams, *, append: Seq[int] = (), share: bool = False,
               one_shot: bool = False) -> None:
        """Queue `seq` to prefill its pending tokens (and `append`, a new turn's), then generate up to
        params.max_tokens.

        share=True (a prompt: max_tokens=0): it enters the prefix cache now, as an unlocked entry, so
        prompts submitted while it is prefilled fork it instead of computing its tokens again.
        one_shot=True: released as soon as this turn ends (fan-out branches).
        `withdraw` undoes a submit (a batch of which a later one failed).
        """
        if share and params.max_tokens:
            raise KvforkError("only a prompt (max_tokens=0) can be shared while it is prefilled")
        if seq.status in (SeqStatus.WAITING, SeqStatus.RUNNING):
            raise KvforkError("this branch is already generating")
        if seq.status is SeqStatus.CLOSED or seq.released:
            raise SnapshotMismatch("this branch was closed")
        seq.start_turn(params)
        seq.tokens.extend(int(t) for t in append)
        seq.one_shot = one_shot
        if params.max_tokens > 0 and seq.n_in_kv > 0:
            self._recompute_own(seq)
        try:
            self.table.check_fits(seq)
            if params.max_tokens > 0:
                self._prepare_sampler(seq)
        except BaseException:  # NOTE: leave the sequence as it was (the turn's tokens not added)
            del seq.tokens[max(seq.n_turn_start, seq.n_in_kv):]
            raise
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        if share and seq not in self.prefixes:
            self.prefixes.insert(seq)

    def withdraw(self, seq: KvSequence) -> None:
        """Undo `submit`: stop the turn and drop the tokens it appended (those not in the cache yet)."""
        self.cancel(seq)
        del seq.tokens[max(seq.n_turn_start, seq.n_in_kv):]

    def extend(self, seq: KvSequence, tokens: Seq[int]) -> None:
        """Append tokens for `seq`'s next submit to compute (or `place` after them). Not while it runs."""
        if seq.status in (SeqStatus.WAITING, SeqStatus.RUNNING) or seq in self.prefixes:
            raise KvforkError("cannot add tokens to a sequence that is generating or is a prefix cache entry")
        seq.tokens.extend(int(t) for t in tokens)

    def place(self, seq: KvSequence, tokens: Seq[int], state: bytes) -> None:
        """Append `tokens` with their cells given instead of computed: `state` is a sequence-state blob
        holding exactly their cells, at positions len(seq.tokens)...; seq has nothing pending.

        NOTE: the blob goes to a borrowed scratch id, then seq_cp tags its cells with seq's id. Idle
        prefix-cache entries make room for both, as they do for a prefill or a restore. Raises
        ContextOverflow (seq left as it was) when there is still no room or no free id.
        """
        if seq.n_pending or seq.status in (SeqStatus.WAITING, SeqStatus.RUNNING):
            raise KvforkError("place cells only after a sequence's pending tokens are computed")
        n0 = len(seq.tokens)
        seq.tokens.extend(int(t) for t in tokens)
        try:
            self._evict_for(seq)
            if seq.seq_id is None:  # NOTE: a fork not admitted yet (nothing computed since it was made)
                self.allocate_now(seq, "for placed cells")
            # NOTE: the scratch id: an entry forks share gives its id back too (its cells go to them)
            self.evict_until(lambda: self.table.n_free_ids > 0, frees_cells=False)
            if not self.table.can_allocate(seq) or self.table.n_free_ids < 1:
                raise ContextOverflow(f"no room for {len(tokens):,} more KV cells (or no free sequence id) in a"
                                      f" context of {self.backend.n_ctx:,}; close branches or raise n_ctx")
            scratch = self.table.borrow_id()
            try:
                self.settle()
                self.backend.state_seq_set(scratch, state)
                self.backend.seq_cp(scratch, seq.seq_id, -1, -1)  # type: ignore[arg-type]
            finally:
                self.table.return_id(scratch)
        except BaseException:
            del seq.tokens[n0:]
            raise
        seq.n_in_kv = len(seq.tokens)

    def release(self, seq: KvSequence) -> None:
        """Forget `seq`: leave the queues and the prefix cache, free its cells (its forks keep theirs)."""
        self.cancel(seq)
        self.prefixes.remove(seq)
        sampler = self._samplers.pop(seq, None)
        if sampler is not None:
            sampler.close()
        # NOTE: exact mode defers frees while turns run (see BranchTable.release); fast mode frees at once.
        self.table.release(seq, defer=self.exact and bool(self.running))

    def keep(self, seq: KvSequence) -> None:
        """A finished turn's sequence becomes one of the prefix cache's own entries instead of being released.

        A later prompt that continues its conversation (the reply sent back with the next message, as
        agent loops do) forks it there and computes only what is new. Its sampler is closed; the cache
        evicts it (least recently used) when room or its entry cap is needed.
        """
        if seq.status is not SeqStatus.IDLE:
            raise KvforkError("only a sequence whose turn has ended can be kept")
        sampler = self._samplers.pop(seq, None)
        if sampler is not None:
            sampler.close()
        self.prefixes.insert(seq)

    def cancel(self, seq: KvSequence) -> None:
        """Stop `seq`'s turn now; it keeps what is already in the cache and can take another turn."""
        if in_flight(seq):
            self.prefixes.remove(seq)  # NOTE: it will not hold the tokens it was indexed by
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.status in (SeqStatus.WAITING, SeqStatus.RUNNING):
            seq.status = SeqStatus.IDLE
            if seq.finish_reason is None:
                seq.finish("cancelled")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step: schedule -> run -> postprocess -------------------------------------------------
    def step(self) -> list[KvSequence]:
        """Run one decode over every running sequence; return the sequences whose turn ended."""
        decodes, idle = self.schedule()
        return self.postprocess([self.run(d) for d in decodes], idle)

    def schedule(self) -> tuple[list[Decode], list[KvSequence]]:
        """Admit what fits, then plan this step's decodes (one per adapter set, the active set first).

        Returns the decodes and the running sequences with nothing left to compute (their turn ends).
        Sequences that are decoding get their token before any prefill chunk takes the rest of n_batch.
        """
        self._admit()
        if self.waiting and not self.running:
            held = self.table.n_live
            raise KvforkError(
                f"nothing can run: the next branch needs a sequence id or KV cells that {held} open snapshots and"
                " branches hold; close branches you are done with, or raise n_seq_max / n_ctx"
            )
        groups: dict[Adapter | None, Decode] = {}
        budget = self.n_batch
        decoding = [s for s in self.running if s.n_pending == 1 and s.generated]
        prefilling = [s for s in self.running if s not in decoding]
        for seq in decoding + prefilling:
            adapter, run_end = seq.next_run()
            take = min(min(run_end, self._next_stop(seq)) - seq.n_in_kv, budget)
            if take <= 0:
                continue
            budget -= take
            completes = take == seq.n_pending
            sample_at = None
            decode = groups.setdefault(adapter, Decode(adapter))
            for i in range(seq.n_in_kv, seq.n_in_kv + take):
                last = completes and i == len(seq.tokens) - 1 and seq.wants_tokens
                index = decode.batch.add(seq.tokens[i], i, seq.seq_id, last)  # type: ignore[arg-type]
                if last:
                    sample_at = index
            decode.rows.append(Row(seq, take, sample_at))
        idle = [s for s in self.running if s.n_pending == 0]
        # NOTE: one llama_decode per adapter set (llama.cpp applies a set to the whole batch); the set
        # that is active already goes first, so a step switches sets only where it must.
        order = sorted(groups, key=lambda a: a is not self._active)
        return [groups[a] for a in order], idle

    def run(self, decode: Decode) -> Outcome:
        """One decode on the backend, then sample every row that asked for a token.

        NOTE: sampling happens here, not in postprocess: the logits of this decode are gone after the next one.
        """
        adapter = decode.adapter
        self.backend.set_adapters(() if adapter is None else ((adapter.lora, adapter.scale),))
        self._active = adapter
        try:
            self.settle()
            self.backend.decode(decode.batch)
        except KvforkError as exc:
            return Outcome(decode, error=exc)
        sampled: dict[KvSequence, Sampled] = {}
        for row in decode.rows:
            if row.sample_at is not None:
                seq = row.seq
                # NOTE: the raw logits are read before the sampler chain runs over them
                raw = self.backend.logits(row.sample_at) if seq.params.logprobs is not None else None
                token = self._samplers[seq].sample(row.sample_at)
                sampled[seq] = Sampled(token, raw, time.perf_counter())
        return Outcome(decode, sampled)

    def postprocess(self, outcomes: list[Outcome], idle: list[KvSequence]) -> list[KvSequence]:
        """Advance each sequence by what its decode computed, take its sampled token, end finished turns."""
        finished = list(idle)
        for outcome in outcomes:
            if outcome.error is not None:
                finished += self._fail(outcome.decode.rows, outcome.error)
                continue
            for seq, take, _ in outcome.decode.rows:
                if seq.generated == [] and seq.n_pending > 0:
                    seq.n_prompt_computed += take
                seq.n_in_kv += take
                if seq in outcome.sampled:
                    self._take(seq, outcome.sampled[seq])
                if seq.finish_reason is None and seq.n_pending == 0 and not seq.wants_tokens:
                    seq.finish("prefilled")
                if seq.finish_reason is not None:
                    finished.append(seq)
        for seq in finished:
            if seq in self.running:
                self.running.remove(seq)
                seq.status = SeqStatus.IDLE
                if seq.t_done is None:
                    seq.t_done = time.perf_counter()
                if seq.one_shot:
                    # NOTE: release at once, so queued branches can start in this very run (the table
                    # hands them its id and cells when they need them).
                    self.release(seq)
        if not self.running:
            self.table.free_spent()
        return finished

    def _recompute_own(self, seq: KvSequence) -> None:
        """Drop the cached tokens a generating turn must compute itself, so they are decoded again.

        NOTE: sampling needs the logits after the last token, which are long gone when every token is
        already in the cache (a bare fork); and a decoder computes its prompt's last tokens with its
        adapter (Adapter.first_own), which a fork of base KV holds as the base model's.
        """
        start = seq.n_in_kv - 1 if seq.n_pending == 0 else seq.n_in_kv
        if seq.adapter is not None and seq.adapter.prefill == "base":
            start = min(start, seq.adapter.first_own(len(seq.tokens), True))
        if start >= seq.n_in_kv:
            return
        if seq.seq_id is not None:
            # NOTE: cells below n_shared stay with the parent: only the sequence's own ones are freed
            self.table.drop_cells(seq.seq_id, start, -1, frees=seq.n_in_kv > max(start, seq.n_shared))
        seq.n_in_kv = start
        seq.n_shared = min(seq.n_shared, start)

    def _next_stop(self, seq: KvSequence) -> int:
        """Where `seq`'s next chunk must end for the forks waiting on it (len(tokens): nowhere sooner).

        NOTE: a fork is tagged from its parent's cells when it is admitted, and a sliding-window layer
        drops positions the parent has moved n_swa past; so on such a model the parent holds at a
        waiting fork's point until the fork is admitted (or detached, see _admit). Full attention keeps
        every cell: there the chunk just ends at the fork point, which costs nothing.
        """
        hold = self.prefixes.n_swa > 0
        stops = [c.n_shared for c in seq.children
                 if c.seq_id is None and (c.n_shared >= seq.n_in_kv if hold else c.n_shared > seq.n_in_kv)]
        return min(stops, default=len(seq.tokens))

    def _admit(self) -> None:
        # NOTE: first fit, in arrival order: a sequence that does not fit now must not hold back the
        # ones behind it that do (a fork that needs a few cells to decode, whose parent holds many).
        # At most max_running sequences run (generating or prefilling a prompt); the rest wait, so under
        # overload a step's rows and prefill chunks stay bounded and started turns finish instead of all
        # slowing down together. Turns that generate go before prompts, so a request whose prompt is
        # computed decodes before new prompts start. A fork of a running prompt in flight skips the
        # bound: that prompt may be holding at the fork's point for it (see _next_stop).
        places = self.places()
        for seq in sorted(self.waiting, key=lambda s: not s.wants_tokens):  # NOTE: stable: arrival order within
            parent = seq.parent if seq.seq_id is None else None  # a fork still to be tagged from its parent
            if parent is not None and not self._reached(parent, seq.n_shared):
                if in_flight(parent) and not parent.released:
                    continue
                self.table.detach(seq)  # NOTE: the prompt it waited on stopped short: compute it all
                parent = None
            held = parent is not None and parent.status is SeqStatus.RUNNING and in_flight(parent)
            if places <= 0 and not held:
                continue
            if self.table.can_allocate(seq) or self._evict_for(seq):
                self.waiting.remove(seq)
                self._start(seq)
                places -= 1
            elif parent is not None and self.prefixes.n_swa > 0 and in_flight(parent):
                self.table.detach(seq)  # NOTE: its parent holds for it (see _next_stop): let it go on

    def places(self) -> int:
        """How many more sequences may start running now (max_running less those running)."""
        return self.max_running - len(self.running)

    @staticmethod
    def _reached(parent: KvSequence, n: int) -> bool:
        """Whether `parent` holds its first `n` tokens' cells under an id (a fork of it can be admitted)."""
        return parent.seq_id is not None and parent.n_in_kv >= n  # NOTE: a fork waiting for its id has none

    def _evict_for(self, seq: KvSequence) -> bool:
        """Evict until `seq` fits; did it? NOTE: one that forks share frees only its id, so such an entry
        goes only when `seq` needs an id and none is free."""
        def fits() -> bool:
            return self.table.can_allocate(seq)

        if seq.seq_id is None and not self.table.n_free_ids:
            self.evict_until(lambda: fits() or self.table.n_free_ids > 0, frees_cells=False)
        return self.evict_until(fits)

    def evict_until(self, fits: Callable[[], bool], *, frees_cells: bool = True) -> bool:
        """Release the prefix cache's own entries, least recently used first, until `fits()`; did it?

        frees_cells=True takes only entries no fork shares (their release frees cells at once);
        otherwise those go first, then any.
        """
        while not fits():
            victim = self.prefixes.evict(frees_cells=frees_cells)
            if victim is None:
                return False
            self.release(victim)
        return True

    def settle(self) -> None:
        """Exact mode: before cells are written, if cells were freed since the last time, move the used cells
        down into one run (Backend.compact), so that every sequence's cells stay in position order.

        NOTE: llama.cpp writes new cells into the lowest free cells from the first one freed, and flash
        attention sums a query's cells in cache order. With cells freed below a live prefix (an earlier
        snapshot closed, a prefix-cache entry evicted), a fork's next tokens went below the prefix's cells,
        and its greedy tokens parted from a from-scratch run's (gemma3-270m: one branch of three, test_exactness).
        Deferring frees while turns run (BranchTable.release) keeps this to once per freeing, not per step.
        """
        if self.exact and self.table.holes:
            self.backend.compact()
            self.table.holes = False

    def park_idle(self) -> int:
        """While there is work to run, move the prefix cache's idle exact entries that no fork shares to
        its lower tier (host RAM); how many went. A later prompt restores one (Scheduler.sequence_for).

        NOTE: llama.cpp's unified cache attends over every cell up to the highest one in use, masked per
        sequence, so an idle prefix's cells cost every token any other request computes. On a CPU that tax
        outweighs a round trip through host memory: Qwen2.5-Coder-0.5B, 3,531 tokens, capture ~60 ms and
        restore ~35 ms. 8 agents over a new 3,568-token document (bench/peers.py, flash attention on) took
        31.7 / 35.3 / 38.5 s with 0 / 1 / 2 earlier documents' prefixes idle in the context, and 33.6 /
        32.5 / 32.1 s with them parked; 16 idle 1,300-token prefixes halved a new prompt's prefill rate
        (bench/pool_attention.py). Without a lower tier nothing moves.
        """
        if not self.has_work:
            return 0
        n = 0
        while (victim := self.prefixes.evict(frees_cells=True, demotable=True)) is not None:
            self.release(victim)
            n += 1
        return n

    def _start(self, seq: KvSequence) -> None:
        self.table.allocate(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _take(self, seq: KvSequence, sampled: Sampled) -> None:
        """Append a sampled token to `seq`'s turn, or end the turn (end of generation, stop string, length)."""
        token = sampled.token
        if seq.t_first_token is None:
            seq.t_first_token = sampled.t
        if self.backend.is_eog(token) and not seq.params.ignore_eos:
            seq.finish("stop")
            return
        seq.generated.append(token)
        seq.tokens.append(token)
        if sampled.raw is not None:
            seq.logprobs.append(token_logprob(sampled.raw, token, seq.params.logprobs or 0))
        if seq.out.add(self.backend.token_bytes(token)):
            seq.finish("stop")
        elif len(seq.generated) >= seq.params.max_tokens:
            seq.finish("length")

    def _prepare_sampler(self, seq: KvSequence) -> None:
        old = self._samplers.pop(seq, None)
        if old is not None:
            old.close()
        params = seq.params
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        sampler = self.backend.sampler(params, seed)
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            for token in seq.tokens[-params.repeat_last_n:] if params.repeat_last_n else ():
                sampler.accept(token)
        self._samplers[seq] = sampler

    def _fail(self, rows: list[Row], exc: Exception) -> list[KvSequence]:
        """A decode failed: drop what the batch may have left in the cache, fail its sequences."""
        failed = []
        for seq, _, _ in rows:
            # NOTE: llama.cpp keeps ubatches that succeeded before the failing one; trim them so the
            # sequence's cells again match tokens[:n_in_kv], and the engine stays usable.
            self.prefixes.remove(seq)  # NOTE: a prompt in flight no longer holds the tokens it was indexed by
            self.table.drop_cells(seq.seq_id, seq.n_in_kv, -1)  # type: ignore[arg-type]
            del seq.tokens[seq.n_in_kv:]
            seq.error = exc
            seq.finish("error")
            failed.append(seq)
        return failed
