"""RopeSpec and rerotate: move cached keys to new positions by RoPE re-rotation on decoded numpy arrays.

A key cached at position p holds R(p) k. Rotating it by R(delta) gives R(p + delta) k: the key the
model would have cached at p + delta (up to rounding), with V unchanged. This is llama.cpp's own
K-shift (llama-kv-cache.cpp `build_rope_shift`, applied after llama_memory_seq_add), redone on a
decoded blob, so a segment can be placed at a new offset before it is restored. It mirrors ggml's
CPU rope (ggml-cpu/ops.cpp `ggml_rope_cache_init`, `rotate_pairs`) for NORM and NEOX RoPE without
YaRN; other RoPE kinds are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum
from types import EllipsisType
from typing import Any

import numpy as np

from kvfork.errors import InvalidParameter
from kvfork.kvcache.hadamard import apply_rotation, k_rotation_size
from kvfork.kvcache.state import CacheState, KvTensor, SeqState
from kvfork.kvcache.trig import cos_sin

__all__ = ["RopeType", "RopeParams", "RopeSpec", "rerotate", "rotate_keys"]

# NOTE: iSWA architectures whose per-layer RoPE settings were checked against llama.cpp's loader
# (src/models/gemma3.cpp: SWA layers use rope.freq_base_swa, default 10000, and scale 1). Others
# set their SWA defaults differently (exaone4, llama4, olmo2, ...), so they are refused, not guessed.
_SWA_ARCHS = frozenset({"gemma3"})


class RopeType(IntEnum):
    """llama_rope_type (llama.h)."""

    NONE = -1
    NORM = 0
    NEOX = 2
    MROPE = 8
    VISION = 24
    IMROPE = 40


@dataclass(frozen=True)
class RopeParams:
    """RoPE settings of the layers of one KV cache (the full-attention or the sliding-window one)."""

    freq_base: float
    freq_scale: float
    head_dim: int
    n_rot: int  # rotated dimensions at the start of each head (the rest is left alone)


@dataclass(frozen=True)
class RopeSpec:
    """How a model rotates its keys: enough to re-rotate a decoded blob's keys by a position delta.

    full applies to caches[0] of a SeqState, swa (sliding-window models only) to caches[1].
    NOTE: kvfork leaves the context's rope_freq_base/scale/yarn parameters at their defaults, so the
    model's trained values are the ones llama.cpp uses (llama-context.cpp, cparams).
    """

    rope_type: RopeType
    full: RopeParams
    swa: RopeParams | None = None
    attn_factor: float = 1.0

    @classmethod
    def from_model(cls, model: Any) -> RopeSpec:  # NOTE: engine.llama.LlamaModel (engine imports kvcache)
        """Read the spec of a loaded model (rope type from llama.cpp, the rest from its GGUF metadata).

        Raises InvalidParameter for models whose keys cannot be re-rotated here (see `check`).
        """
        arch = model.meta("general.architecture") or ""

        def num(key: str, default: float) -> float:
            value = model.meta(f"{arch}.{key}")
            return float(value) if value not in (None, "") else default

        n_head = num("attention.head_count", 0)
        head_dim = int(num("attention.key_length", num("embedding_length", 0) // n_head if n_head else 0))
        n_rot = int(num("rope.dimension_count", head_dim))
        scaling = (model.meta(f"{arch}.rope.scaling.type") or "linear").lower()
        if scaling in ("yarn", "longrope"):
            raise InvalidParameter(f"{arch} uses {scaling} RoPE scaling: its keys cannot be re-rotated in numpy; "
                                   "shift them with llama.cpp's K-shift (LlamaContext.seq_add) instead")
        factor = num("rope.scaling.factor", num("rope.scale_linear", 0.0))
        scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
        full = RopeParams(num("rope.freq_base", 10000.0), scale, head_dim, n_rot)
        swa = None
        if num("attention.sliding_window", 0) > 0:
            if arch not in _SWA_ARCHS:
                raise InvalidParameter(f"sliding-window RoPE settings of {arch!r} are not known to kvfork; "
                                       "shift with LlamaContext.seq_add instead")
            swa_dim = int(num("attention.key_length_swa", head_dim))
            swa = RopeParams(num("rope.freq_base_swa", 10000.0), 1.0, swa_dim,
                             int(num("rope.dimension_count_swa", n_rot)))
        spec = cls(RopeType(model.rope_type), full, swa, num("rope.scaling.attn_factor", 1.0))
        spec.check()
        return spec

    def check(self) -> None:
        """Raise InvalidParameter unless keys of this kind can be re-rotated (NONE, NORM or NEOX RoPE)."""
        if self.rope_type not in (RopeType.NONE, RopeType.NORM, RopeType.NEOX):
            raise InvalidParameter(f"{self.rope_type.name} RoPE (multi-axis positions) cannot be shifted by a "
                                   "position delta; recompute the segment instead (reuse mode 'exact')")
        for p in filter(None, (self.full, self.swa)):
            if p.n_rot % 2 or not 0 < p.n_rot <= p.head_dim:
                raise InvalidParameter(f"RoPE over {p.n_rot} of {p.head_dim} head dimensions is not supported")

    def params(self, cache_index: int, n_caches: int) -> RopeParams:
        """The params for caches[cache_index] of a blob with n_caches parts."""
        if n_caches != (2 if self.swa else 1) or not 0 <= cache_index < n_caches:
            raise InvalidParameter(f"a blob with {n_caches} KV caches does not match this model "
                                   f"({'sliding-window' if self.swa else 'one cache'})")
        return self.swa if cache_index == 1 and self.swa else self.full


@functools.lru_cache(maxsize=256)
def _cos_sin(delta: int, p: RopeParams, attn_factor: float) -> tuple[np.ndarray, np.ndarray]:
    # NOTE: as ggml_rope_cache_init: theta_0 = delta, theta_{i+1} = theta_i * base^(-2/n_rot), all in
    # float32 and in that order (a sequential product, not a power), then scaled by freq_scale.
    theta_scale = np.float32(p.freq_base) ** (np.float32(-2.0) / np.float32(p.n_rot))
    steps = np.full(p.n_rot // 2, theta_scale, dtype=np.float32)
    steps[0] = np.float32(delta)
    theta = np.multiply.accumulate(steps, dtype=np.float32) * np.float32(p.freq_scale)
    cos, sin = cos_sin(theta)
    cos, sin = cos * np.float32(attn_factor), sin * np.float32(attn_factor)
    cos.flags.writeable = sin.flags.writeable = False  # cached: shared by every call with these arguments
    return cos, sin


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # a*b + c as a fused multiply-add: the float32 product is exact in float64, and the sum is rounded
    # to float64 then float32 (a double rounding that can differ from one fma rounding, very rarely).
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def rotate_keys(keys: np.ndarray, delta: int, p: RopeParams, rope_type: RopeType, attn_factor: float = 1.0
                ) -> np.ndarray:
    """Rotate un-rotated (plain) keys [n_cells, n_head * head_dim] by `delta` positions; returns a new array."""
    x = np.array(keys, dtype=np.float32).reshape(len(keys), -1, p.head_dim)
    if rope_type is RopeType.NONE or delta == 0:
        return x.reshape(keys.shape)
    cos, sin = _cos_sin(delta, p, attn_factor)
    half = p.n_rot // 2
    i0: tuple[EllipsisType, slice]
    i1: tuple[EllipsisType, slice]
    if rope_type is RopeType.NEOX:  # pairs (i, i + n_rot/2)
        i0, i1 = (..., slice(0, half, 1)), (..., slice(half, p.n_rot, 1))
    elif rope_type is RopeType.NORM:  # adjacent pairs (2i, 2i + 1)
        i0, i1 = (..., slice(0, p.n_rot, 2)), (..., slice(1, p.n_rot, 2))
    else:
        raise InvalidParameter(f"{rope_type.name} RoPE cannot be shifted by a position delta")
    x0, x1 = x[i0].copy(), x[i1].copy()
    # NOTE: the compiler contracts ggml's rotate_pairs (x0*cos - x1*sin, x0*sin + x1*cos) into
    # fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos) in llama-cpp-python's native (FMA) CPU build.
    # Doing the same made re-rotated f16 keys bit-identical to llama.cpp's K-shift (plain float32
    # arithmetic: 1 value in 10^4 differed); a build without FMA would round once more per product.
    x[i0] = _fma(x0, cos, -(x1 * sin))
    x[i1] = _fma(x0, sin, x1 * cos)
    return x.reshape(keys.shape)


def _shift_tensor(t: KvTensor, rows: np.ndarray, delta: int, p: RopeParams, spec: RopeSpec) -> KvTensor:
    if t.n_embd % p.head_dim:
        raise InvalidParameter(f"K rows of {t.n_embd} values are not whole heads of {p.head_dim}")
    keys = t.values[rows]
    size = k_rotation_size(t.ggml_type, p.head_dim)
    if size:  # stored keys are H @ k: un-rotate, apply RoPE, rotate back (as build_rope_shift does)
        keys = apply_rotation(keys, size)
    keys = rotate_keys(keys, delta, p, spec.rope_type, spec.attn_factor)
    if size:
        keys = apply_rotation(keys, size)
    values = t.values.copy()
    values[rows] = keys
    return t.with_values(values)


def rerotate(state: SeqState, spec: RopeSpec, delta: int, p0: int = 0, p1: int | None = None) -> SeqState:
    """Move the cells at positions [p0, p1) by `delta`, re-rotating their keys: seq_add + K-shift, in numpy.

    Every part of the blob moves the same cells (a sliding-window part holds a suffix of them).
    Other cells and every V are untouched. A cell may not move below position 0 (llama.cpp would
    drop it). Raises InvalidParameter when the spec or the blob cannot be shifted.
    """
    spec.check()
    end = np.iinfo(np.int32).max if p1 is None else p1
    parts: list[CacheState] = []
    for i, part in enumerate(state.caches):
        p = spec.params(i, len(state.caches))
        rows = (part.positions >= p0) & (part.positions < end)
        if delta == 0 or not rows.any():
            parts.append(part)
            continue
        if int(part.positions[rows].min()) + delta < 0:
            raise InvalidParameter(f"shifting by {delta} would move cells below position 0")
        # NOTE: without RoPE a key does not depend on its position (llama.cpp skips the K-shift too).
        k = part.k if spec.rope_type is RopeType.NONE else tuple(_shift_tensor(t, rows, delta, p, spec) for t in part.k)
        parts.append(part.with_layers(k=k, positions=part.positions + np.int32(delta) * rows))
    return state.with_caches(tuple(parts))
