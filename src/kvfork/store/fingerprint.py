"""Model fingerprint: a content hash of a GGUF file (not its path), computed once per file version."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["model_fingerprint"]

_SAMPLE = 4 << 20  # bytes hashed at each end of the file
_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 hex of (file size, first 4 MiB, last 4 MiB) of a model file.

    NOTE: hashing both ends and the size tells apart every pair of GGUF files met in practice
    (header, tensor directory and the last tensors differ) at the cost of 8 MiB of reads instead of
    a whole 500 MB file. The result is cached per (real path, size, mtime), so a replaced file is
    hashed again, and two copies of one model at different paths get the same fingerprint.
    """
    real = Path(path).resolve()
    st = real.stat()
    cache_key = (str(real), st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _cache.get(cache_key)
    if hit is not None:
        return hit
    digest = hashlib.sha256(st.st_size.to_bytes(8, "little"))
    with real.open("rb") as fh:
        digest.update(fh.read(_SAMPLE))
        if st.st_size > _SAMPLE:
            fh.seek(max(_SAMPLE, st.st_size - _SAMPLE))
            digest.update(fh.read(_SAMPLE))
    value = digest.hexdigest()
    with _lock:
        _cache[cache_key] = value
    return value
