"""LoRA decoders (issue 8): branches with different adapters over one base prefill, exact against from scratch."""

from __future__ import annotations

import pytest

from kvfork import Engine
from kvfork.engine.adapters import OWN_TOKENS_KEY, PREFILL_KEY
from kvfork.errors import InvalidModelFile, InvalidParameter, ModelNotFound
from kvfork.train.gguf_lora import random_lora_gguf
from tests.support.models import GEMMA, load_all
from tests.support.text import long_text

INSTRUCTIONS = ["Summarize the log in one sentence.", "Which station restarted?", "List two faults."]


def test_branches_with_different_adapters_match_from_scratch(gemma, gemma_ref, adapter_files):
    load_all(gemma, adapter_files, "base")
    load_all(gemma_ref, adapter_files, "base")
    document = long_text(30)
    adapters = ["planner", "coder", None]
    with gemma.prefill(document) as snapshot:
        shared = snapshot.fan_out(INSTRUCTIONS, adapters=adapters, max_tokens=20, logprobs=0)
        plain = snapshot.fan_out(INSTRUCTIONS, max_tokens=20)
    for instruction, adapter, got, base in zip(INSTRUCTIONS, adapters, shared, plain, strict=True):
        ref = gemma_ref.generate(gemma_ref.prompt_tokens(document, instruction), adapter=adapter, max_tokens=20,
                                 logprobs=0)
        assert got.tokens == ref.tokens, (adapter, got.text, ref.text)
        assert got.logprobs[0].logprob == pytest.approx(ref.logprobs[0].logprob, abs=1e-3)
        assert got.reused_tokens > 0  # the document came from the shared prefill
        if adapter is not None:
            assert got.tokens != base.tokens  # the adapter was applied


def test_base_prefill_reads_base_kv_and_own_prefill_does_not(gemma_path, adapter_files):
    """The same adapter file loaded both ways: the prompt's cells are computed by the base model
    (prefill="base") or by the adapter (prefill="adapter"), which changes the first token's logprob."""
    with Engine(gemma_path, n_ctx=2048, n_seq_max=4, **GEMMA) as engine:
        engine.load_adapter("shared", adapter_files["planner"], prefill="base")
        engine.load_adapter("own", adapter_files["planner"], prefill="adapter")
        prompt = engine.prompt_tokens(long_text(12), INSTRUCTIONS[0])
        shared = engine.generate(prompt, adapter="shared", max_tokens=1, logprobs=0)
        own = engine.generate(prompt, adapter="own", max_tokens=1, logprobs=0)
        base = engine.generate(prompt, max_tokens=1, logprobs=0)
        again = engine.generate(prompt, adapter="own", max_tokens=1, logprobs=0)
    assert own.logprobs[0].logprob == pytest.approx(again.logprobs[0].logprob, abs=1e-5)
    values = [shared.logprobs[0].logprob, own.logprobs[0].logprob, base.logprobs[0].logprob]
    assert len({round(v, 4) for v in values}) == 3, values


def test_own_prefill_adapter_cannot_fork_base_kv(gemma, adapter_files):
    if "own-planner" not in gemma.adapters.names():
        gemma.load_adapter("own-planner", adapter_files["planner"])  # a file without kvfork's key: "adapter"
    assert gemma.adapters.get("own-planner").prefill == "adapter"
    with gemma.prefill(long_text(6)) as snapshot:
        with pytest.raises(InvalidParameter, match="computes its own prompts"):
            snapshot.fork(adapter="own-planner")
        with snapshot.fork() as branch:  # the engine is still usable
            assert branch.send("Name one station.").generate(max_tokens=4).tokens


