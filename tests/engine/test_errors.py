"""Bad input gets a clear error, and the engine stays usable afterwards."""

from __future__ import annotations

import pytest

from kvfork import ContextOverflow, Engine, InvalidModelFile, InvalidParameter, ModelNotFound
from tests.support.models import GEMMA
from tests.support.text import long_text


def test_unknown_model_name():
    with pytest.raises(ModelNotFound, match="unknown model"):
        Engine("no-such-model-7b")


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelNotFound):
        Engine(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(InvalidModelFile, match="not a GGUF"):
        Engine(fake)


def test_model_without_chat_template_says_what_to_do(gemma_path):
    with Engine(gemma_path, n_ctx=256) as engine:
        with pytest.raises(InvalidParameter, match="chat_template"):
            engine.prefill("hello")
        assert engine.prefill("hello", chat=False).n_tokens >= 1


def test_overlong_context_then_engine_still_works(gemma_path):
    with Engine(gemma_path, n_ctx=512, **GEMMA) as engine:
        with pytest.raises(ContextOverflow, match="raise n_ctx"):
            engine.prefill(long_text(80))
        snap = engine.prefill(long_text(5))
        with pytest.raises(ContextOverflow):
            snap.fan_out([long_text(40)], max_tokens=8)  # the instruction alone overflows
        with pytest.raises(ContextOverflow):
            snap.fan_out(["fine"], max_tokens=10_000)  # room for the prompt, not for max_tokens
        out = snap.fan_out(["Summarize.", "Title?"], max_tokens=5)
        assert [len(o.tokens) for o in out] == [5, 5]


def test_empty_prompts(gemma):
    with pytest.raises(InvalidParameter):
        gemma.prefill("", chat=False)
    with pytest.raises(InvalidParameter):
        gemma.generate([])
    with pytest.raises(TypeError):
        gemma.prefill(None)  # type: ignore[arg-type]


def test_invalid_engine_config():
    with pytest.raises(InvalidParameter):
        Engine("gemma3-270m", n_seq_max=1)
    with pytest.raises(InvalidParameter):
        Engine("gemma3-270m", kv_type="q4_0")
