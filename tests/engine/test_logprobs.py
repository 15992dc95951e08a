"""Logprobs: each generated token's log-probability under the model, identical for a fork and a from-scratch run."""

from __future__ import annotations

import math

import pytest

from kvfork import InvalidParameter, SamplingParams
from tests.support.text import long_text


def test_greedy_logprobs_are_the_argmax_and_match_scratch(gemma, gemma_ref):
    doc = long_text(30)
    snap = gemma.prefill(doc, system="You are brief.")
    (out,) = snap.fan_out(["Name the first event."], max_tokens=12, logprobs=3)
    snap.close()
    assert out.logprobs is not None and len(out.logprobs) == len(out.tokens) == 12
    for token, lp in zip(out.tokens, out.logprobs, strict=True):
        assert lp.token == token and lp.logprob <= 0.0
        assert len(lp.top) == 3 and lp.top[0] == (token, lp.logprob)  # greedy picks the likeliest token
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-9
    ref = gemma_ref.generate(gemma_ref.prompt_tokens(doc, "Name the first event.", system="You are brief."),
                             max_tokens=12, logprobs=3)
    assert ref.tokens == out.tokens
    assert ref.logprobs == out.logprobs  # a fork's logits are bit-identical to a from-scratch run's


def test_sampled_tokens_get_their_own_logprob(gemma):
    out = gemma.generate("The backup line", chat=False, max_tokens=10, temperature=1.0, seed=3, logprobs=0)
    assert out.logprobs is not None and [lp.token for lp in out.logprobs] == list(out.tokens)
    assert all(lp.top == () and lp.logprob <= 0.0 for lp in out.logprobs)
    assert gemma.generate("The backup line", chat=False, max_tokens=4).logprobs is None


def test_logprobs_bounds():
    with pytest.raises(InvalidParameter, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(InvalidParameter, match="logprobs"):
        SamplingParams(logprobs=-1)
