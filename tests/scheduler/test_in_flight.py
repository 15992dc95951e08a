"""Prompts in flight (fake backend): a prompt enters the prefix cache as it is submitted, so one
submitted while it is prefilled forks it at the point they part and the shared part is computed once.

The fake's logits depend on exactly the cells a sequence sees, so a branch whose tokens equal the
fake's from-scratch run (`greedy`) shared the right cells.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvfork.config import EngineConfig
from kvfork.engine.sampling import SamplingParams
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus
from kvfork.scheduler.prefix_cache import MIN_SUFFIX, in_flight
from kvfork.scheduler.scheduler import Scheduler

DOC = [(i * 7 + 3) % 50 + 1 for i in range(200)]


def _scheduler(backend: Any, **config: Any) -> Scheduler:
    return Scheduler(backend, EngineConfig(n_ctx=backend.n_ctx, n_batch=32, n_ubatch=32, **config))


def _prompt(sched: Scheduler, tokens: list[int]) -> KvSequence:
    """What the server and Engine.prefill do: the best prefix's fork (in flight too), submitted as shared."""
    seq = sched.sequence_for(list(tokens))
    sched.submit(seq, SamplingParams(max_tokens=0), share=True)
    return seq


def _step_until_idle(sched: Scheduler, seqs: list[KvSequence]) -> list[list[tuple[int, int]]]:
    """Step until `seqs` are prefilled; per step, (seq_id, position) of each token decoded."""
    log = []
    for _ in range(200):
        if all(s.status is SeqStatus.IDLE for s in seqs):
            return log
        sched.prefixes.check_integrity()
        before = len(sched.backend.decodes)
        sched.step()
        log.append([(b.seq_ids[i], b.positions[i]) for b in sched.backend.decodes[before:] for i in range(len(b))])
    raise AssertionError("the prefills did not end")


@pytest.mark.parametrize("exact", [False, True])
def test_prompts_submitted_while_one_prefills_fork_it_and_compute_the_shared_part_once(fake_backend, exact):
    be = fake_backend(n_ctx=2048)
    sched = _scheduler(be, exact=exact)
    first = _prompt(sched, DOC + [60, 1, 2, 3, 4] * 6)
    sched.step()  # NOTE: one 32-token chunk in: the others arrive while it prefills
    assert in_flight(first) and first in sched.prefixes
    others = [_prompt(sched, DOC + [61 + i, 9, 8, 7] * 5) for i in range(3)]
    assert all(o.parent is first and o.n_shared == len(DOC) for o in others)
    log = _step_until_idle(sched, [first, *others])
    # the document is decoded once, by the first prompt; its chunk stopped where the others fork
    assert sum(pos < len(DOC) for b in be.decodes for pos in b.positions) == len(DOC)
    assert any(step and max(p for s, p in step if s == first.seq_id) == len(DOC) - 1 for step in log)
    assert [o.n_prompt_computed for o in others] == [20] * 3 and first.n_prompt_computed == len(first.tokens)
    for seq in (first, *others):  # every prompt's cells are what a from-scratch prefill computes
        branch = sched.fork(seq)
        sched.submit(branch, SamplingParams(max_tokens=4, ignore_eos=True))
        _step_until_idle(sched, [branch])
        assert branch.generated == be.greedy(seq.tokens, 4)
    sched.prefixes.check_integrity()


def test_exact_mode_never_stops_a_chunk_a_few_tokens_short_of_a_fork(fake_backend):
    be = fake_backend(n_ctx=2048)
    sched = _scheduler(be, exact=True)
    first = _prompt(sched, DOC + [60] * 40)
    for _ in range(6):
        sched.step()  # NOTE: 192 of the 200 document tokens in: a fork at 200 would leave an 8-row chunk
    second = _prompt(sched, DOC + [61] * 40)
    assert second.parent is first and second.n_shared == first.n_in_kv == 192
    log = _step_until_idle(sched, [first, second])
    sizes = [sum(1 for s, _ in step if s == first.seq_id) for step in log]
    assert all(not 1 < n < MIN_SUFFIX for n in sizes if n), sizes


def test_a_fork_whose_prompt_in_flight_is_cancelled_computes_everything_itself(fake_backend):
    be = fake_backend(n_ctx=2048)
    sched = _scheduler(be)
    first = _prompt(sched, DOC + [60] * 40)
    sched.step()
    second = _prompt(sched, DOC + [61] * 40)
    assert second.parent is first
    sched.cancel(first)  # its client left before the document was in
    sched.release(first)
    assert first not in sched.prefixes
    _step_until_idle(sched, [second])
    assert second.parent is None and second.n_prompt_computed == len(second.tokens)
    branch = sched.fork(second)
    sched.submit(branch, SamplingParams(max_tokens=4, ignore_eos=True))
    _step_until_idle(sched, [branch])
    assert branch.generated == be.greedy(second.tokens, 4)
    sched.prefixes.check_integrity()


def test_on_a_sliding_window_model_the_prompt_holds_at_the_fork_until_the_fork_is_admitted(fake_backend):
    be = fake_backend(n_ctx=2048, n_swa=64)
    sched = _scheduler(be)
    first = _prompt(sched, DOC + [60] * 40)
    sched.step()
    second = _prompt(sched, DOC + [61] * 40)
    assert second.parent is first
    while second.seq_id is None:
        sched.step()
        # NOTE: the window would drop positions the fork needs once the prompt moved past them
        assert first.n_in_kv <= len(DOC) or second.seq_id is not None
    _step_until_idle(sched, [first, second])
    assert second.n_prompt_computed == 40


def test_a_fork_the_prompt_holds_for_is_admitted_past_max_running(fake_backend):
    be = fake_backend(n_ctx=2048, n_swa=64)
    sched = _scheduler(be, max_running=1)  # the prompt takes the one place
    first = _prompt(sched, DOC + [60] * 40)
    sched.step()
    second = _prompt(sched, DOC + [61] * 40)
    assert second.parent is first
    _step_until_idle(sched, [first, second])  # NOTE: waiting for a place here would hold both forever
    assert second.n_prompt_computed == 40 and first.n_in_kv == len(DOC) + 40


def test_a_prompt_that_has_moved_past_the_fork_is_cut_only_where_the_window_allows(fake_backend):
    be = fake_backend(n_ctx=2048, n_swa=64)
    sched = _scheduler(be)
    first = _prompt(sched, DOC + [60] * 40)
    for _ in range(7):
        sched.step()  # NOTE: 224 tokens in, past the 200 it shares with the next prompt
    second = _prompt(sched, DOC + [61] * 40)
    assert in_flight(first) and first.n_in_kv == 224
    assert second.parent is None and second.n_in_kv == 0  # 240 > n_swa: the window has dropped what it needs
