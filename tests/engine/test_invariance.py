"""Batch and layout invariance of kvfork's patched llama.cpp (engine/ggml-batch-invariant.patch, `kvfork build`):
one token's logits decoded alone equal, bit for bit, the same token's inside batches of 2 to 512 rows, with its
sequence's cells contiguous or interleaved with other sequences' cells and holes, at 1 and 2 threads, for both
catalog models (Gemma's 2048-wide ffn_down takes another tiled-matmul instance than Qwen's 4864) and a Q5_K
requantization of Gemma (one token alone goes through the K-quant gemv, batches of 7+ through the tile).

ggml reads its kernel switches once per process, so each check runs in a fresh interpreter
(kvfork.engine.invariance), with ggml's default matmul settings (the tiled K-quant kernel on).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvfork.engine import llama
from kvfork.engine.invariance import LAYOUTS, SIZES
from kvfork.scheduler.prefix_cache import MIN_SUFFIX

PATCHED = llama.batch_invariant_build()
needs_patched = pytest.mark.skipif(
    not PATCHED, reason="llama-cpp-python is not kvfork's patched build (no BATCH_INVARIANT = 1 in"
    " llama_print_system_info); `kvfork build` builds it")


def _check(path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GGML_CPU_BATCH_INVARIANT", "GGML_CPU_TILED_MM")}
    run = subprocess.run([sys.executable, "-m", "kvfork.engine.invariance", str(path), *args],
                         capture_output=True, text=True, env=env, timeout=420)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gemma_q5k_path(gemma_path, tmp_path_factory):
    """gemma3-270m requantized to Q5_K_S by llama.cpp (Q5_K in ffn_down and attn_output): the third K-quant the
    patched kernels' decode gemv handles (the catalog models have Q4_K and Q6_K)."""
    import llama_cpp

    out = tmp_path_factory.mktemp("q5k") / "gemma3-270m-q5_k_s.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(gemma_path).encode(), str(out).encode(), params) == 0
    return out


@needs_patched
@pytest.mark.parametrize("model", ["gemma_path", "qwen_path", "gemma_q5k_path"])
def test_one_token_alone_equals_it_inside_any_batch_and_layout(model, request):
    path = request.getfixturevalue(model)
    references = set()
    for threads in (1, 2):
        report = _check(path, "--threads", str(threads))
        cases = report["cases"]
        assert {(c["layout"], c["rows"]) for c in cases} >= {(layout, n) for layout in LAYOUTS for n in SIZES}
        assert [c for c in cases if not c["equal"]] == [], f"{threads} threads"
        references.add(report["reference"])
    assert len(references) == 1  # and the same bits at 1 and 2 threads


@needs_patched
def test_without_the_switch_the_same_build_is_not_invariant(gemma_path):
    # NOTE: the control: llama.cpp's own kernels (f16 cache, flash attention on, switch off) differ between a
    # token alone and inside 64 rows; it shows that the check above can fail.
    report = _check(gemma_path, "--threads", "2", "--fast", "--sizes", "2,64")
    assert any(not c["equal"] for c in report["cases"])


def test_exact_mode_takes_the_patched_kernels_when_present(monkeypatch):
    monkeypatch.setattr(llama, "batch_invariant_build", lambda: True)
    monkeypatch.setattr(llama, "_decoded", False)
    monkeypatch.setattr(llama, "_exact_kernels", None)
    monkeypatch.setenv(llama.BATCH_INVARIANT_ENV, "")
    monkeypatch.delenv(llama.BATCH_INVARIANT_ENV)  # recorded as absent: the switch is undone after the test
    llama._require_exact_kernels()
    assert os.environ[llama.BATCH_INVARIANT_ENV] == "1"
    assert llama.exact_kernels() == "batch-invariant"


def test_exact_mode_falls_back_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(llama, "batch_invariant_build", lambda: False)
    monkeypatch.setattr(llama, "_decoded", False)
    monkeypatch.setattr(llama, "_exact_kernels", None)
    monkeypatch.setenv("GGML_CPU_TILED_MM", "0")
    with caplog.at_level(logging.WARNING, logger="kvfork.engine"):
        llama._require_exact_kernels()
        llama._require_exact_kernels()
    assert llama.exact_kernels() == "fallback"
    warnings = [r for r in caplog.records if "kvfork build" in r.getMessage()]
    assert len(warnings) == 1


def test_a_patched_build_too_late_for_the_switch_falls_back(monkeypatch, caplog):
    # NOTE: ggml read its switches at this process's first decode; exact mode then keeps today's settings
    monkeypatch.setattr(llama, "batch_invariant_build", lambda: True)
    monkeypatch.setattr(llama, "_decoded", True)
    monkeypatch.setattr(llama, "_exact_kernels", None)
    monkeypatch.setenv(llama.BATCH_INVARIANT_ENV, "")
    monkeypatch.delenv(llama.BATCH_INVARIANT_ENV)
    monkeypatch.setenv("GGML_CPU_TILED_MM", "0")
    with caplog.at_level(logging.WARNING, logger="kvfork.engine"):
        llama._require_exact_kernels()
    assert llama.exact_kernels() == "fallback"
    assert llama.BATCH_INVARIANT_ENV not in os.environ
    assert "first decode" in caplog.text


_FORK_PROBE = """
import json, sys
from kvfork import Engine
from kvfork.engine.llama import exact_kernels
from tests.support.text import long_text

kw = dict(exact=True, chat_template="gemma", n_ctx=2048, progress=False)
engine, ref = Engine(sys.argv[1], **kw), Engine(sys.argv[1], **kw)
doc = long_text(20)
base = engine.prefill(doc, chat=False)
rows = []
for tail in [" Then the", " In the end, the crew", " After the storm the operators said"]:
    snap = engine.prefill(doc + tail, chat=False)
    (out,) = snap.fan_out([" In short,"], max_tokens=12)
    want = ref.generate(ref.prompt_tokens(doc + tail, " In short,", chat=False), max_tokens=12)
    rows.append({"suffix": snap.n_tokens - base.n_tokens, "computed": snap.sequence.n_prompt_computed,
                 "equal": list(out.tokens) == list(want.tokens)})
    snap.close()
print(json.dumps({"kernels": exact_kernels(), "rows": rows}))
"""


@needs_patched
def test_a_fork_leaving_a_few_tokens_computes_only_them_and_matches_scratch(gemma_path):
    # NOTE: on llama.cpp's own kernels a 3-6-token ubatch rounds otherwise than the same tokens inside a long
    # prompt (it flipped greedy tokens), so exact mode there leaves a fork MIN_SUFFIX tokens to compute
    # (prefix_cache.MIN_SUFFIX); on the patched kernels it computes just its own few tokens, exactly.
    env = {k: v for k, v in os.environ.items() if k not in ("GGML_CPU_BATCH_INVARIANT", "GGML_CPU_TILED_MM")}
    run = subprocess.run([sys.executable, "-c", _FORK_PROBE, str(gemma_path)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["kernels"] == "batch-invariant"
    rows = report["rows"]
    assert all(2 <= r["suffix"] < MIN_SUFFIX for r in rows), rows
    assert [r["computed"] for r in rows] == [r["suffix"] for r in rows]
    assert all(r["equal"] for r in rows), rows
