"""Helpers for the kvcache tests: small contexts on the catalog models, prefill and greedy decoding by hand."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from kvfork.config import EngineConfig
from kvfork.engine.batch import Batch
from kvfork.engine.llama import LlamaContext, LlamaModel
from kvfork.kvcache import KvTensor, SeqState
from tests.support.text import long_text

# (kv_type, flash_attn): kvfork's default cache, f16, and f16 without flash attention (V transposed)
KV_LAYOUTS = [("q8_0", "on"), ("f16", "on"), ("f16", "off")]


@contextmanager
def kv_context(model: LlamaModel, kv_type: str, flash_attn: str) -> Iterator[LlamaContext]:
    """A small context (512 cells) with the given cache layout, freed on exit."""
    # NOTE: one thread: deterministic, and no spinning thread barrier on a busy 2-core machine.
    config = EngineConfig(n_ctx=512, n_batch=256, n_ubatch=256, n_seq_max=4, n_threads=1,
                          kv_type=kv_type, flash_attn=flash_attn, progress=False)  # type: ignore[arg-type]
    ctx = LlamaContext(model, config)
    try:
        yield ctx
    finally:
        ctx.close()


def prompt(model: LlamaModel, n_sentences: int = 3) -> list[int]:
    """A short deterministic prompt (about 20 tokens per sentence)."""
    return model.tokenize(long_text(n_sentences), add_special=True, parse_special=False)


def prefill(ctx: LlamaContext, tokens: list[int], seq: int = 0, pos0: int = 0) -> np.ndarray:
    """Decode `tokens` at positions pos0.. in one batch; the logits after the last one."""
    batch = Batch()
    for i, t in enumerate(tokens):
        batch.add(t, pos0 + i, seq, logits=i == len(tokens) - 1)
    ctx.decode(batch)
    return ctx.logits(len(tokens) - 1)


def greedy(ctx: LlamaContext, logits: np.ndarray, seq: int, pos: int, n: int) -> list[int]:
    """n argmax tokens, starting from `logits`, the next one going to position `pos` of `seq`."""
    return greedy_steps(ctx, logits, seq, pos, n)[0]


def greedy_steps(
    ctx: LlamaContext, logits: np.ndarray, seq: int, pos: int, n: int
) -> tuple[list[int], list[np.ndarray]]:
    """greedy's tokens and the logits each was chosen from."""
    out, steps = [], [logits]
    for i in range(n):
        out.append(int(np.argmax(logits)))
        if i + 1 < n:
            logits = prefill(ctx, [out[-1]], seq, pos + i)
            steps.append(logits)
    return out, steps


def forced(ctx: LlamaContext, logits: np.ndarray, seq: int, pos: int, tokens: list[int]) -> list[np.ndarray]:
    """The logits before each of `tokens` (teacher-forced from `logits`, tokens[0] going to position `pos`)."""
    out = [logits]
    for i, t in enumerate(tokens[:-1]):
        out.append(prefill(ctx, [t], seq, pos + i))
    return out


def reencoded(state: SeqState) -> SeqState:
    """The same state with every tensor marked edited, so encode() rebuilds all bytes from the values."""
    parts = tuple(
        part.with_layers(k=tuple(_edited(t) for t in part.k), v=tuple(_edited(t) for t in part.v))
        for part in state.caches
    )
    return state.with_caches(parts)


def _edited(t: KvTensor) -> KvTensor:
    out = t.with_values(t.values)
    assert out.raw is None
    return out
