"""decode / encode: llama.cpp sequence-state blobs (`llama_state_seq_get_data`) <-> SeqState, byte-exact.

Works on bytes only; the layout is the one llama.cpp 0c1e570 writes (vendor/llama.cpp/src):
  llama-context.cpp  state_seq_get_data: u32 magic 0xaf143cd8, i32 source seq id, then the memory's parts;
  llama-kv-cache-iswa.cpp state_write: the full-attention cache, then the sliding-window cache;
  llama-kv-cache.cpp state_write: u32 n_stream; per stream u32 cell_count and, when cells:
    state_write_meta  per cell: i32 pos, u32 n_seq_id, i32 seq_id * n_seq_id;
    state_write_data  u32 v_trans, u32 n_layer; per layer K: i32 type, u64 row bytes, rows;
                      per layer V: the same, or when transposed i32 type, u32 element bytes,
                      u32 n_embd_v, then n_embd_v rows of n_cells elements.
Not handled (refused as a mismatch): cells with extended metadata (M-RoPE positions, PLE token ids),
recurrent or hybrid memories, KV types other than f32 / f16 / q8_0.
"""

from __future__ import annotations

import struct

import numpy as np

from kvfork.errors import SnapshotCorrupt, SnapshotMismatch
from kvfork.kvcache.ggml_types import GgmlType, row_bytes
from kvfork.kvcache.state import CacheState, KvTensor, SeqState

__all__ = ["decode", "encode", "SEQ_STATE_MAGIC"]

SEQ_STATE_MAGIC = 0xAF143CD8
_LLAMA_MAX_SEQ = 256
_CELL = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])  # one cell of one sequence


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise SnapshotCorrupt(f"state blob truncated: needs {n} bytes at offset {self.at} of {len(self.data)}")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt)))
        return int(value)

    @property
    def left(self) -> int:
        return len(self.data) - self.at


def decode(blob: bytes) -> SeqState:
    """Parse a sequence-state blob. SnapshotCorrupt when it is damaged, SnapshotMismatch when unsupported."""
    r = _Reader(bytes(blob))
    magic = r.unpack("<I")
    if magic != SEQ_STATE_MAGIC:
        raise SnapshotCorrupt(f"not a llama.cpp sequence state (magic {magic:#x}, expected {SEQ_STATE_MAGIC:#x})")
    seq_id = r.unpack("<i")
    caches = []
    while r.left:
        caches.append(_read_cache(r))
    return SeqState(seq_id, tuple(caches))


def encode(state: SeqState) -> bytes:
    """The blob of `state`: what llama_state_seq_set_data reads. decode(b) -> encode gives b back exactly."""
    out = [struct.pack("<Ii", SEQ_STATE_MAGIC, state.seq_id)]
    for part in state.caches:
        _write_cache(part, out)
    return b"".join(out)


def _read_cache(r: _Reader) -> CacheState:
    n_stream = r.unpack("<I")
    if not 1 <= n_stream <= _LLAMA_MAX_SEQ:
        raise SnapshotMismatch(f"a KV cache part with {n_stream} streams: not a KV cache (recurrent memory?)")
    part = None
    for s in range(n_stream):
        n_cells = r.unpack("<I")
        if n_cells == 0:
            continue
        if part is not None:
            raise SnapshotMismatch("cells in several streams (a whole-context blob of a non-unified cache); "
                                   "decode the blob of one sequence")
        positions, seq_ids = _read_cells(r, n_cells)
        part = _read_layers(r, n_stream, s, positions, seq_ids)
    return part or CacheState(n_stream, 0, np.zeros(0, dtype=np.int32), ())


