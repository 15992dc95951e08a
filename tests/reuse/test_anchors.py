"""The anchor pool and the cell operations it stands on, on synthetic states (no model needed)."""

from __future__ import annotations

import operator

import numpy as np
import pytest

from kvfork.errors import InvalidParameter
from kvfork.kvcache import CacheState, GgmlType, KvTensor, SeqState, decode, encode
from kvfork.kvcache.cells import combine, covers, select, shift_positions, summary
from kvfork.reuse import AnchorPool, ReuseConfig


def _state(positions: list[int], seed: int = 0, n_embd: int = 64, ggml: GgmlType = GgmlType.F16) -> SeqState:
    rng = np.random.default_rng(seed)

    def t() -> KvTensor:
        return KvTensor(ggml, rng.normal(size=(len(positions), n_embd)).astype(np.float16).astype(np.float32))

    part = CacheState(1, 0, np.array(positions, dtype=np.int32), ((0,),) * len(positions), False, (t(), t()),
                      (t(), t()))
    return SeqState(0, (part,))


def test_select_keeps_position_order_and_stored_bytes():
    state = decode(encode(_state([5, 2, 3, 4, 9], ggml=GgmlType.Q8_0)))  # q8_0 rows, cells out of order
    cut = select(state, 2, 5)
    assert cut.positions.tolist() == [2, 3, 4]
    raw = state.caches[0].k[0].raw
    row = len(raw) // 5
    assert cut.caches[0].k[0].raw == raw[row:2 * row] + raw[2 * row:3 * row] + raw[3 * row:4 * row]
    assert decode(encode(cut)).positions.tolist() == [2, 3, 4]  # a valid blob of just those cells
    assert select(state, 20, 30).n_cells == 0


def test_combine_matches_cells_by_position_and_drops_the_rest():
    a, b = _state([0, 1, 2, 3], seed=1), _state([2, 3, 4], seed=2)
    diff = combine(a, b, operator.sub)
    assert diff.positions.tolist() == [2, 3]
    want = a.caches[0].v[1].values[2:] - b.caches[0].v[1].values[:2]
    assert np.array_equal(diff.caches[0].v[1].values, want)
    back = combine(diff, b, operator.add)
    assert np.allclose(back.caches[0].k[0].values, a.caches[0].k[0].values[2:])
    with pytest.raises(InvalidParameter):
        combine(a, SeqState(0, ()), operator.add)


def test_shift_summary_and_coverage():
    s = _state([10, 11, 12])
    assert shift_positions(s, -10).positions.tolist() == [0, 1, 2]
    assert summary(s).shape == (2 * 64,)  # the mean V row of each of the 2 layers
    assert covers(s, 10, 13, None) and not covers(s, 9, 13, None)
    with pytest.raises(InvalidParameter):
        summary(select(s, 0, 1))


def test_gate_weights_entropy_and_eviction():
    cfg = ReuseConfig(mode="kvcomm", temperature=0.01, gamma=0.3, max_anchors=3, min_anchors=2)
    pool = AnchorPool()
    base = np.ones(8, dtype=np.float32)
    dev = shift_positions(_state([0, 1, 2]), 0)
    assert not pool.estimate("doc", "a", base, cfg).accepted  # fewer than min_anchors
    pool.add("doc", "a", base, dev, 3, cfg)
    pool.add("doc", "a", base * 1.5, dev, 3, cfg)  # 50% away
    near = pool.estimate("doc", "a", base * 1.001, cfg)  # one anchor much closer: peaked weights
    assert near.accepted and near.weights[0] > 0.99 and near.entropy < near.threshold
    far = pool.estimate("doc", "a", base * 1.25, cfg)  # halfway between both: flat weights, refused
    assert not far.accepted and abs(near.threshold - 0.3) < 1e-9 and far.entropy > 0.9
    assert not pool.estimate("doc", "b", base * 1.001, cfg).accepted  # agent b has no deviations yet
    assert not pool.estimate("doc", "b", base, cfg).accepted  # an anchor without b's deviation: complete it
    pool.add("doc", "b", base, dev, 3, cfg)  # joins the same anchor
    assert pool.n_anchors("doc") == 2 and pool.n_anchors("doc", "b") == 1
    pool.add("doc", "a", base * 2, dev, 3, cfg)
    pool.deviation(near, dev)  # uses the first anchor: the oldest, but used, so it stays
    pool.add("doc", "a", base * 3, dev, 3, cfg)  # past max_anchors: the least used of the older half goes
    assert pool.n_anchors("doc") == 3
    left = pool.estimate("doc", "a", base, ReuseConfig(mode="kvcomm", temperature=0.01, min_anchors=1))
    assert [round(float(np.linalg.norm(a.summary) / np.linalg.norm(base)), 3) for a in left.anchors] == [1, 2, 3]


def test_deviation_uses_kept_rows_then_the_mean_row():
    cfg = ReuseConfig(mode="kvcomm", delta_tokens=2, min_anchors=1)
    pool = AnchorPool()
    dev = _state([0, 1, 2, 3], seed=4)
    pool.add("doc", "a", np.ones(4, dtype=np.float32), dev, 4, cfg)
    est = pool.estimate("doc", "a", np.full(4, 2, dtype=np.float32), cfg)
    out = pool.deviation(est, _state([0, 1, 2, 3, 4, 5], seed=5))
    k = dev.caches[0].k[0].values
    got = out.caches[0].k[0].values
    assert np.allclose(got[:2], k[:2], atol=1e-2)  # kept rows (stored as float16)
    assert np.allclose(got[2:], k.mean(axis=0), atol=1e-5)  # the mean row for the rest
