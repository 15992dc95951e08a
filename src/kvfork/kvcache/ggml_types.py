"""GgmlType: the KV element types the codec reads and writes (f32, f16, q8_0), and their byte encodings.

Each function maps between a tensor's bytes as ggml stores them, row by row, and a float32 numpy
array of shape [n_rows, n_embd]. Sources: ggml/src/ggml-quants.c (`quantize_row_q8_0_ref`,
`dequantize_row_q8_0`) and ggml/src/ggml-common.h (`block_q8_0`).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from kvfork.errors import SnapshotMismatch

__all__ = ["GgmlType", "QK8_0", "Q8_0_BLOCK", "row_bytes", "to_float32", "from_float32"]

QK8_0 = 32  # values per q8_0 block
# NOTE: block_q8_0 is {ggml_half d; int8_t qs[32]}: 34 bytes, packed, little-endian.
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])


class GgmlType(IntEnum):
    """ggml_type ids (ggml.h) of the KV cache types kvfork can create."""

    F32 = 0
    F16 = 1
    Q8_0 = 8

    @classmethod
    def of(cls, type_id: int) -> GgmlType:
        """The type for a ggml_type id read from a blob; SnapshotMismatch for any other type."""
        try:
            return cls(type_id)
        except ValueError:
            raise SnapshotMismatch(
                f"KV tensor of ggml type {type_id}: the codec reads f32 (0), f16 (1) and q8_0 (8) caches only"
            ) from None

    @property
    def is_quantized(self) -> bool:
        return self is GgmlType.Q8_0

    @property
    def element_size(self) -> int:
        """ggml_type_size: bytes of one element (f32, f16) or of one block (q8_0)."""
        return {GgmlType.F32: 4, GgmlType.F16: 2, GgmlType.Q8_0: Q8_0_BLOCK.itemsize}[self]

    @property
    def block_size(self) -> int:
        """ggml_blck_size: values per element (1) or per block (32)."""
        return QK8_0 if self is GgmlType.Q8_0 else 1


def row_bytes(ggml_type: GgmlType, n_embd: int) -> int:
    """ggml_row_size: bytes of one row of `n_embd` values."""
    if n_embd % ggml_type.block_size:
        raise SnapshotMismatch(f"a {ggml_type.name} row of {n_embd} values is not whole blocks of {QK8_0}")
    return n_embd // ggml_type.block_size * ggml_type.element_size


def to_float32(data: bytes | memoryview, ggml_type: GgmlType, n_embd: int) -> np.ndarray:
    """Rows of `n_embd` values stored as `ggml_type` -> float32 [n_rows, n_embd] (exact for every type)."""
    if ggml_type is GgmlType.F32:
        flat = np.frombuffer(data, dtype="<f4").astype(np.float32)
    elif ggml_type is GgmlType.F16:
        flat = np.frombuffer(data, dtype="<f2").astype(np.float32)
    else:
        blocks = np.frombuffer(data, dtype=Q8_0_BLOCK)
        # NOTE: dequantize_row_q8_0 is qs[j] * d with d widened to float32: one rounding, as here.
        flat = (blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)
    return flat.reshape(-1, n_embd)


def from_float32(values: np.ndarray, ggml_type: GgmlType) -> bytes:
    """float32 [n_rows, n_embd] -> the bytes ggml stores for `ggml_type` (q8_0: quantize_row_q8_0_ref)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type is GgmlType.F32:
        return values.astype("<f4").tobytes()
    if ggml_type is GgmlType.F16:
        return values.astype("<f2").tobytes()
    row_bytes(ggml_type, values.shape[-1])  # checks whole blocks
    x = values.reshape(-1, QK8_0)
    amax = np.abs(x).max(axis=1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    scaled = x * inv[:, None]
    # NOTE: roundf rounds halves away from zero (np.round would round them to even). |scaled| <= 127 here,
    # so adding 0.5 in float64 is exact and floor() gives roundf's result.
    q = np.copysign(np.floor(np.abs(scaled).astype(np.float64) + 0.5), scaled)
    blocks = np.empty(len(x), dtype=Q8_0_BLOCK)
    blocks["d"] = d.astype(np.float16)  # GGML_FP32_TO_FP16 rounds to nearest even, like astype
    blocks["qs"] = q.astype(np.int8)
    return blocks.tobytes()
