"""cos and sin of float32 angles as ggml's CPU rope gets them: the C library's cosf / sinf.

NOTE: glibc's cosf/sinf are not always the correctly rounded float32 (measured: 2 of 128 RoPE
angles differ by one ulp from cos computed in float64 and rounded), and one ulp in a cos is enough
to change a re-rotated f16 key. Calling the same C library functions is what makes numpy
re-rotation bit-identical to llama.cpp's K-shift; where no C math library can be found, float64
numpy rounded to float32 is used (off by one ulp now and then).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

__all__ = ["cos_sin"]


@functools.lru_cache(maxsize=1)
def _libm() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
        for fn in (lib.cosf, lib.sinf):
            fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    except (OSError, AttributeError, TypeError):
        return None
    return lib


def cos_sin(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosf(theta), sinf(theta)) elementwise for a small float32 array of angles."""
    theta = np.asarray(theta, dtype=np.float32)
    lib = _libm()
    if lib is None:
        wide = theta.astype(np.float64)
        return np.cos(wide).astype(np.float32), np.sin(wide).astype(np.float32)
    angles = theta.tolist()
    return (np.array([lib.cosf(t) for t in angles], dtype=np.float32),
            np.array([lib.sinf(t) for t in angles], dtype=np.float32))
