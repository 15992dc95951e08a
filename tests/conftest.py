"""Shared fixtures: the real catalog models, pulled once per machine (~/.cache/kvfork or $KVFORK_CACHE)."""

from __future__ import annotations

import os

import pytest

from kvfork import Engine, resolve_model

# NOTE: one pytest process hosts engines of both modes, and exact mode needs ggml's tiled matmul off,
# which ggml reads once per process (see engine/llama.py). Fast-mode tests here run without it; the
# fast defaults as users get them (tiled matmul on) are tested in a subprocess (tests/engine/test_fast.py).
os.environ.setdefault("GGML_CPU_TILED_MM", "0")

# NOTE: gemma3-270m has no chat template in its GGUF (a base model); llama.cpp's built-in "gemma"
# template is the one its instruct sibling uses, and it exercises the same layout code as qwen's.
# The tests that compare forks with from-scratch runs bit for bit run in exact mode.
GEMMA = dict(chat_template="gemma", exact=True)
GEMMA_FAST = dict(chat_template="gemma")


@pytest.fixture(scope="session")
def gemma_path():
    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def qwen_path():
    return resolve_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def gemma(gemma_path):
    """A shared engine for tests that do not care what else lives in the context."""
    with Engine(gemma_path, n_ctx=4096, n_seq_max=8, **GEMMA) as engine:
        yield engine


@pytest.fixture(scope="session")
def gemma_ref(gemma_path):
    """A second engine (its own context) for from-scratch reference runs."""
    with Engine(gemma_path, n_ctx=4096, n_seq_max=8, **GEMMA) as engine:
        yield engine


@pytest.fixture(scope="session")
def adapter_files(gemma_path, tmp_path_factory):
    """Two real LoRA GGUFs for gemma3-270m (random weights, large enough to change greedy outputs)."""
    from kvfork.train.gguf_lora import random_lora_gguf

    folder = tmp_path_factory.mktemp("adapters")
    return {
        name: random_lora_gguf(gemma_path, folder / f"{name}.gguf", rank=8, std=0.05, seed=seed,
                               targets=("attn_q", "attn_v", "ffn_up"))
        for name, seed in (("planner", 1), ("coder", 2))
    }


def long_text(n_sentences: int) -> str:
    """A deterministic document with varied content, so greedy decoding has something to say."""
    subjects = ["The pump", "Station four", "The night crew", "Valve 12", "The backup line", "The operator"]
    verbs = ["reported", "measured", "restarted", "flagged", "inspected", "logged"]
    objects = ["a pressure drop", "high turbidity", "a sensor fault", "the chlorine dose", "a leak", "the flow rate"]
    out = []
    for i in range(n_sentences):
        s, v, o = subjects[i % 6], verbs[(i * 5 + 1) % 6], objects[(i * 7 + 2) % 6]
        out.append(f"{s} {v} {o} at {8 + i % 12}:{(i * 13) % 60:02d} on day {1 + i // 9}.")
    return " ".join(out)
