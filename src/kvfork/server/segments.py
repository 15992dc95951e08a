"""Reuse modes in the server: long messages seen before at another offset are placed, not computed.

A chat request under a reuse mode other than "exact" arrives as pieces: template text and each
message's content. Contents at least `reuse_min_tokens` long are looked up in a SegmentCache (by
their tokens); a hit is placed as kvfork.reuse says (shift, kvcomm, blend), a miss is computed and
kept as a segment for later requests. The head (everything before the first placed content) comes
from the usual live prefixes. The composed prompt is approximate: it is kept only under its reuse
settings' prefix-cache namespace.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import ContextOverflow, KvforkError
from kvfork.reuse.composer import Part, Segment, Steps, split_head
from kvfork.reuse.report import ReuseReport
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.server.errors import APIError, cache_full
from kvfork.server.job import Job
from kvfork.store.ram import RamTier

if TYPE_CHECKING:
    from kvfork.server.dispatch import Dispatcher

__all__ = ["SegmentCache", "ReusePlacer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class _Entry:
    segment: Segment
    rest: tuple[int, ...]  # the key's tokens after the segment that were never cached (a reply's last)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(t.values.nbytes + len(t.raw or b"") for part in self.segment.kv.caches for t in (*part.k, *part.v))


class SegmentCache:
    """Segments by the tokens they stand for (a segment and the tokens after it that were never cached),
    LRU under a byte budget of decoded K/V values and stored bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self._lru: RamTier[tuple[int, ...], _Entry] = RamTier(budget_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def bytes(self) -> int:
        return self._lru.nbytes

    def get(self, tokens: tuple[int, ...]) -> tuple[Segment, tuple[int, ...]] | None:
        entry = self._lru.get(tokens)
        return None if entry is None else (entry.segment, entry.rest)

    def put(self, segment: Segment, rest: tuple[int, ...] = ()) -> None:
        key = segment.tokens + rest
        if key not in self._lru:
            self._lru.put(key, _Entry(segment, rest))


class ReusePlacer:
    """Builds reuse-mode prompts in the loop thread: head node, then Composer.steps driven by waiters.

    A composed prompt is kept in the prefix cache under its reuse settings' namespace (never EXACT: its
    placed cells are approximate): the same prompt sent again with the same settings forks it whole.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.cache = SegmentCache(dispatcher.config.reuse_cache_mb << 20)
        self.deferred: deque[Job] = deque()  # jobs waiting for room in the cache
        self._placed: weakref.WeakKeyDictionary[KvSequence, int] = weakref.WeakKeyDictionary()  # kept prompts

    def place(self, job: Job) -> None:
        """Start composing `job`'s prompt now if its cells can be reserved, else once they can (retry);
        fork a prompt composed before with the same settings and tokens at once."""
        assert job.reuse is not None
        hit = self.dispatcher.prefixes.match(job.tokens, namespace=("reuse", job.reuse))
        if hit is not None and hit.n == len(job.tokens) and hit.node in self._placed:
            job.placed += self._placed[hit.node]
            self.dispatcher.choices.fork(job, hit.node, hit.n)
            return
        if not self._room_for(job):
            self.deferred.append(job)
            return
        self._place(job)

    def retry(self) -> None:
        """Start deferred jobs that fit now; fail (503) the first one that cannot while nothing runs."""
        while self.deferred:
            job = self.deferred[0]
            if job.cancelled or job.done:
                self.deferred.popleft()
                continue
            if not self._room_for(job):
                if not self.dispatcher.sched.has_work:
                    self.deferred.popleft()
                    self.dispatcher.choices.fail([job], cache_full())
                    continue
                return
            self.deferred.popleft()
            self.dispatcher.guard([job], functools.partial(self._place, job))

    def _room_for(self, job: Job) -> bool:
        """Whether the prompt's own cells and its choices' tokens fit next to what is reserved, after
        evicting idle live prefixes. NOTE: a placed segment is this prompt's own copy: nothing shares it."""
        table = self.dispatcher.sched.table
        need = len(job.tokens) + sum(p.max_tokens for p in job.params)
        return self.dispatcher.sched.evict_until(lambda: table.cells_reserved() + need <= table.n_cells)

    def _place(self, job: Job) -> None:
        assert job.pieces is not None and job.reuse is not None
        parts: list[Part] = []
        fresh: list[tuple[int, int]] = []  # (offset, length) of contents computed now, to keep as segments
        offset, least = 0, self.dispatcher.config.reuse_min_tokens
        for slot, (tokens, content) in enumerate(job.pieces):
            hit = self.cache.get(tuple(tokens)) if content and len(tokens) >= least else None
            if hit is not None:
                # NOTE: kvcomm pools anchors per slot of the prompt (the piece's place), as per template slot
                seg = dataclasses.replace(hit[0], name=f"message:{slot}")
                parts += [seg, list(hit[1])] if hit[1] else [seg]
            else:
                parts.append(tokens)
                if content and len(tokens) >= least:
                    fresh.append((offset, len(tokens)))
            offset += len(tokens)
        head, rest = split_head(parts)
        agent = hashlib.sha256(repr(head).encode()).hexdigest()[:16]  # NOTE: kvcomm pools per agent prefix

        def start(node: KvSequence) -> None:
            seq = self.dispatcher.sched.fork(node, len(head))
            report = ReuseReport(job.reuse.mode)  # type: ignore[union-attr]
            report.prefix_tokens = len(head)
            steps = self.dispatcher.engine.composer.steps(seq, rest, agent, job.reuse, report)  # type: ignore[arg-type]
            self._advance(job, seq, steps, report, fresh)

        self.dispatcher.prefill_then(head, job, start)

    def _advance(self, job: Job, seq: KvSequence, steps: Steps, report: ReuseReport,
                 fresh: list[tuple[int, int]]) -> None:
        sched = self.dispatcher.sched
        if job.cancelled:
            steps.close()
            sched.release(seq)
            return
        try:
            pending = next(steps)
        except StopIteration:
            self._finish(job, seq, report, fresh)
            return
        except ContextOverflow:  # NOTE: others took the room meanwhile: retryable, not the request's fault
            sched.release(seq)
            self.dispatcher.choices.fail([job], cache_full())
            return
        except (KvforkError, APIError) as exc:
            sched.release(seq)
            self.dispatcher.choices.fail([job], exc)
            return
        try:
            sched.submit(pending, SamplingParams(max_tokens=0))
        except KvforkError as exc:
            sched.release(seq)
            self.dispatcher.choices.fail([job], exc)
            return
        self.dispatcher.wait(pending, job, lambda _: self._advance(job, seq, steps, report, fresh), keep=False)

    def keep_reply(self, job: Job, seq: KvSequence) -> None:
        """Keep a reuse-mode choice's reply as a segment (before its branch is freed): an agent that
        gets it as a message next places it at once. Keyed by the tokens of its text and of its
        stripped text (what clients send back); a reply whose text does not tokenize back to its
        tokens is not kept."""
        if job.reuse is None or job.reuse.mode == "exact" or seq.seq_id is None:
            return
        gen, start, cached = self.dispatcher.engine.composer.reply(seq)
        if len(gen) < self.dispatcher.config.reuse_min_tokens or cached < 1:
            return
        seen: set[tuple[int, ...]] = set()
        for text in (seq.text, seq.text.strip()):
            toks = tuple(self.dispatcher.engine.tokenize(text, special=True))
            off = len(gen) - len(toks)
            if toks in seen or off < 0 or off >= cached or tuple(gen[off:]) != toks:
                continue
            seen.add(toks)
            try:
                seg = self.dispatcher.engine.composer.capture("reply", seq, start + off, start + cached)
            except KvforkError as exc:  # NOTE: reuse is an optimization: a failed capture fails nothing
                log.warning("could not keep a reply segment: %s", exc)
                return
            self.cache.put(seg, tuple(gen[cached:]))

    def _finish(self, job: Job, seq: KvSequence, report: ReuseReport, fresh: list[tuple[int, int]]) -> None:
        composer = self.dispatcher.engine.composer
        for offset, length in fresh:
            try:
                self.cache.put(composer.capture("message", seq, offset, offset + length))
            except KvforkError as exc:  # NOTE: reuse is an optimization: a failed capture fails nothing
                log.warning("could not keep a message segment: %s", exc)
        metrics = self.dispatcher.metrics
        for outcome in report.segments:
            metrics.reuse_segments.labels(outcome.action).inc()
        job.computed += report.computed_tokens
        job.placed += report.reused_tokens
        try:
            self.dispatcher.choices.fork(job, seq, None)
        except (KvforkError, APIError) as exc:
            self.dispatcher.choices.fail([job], exc)
            self.dispatcher.sched.release(seq)
            return
        if seq.n_pending or seq.seq_id is None:  # NOTE: not a whole prompt in the cache: nothing to keep
            self.dispatcher.sched.release(seq)
            return
        self.dispatcher.prefixes.insert(seq, namespace=("reuse", job.reuse))
        self._placed[seq] = report.reused_tokens
        self.dispatcher.trim_live()