def test_adapter_errors_are_clear_and_lose_nothing(gemma, gemma_path, qwen_path, adapter_files, tmp_path):
    with pytest.raises(ModelNotFound, match="unknown adapter 'nope'"):
        gemma.generate("Hello", adapter="nope", max_tokens=2)
    with pytest.raises(ModelNotFound, match="no adapter file"):
        gemma.load_adapter("missing", tmp_path / "missing.gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(InvalidModelFile, match="LoRA adapter"):
        gemma.load_adapter("broken", broken)
    foreign = random_lora_gguf(qwen_path, tmp_path / "qwen.gguf", rank=4)
    with pytest.raises(InvalidModelFile, match="another base model"):
        gemma.load_adapter("foreign", foreign)
    for bad in ({"name": "a+b"}, {"name": " x"}, {"name": "ok", "scale": 0}, {"name": "ok", "prefill": "x"}):
        name = bad.pop("name")
        with pytest.raises(InvalidParameter):
            gemma.load_adapter(name, adapter_files["coder"], **bad)
    assert "broken" not in gemma.adapters.names() and "foreign" not in gemma.adapters.names()
    assert gemma.generate("Hello", max_tokens=2).finish_reason in ("length", "stop")


def test_branches_sharing_an_adapter_match_from_scratch_bit_for_bit(gemma, gemma_ref, adapter_files):
    """Several branches per adapter put several rows through its matrices in one decode; from scratch
    there is one (the adapter files are q8_0, whose kernels do not depend on the batch)."""
    load_all(gemma, adapter_files, "base")
    load_all(gemma_ref, adapter_files, "base")
    document = long_text(30)
    adapters = ["planner", "coder"] * 3
    with gemma.prefill(document) as snapshot:
        outs = snapshot.fan_out(INSTRUCTIONS * 2, adapters=adapters, max_tokens=12, ignore_eos=True, logprobs=1)
    for instruction, adapter, got in zip(INSTRUCTIONS * 2, adapters, outs, strict=True):
        ref = gemma_ref.generate(gemma_ref.prompt_tokens(document, instruction), adapter=adapter, max_tokens=12,
                                 ignore_eos=True, logprobs=1)
        assert got.tokens == ref.tokens
        assert got.logprobs == ref.logprobs


@pytest.fixture(scope="module")
def tail_files(gemma_path, tmp_path_factory):
    """One decoder's weights twice: computing its prompts' last 12 tokens itself (as `train-decoder
    --own-tokens 12` writes), and the last one only."""
    folder = tmp_path_factory.mktemp("tail")
    return {name: random_lora_gguf(gemma_path, folder / f"{name}.gguf", rank=8, std=0.05, seed=5,
                                   targets=("attn_q", "attn_v", "ffn_up"),
                                   meta={PREFILL_KEY: "base", OWN_TOKENS_KEY: own})
            for name, own in (("tail12", "12"), ("tail1", "1"))}


def test_own_tokens_decoder_computes_its_prompt_tail_whatever_the_fork_holds(gemma, gemma_ref, tail_files):
    """own_tokens = 12: the adapter computes each prompt's last 12 tokens. A fork whose snapshot holds some
    of them as base KV (a short instruction, or the whole prompt) drops and recomputes them, so every
    branch gives exactly the tokens of the same decoder from scratch; and the setting changes the output."""
    load_all(gemma, tail_files, None)
    load_all(gemma_ref, tail_files, None)
    assert [gemma.adapters.get(n).own_tokens for n in ("tail12", "tail1")] == [12, 1]
    document = long_text(20)
    instructions = ["Why?", INSTRUCTIONS[0] + " Use the station names and the times the log gives."]
    assert len(gemma.tokenize(instructions[0])) < 12 < len(gemma.tokenize(instructions[1]))
    with gemma.prefill(document) as snapshot:
        got = snapshot.fan_out(instructions, adapters=["tail12", "tail12"], max_tokens=10, ignore_eos=True,
                               logprobs=0)
        last_only = snapshot.fan_out(instructions[1:], adapters=["tail1"], max_tokens=1, logprobs=0)[0]
        with snapshot.fork() as whole:  # the base model computes the whole prompt, then a decoder forks it
            whole.send(instructions[0]).generate(max_tokens=0)
            assert whole.tokens == gemma.prompt_tokens(document, instructions[0])
            with whole.fork(adapter="tail12") as branch:
                bare = branch.generate(max_tokens=10, ignore_eos=True, logprobs=0)
    for instruction, out in zip(instructions, got, strict=True):
        ref = gemma_ref.generate(gemma_ref.prompt_tokens(document, instruction), adapter="tail12", max_tokens=10,
                                 ignore_eos=True, logprobs=0)
        assert out.tokens == ref.tokens, (instruction, out.text, ref.text)
        assert out.logprobs[0].logprob == pytest.approx(ref.logprobs[0].logprob, abs=1e-3)
    assert bare.tokens == got[0].tokens
    assert abs(last_only.logprobs[0].logprob - got[1].logprobs[0].logprob) > 1e-2


def test_own_tokens_is_read_from_the_file_and_checked(gemma, gemma_path, tmp_path):
    bad = random_lora_gguf(gemma_path, tmp_path / "bad.gguf", rank=4, meta={PREFILL_KEY: "base", OWN_TOKENS_KEY: "0"})
    with pytest.raises(InvalidParameter, match="own_tokens"):
        gemma.load_adapter("bad-tail", bad)
    assert "bad-tail" not in gemma.adapters.names()
    one = random_lora_gguf(gemma_path, tmp_path / "one.gguf", rank=4, meta={PREFILL_KEY: "base"})
    assert gemma.load_adapter("one-tail", one).own_tokens == 1  # files from before the setting: the last token
