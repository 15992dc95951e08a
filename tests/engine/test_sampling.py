"""Per-branch sampling through llama.cpp's sampler chain: limits, stop strings, seeds, validation."""

from __future__ import annotations

import pytest

from kvfork import InvalidParameter, SamplingParams
from tests.support.text import long_text


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_tokens=-1),
        dict(temperature=-0.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-3),
        dict(min_p=1.0),
        dict(repeat_penalty=0.0),
        dict(seed=-1),
        dict(stop=[""]),
    ],
)
def test_invalid_sampling_values_are_rejected(bad):
    with pytest.raises(InvalidParameter):
        SamplingParams(**bad)


def test_unknown_sampling_name_is_rejected(gemma):
    snap = gemma.prefill(long_text(3))
    with pytest.raises(InvalidParameter, match="unknown sampling parameter"):
        snap.fan_out(["x"], temprature=0.5)
    assert snap.fan_out(["Say hi."], max_tokens=2)[0].completion_tokens == 2  # still usable
    snap.close()


def test_per_branch_settings_in_one_batch(gemma):
    snap = gemma.prefill(long_text(8))
    params = [
        SamplingParams(max_tokens=3),
        SamplingParams(max_tokens=9),
        SamplingParams(max_tokens=40, temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=7),
    ]
    outs = snap.fan_out(["a", "b", "c"], params=params)
    assert [len(o.tokens) for o in outs[:2]] == [3, 9]
    assert 1 <= len(outs[2].tokens) <= 40
    snap.close()


def test_same_seed_same_tokens_different_seed_differs(gemma):
    snap = gemma.prefill(long_text(8))
    kw = dict(max_tokens=24, temperature=1.2, seed=1234)
    a, b = snap.fan_out(["Continue the log.", "Continue the log."], **kw)
    assert a.tokens == b.tokens
    others = [snap.fan_out(["Continue the log."], max_tokens=24, temperature=1.2, seed=s)[0].tokens for s in (1, 2, 3)]
    assert any(t != a.tokens for t in others)
    snap.close()


def test_stop_string_cuts_the_text(gemma):
    snap = gemma.prefill(long_text(8), chat=False)
    free = snap.fan_out([" The"], max_tokens=30)[0]
    assert len(free.text) > 4
    stop = free.text[3:6]
    cut = snap.fan_out([" The"], max_tokens=30, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text
    snap.close()
