"""Forks share cells (zero-copy), free only their own cells, queue when the id pool is empty, admitted first fit."""

from __future__ import annotations

from kvfork import Engine
from tests.support.models import GEMMA
from tests.support.text import long_text


def test_forks_share_cells_instead_of_copying(gemma_path):
    # 1,024 cells hold a ~730-token prefix once plus 6 short branches; 6 copies could never fit.
    with Engine(gemma_path, n_ctx=1024, n_seq_max=8, **GEMMA) as engine:
        snap = engine.prefill(long_text(40))
        assert 600 < snap.n_tokens < 900
        outs = snap.fan_out([f"Question {i}: what failed?" for i in range(6)], max_tokens=8)
        assert all(len(o.tokens) == 8 and o.finish_reason == "length" for o in outs)
        assert 6 * snap.n_tokens > engine.ctx.n_ctx


def test_closing_branches_keeps_the_shared_prefix(gemma):
    snap = gemma.prefill(long_text(20))
    first = snap.fan_out(["Summarize.", "What broke?"], max_tokens=10)
    again = snap.fan_out(["Summarize.", "What broke?"], max_tokens=10)
    assert [o.tokens for o in first] == [o.tokens for o in again]
    assert gemma.ctx.seq_pos_max(snap.sequence.seq_id) == snap.n_tokens - 1
    snap.close()


def test_more_branches_than_sequence_ids_are_queued(gemma_path):
    with Engine(gemma_path, n_ctx=2048, n_seq_max=3, **GEMMA) as engine:
        snap = engine.prefill(long_text(10))  # one id for the snapshot, two left for branches
        questions = [f"Give fact number {i}." for i in range(5)]
        together = snap.fan_out(questions, max_tokens=6)
        alone = [snap.fan_out([q], max_tokens=6)[0] for q in questions]
        assert [o.tokens for o in together] == [o.tokens for o in alone]
        assert engine.scheduler.table.n_free_ids == 2


def test_branch_forks_a_branch(gemma, gemma_ref):
    snap = gemma.prefill(long_text(12))
    parent = snap.fork()
    parent.send("Name one station.").generate(max_tokens=6)
    child = parent.fork()
    child.send("Name another.")
    out = child.generate(max_tokens=6)
    history = child.tokens[: len(child.tokens) - len(out.tokens)]
    assert out.tokens == gemma_ref.generate(history, max_tokens=6).tokens
    for b in (child, parent, snap):
        b.close()


def test_a_chain_of_forks_each_closing_its_parent_runs_on_a_few_ids(gemma_path, gemma_ref):
    """20 forks of forks through 4 sequence ids, each parent closed once forked: a closed parent hands
    its cells to its fork (nothing pins it), and the last fork still computes what a from-scratch run does."""
    with Engine(gemma_path, n_ctx=2048, n_seq_max=4, **GEMMA) as engine:
        snap = engine.prefill(long_text(6))
        branch = snap.fork()
        snap.close()
        for i in range(20):
            branch.send(f" Step {i}:").generate(max_tokens=2)
            branch, parent = branch.fork(), branch
            parent.close()
        assert engine.scheduler.table.n_free_ids == 3
        branch.send(" Summary:")
        out = branch.generate(max_tokens=6)
        history = branch.tokens[: len(branch.tokens) - len(out.tokens)]
        assert out.tokens == gemma_ref.generate(history, max_tokens=6).tokens
        branch.close()
        assert engine.scheduler.table.n_free_ids == 4 and engine.scheduler.table.cells_reserved() == 0
