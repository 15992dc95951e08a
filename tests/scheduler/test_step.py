"""The step loop on the fake backend (no model): batching, chunking, forks, failures, stop strings.

The fake's logits depend on exactly the cells a sequence sees, so a branch whose tokens equal the
fake's from-scratch run (`greedy`) has shared the right cells and computed its own at the right
positions. The same properties on the real model are in test_branches.py and tests/engine/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvfork.config import EngineConfig
from kvfork.engine.adapters import Adapter
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import ContextOverflow, InvalidParameter, KvforkError
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus
from kvfork.scheduler.scheduler import Scheduler
from kvfork.scheduler.text import TurnText

PROMPT = [7, 3, 9, 12, 5, 30, 2, 8, 17, 44, 21, 6]


def _run(sched: Scheduler, seqs: list[KvSequence], max_steps: int = 1000) -> int:
    """Step until every one of `seqs` has ended its turn; the number of steps."""
    for n in range(1, max_steps + 1):
        sched.step()
        if all(s.status not in (SeqStatus.WAITING, SeqStatus.RUNNING) for s in seqs):
            return n
    raise AssertionError("the turns did not end")


def _prefilled(sched: Scheduler, tokens: list[int]) -> KvSequence:
    seq = KvSequence(tokens=list(tokens))
    sched.submit(seq, SamplingParams(max_tokens=0))
    _run(sched, [seq])
    assert seq.finish_reason == "prefilled" and seq.n_in_kv == len(tokens)
    return seq


def _scheduler(backend: Any, **config: Any) -> Scheduler:
    config.setdefault("n_ubatch", config.get("n_batch", 512))
    return Scheduler(backend, EngineConfig(n_ctx=backend.n_ctx, **config))


def test_a_fresh_sequence_generates_the_from_scratch_tokens(fake_backend):
    be = fake_backend()
    sched = _scheduler(be)
    seq = KvSequence(tokens=list(PROMPT))
    sched.submit(seq, SamplingParams(max_tokens=12))
    _run(sched, [seq])
    want = be.greedy(PROMPT, 12, ignore_eos=False)
    assert seq.generated == want and seq.tokens == PROMPT + want
    assert seq.finish_reason == ("length" if len(want) == 12 else "stop")
    assert seq.n_prompt_computed == len(PROMPT) and seq.t_first_token is not None


def test_forks_decode_together_and_match_from_scratch_runs(fake_backend):
    be = fake_backend()
    sched = _scheduler(be)
    root = _prefilled(sched, PROMPT)
    suffixes = [[40 + i, 50 + i] for i in range(4)]
    branches = []
    for suffix in suffixes:
        child = sched.fork(root)
        child.tokens += suffix
        sched.submit(child, SamplingParams(max_tokens=8, ignore_eos=True))
        branches.append(child)
    n_decodes = len(be.decodes)
    _run(sched, branches)
    for child, suffix in zip(branches, suffixes, strict=True):
        assert child.generated == be.greedy(PROMPT + suffix, 8)
        assert child.n_prompt_computed == 2 and child.n_shared == len(PROMPT)
    # one decode per step, every branch in it: the prompts' suffixes together, then one token each
    batches = be.decodes[n_decodes:]
    assert len(batches) == 8 and len(batches[0]) == 8 and all(len(b) == 4 for b in batches[1:])
    assert len(be.cells) == len(PROMPT) + 4 * (2 + 7)  # the prompt once; the last sampled tokens not in the cache


def test_ignore_eos_keeps_generating_past_the_end_token(fake_backend):
    be = fake_backend(n_vocab=2)  # tokens 0 (the end) and 1: the end comes early
    sched = _scheduler(be)
    ends = KvSequence(tokens=[1, 1, 1])
    goes_on = KvSequence(tokens=[1, 1, 1])
    sched.submit(ends, SamplingParams(max_tokens=32))
    sched.submit(goes_on, SamplingParams(max_tokens=32, ignore_eos=True))
    _run(sched, [ends, goes_on])
    assert ends.finish_reason == "stop" and len(ends.generated) < 32 and 0 not in ends.generated
    assert goes_on.finish_reason == "length" and len(goes_on.generated) == 32 and 0 in goes_on.generated


def test_long_prefills_are_chunked_and_decoding_branches_go_first(fake_backend):
    be = fake_backend(n_batch=16)
    sched = _scheduler(be, n_batch=16)
    talker = KvSequence(tokens=list(PROMPT))
    sched.submit(talker, SamplingParams(max_tokens=10, ignore_eos=True))
    sched.step()  # its prompt, and its first token
    reader = KvSequence(tokens=[(i * 7) % 60 + 1 for i in range(50)])
    sched.submit(reader, SamplingParams(max_tokens=1, ignore_eos=True))
    n_before = len(be.decodes)
    _run(sched, [reader])
    batches = be.decodes[n_before:]
    # the talker's token first in every batch, the reader's prompt in chunks of the rest of n_batch
    assert all(b.seq_ids[0] == talker.seq_id and len(b) <= 16 for b in batches)
    assert [b.seq_ids[1:].count(reader.seq_id) for b in batches] == [15, 15, 15, 5]
    assert reader.generated == be.greedy(reader.tokens[:50], 1)
    _run(sched, [talker])
    assert talker.generated == be.greedy(PROMPT, 10)


def test_a_failed_decode_fails_its_sequences_and_leaves_the_cache_consistent(fake_backend):
    be = fake_backend(n_batch=8)
    sched = _scheduler(be, n_batch=8)
    seq = KvSequence(tokens=[(i * 5) % 60 + 1 for i in range(20)])
    sched.submit(seq, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.step()  # the first chunk of 8
    be.fail_next, be.fail_after = ContextOverflow("no room"), 5  # the next chunk leaves 5 cells behind
    finished = sched.step()
    assert finished == [seq] and seq.finish_reason == "error" and isinstance(seq.error, ContextOverflow)
    assert seq.n_in_kv == len(seq.tokens) == 8 and be.positions(seq.seq_id) == list(range(8))
    # the sequence and the scheduler stay usable: the next turn computes the rest again
    seq.tokens += [(i * 5) % 60 + 1 for i in range(8, 20)]
    sched.submit(seq, SamplingParams(max_tokens=4, ignore_eos=True))
    _run(sched, [seq])
    assert seq.finish_reason == "length" and seq.generated == be.greedy(seq.tokens[:20], 4)


def test_one_shot_branches_queue_for_ids_and_take_them_as_others_end(fake_backend):
    be = fake_backend()
    sched = _scheduler(be, n_seq_max=3)  # the root and two branches at a time
    root = _prefilled(sched, PROMPT)
    branches = []
    for i in range(5):
        child = sched.fork(root)
        sched.submit(child, SamplingParams(max_tokens=3 + i, ignore_eos=True), append=[40 + i], one_shot=True)
        branches.append(child)
    _run(sched, branches)
    for i, child in enumerate(branches):
        assert child.generated == be.greedy(PROMPT + [40 + i], 3 + i)
        assert child.status is SeqStatus.CLOSED and child.seq_id is None
    assert be.positions(root.seq_id) == list(range(len(PROMPT))) and len(be.cells) == len(PROMPT)


def test_max_running_bounds_what_runs_and_turns_that_generate_start_before_new_prompts(fake_backend):
    be = fake_backend()
    sched = _scheduler(be, n_seq_max=16, max_running=2)
    root = _prefilled(sched, PROMPT)
    prompt = KvSequence(tokens=list(PROMPT[:6]))  # a new prompt, submitted first: it waits for the turns
    sched.submit(prompt, SamplingParams(max_tokens=0))
    branches = []
    for i in range(5):
        child = sched.fork(root)
        sched.submit(child, SamplingParams(max_tokens=4, ignore_eos=True), append=[40 + i], one_shot=True)
        branches.append(child)
    n_decodes = len(be.decodes)
    started: list[KvSequence] = []
    for _ in range(1000):
        sched.step()
        started += [s for s in [*branches, prompt] if s.n_in_kv > (0 if s is prompt else len(PROMPT))
                    and s not in started]
        assert len(sched.running) <= 2
        if prompt.finish_reason and all(s.status is SeqStatus.CLOSED for s in branches):
            break
    assert started == [*branches, prompt]  # first come, first served; turns before new prompts
    assert prompt.finish_reason == "prefilled" and prompt.n_in_kv == 6
    assert max(len(set(b.seq_ids)) for b in be.decodes[n_decodes:]) <= 2
    for i, child in enumerate(branches):
        assert child.generated == be.greedy(PROMPT + [40 + i], 4)


def test_max_running_must_be_positive():
    with pytest.raises(InvalidParameter, match="max_running"):
        EngineConfig(max_running=0)


def test_nothing_can_run_is_an_error_naming_the_fix(fake_backend):
    sched = _scheduler(fake_backend(), n_seq_max=2)
    _prefilled(sched, PROMPT)
    _prefilled(sched, PROMPT[:5])  # the two ids are held
    other = KvSequence(tokens=[1, 2, 3])
    sched.submit(other, SamplingParams(max_tokens=1))
    with pytest.raises(KvforkError, match="nothing can run.*n_seq_max"):
        sched.step()


def test_sequences_of_two_adapters_decode_apart_the_active_set_first(fake_backend):
    be = fake_backend()
    sched = _scheduler(be)
    lora = {name: Adapter(name, Path(name), 1.0, "adapter", lora=f"lora-{name}") for name in ("a", "b")}
    seqs = []
    for name in ("a", "b", "a"):
        seq = KvSequence(tokens=list(PROMPT), adapter=lora[name])
        sched.submit(seq, SamplingParams(max_tokens=3, ignore_eos=True))
        seqs.append(seq)
    _run(sched, seqs)
    assert be.adapter_log[:2] == [(("lora-a", 1.0),), (("lora-b", 1.0),)]
    # then each step keeps the set that ran last first, and switches once
    assert be.adapter_log[2:4] == [(("lora-b", 1.0),), (("lora-a", 1.0),)]
    assert all(len(b) in (2 * len(PROMPT), len(PROMPT), 2, 1) for b in be.decodes)


def test_logprobs_are_the_log_softmax_of_the_raw_logits(fake_backend):
    be = fake_backend()
    sched = _scheduler(be)
    seq = KvSequence(tokens=list(PROMPT))
    sched.submit(seq, SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2))
    _run(sched, [seq])
    history = list(PROMPT)
    for token, lp in zip(seq.generated, seq.logprobs, strict=True):
        x = be.next_logits(history).astype(np.float64)
        logz = np.log(np.exp(x - x.max()).sum()) + x.max()
        assert lp.token == token and lp.logprob == pytest.approx(x[token] - logz)
        assert [t for t, _ in lp.top] == list(np.argsort(-x)[:2]) and lp.top[0][0] == token  # greedy
        history.append(token)


def test_a_stop_string_across_pieces_ends_the_turn_before_it(fake_backend):
    be = fake_backend()
    sched = _scheduler(be)
    want = be.greedy(PROMPT, 12)
    text = b"".join(be.token_bytes(t) for t in want).decode("utf-8", errors="replace")
    stop = text[4:6]  # two tokens' letters: the stop spans two pieces
    assert stop.isascii() and stop.isalpha()
    seq = KvSequence(tokens=list(PROMPT))
    sched.submit(seq, SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))
    _run(sched, [seq])
    assert seq.finish_reason == "stop" and seq.text == text[: text.find(stop)]


def test_turn_text_decodes_utf8_split_across_tokens_and_cuts_at_the_earliest_stop():
    out = TurnText(stop=("zz", "é!"))
    assert not out.add(b"a\xc3") and out.text == "a\ufffd"  # half a character so far
    assert not out.add(b"\xa9") and out.text == "aé"
    assert out.add(b"!zz") and out.text == "a" and out.stopped
    with pytest.raises(ValueError):
        out.add(b"x")


def test_exact_mode_keeps_a_released_branchs_cells_until_the_running_turns_end(fake_backend):
    be = fake_backend()
    sched = _scheduler(be, exact=True)
    done = _prefilled(sched, PROMPT)
    runner = KvSequence(tokens=[1, 2, 3])
    sched.submit(runner, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.step()
    sched.release(done)  # deferred: a cell freed under a decoding branch would take its next token
    assert len(be.positions(done.seq_id)) == len(PROMPT)  # type: ignore[arg-type]
    _run(sched, [runner])
    assert done.seq_id is None and be.positions(runner.seq_id) == list(range(3 + 3))  # type: ignore[arg-type]


@pytest.mark.parametrize("exact", [True, False])
def test_exact_mode_compacts_the_cache_once_after_cells_are_freed_before_writing_more(fake_backend, exact):
    be = fake_backend()
    sched = _scheduler(be, exact=exact)
    first, second = _prefilled(sched, PROMPT), _prefilled(sched, [4, 4, 4])
    assert be.n_compactions == 0  # nothing freed yet
    sched.release(first)  # nothing runs: freed now, below `second`'s cells
    branch = sched.fork(second)
    sched.submit(branch, SamplingParams(max_tokens=3, ignore_eos=True), append=[9])
    _run(sched, [branch])
    assert be.n_compactions == (1 if exact else 0)  # once, before the branch's first decode, not every step
    assert branch.generated == be.greedy([4, 4, 4, 9], 3)


def test_cancel_stops_a_turn_and_the_branch_can_take_another(fake_backend):
    be = fake_backend()
    sched = _scheduler(be)
    seq = KvSequence(tokens=list(PROMPT))
    sched.submit(seq, SamplingParams(max_tokens=50, ignore_eos=True))
    sched.step()
    sched.step()
    sched.cancel(seq)
    assert seq.finish_reason == "cancelled" and seq.status is SeqStatus.IDLE and not sched.has_work
    n = len(seq.generated)
    sched.submit(seq, SamplingParams(max_tokens=3, ignore_eos=True))
    _run(sched, [seq])
    history = PROMPT + be.greedy(PROMPT, n)  # what the cancelled turn left
    assert seq.tokens[: len(history)] == history and seq.generated == be.greedy(history, 3)


def test_a_small_fork_does_not_wait_behind_a_prompt_that_does_not_fit(fake_backend):
    # 1,024 cells: a 730-token prefix, then a 600-token prompt that cannot fit until the prefix is gone,
    # queued ahead of a short fork of the prefix that fits: the fork runs first (first fit).
    be = fake_backend(n_ctx=1024)
    sched = _scheduler(be)
    root = _prefilled(sched, [(i * 7) % 60 + 1 for i in range(730)])
    big = KvSequence(tokens=[(i * 11) % 60 + 1 for i in range(600)])
    sched.submit(big, SamplingParams(max_tokens=0))
    small = sched.fork(root)
    small.tokens += [5, 6, 7]
    sched.submit(small, SamplingParams(max_tokens=4, ignore_eos=True))
    finished = []
    while small.status is not SeqStatus.IDLE:
        finished += sched.step()
    assert small in finished and small.generated == be.greedy(root.tokens + [5, 6, 7], 4)
    assert big.status is SeqStatus.WAITING  # still no room for it
    sched.release(small)
    sched.release(root)
    _run(sched, [big])
    assert big.n_in_kv == len(big.tokens) == 600 and be.positions(big.seq_id) == list(range(600))


def _shared(sched: Scheduler, tokens: list[int]) -> KvSequence:
    """A prompt prefilled as an idle entry of the prefix cache's own."""
    seq = KvSequence(tokens=list(tokens))
    sched.submit(seq, SamplingParams(max_tokens=0), share=True)
    _run(sched, [seq])
    assert seq in sched.prefixes
    return seq


def test_placing_cells_evicts_idle_prefix_cache_entries_for_an_id_and_room(fake_backend):
    # 3 sequence ids and 40 cells, all held by idle entries: the fork of one of them that gets 6 placed
    # cells needs its own id, a scratch id and 6 cells (what the server's reuse modes place). The other
    # entries go, least recently used first, and the fork then generates the from-scratch tokens.
    be = fake_backend(n_ctx=40)
    sched = _scheduler(be, n_seq_max=3)
    head = _shared(sched, PROMPT[:6])
    others = [_shared(sched, [40 + k] * 14) for k in range(2)]
    assert sched.table.n_free_ids == 0 and len(be.cells) == 34
    seq = sched.fork(head, 6)
    placed = np.array([(6 + i, t) for i, t in enumerate(PROMPT[6:])], dtype=np.int32).tobytes()
    sched.place(seq, PROMPT[6:], placed)
    assert seq.n_in_kv == len(PROMPT) and head in sched.prefixes
    assert others[0] not in sched.prefixes and others[0].seq_id is None  # evicted first: least recently used
    sched.submit(seq, SamplingParams(max_tokens=5, ignore_eos=True))
    _run(sched, [seq])
    assert seq.generated == be.greedy(PROMPT, 5)
