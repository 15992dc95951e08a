"""The sequence-state codec against llama.cpp itself: byte-exact round trips, restores, edits that matter."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kvfork.errors import SnapshotCorrupt, SnapshotMismatch
from kvfork.kvcache import GgmlType, apply_rotation, decode, encode, k_rotation_size, v_rotation_size
from kvfork.kvcache.ggml_types import from_float32, to_float32
from tests.support.kv import KV_LAYOUTS, greedy, kv_context, prefill, prompt, reencoded

# model -> (layers per cache part, K/V row width): gemma3 writes its 3 global layers, then its 15 sliding-window ones
SHAPES = {"gemma": ((3, 15), 256), "qwen": ((24,), 128)}
CASES = [(name, kv_type, flash_attn) for name in ("gemma", "qwen") for kv_type, flash_attn in KV_LAYOUTS]


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def case(request, load_model):
    """(model name, kv_type, flash_attn, model, context) for each catalog model and cache layout."""
    name, kv_type, flash_attn = request.param
    model = load_model(name)
    with kv_context(model, kv_type, flash_attn) as ctx:
        yield name, kv_type, flash_attn, model, ctx


def test_round_trip_is_byte_exact(case):
    name, kv_type, flash_attn, model, ctx = case
    tokens = prompt(model)
    prefill(ctx, tokens, seq=2)
    blob = ctx.state_seq_get(2)
    state = decode(blob)
    layers, n_embd = SHAPES[name]
    assert state.seq_id == 2
    assert tuple(part.n_layer for part in state.caches) == layers
    for part in state.caches:
        assert part.positions.tolist() == list(range(len(tokens)))
        assert part.seq_ids == ((2,),) * len(tokens)
        assert part.v_trans == (flash_attn == "off")
        assert {(t.ggml_type, t.n_embd) for t in (*part.k, *part.v)} == {(GgmlType[kv_type.upper()], n_embd)}
    assert encode(state) == blob  # untouched tensors: written back from their bytes
    assert encode(reencoded(state)) == blob  # every tensor rebuilt from its float32 values


def test_transposed_and_quantized_layouts_decode_to_the_same_values(load_model):
    """A wrong transposition or a missed rotation would still round-trip; the values themselves must agree.

    The first model layer's K and V depend only on the token embeddings, so f16 caches with and
    without flash attention hold the same numbers there; the q8_0 cache holds them Hadamard-rotated
    and quantized.
    """
    model = load_model("qwen")
    tokens = prompt(model)
    states = {}
    for kv_type, flash_attn in KV_LAYOUTS:
        with kv_context(model, kv_type, flash_attn) as ctx:
            prefill(ctx, tokens)
            states[kv_type, flash_attn] = decode(ctx.state_seq_get(0)).caches[0]
    f16, f16_trans, q8 = states["f16", "on"], states["f16", "off"], states["q8_0", "on"]
    assert f16_trans.v_trans and not f16.v_trans
    assert np.array_equal(f16_trans.k[0].values, f16.k[0].values)
    assert np.array_equal(f16_trans.v[0].values, f16.v[0].values)
    head_dim = 64
    for got, ref, size in ((q8.k[0], f16.k[0], k_rotation_size(GgmlType.Q8_0, head_dim)),
                           (q8.v[0], f16.v[0], v_rotation_size(GgmlType.Q8_0, head_dim))):
        assert size == 64
        unrotated = apply_rotation(got.values, size)
        top = np.abs(ref.values).max()
        assert np.abs(unrotated - ref.values).max() < 0.02 * top  # q8_0 error: under 1% of a block's range
        assert np.abs(got.values - ref.values).max() > 0.1 * top  # stored rotated, not as computed


def test_reencoded_blob_restores_to_identical_output_and_an_edit_changes_it(case):
    *_, model, ctx = case
    *head, last = prompt(model)
    n = len(head)

    ctx.clear()
    prefill(ctx, head, seq=0)
    blob = ctx.state_seq_get(0)
    ref_logits = prefill(ctx, [last], seq=0, pos0=n)
    ref = greedy(ctx, ref_logits, seq=0, pos=n + 1, n=10)

    state = decode(blob)
    ctx.clear()  # NOTE: same cells in the same order: the restored cache is bit-identical to the original
    ctx.state_seq_set(1, encode(reencoded(state)))
    logits = prefill(ctx, [last], seq=1, pos0=n)
    assert np.array_equal(logits, ref_logits)
    assert greedy(ctx, logits, seq=1, pos=n + 1, n=10) == ref

    # zero the V of one layer of the full-attention cache: llama.cpp must read it where we wrote it
    part = state.caches[0]
    zeroed = part.v[0].with_values(np.zeros_like(part.v[0].values))
    edited = state.with_caches((part.with_layers(v=(zeroed, *part.v[1:])), *state.caches[1:]))
    ctx.clear()
    ctx.state_seq_set(1, encode(edited))
    back = decode(ctx.state_seq_get(1)).caches[0]
    assert not back.v[0].values.any()
    assert all(np.array_equal(a.values, b.values) for a, b in zip(back.v[1:], part.v[1:], strict=True))
    assert all(np.array_equal(a.values, b.values) for a, b in zip(back.k, part.k, strict=True))
    changed = prefill(ctx, [last], seq=1, pos0=n)
    moved = float(np.abs(changed - ref_logits).max())
    print(f"\nzeroed V of one layer: max |logit diff| {moved:.2f}")
    assert moved > 0.1  # measured 0.48 to 3.2; the unedited restore above moved them by exactly 0


def test_damaged_and_unsupported_blobs_are_refused(load_model):
    model = load_model("qwen")
    tokens = prompt(model, 1)
    with kv_context(model, "q8_0", "on") as ctx:
        prefill(ctx, tokens)
        blob = ctx.state_seq_get(0)
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        decode(blob[:-7])
    with pytest.raises(SnapshotCorrupt, match="magic"):
        decode(b"\0" * 64)
    # the first K type id sits after: magic, seq id, n_stream, cell_count, 12 bytes per cell, v_trans, n_layer
    at = 16 + 12 * len(tokens) + 8
    assert struct.unpack_from("<i", blob, at)[0] == GgmlType.Q8_0
    q4_0 = blob[:at] + struct.pack("<i", 2) + blob[at + 4 :]
    with pytest.raises(SnapshotMismatch, match="ggml type 2"):
        decode(q4_0)


def test_q8_0_matches_ggml_reference_quantizer():
    x = np.zeros((1, 64), dtype=np.float32)
    x[0, :5] = [127.0, 2.5, -2.5, 0.5, -126.5]  # first block: scale 1, halves round away from zero (roundf)
    x[0, 32:] = 0.0  # second block: all zero, scale 0
    blocks = np.frombuffer(from_float32(x, GgmlType.Q8_0), dtype=[("d", "<f2"), ("qs", "i1", (32,))])
    assert blocks["d"].tolist() == [1.0, 0.0]
    assert blocks["qs"][0, :5].tolist() == [127, 3, -3, 1, -127]
    assert not blocks["qs"][1].any()
    rng = np.random.default_rng(7)
    y = rng.normal(size=(4, 256)).astype(np.float32)
    back = to_float32(from_float32(y, GgmlType.Q8_0), GgmlType.Q8_0, 256)
    scale = np.abs(y.reshape(-1, 32)).max(axis=1) / 127
    # half a step, plus the fp16 rounding of the scale (127 steps * 2^-11)
    assert (np.abs(back - y).reshape(-1, 32) <= 0.57 * scale[:, None]).all()
    assert from_float32(back, GgmlType.Q8_0) == from_float32(y, GgmlType.Q8_0)  # quantizing again changes nothing


def test_cells_out_of_a_sequences_window_leave_the_sliding_window_cache_only():
    from kvfork.kvcache import CacheState, GgmlType, KvTensor, SeqState
    from kvfork.kvcache.cells import drop_out_of_window

    def part(positions, ids):
        rows = np.arange(len(positions), dtype=np.float32)[:, None].repeat(4, 1)
        return CacheState(1, 0, np.array(positions, dtype=np.int32), ids, False,
                          (KvTensor(GgmlType.F32, rows),), (KvTensor(GgmlType.F32, rows),))

    # seq 0 holds positions 0..9, seq 1 positions 0..2 (a fork of seq 0's first three: shared cells); window 4
    positions = list(range(10)) + [2]
    ids = ((0, 1),) * 2 + ((0,),) * 8 + ((1,),)
    whole = SeqState(-1, (part(positions, ids), part(positions, ids)))
    out = drop_out_of_window(whole, 4)
    assert out.caches[0] is whole.caches[0]  # the full-attention cache keeps every cell
    # seq 0's next position is 10: its single-id cells 2..6 are 4+ below it, out; 0 and 1 are shared with seq 1
    assert out.caches[1].positions.tolist() == [0, 1, 7, 8, 9, 2]
    assert out.caches[1].k[0].values[:, 0].tolist() == [0, 1, 7, 8, 9, 10]  # the K rows go with their cells
    assert drop_out_of_window(SeqState(-1, (part(positions, ids),)), 4).caches[0].n_cells == 11  # no window cache
