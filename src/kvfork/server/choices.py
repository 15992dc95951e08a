"""Choices: each request's choices as branches: their text so far, their end, and the request's bill."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.scheduler import Scheduler
from kvfork.server.errors import from_kvfork
from kvfork.server.job import Event, Job, Usage
from kvfork.server.metrics import ServerMetrics

__all__ = ["Choices"]

_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class Choices:
    """The live jobs and the branch of each of their choices (forks of the job's prompt node).

    Contract: only the engine loop thread calls it. Every job ends exactly once (`end`): it is billed
    to the metrics (prefill computed vs reused, completion tokens) and its handler gets "done" with
    the usage, or an "error" event before that.
    """

    def __init__(self, sched: Scheduler, metrics: ServerMetrics) -> None:
        self.sched = sched
        self.metrics = metrics
        self.jobs: set[Job] = set()
        self._owner: dict[KvSequence, tuple[Job, int]] = {}
        self.on_reply: Callable[[Job, KvSequence], None] | None = None  # sees a finished choice before it is freed

    def owns(self, seq: KvSequence) -> bool:
        return seq in self._owner

    def job_of(self, seq: KvSequence) -> Job:
        return self._owner[seq][0]

    def admit(self, job: Job) -> bool:
        """Track a new job; True if it was cancelled before it could start."""
        self.jobs.add(job)
        job.branches = [None] * job.n
        job.sent = [0] * job.n
        job.ended = [False] * job.n
        if job.cancelled:
            self.end(job, None)
        return job.cancelled

    def fork(self, job: Job, node: KvSequence, n: int | None, append: Sequence[int] = ()) -> None:
        """Fork one branch per choice from `node` (its first `n` cached tokens), each with `append` (the
        prompt's tokens after the node's, which the branch computes), and submit them."""
        if job.cancelled:
            return
        job.computed += len(append)  # NOTE: billed once, as the node's prefill is, whatever n is
        for i, params in enumerate(job.params):
            child = self.sched.fork(node, n, adapter=job.adapter)
            try:
                self.sched.submit(child, params, append=append)
            except BaseException:
                self.sched.release(child)
                raise
            self._owner[child] = (job, i)
            job.branches[i] = child
            self.metrics.active_branches.inc()

    def emit_all(self, finished: list[KvSequence]) -> None:
        """Send every job its new text; end the choices whose turn ended in this step."""
        ended = set(finished)
        for seq, (job, i) in list(self._owner.items()):
            self._emit(job, i, seq, seq in ended)
        for seq in finished:
            if seq in self._owner:
                self._end_choice(seq)

    def _emit(self, job: Job, i: int, seq: KvSequence, final: bool) -> None:
        if not job.first_token and (seq.generated or final):
            job.first_token = True
            self.metrics.ttft.observe(time.perf_counter() - job.t_arrival)
            self.metrics.queue_length.dec()
        text = seq.text
        safe = len(text)
        if not final:
            # NOTE: hold back what may be the start of a stop string or half of a UTF-8 character.
            safe -= max((len(s) for s in seq.params.stop), default=1) - 1
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > job.sent[i]:
            job.sink.put(Event("delta", i, text[job.sent[i]:safe]))
            job.sent[i] = safe

    def _end_choice(self, seq: KvSequence) -> None:
        job, i = self._owner.pop(seq)
        self.metrics.active_branches.dec()
        job.completion_tokens += len(seq.generated)
        error = seq.error
        if error is None and self.on_reply is not None:
            self.on_reply(job, seq)
        if error is None and self._keeps(job, seq):
            self.sched.keep(seq)
        else:
            self.sched.release(seq)
        if error is not None:
            self.fail([job], error)
            return
        job.ended[i] = True
        job.sink.put(Event("finish", i, finish_reason=_FINISH.get(seq.finish_reason or "stop", "stop"),
                           logprobs=tuple(seq.logprobs) if seq.params.logprobs is not None else None))
        if job.finished:
            self.end(job, None)

    @staticmethod
    def _keeps(job: Job, seq: KvSequence) -> bool:
        """Whether a finished choice's cells stay in the prefix cache for the conversation's next request.

        NOTE: only cells computed as a from-scratch prefill of the same tokens computes them: not a
        reuse-mode prompt's (approximate) and not a LoRA decoder's reply (the base model computes prompts).
        """
        return job.adapter is None and not job.composed and seq.seq_id is not None and seq.n_in_kv > 0

    def cancel(self, job: Job) -> None:
        """The client left: stop and free its branches now."""
        job.cancelled = True
        if job in self.jobs:
            self._drop_branches(job)
            self.end(job, None)

    def fail(self, jobs: list[Job], exc: Exception) -> None:
        """End `jobs` with an error event (an OpenAI error object for the handler); free their branches."""
        for job in jobs:
            if job.done:
                continue
            self._drop_branches(job)
            job.sink.put(Event("error", error=from_kvfork(exc)))
            self.end(job, exc)

    def _drop_branches(self, job: Job) -> None:
        for seq in job.branches:
            if seq is not None and seq in self._owner:
                del self._owner[seq]
                self.sched.cancel(seq)
                self.sched.release(seq)
                self.metrics.active_branches.dec()

    def end(self, job: Job, error: Exception | None) -> None:
        """Bill the job to the metrics and tell its handler it is done (once; later calls do nothing)."""
        if job.done:
            return
        job.done = True
        self.jobs.discard(job)
        if not job.first_token:
            self.metrics.queue_length.dec()
        computed = min(job.computed, len(job.tokens))
        self.metrics.prefill_computed.inc(computed)
        self.metrics.prefill_reused.inc(len(job.tokens) - computed)
        self.metrics.prefill_placed.inc(job.placed)
        self.metrics.completion_tokens.inc(job.completion_tokens)
        outcome = "error" if error is not None else "cancelled" if job.cancelled else "ok"
        self.metrics.requests.labels(outcome).inc()
        if error is None and not job.cancelled:
            usage = Usage(len(job.tokens), job.completion_tokens, len(job.tokens) - computed, job.placed)
            job.sink.put(Event("done", usage=usage))
        if job.on_end is not None:
            job.on_end(job)
