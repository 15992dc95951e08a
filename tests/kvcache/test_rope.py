"""Placing cached keys at new positions: numpy re-rotation against llama.cpp's own K-shift (seq_add)."""

from __future__ import annotations

import numpy as np
import pytest

from kvfork.errors import InvalidParameter
from kvfork.kvcache import (
    CacheState,
    GgmlType,
    KvTensor,
    RopeParams,
    RopeSpec,
    RopeType,
    SeqState,
    decode,
    encode,
    rerotate,
    rotate_keys,
)
from tests.support.kv import forced, greedy_steps, kv_context, prefill, prompt

DELTA = 100


def test_rope_spec_of_catalog_models(load_model):
    gemma = RopeSpec.from_model(load_model("gemma"))
    # llama-model.cpp get_rope_freq_base: sliding-window layers use rope.freq_base_swa (gemma3: 10000)
    assert gemma.rope_type is RopeType.NEOX
    assert gemma.full == RopeParams(1e6, 1.0, 256, 256)
    assert gemma.swa == RopeParams(1e4, 1.0, 256, 256)
    qwen = RopeSpec.from_model(load_model("qwen"))
    assert qwen.rope_type is RopeType.NEOX
    assert qwen.full == RopeParams(1e6, 1.0, 64, 64)
    assert qwen.swa is None


def _keys_diff(a: SeqState, b: SeqState, below: int) -> tuple[float, float]:
    """Largest |a - b| relative to the tensor's largest key, and the fraction of equal values, over cells < below."""
    worst, equal, total = 0.0, 0, 0
    for pa, pb in zip(a.caches, b.caches, strict=True):
        rows = pa.positions < below
        assert np.array_equal(pa.positions, pb.positions)
        for ka, kb in zip(pa.k, pb.k, strict=True):
            x, y = ka.values[rows], kb.values[rows]
            worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
            equal += int((x == y).sum())
            total += x.size
    return worst, equal / total


@pytest.mark.parametrize("kv_type", ["q8_0", "f16"])
@pytest.mark.parametrize("name", ["gemma", "qwen"])
def test_numpy_rerotation_matches_llama_kshift(load_model, name, kv_type):
    model = load_model(name)
    spec = RopeSpec.from_model(model)
    with kv_context(model, kv_type, "on") as ctx:
        assert ctx.can_shift()
        *seg, q = prompt(model)
        n, at = len(seg), len(seg) + DELTA

        # llama.cpp: cache the segment at 0.., move it by DELTA; the K-shift runs before the next decode
        ctx.clear()
        prefill(ctx, seg)
        ctx.seq_add(0, 0, n, DELTA)
        logits_llama = prefill(ctx, [q], pos0=at)
        keys_llama = decode(ctx.state_seq_get(0))
        gen_llama, llama_steps = greedy_steps(ctx, logits_llama, seq=0, pos=at + 1, n=8)

        # numpy: cache the segment at 0.., re-rotate the decoded blob, restore it
        ctx.clear()
        prefill(ctx, seg)
        moved = rerotate(decode(ctx.state_seq_get(0)), spec, DELTA)
        assert moved.positions.tolist() == list(range(DELTA, at))
        ctx.clear()
        ctx.state_seq_set(0, encode(moved))
        logits_numpy = prefill(ctx, [q], pos0=at)
        keys_numpy = decode(ctx.state_seq_get(0))
        steps_numpy = forced(ctx, logits_numpy, seq=0, pos=at + 1, tokens=gen_llama)

        # reference: the segment computed at its new positions from scratch
        ctx.clear()
        prefill(ctx, seg, pos0=DELTA)
        logits_fresh = prefill(ctx, [q], pos0=at)

    worst, same = _keys_diff(keys_llama, keys_numpy, at)
    vs_llama = float(np.abs(logits_numpy - logits_llama).max())
    llama_vs_fresh = float(np.abs(logits_llama - logits_fresh).max())
    numpy_vs_fresh = float(np.abs(logits_numpy - logits_fresh).max())
    print(f"\n{name} {kv_type}: keys max rel diff {worst:.2e}, equal {same:.4%}; max |logit diff| numpy vs "
          f"seq_add {vs_llama:.2e}, seq_add vs fresh {llama_vs_fresh:.2e}, numpy vs fresh {numpy_vs_fresh:.2e}")
    if kv_type == "f16":
        # same float32 ops as ggml's rope (fma, libm cosf/sinf), one f16 rounding: bit-identical
        assert worst == 0.0 and same == 1.0
        assert np.array_equal(logits_numpy, logits_llama)
    else:
        # q8_0: ggml's x86 kernel quantizes with 127/amax and rounds halves to even, the codec with ggml's
        # reference (1/d, halves away from zero): now and then a value lands one quantization step away
        assert worst < 1e-2 and same > 0.9999
        assert vs_llama <= llama_vs_fresh
        assert int(np.argmax(logits_numpy)) == int(np.argmax(logits_llama))
    # along llama's own greedy continuation, the numpy cache predicts its tokens, but where the difference
    # between the caches can explain it: a near tie of llama's choice and numpy's, closer than they differ
    for token, ours, theirs in zip(gen_llama, steps_numpy, llama_steps, strict=True):
        choice = int(np.argmax(ours))
        if choice != token:
            assert theirs[token] - theirs[choice] < np.abs(ours - theirs).max(), (token, choice)


