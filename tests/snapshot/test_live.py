"""The live tier: a prefill that extends (or repeats) a snapshot still in the context forks it, zero-copy."""

from __future__ import annotations

from tests.support.text import long_text


def test_same_document_again_is_a_fork_not_a_prefill(gemma):
    doc = long_text(30)
    first = gemma.prefill(doc)
    forks = gemma.scheduler.table.n_forks
    again = gemma.prefill(doc)
    assert gemma.scheduler.table.n_forks == forks + 1
    assert again.sequence.n_prompt_computed == 0 and again.tokens == first.tokens
    ask = ["What happened on day 3?", "Name a valve."]
    assert [o.tokens for o in again.fan_out(ask, max_tokens=8)] == [o.tokens for o in first.fan_out(ask, max_tokens=8)]
    first.close()  # the second snapshot still holds the shared cells
    assert len(again.fan_out(ask[:1], max_tokens=4)[0].tokens) == 4
    again.close()


def test_longer_document_prefills_only_its_tail(gemma, gemma_ref):
    base = long_text(20)
    snap = gemma.prefill(base, chat=False)
    longer = gemma.prefill(base + " " + long_text(5), chat=False)
    assert longer.sequence.n_shared > 0.8 * snap.n_tokens
    assert longer.sequence.n_prompt_computed == longer.n_tokens - longer.sequence.n_shared
    out = longer.fan_out([" In short,"], max_tokens=10)[0]
    prompt = gemma_ref.prompt_tokens(base + " " + long_text(5), " In short,", chat=False)
    ref = gemma_ref.generate(prompt, max_tokens=10)
    assert out.tokens == ref.tokens
    longer.close()
    snap.close()


def test_shorter_request_cannot_cut_into_a_sliding_window(gemma, gemma_ref):
    long_doc = long_text(60)  # > 512 tokens: gemma's window no longer holds the early positions
    snap = gemma.prefill(long_doc, chat=False)
    short_doc = long_doc[: len(long_doc) // 3]
    short = gemma.prefill(short_doc, chat=False)
    assert short.sequence.parent is None, "cut would need positions the sliding window dropped: prefill instead"
    out = short.fan_out([" Next,"], max_tokens=8)[0]
    prompt = gemma_ref.prompt_tokens(short_doc, " Next,", chat=False)
    assert out.tokens == gemma_ref.generate(prompt, max_tokens=8).tokens
    short.close()
    snap.close()
