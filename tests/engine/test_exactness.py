"""Exactness: with greedy sampling a forked branch produces exactly the tokens of a from-scratch run."""

from __future__ import annotations

import pytest

from kvfork import Engine
from tests.support.models import GEMMA
from tests.support.text import long_text

INSTRUCTIONS = [
    "Summarize the log in two sentences.",
    "Which equipment appears most often?",
    "List three times when a fault was reported.",
    "Write a title for this log.",
]


def _reference(engine: Engine, document: str, instruction: str, *, system: str | None, chat: bool, n: int) -> tuple:
    return engine.generate(engine.prompt_tokens(document, instruction, system=system, chat=chat), max_tokens=n).tokens


def test_gemma_fanout_beyond_sliding_window_matches_scratch(gemma, gemma_ref):
    doc = long_text(70)  # ~900 tokens: past gemma's 512-token sliding window
    snap = gemma.prefill(doc, system="You are a careful analyst.")
    assert snap.n_tokens > 2 * gemma.model.n_swa > 0
    outs = snap.fan_out(INSTRUCTIONS, max_tokens=24)
    for instruction, out in zip(INSTRUCTIONS, outs, strict=False):
        assert out.reused_tokens == snap.n_tokens
        assert out.computed_tokens == out.prompt_tokens - snap.n_tokens
        ref = _reference(gemma_ref, doc, instruction, system="You are a careful analyst.", chat=True, n=24)
        assert out.tokens == ref
    snap.close()


def test_gemma_plain_mode_matches_scratch(gemma, gemma_ref):
    doc = long_text(40)
    snap = gemma.prefill(doc, chat=False)
    tails = [" In summary,", " The most serious issue was", " Next steps:"]
    outs = snap.fan_out(tails, max_tokens=16)
    for tail, out in zip(tails, outs, strict=False):
        assert len(out.tokens) == 16
        assert out.tokens == _reference(gemma_ref, doc, tail, system=None, chat=False, n=16)
    snap.close()


def test_branches_of_a_snapshot_above_freed_cells_match_scratch(gemma_path, gemma_ref):
    """A snapshot closed below a live one leaves free cells under it, where llama.cpp writes the next tokens; a
    branch's tokens written below its prefix's cells would be summed before them (failed here before the
    scheduler compacted the cache: one of three branches parted from the from-scratch run)."""
    with Engine(gemma_path, n_ctx=2048, n_seq_max=8, progress=False, **GEMMA) as engine:
        below = engine.prefill("An unrelated maintenance note. " * 60, chat=False)
        doc = long_text(30)
        snap = engine.prefill(doc, chat=False)
        below.close()
        tails = [" In summary,", " The most serious issue was", " Next steps:"]
        for tail, out in zip(tails, snap.fan_out(tails, max_tokens=16), strict=True):
            assert out.tokens == _reference(gemma_ref, doc, tail, system=None, chat=False, n=16)


def test_branches_after_a_compaction_next_to_a_sequence_past_the_window_match_scratch(gemma_path, gemma_ref):
    """gemma3's sliding-window cache keeps cells that slid out of a long sequence's window, and llama.cpp
    writes any sequence's new tokens over them; a compaction moves them to the front, so they go first
    (failed here while the compaction kept them: the forks' tokens went below their prefix's cells)."""
    with Engine(gemma_path, n_ctx=2048, n_seq_max=8, progress=False, **GEMMA) as engine:
        past = engine.prefill(long_text(60), chat=False)
        assert past.n_tokens > engine.model.n_swa + 100
        snap = engine.prefill("Once upon a time", chat=False)
        freed = engine.prefill("An unrelated maintenance note. " * 20, chat=False)
        freed.close()
        want = _reference(gemma_ref, "Once upon a time", "", system=None, chat=False, n=16)
        assert [out.tokens for out in snap.fan_out(["", "", ""], max_tokens=16)] == [want] * 3


def test_multi_turn_branch_matches_scratch(gemma, gemma_ref):
    doc = long_text(30)
    snap = gemma.prefill(doc)
    branch = snap.fork()
    first = branch.send("What happened on day 2?").generate(max_tokens=12)
    branch.send("And on day 3?")
    second = branch.generate(max_tokens=12)
    history = branch.tokens[: len(branch.tokens) - len(second.tokens)]
    assert second.reused_tokens >= snap.n_tokens + len(first.tokens) - 1
    assert second.tokens == gemma_ref.generate(history, max_tokens=12).tokens
    branch.close()
    snap.close()


@pytest.mark.parametrize("n_branches", [3])
def test_qwen_chat_fanout_matches_scratch(qwen_path, n_branches):
    doc = long_text(25)  # a few hundred tokens: qwen prefills ~100-190 tok/s here
    with Engine(qwen_path, n_ctx=2048, n_seq_max=8, exact=True) as engine, \
            Engine(qwen_path, n_ctx=2048, n_seq_max=2, exact=True) as ref:
        snap = engine.prefill(doc, system="You are a careful analyst.")
        outs = snap.fan_out(INSTRUCTIONS[:n_branches], max_tokens=20)
        for instruction, out in zip(INSTRUCTIONS, outs, strict=False):
            assert out.tokens == _reference(ref, doc, instruction, system="You are a careful analyst.", chat=True, n=20)


def test_many_branches_of_different_lengths_match_scratch_bit_for_bit(gemma_path, gemma_ref):
    """Ten branches (a decode of 8 rows or more: ggml's tiled K-quant matmul would take it) that end at
    different lengths (freed cells under running branches would take their next tokens out of order)."""
    doc = long_text(30)
    questions = [f"What happened on day {1 + i % 4}? Answer {i}." for i in range(10)]
    lengths = [3, 9, 17, 30, 5] * 2
    with Engine(gemma_path, n_ctx=4096, n_seq_max=16, **GEMMA) as engine:
        snap = engine.prefill(doc)
        params = [engine.sampling(max_tokens=n, ignore_eos=True, logprobs=1) for n in lengths]
        outs = snap.fan_out(questions, params=params)
        snap.close()
    for question, n, out in zip(questions, lengths, outs, strict=True):
        ref = gemma_ref.generate(gemma_ref.prompt_tokens(doc, question), max_tokens=n, ignore_eos=True, logprobs=1)
        assert out.tokens == ref.tokens
        assert out.logprobs == ref.logprobs  # bit-identical logits, not merely the same argmax
