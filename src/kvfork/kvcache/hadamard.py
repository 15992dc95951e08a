"""The Walsh-Hadamard rotation llama.cpp applies to quantized K and V before it stores them.

Source: vendor/llama.cpp/src/llama-kv-cache.cpp (`attn_rot_k`, `attn_rot_v`, `build_input_k_rot`,
`ggml_gen_hadamard`: the normalized Sylvester matrix): for a quantized cache type and a head size
divisible by 64, every key is stored as H @ k, chunk by chunk along each row, and every value as
H64 @ v. H is orthonormal and symmetric (H @ H = I), so applying it again undoes it. Setting
LLAMA_ATTN_ROT_DISABLE=1 in the environment before the context is created turns it off.
"""

from __future__ import annotations

import os
import re

import numpy as np

from kvfork.kvcache.ggml_types import GgmlType

__all__ = ["k_rotation_size", "v_rotation_size", "apply_rotation"]


def _rotation_enabled(ggml_type: GgmlType, head_dim: int) -> bool:
    # NOTE: llama.cpp reads the variable with atoi(): a leading nonzero integer disables, "0" or text does not.
    number = re.match(r"\s*([+-]?\d+)", os.environ.get("LLAMA_ATTN_ROT_DISABLE", ""))
    disabled = number is not None and int(number.group(1)) != 0
    return not disabled and ggml_type.is_quantized and head_dim > 0 and head_dim % 64 == 0


def k_rotation_size(ggml_type: GgmlType, head_dim: int) -> int | None:
    """Size of the Hadamard blocks of stored keys (the largest power of two >= 64 dividing head_dim), or None."""
    if not _rotation_enabled(ggml_type, head_dim):
        return None
    n = 64
    while head_dim % (n * 2) == 0:
        n *= 2
    return n


def v_rotation_size(ggml_type: GgmlType, head_dim: int) -> int | None:
    """Size of the Hadamard blocks of stored values (always 64 when on), or None."""
    return 64 if _rotation_enabled(ggml_type, head_dim) else None


def apply_rotation(values: np.ndarray, size: int) -> np.ndarray:
    """Multiply each consecutive `size`-chunk of each row by H (rotates, or un-rotates: H @ H = I).

    NOTE: computed as ggml's CPU kernel does it (ops.cpp `ggml_compute_forward_fwht`: scale by
    1/sqrt(size), then butterflies u+v, u-v of width 1, 2, 4, ...), not as a matrix product, so the
    float32 results are the ones llama.cpp gets, bit for bit.
    """
    rows = np.ascontiguousarray(values, dtype=np.float32)
    x = rows.reshape(-1, size) * (np.float32(1.0) / np.sqrt(np.float32(size)))  # 1.0f / sqrtf(n)
    width = 1
    while width < size:
        pairs = x.reshape(len(x), size // (2 * width), 2, width)
        u, v = pairs[:, :, 0, :], pairs[:, :, 1, :]
        x = np.stack([u + v, u - v], axis=2).reshape(len(x), size)
        width *= 2
    return x.reshape(rows.shape)