def _state(positions: list[int], n_embd: int = 128) -> SeqState:
    rng = np.random.default_rng(3)
    k = KvTensor(GgmlType.F16, rng.normal(size=(len(positions), n_embd)).astype(np.float16).astype(np.float32))
    v = KvTensor(GgmlType.F16, np.zeros((len(positions), n_embd), dtype=np.float32))
    part = CacheState(1, 0, np.array(positions, dtype=np.int32), ((0,),) * len(positions), False, (k,), (v,))
    return SeqState(0, (part,))


def test_unshiftable_requests_are_refused():
    one_cache = RopeSpec(RopeType.NEOX, RopeParams(1e4, 1.0, 64, 64))
    with pytest.raises(InvalidParameter, match="multi-axis"):
        rerotate(_state([0, 1]), RopeSpec(RopeType.MROPE, RopeParams(1e4, 1.0, 64, 64)), 5)
    with pytest.raises(InvalidParameter, match="below position 0"):
        rerotate(_state([3, 4]), one_cache, -4)
    two_caches = RopeSpec(RopeType.NEOX, one_cache.full, swa=RopeParams(1e4, 1.0, 64, 64))
    with pytest.raises(InvalidParameter, match="does not match"):
        rerotate(_state([0, 1]), two_caches, 5)  # a one-cache blob with a sliding-window model's spec
    moved = rerotate(_state([0, 1, 2, 3]), one_cache, 10, p0=2)
    assert moved.positions.tolist() == [0, 1, 12, 13]
    before, after = _state([0, 1, 2, 3]).caches[0].k[0].values, moved.caches[0].k[0].values
    assert np.array_equal(after[:2], before[:2]) and not np.allclose(after[2:], before[2:])


def test_norm_rope_pairs_adjacent_dims_and_rotations_compose():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(5, 2 * 64)).astype(np.float32)  # 5 cells, 2 heads of 64
    p = RopeParams(10000.0, 1.0, 64, 64)
    # NORM rotates pairs (2i, 2i+1); NEOX pairs (i, i+32): the same rotation after moving the dims
    halves = np.concatenate([np.arange(0, 64, 2), np.arange(1, 64, 2)])
    norm = rotate_keys(x, 37, p, RopeType.NORM).reshape(5, 2, 64)[..., halves]
    neox = rotate_keys(x.reshape(5, 2, 64)[..., halves].reshape(5, 128), 37, p, RopeType.NEOX)
    assert np.array_equal(norm.reshape(5, 128), neox)
    assert not np.allclose(rotate_keys(x, 37, p, RopeType.NORM), rotate_keys(x, 37, p, RopeType.NEOX))
    for kind in (RopeType.NORM, RopeType.NEOX):
        twice = rotate_keys(rotate_keys(x, 30, p, kind), 7, p, kind)
        np.testing.assert_allclose(twice, rotate_keys(x, 37, p, kind), atol=1e-5)
        np.testing.assert_allclose(rotate_keys(rotate_keys(x, 37, p, kind), -37, p, kind), x, atol=1e-5)
    partial = rotate_keys(x, 37, RopeParams(10000.0, 1.0, 64, 32), RopeType.NEOX).reshape(5, 2, 64)
    assert np.array_equal(partial[..., 32:], x.reshape(5, 2, 64)[..., 32:])  # only the first n_rot dims turn
