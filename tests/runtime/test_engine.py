"""The Engine's own logic on the fake backend (no weights): fan-out, the prefix cache, multi-turn branches and
failed batches. The same behaviour on gemma3-270m, bit for bit, is in tests/engine/test_exactness.py."""

from __future__ import annotations

import pytest

from kvfork.errors import ContextOverflow

DOC = "The pump reported a pressure drop at 08:13 on day 1. " * 8
QUESTIONS = ["When?", "What failed?", "Who logged it?"]


def test_fan_out_gives_every_branch_its_from_scratch_tokens(fake_engine):
    engine, ref = fake_engine(), fake_engine()
    with engine.prefill(DOC, system="Be brief.") as snap:
        outs = snap.fan_out(QUESTIONS, max_tokens=6)
    want = [ref.generate(ref.prompt_tokens(DOC, q, system="Be brief."), max_tokens=6) for q in QUESTIONS]
    assert [o.tokens for o in outs] == [w.tokens for w in want]
    assert all(o.reused_tokens == snap.n_tokens for o in outs)  # the document was prefilled once


def test_a_prefill_that_extends_a_live_snapshot_forks_it(fake_engine):
    engine = fake_engine()
    decoded = engine.ctx.decodes  # the fake backend's record of every batch
    with engine.prefill(DOC, chat=False) as short:
        n = sum(len(b) for b in decoded)
        with engine.prefill(DOC + " More text follows here.", chat=False) as long_:
            assert sum(len(b) for b in decoded) - n == long_.n_tokens - short.n_tokens  # only the extension
    assert engine.scheduler.prefixes.entries() == [] and engine.scheduler.table.n_live == 0


def test_a_branch_keeps_its_turns(fake_engine):
    engine, ref = fake_engine(), fake_engine()
    with engine.prefill(DOC) as snap:
        branch = snap.fork()
        first = branch.send("When?").generate(max_tokens=5)
        second = branch.send("And then?").generate(max_tokens=5)
        history = list(branch.tokens)
        branch.close()
    # NOTE: the second turn reuses the first turn's prompt and reply (but a last sampled token never decoded)
    assert second.reused_tokens in (first.prompt_tokens + first.completion_tokens - 1,
                                    first.prompt_tokens + first.completion_tokens)
    # the second turn's reply is what a from-scratch run of the whole history gives
    assert ref.generate(history[: len(history) - len(second.tokens)], max_tokens=5).tokens == second.tokens


def test_a_failed_batch_leaves_every_branch_as_it_was(fake_engine):
    engine, ref = fake_engine(n_ctx=2048), fake_engine(n_ctx=2048)
    snap = engine.prefill(DOC)
    a, b, c = snap.fork().send("one"), snap.fork().send("two"), snap.fork().send("three")
    too_long, ok = engine.sampling(max_tokens=100_000), engine.sampling(max_tokens=4)
    with pytest.raises(ContextOverflow):
        engine.generate_branches([a, b, c], [ok, too_long, ok])
    assert [len(x.tokens) for x in (a, b, c)] == [snap.n_tokens] * 3
    # each branch still holds its text, once: a retry without the bad one gives from-scratch tokens
    outs = engine.generate_branches([a, c], [ok, ok])
    assert [o.tokens for o in outs] == [ref.generate(ref.prompt_tokens(DOC, q), max_tokens=4).tokens
                                        for q in ("one", "three")]
