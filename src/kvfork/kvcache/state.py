"""SeqState: one sequence's KV state blob, decoded: cells (positions, sequence ids) and per-layer K and V.

The shapes mirror what llama.cpp writes (src/llama-kv-cache.cpp, `state_write`): a blob holds one
part per KV cache of the context's memory (one for a plain cache; two for a sliding-window model,
the full-attention cache first and the sliding-window cache second, src/llama-kv-cache-iswa.cpp),
and each part holds its own cells: a sliding-window cache writes only the cells still inside the
window, so its cells are a suffix of the full cache's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from kvfork.errors import InvalidParameter
from kvfork.kvcache.ggml_types import GgmlType, from_float32, row_bytes, to_float32

__all__ = ["KvTensor", "CacheState", "SeqState"]


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class KvTensor:
    """One layer's K or V over a cache part's cells: `values` is float32 [n_cells, n_embd], read-only.

    `raw` is the tensor's bytes exactly as read from the blob (V transposed or not, as the part
    says); an untouched tensor is written back from `raw`, byte for byte. `with_values` makes an
    edited tensor (raw=None), which is encoded from its values (q8_0: ggml's reference quantizer).

    NOTE: values are what the cache stores. For a quantized (q8_0) cache llama.cpp multiplies K and
    V by a Walsh-Hadamard matrix before storing them (attn_rot_k / attn_rot_v, llama-kv-cache.cpp),
    so q8_0 values are rotated; the rotation is orthonormal, so sums, differences and L2 distances
    are unchanged by it. kvcache.rope undoes it around RoPE.
    """

    ggml_type: GgmlType
    values: np.ndarray
    raw: bytes | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.dtype != np.float32:
            raise InvalidParameter(f"KV values must be float32 [n_cells, n_embd], got {self.values.dtype} "
                                   f"{self.values.shape}")
        row_bytes(self.ggml_type, self.values.shape[1])  # whole q8_0 blocks
        if self.values.flags.writeable:
            # NOTE: read-only, so an in-place edit cannot leave `raw` silently stale.
            object.__setattr__(self, "values", _frozen(self.values.copy()))

    @classmethod
    def from_raw(cls, raw: bytes, ggml_type: GgmlType, n_embd: int, transposed: bool) -> KvTensor:
        """Decode a tensor's blob bytes (cell-major rows, or [n_embd, n_cells] when transposed)."""
        if transposed:
            if ggml_type.is_quantized:
                raise InvalidParameter("a transposed V cache cannot be quantized (llama.cpp needs flash attention)")
            values = to_float32(raw, ggml_type, 1).reshape(n_embd, -1).T.copy()
        else:
            values = to_float32(raw, ggml_type, n_embd)
        return cls(ggml_type, _frozen(values), raw)

    @property
    def n_embd(self) -> int:
        return int(self.values.shape[1])

    def with_values(self, values: np.ndarray) -> KvTensor:
        """The same tensor with new values (same shape); encoded from the values from now on."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != self.values.shape:
            raise InvalidParameter(f"new KV values have shape {values.shape}, the tensor has {self.values.shape}")
        return KvTensor(self.ggml_type, values)

    def to_bytes(self, transposed: bool) -> bytes:
        """The tensor's bytes as the blob holds them: `raw` when untouched, else encoded from the values."""
        if self.raw is not None:
            return self.raw
        return from_float32(self.values.T if transposed else self.values, self.ggml_type)


@dataclass(frozen=True, eq=False)
class CacheState:
    """The part of a blob that one llama_kv_cache wrote: its cells and, per layer of that cache, K and V.

    positions: int32 [n_cells]; seq_ids: the sequence ids of each cell (one id per cell in a blob of
    one sequence). n_stream and stream say which of the cache's streams held the cells (kvfork's
    unified cache has one stream). An empty part (no cells) has no layers: llama.cpp writes none.
    """

    n_stream: int
    stream: int
    positions: np.ndarray
    seq_ids: tuple[tuple[int, ...], ...]
    v_trans: bool = False
    k: tuple[KvTensor, ...] = ()
    v: tuple[KvTensor, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.positions)
        if len(self.seq_ids) != n:
            raise InvalidParameter(f"{len(self.seq_ids)} seq-id lists for {n} cells")
        if n and (len(self.k) != len(self.v) or not self.k):
            raise InvalidParameter(f"a cache part with cells needs K and V per layer, got {len(self.k)}, {len(self.v)}")
        for t in (*self.k, *self.v):
            if t.values.shape[0] != n:
                raise InvalidParameter(f"a KV tensor of {t.values.shape[0]} cells in a part of {n} cells")
        if self.v_trans and any(t.ggml_type.is_quantized for t in self.v):
            raise InvalidParameter("a transposed V cache cannot be quantized (llama.cpp needs flash attention)")
        if self.positions.flags.writeable:
            object.__setattr__(self, "positions", _frozen(np.array(self.positions, dtype=np.int32)))

    @property
    def n_cells(self) -> int:
        return len(self.positions)

    @property
    def n_layer(self) -> int:
        return len(self.k)

    def with_layers(self, k: tuple[KvTensor, ...] | None = None, v: tuple[KvTensor, ...] | None = None,
                    positions: np.ndarray | None = None) -> CacheState:
        """A copy with some of K, V and positions replaced (same cells, same order)."""
        return replace(self, k=self.k if k is None else k, v=self.v if v is None else v,
                       positions=self.positions if positions is None else np.array(positions, dtype=np.int32))


@dataclass(frozen=True, eq=False)
class SeqState:
    """A decoded `llama_state_seq_get_data` blob: the source sequence id and one part per KV cache.

    caches[0] is the full-attention cache; a sliding-window model (gemma3) has caches[1], the
    sliding-window cache, whose cells are the last window of caches[0]'s.
    """

    seq_id: int
    caches: tuple[CacheState, ...] = field(default_factory=tuple)

    @property
    def positions(self) -> np.ndarray:
        """Positions of the full-attention cache's cells (all of the sequence's cells)."""
        return self.caches[0].positions if self.caches else np.zeros(0, dtype=np.int32)

    @property
    def n_cells(self) -> int:
        return len(self.positions)

    def with_caches(self, caches: tuple[CacheState, ...]) -> SeqState:
        return replace(self, caches=caches)
