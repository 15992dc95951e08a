"""Cell-level operations on decoded states: select a position range, add and subtract K/V, summarize.

These are what reusing a segment needs on top of the codec: cut a segment's cells out of a
sequence's blob, take the difference between two computations of the same tokens (a KVCOMM
deviation), add an estimated deviation, and a short vector that describes a segment's content.
Values of q8_0 tensors are Hadamard-rotated as stored (see KvTensor); every operation here is
linear or an orthonormal-invariant distance, so it is valid on the rotated values as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvfork.errors import InvalidParameter
from kvfork.kvcache.state import CacheState, KvTensor, SeqState

__all__ = ["select", "combine", "shift_positions", "summary", "covers", "drop_out_of_window"]


def _take(t: KvTensor, rows: np.ndarray, transposed: bool) -> KvTensor:
    values = t.values[rows]
    if t.raw is not None and not transposed:
        # NOTE: keep the stored bytes of untouched rows (a q8_0 row re-quantized by ggml's reference
        # quantizer can differ from what the CPU kernel stored), so a selected segment restores as read.
        row = len(t.raw) // max(1, len(t.values))
        raw = np.frombuffer(t.raw, dtype=np.uint8).reshape(len(t.values), row)[rows].tobytes()
        return KvTensor(t.ggml_type, values, raw)
    return KvTensor(t.ggml_type, values)


def _subset(part: CacheState, idx: np.ndarray) -> CacheState:
    if len(idx) == 0:
        return CacheState(part.n_stream, part.stream, np.zeros(0, dtype=np.int32), (), part.v_trans)
    return CacheState(
        part.n_stream, part.stream, part.positions[idx], tuple(part.seq_ids[i] for i in idx), part.v_trans,
        tuple(_take(t, idx, False) for t in part.k), tuple(_take(t, idx, part.v_trans) for t in part.v),
    )


def select(state: SeqState, p0: int, p1: int) -> SeqState:
    """The cells at positions [p0, p1) of every part of `state`, in position order."""
    parts = []
    for part in state.caches:
        idx = np.flatnonzero((part.positions >= p0) & (part.positions < p1))
        parts.append(_subset(part, idx[np.argsort(part.positions[idx], kind="stable")]))
    return state.with_caches(tuple(parts))


def shift_positions(state: SeqState, delta: int) -> SeqState:
    """The same cells and values with positions moved by `delta` (keys NOT re-rotated: for V-only data)."""
    return state.with_caches(tuple(p.with_layers(positions=p.positions + np.int32(delta)) for p in state.caches))


def combine(a: SeqState, b: SeqState, op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> SeqState:
    """op(a, b) on the K and V values of the cells both states hold at the same positions (a's order).

    Cells of `a` that `b` lacks are dropped. The result has a's layout; its tensors are edited.
    """
    if len(a.caches) != len(b.caches):
        raise InvalidParameter(f"states with {len(a.caches)} and {len(b.caches)} KV caches cannot be combined")
    parts = []
    for pa, pb in zip(a.caches, b.caches, strict=True):
        if pa.n_cells == 0 or pb.n_cells == 0:
            parts.append(_subset(pa, np.zeros(0, dtype=np.int64)))
            continue
        if pa.n_layer != pb.n_layer:
            raise InvalidParameter(f"states with {pa.n_layer} and {pb.n_layer} layers cannot be combined")
        where = {int(p): i for i, p in enumerate(pb.positions)}
        ia = np.array([i for i, p in enumerate(pa.positions) if int(p) in where], dtype=np.int64)
        ib = np.array([where[int(pa.positions[i])] for i in ia], dtype=np.int64)
        sub = _subset(pa, ia)

        def one(ta: KvTensor, tb: KvTensor, ia: np.ndarray = ia, ib: np.ndarray = ib) -> KvTensor:
            return KvTensor(ta.ggml_type, op(ta.values[ia], tb.values[ib]).astype(np.float32))

        if len(ia):
            sub = sub.with_layers(k=tuple(map(one, pa.k, pb.k)), v=tuple(map(one, pa.v, pb.v)))
        parts.append(sub)
    return a.with_caches(tuple(parts))


def summary(state: SeqState) -> np.ndarray:
    """A content vector of a segment: the mean V row of every layer of the full cache, concatenated.

    NOTE: V carries no position (RoPE rotates K only), so segments placed at different offsets
    compare by content alone; the mean over tokens lets segments of different lengths compare.
    """
    part = state.caches[0] if state.caches else None
    if part is None or part.n_cells == 0:
        raise InvalidParameter("an empty segment has no summary")
    return np.concatenate([t.values.mean(axis=0) for t in part.v]).astype(np.float32)


def covers(state: SeqState, p0: int, p1: int, window: int | None) -> bool:
    """True if every part holds what attention past p1 needs: all of [p0, p1), or its last `window`
    positions in a sliding-window part (parts after the first)."""
    for i, part in enumerate(state.caches):
        lo = p0 if i == 0 or window is None else max(p0, p1 - window)
        have = set(part.positions.tolist())
        if any(p not in have for p in range(lo, p1)):
            return False
    return True


def drop_out_of_window(state: SeqState, n_swa: int) -> SeqState:
    """`state` without the sliding-window cache's cells that llama.cpp may write over: a cell of one sequence
    whose position is n_swa or more below that sequence's last (llama_hparams::is_masked_swa, standard window).

    NOTE: for a whole-cache blob (caches[1]: the sliding-window cache). No query of that sequence attends to
    such a cell again, and llama.cpp's find_slot takes one for any sequence's new token, wherever it lies.
    """
    if len(state.caches) < 2 or not state.caches[1].n_cells:
        return state
    part = state.caches[1]
    last: dict[int, int] = {}
    for pos, ids in zip(part.positions.tolist(), part.seq_ids, strict=True):
        for s in ids:
            last[s] = max(last.get(s, pos), pos)
    keep = np.array([len(ids) != 1 or last[ids[0]] + 1 - pos < n_swa
                     for pos, ids in zip(part.positions.tolist(), part.seq_ids, strict=True)])
    if keep.all():
        return state
    return state.with_caches((state.caches[0], _subset(part, np.flatnonzero(keep)), *state.caches[2:]))
