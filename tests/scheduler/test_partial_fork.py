"""Scheduler.fork(parent, n): a branch that shares only the parent's first n cached tokens."""

from __future__ import annotations

import pytest

from kvfork import SnapshotMismatch
from kvfork.engine.sampling import SamplingParams
from kvfork.scheduler.kv_sequence import KvSequence
from tests.support.text import long_text


def test_fork_at_n_continues_like_from_scratch(gemma):
    base = gemma.tokenize(long_text(8) + "\n\nThe pump", add_bos=True)
    other = gemma.tokenize(long_text(8) + "\n\nMeanwhile the operator noted that the backup line", add_bos=True)
    n = next(i for i, (a, b) in enumerate(zip(base, other, strict=False)) if a != b) - 16  # NOTE: >= 16 new tokens
    sched = gemma.scheduler
    parent = KvSequence(tokens=list(base))
    sched.submit(parent, SamplingParams(max_tokens=0))
    _run(sched)
    with pytest.raises(SnapshotMismatch):
        sched.fork(parent, len(base) + 1)
    with pytest.raises(SnapshotMismatch):
        sched.fork(parent, 0)
    child = sched.fork(parent, n)
    assert child.tokens == base[:n] and child.n_shared == child.n_in_kv == n
    sched.submit(child, SamplingParams(max_tokens=8), append=other[n:])
    _run(sched)
    assert child.n_prompt_computed == len(other) - n
    try:
        assert child.generated == list(gemma.generate(other, max_tokens=8).tokens)
    finally:
        sched.release(child)
        sched.release(parent)


def _run(sched) -> None:
    while sched.has_work:
        sched.step()
