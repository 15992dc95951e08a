"""Composer: builds an agent's prompt in the KV cache from computed tokens and reusable segments.

A prompt is a list of parts: token lists (always computed) and Segments (content that other
prompts share at other offsets: a document after agent-specific system prompts, an upstream
agent's output). The head (the tokens before the first segment) comes from a live snapshot when
one holds it (zero-copy, exact) and is kept as one for the next prompt with the same head. Each
segment is then computed or placed, as the ReuseConfig's mode says, and what follows is computed
on top of it.

Placing writes the segment's cells into a scratch sequence (llama_state_seq_set_data of a blob
holding only those cells, keys re-rotated to their new positions) and tags them to the agent's
sequence (seq_cp): the cells before them are not copied or touched.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Generator
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kvfork.engine.llama import LlamaContext, LlamaModel
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import InvalidParameter
from kvfork.kvcache.cells import combine, covers, select, shift_positions, summary
from kvfork.kvcache.codec import decode, encode
from kvfork.kvcache.rope import RopeSpec, rerotate
from kvfork.kvcache.state import SeqState
from kvfork.reuse.anchors import AnchorPool
from kvfork.reuse.config import ReuseConfig
from kvfork.reuse.report import ReuseReport, SegmentOutcome
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.scheduler import Scheduler

__all__ = ["Composer", "Segment", "Part", "Steps", "split_head"]



@dataclass(frozen=True, eq=False)
class Segment:
    """Tokens whose KV was computed once, elsewhere: `kv` holds their cells at positions p0.. .

    `name` says which slot of a prompt template the segment fills ("document", "upstream:planner"):
    kvcomm anchors are pooled per (name, agent).
    """

    name: str
    tokens: tuple[int, ...]
    kv: SeqState
    p0: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @cached_property
    def summary(self) -> np.ndarray:
        return summary(self.kv)

    def cells(self, start: int = 0) -> SeqState:
        """The cells of tokens[start:], at their base positions."""
        return select(self.kv, self.p0 + start, self.p0 + self.n_tokens)


Part = Seq[int] | Segment
Steps = Generator[KvSequence, None, None]  # yields a sequence whose pending tokens must be prefilled


class Composer:
    """One engine's segment reuse: capture segments, compose prompts, the kvcomm anchor pool.

    Contract: every method runs under the engine's lock (the one thread that steps `scheduler`).
    """

    def __init__(self, scheduler: Scheduler, ctx: LlamaContext, model: LlamaModel,
                 run: Callable[[list[KvSequence]], None]) -> None:
        self.scheduler, self.ctx, self.model = scheduler, ctx, model
        self.run = run  # steps the scheduler until the given sequences' turns end (the engine's loop)
        self.anchors = AnchorPool()

    @cached_property
    def spec(self) -> RopeSpec:
        """How this model's keys move; refuses (before anything is placed) models whose keys cannot."""
        try:
            spec = RopeSpec.from_model(self.model)
            spec.check()
        except InvalidParameter as exc:
            raise InvalidParameter(f"reuse modes other than 'exact' are not available for this model: {exc}") from exc
        return spec

    # -- segments ----------------------------------------------------------------------------------
    def capture(self, name: str, seq: KvSequence, start: int, end: int) -> Segment:
        """The cells of seq's tokens [start, end) as a Segment (seq must hold them in the cache)."""
        if not 0 <= start < end <= seq.n_in_kv or seq.seq_id is None:
            raise InvalidParameter(f"cannot capture tokens [{start}, {end}) of a sequence holding {seq.n_in_kv}")
        cells = select(decode(self.ctx.state_seq_get(seq.seq_id)), start, end)
        if not covers(cells, start, end, self.model.n_swa or None):
            raise InvalidParameter(f"the cache no longer holds tokens [{start}, {end}) (sliding window)")
        return Segment(name, tuple(seq.tokens[start:end]), cells, start)

    def reply(self, seq: KvSequence) -> tuple[list[int], int, int]:
        """The last turn's reply of `seq`: its tokens (end-of-generation dropped), the position of the
        first, and how many of them are in the cache (all but a last sampled one that was never decoded)."""
        tokens = [t for t in seq.generated if not self.model.is_eog(t)]
        start = len(seq.tokens) - len(seq.generated)
        return tokens, start, max(0, min(len(tokens), seq.n_in_kv - start))

    def segment(self, name: str, tokens: Seq[int], head: Seq[int] = ()) -> tuple[Segment, int]:
        """Compute a segment's base KV: prefill head + tokens (the head from a live snapshot when one
        holds it); returns the segment and how many tokens were computed."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InvalidParameter("an empty segment")
        if head:
            seq = self.scheduler.fork(self._head(list(head))[0])
            self.scheduler.extend(seq, tokens)
        else:
            seq = KvSequence(tokens=tokens)
        seq = self._prefilled(seq)
        try:
            n = len(head)
            return self.capture(name, seq, n, n + len(tokens)), seq.n_prompt_computed
        finally:
            self.scheduler.release(seq)

    # -- composing ------------------------------------------------------------------------------
    def compose(self, parts: Seq[Part], agent: str, config: ReuseConfig) -> tuple[KvSequence, ReuseReport]:
        """A sequence holding every part's tokens in order; the caller owns (and releases) it."""
        t0 = time.perf_counter()
        report = ReuseReport(config.mode)
        head, rest = split_head(parts)
        node, computed = self._head(head)
        report.prefix_tokens, report.computed_tokens = len(head) - computed, computed
        seq = self.scheduler.fork(node)
        try:
            for pending in self.steps(seq, rest, agent, config, report):
                self._run(pending)
        except BaseException:
            self.scheduler.release(seq)
            raise
        report.seconds = time.perf_counter() - t0
        return seq, report

    def steps(self, seq: KvSequence, parts: Seq[Part], agent: str, config: ReuseConfig,
              report: ReuseReport) -> Steps:
        """Add the parts to `seq` (a fork of the head): a generator that yields `seq` whenever its
        pending tokens must be prefilled before it can go on; the driver prefills them and resumes
        it (Composer.compose runs them at once; the server submits them to its running batch)."""
        for part in parts:
            yield from self._add(seq, part, agent, config, report)
        yield from self._compute(seq, report)
        if seq.seq_id is None:
            self.scheduler.allocate_now(seq, "for a composed prompt")
        report.prompt_tokens = len(seq.tokens)

    def _placeable(self, part: Part, config: ReuseConfig) -> bool:
        return isinstance(part, Segment) and config.mode != "exact" and part.n_tokens >= max(1, config.min_segment)

    @staticmethod
    def _compute(seq: KvSequence, report: ReuseReport) -> Steps:
        if seq.n_pending:
            yield seq
            report.computed_tokens += seq.n_prompt_computed

    def _add(self, seq: KvSequence, part: Part, agent: str, config: ReuseConfig, report: ReuseReport) -> Steps:
        if not self._placeable(part, config):
            self.scheduler.extend(seq, _tokens(part))
            if isinstance(part, Segment):
                report.segments.append(SegmentOutcome(part.name, part.n_tokens, "computed", 0))
            return
        assert isinstance(part, Segment)
        n = part.n_tokens
        start = min(config.blend_tokens, n - 1) if config.mode == "blend" else 0
        self.scheduler.extend(seq, part.tokens[:start])
        yield from self._compute(seq, report)
        at = len(seq.tokens) - start  # the position of the segment's first token
        deviation, outcome = None, SegmentOutcome(part.name, n, "placed", n - start)
        if config.mode == "blend":
            outcome = SegmentOutcome(part.name, n, "blended", n - start)
        elif config.mode == "kvcomm":
            est = self.anchors.estimate(part.name, agent, part.summary, config)
            if not est.accepted:
                self.scheduler.extend(seq, part.tokens)
                yield from self._compute(seq, report)
                real = self.capture(part.name, seq, at, at + n).kv
                base = rerotate(part.cells(), self.spec, at - part.p0)
                dev = rerotate(combine(real, base, operator.sub), self.spec, -at)
                self.anchors.add(part.name, agent, part.summary, dev, n, config)
                report.segments.append(SegmentOutcome(part.name, n, "fallback", 0, len(est.anchors),
                                                      None if not est.anchors else est.entropy))
                return
            relative = shift_positions(part.cells(), -part.p0)
            deviation = rerotate(self.anchors.deviation(est, relative), self.spec, at)
            outcome = SegmentOutcome(part.name, n, "corrected", n, len(est.anchors), est.entropy)
        self._place(seq, part, start, at, deviation)
        report.reused_tokens += outcome.n_reused
        report.segments.append(outcome)

    def _place(self, seq: KvSequence, part: Segment, start: int, at: int, deviation: SeqState | None) -> None:
        """Write tokens[start:] of the segment at positions at+start.. of `seq`, keys re-rotated."""
        cells = rerotate(part.cells(start), self.spec, at - part.p0)
        if deviation is not None:
            cells = combine(cells, select(deviation, at + start, at + part.n_tokens), operator.add)
        self.scheduler.place(seq, part.tokens[start:], encode(cells))

    # -- sequences ------------------------------------------------------------------------------
    def _run(self, seq: KvSequence) -> None:
        """Prefill seq's pending tokens (no generation)."""
        if not seq.n_pending:
            if seq.seq_id is None:  # NOTE: a fork covering all its tokens still needs its id to be forked from
                self.scheduler.allocate_now(seq, "for a prompt head")
            return
        self.scheduler.submit(seq, SamplingParams(max_tokens=0))
        self.run([seq])
        if seq.error is not None:
            raise seq.error

    def _prefilled(self, seq: KvSequence) -> KvSequence:
        """`seq` with its pending tokens prefilled; released if that fails."""
        try:
            self._run(seq)
        except BaseException:
            self.scheduler.release(seq)
            raise
        return seq

    def _head(self, head: list[int]) -> tuple[KvSequence, int]:
        """A sequence holding exactly `head` in the cache, and how many of its tokens were computed now.

        NOTE: heads live in the engine's prefix cache as its own entries: later prompts of the agent (and
        any prefill starting with the head) fork them, and the scheduler evicts them when it needs room.
        """
        prefixes = self.scheduler.prefixes
        hit = prefixes.match(head)
        if hit is not None and hit.n == len(head) == hit.node.n_in_kv:
            return hit.node, 0
        seq = self._prefilled(self.scheduler.sequence_for(list(head), hit))
        prefixes.insert(seq)
        return seq, seq.n_prompt_computed

    def close(self) -> None:
        self.anchors.clear()


def _tokens(part: Part) -> Seq[int]:
    return part.tokens if isinstance(part, Segment) else part


def split_head(parts: Seq[Part]) -> tuple[list[int], Seq[Part]]:
    """The head's tokens (the parts before the first Segment; the first part if there is none) and the rest.

    NOTE: the head ends there in every mode (exact too), so all modes share heads alike.
    """
    first = next((i for i, p in enumerate(parts) if isinstance(p, Segment)), min(1, len(parts)))
    head = [int(t) for p in parts[:first] for t in _tokens(p)]
    if not head:
        raise InvalidParameter("a composed prompt needs tokens of its own (its head) before any Segment")
    return head, parts[first:]