def _read_cells(r: _Reader, n_cells: int) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    # NOTE: a blob of one sequence has exactly one id per cell: fixed 12-byte records, read in one go.
    if r.left >= n_cells * _CELL.itemsize:
        cells = np.frombuffer(r.data, dtype=_CELL, count=n_cells, offset=r.at)
        if (cells["n_seq"] == 1).all():
            r.at += n_cells * _CELL.itemsize
            return cells["pos"].astype(np.int32), tuple((int(s),) for s in cells["seq"])
    positions = np.empty(n_cells, dtype=np.int32)
    seq_ids = []
    for i in range(n_cells):
        positions[i] = r.unpack("<i")
        n_seq = r.unpack("<I")
        if n_seq > _LLAMA_MAX_SEQ:
            raise SnapshotMismatch(f"cell {i} claims {n_seq} sequences: cells with extended metadata "
                                   "(M-RoPE, PLE) are not supported")
        seq_ids.append(struct.unpack(f"<{n_seq}i", r.take(4 * n_seq)))
    return positions, tuple(seq_ids)


def _read_layers(r: _Reader, n_stream: int, stream: int, positions: np.ndarray,
                 seq_ids: tuple[tuple[int, ...], ...]) -> CacheState:
    n_cells = len(positions)
    v_trans, n_layer = r.unpack("<I"), r.unpack("<I")
    if v_trans > 1 or not 1 <= n_layer <= 4096:
        raise SnapshotMismatch(f"unexpected layer header (v_trans={v_trans}, n_layer={n_layer}): "
                               "cells with extended metadata (M-RoPE, PLE) are not supported")
    k = tuple(_read_rows(r, n_cells) for _ in range(n_layer))
    v = tuple(_read_columns(r, n_cells) if v_trans else _read_rows(r, n_cells) for _ in range(n_layer))
    return CacheState(n_stream, stream, positions, seq_ids, bool(v_trans), k, v)


def _read_rows(r: _Reader, n_cells: int) -> KvTensor:
    ggml_type = GgmlType.of(r.unpack("<i"))
    size = r.unpack("<Q")
    n_embd = size // ggml_type.element_size * ggml_type.block_size
    if n_embd == 0 or row_bytes(ggml_type, n_embd) != size:
        raise SnapshotCorrupt(f"a {ggml_type.name} row of {size} bytes is not whole elements")
    return KvTensor.from_raw(r.take(size * n_cells), ggml_type, n_embd, transposed=False)


def _read_columns(r: _Reader, n_cells: int) -> KvTensor:
    ggml_type = GgmlType.of(r.unpack("<i"))
    element, n_embd = r.unpack("<I"), r.unpack("<I")
    if element != ggml_type.element_size or n_embd == 0:
        raise SnapshotCorrupt(f"transposed V: element of {element} bytes for {ggml_type.name}, n_embd {n_embd}")
    return KvTensor.from_raw(r.take(element * n_embd * n_cells), ggml_type, n_embd, transposed=True)


def _write_cache(part: CacheState, out: list[bytes]) -> None:
    out.append(struct.pack("<I", part.n_stream))
    for s in range(part.n_stream):
        if s != part.stream or part.n_cells == 0:
            out.append(struct.pack("<I", 0))
            continue
        out.append(struct.pack("<I", part.n_cells))
        cells = np.empty(part.n_cells, dtype=_CELL)
        if all(len(ids) == 1 for ids in part.seq_ids):
            cells["pos"], cells["n_seq"], cells["seq"] = part.positions, 1, [ids[0] for ids in part.seq_ids]
            out.append(cells.tobytes())
        else:
            for pos, ids in zip(part.positions.tolist(), part.seq_ids, strict=True):
                out.append(struct.pack(f"<iI{len(ids)}i", pos, len(ids), *ids))
        out.append(struct.pack("<II", int(part.v_trans), part.n_layer))
        for t in part.k:
            out += [struct.pack("<iQ", t.ggml_type, row_bytes(t.ggml_type, t.n_embd)), t.to_bytes(False)]
        for t in part.v:
            if part.v_trans:
                out += [struct.pack("<iII", t.ggml_type, t.ggml_type.element_size, t.n_embd), t.to_bytes(True)]
            else:
                out += [struct.pack("<iQ", t.ggml_type, row_bytes(t.ggml_type, t.n_embd)), t.to_bytes(False)]
