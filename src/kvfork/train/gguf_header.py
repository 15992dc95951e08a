"""LeanGGUFReader: gguf's GGUFReader without the tokenizer's vocabulary arrays (numpy + gguf only).

NOTE: GGUFReader parses every array element into its own numpy view: the 150k-260k entries of the
catalog models' `tokenizer.ggml.*` arrays take ~10 s per read on this machine, and transformers reads a
GGUF twice per load. kvfork tokenizes with llama.cpp, so training and adapter writing need none of them:
this reader steps over those arrays (their byte sizes only) and keeps every other field and the tensors.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

__all__ = ["LeanGGUFReader", "SKIPPED_PREFIX"]

SKIPPED_PREFIX = "tokenizer.ggml."
_MIN_SKIPPED = 1024  # arrays shorter than this are parsed as usual (cheap, and some configs read them)


class LeanGGUFReader(gguf.GGUFReader):
    """A GGUFReader whose `fields` lack the large `tokenizer.ggml.*` arrays; `skipped` names them."""

    def __init__(self, path: os.PathLike[str] | str, mode: Any = "r") -> None:
        self.skipped: dict[str, int] = {}  # field name -> element count
        super().__init__(path, mode)

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(count):
            klen = int(self._get(offs, np.uint64)[0])
            name = bytes(self.data[offs + 8 : offs + 8 + klen]).decode("utf-8")
            kind = int(self._get(offs + 8 + klen, np.uint32)[0])
            body = offs + 8 + klen + 4
            if kind == gguf.GGUFValueType.ARRAY and name.startswith(SKIPPED_PREFIX):
                size = self._array_size(name, body)
                if size is not None:
                    offs = body + size
                    continue
            offs = super()._build_fields(offs, 1)
        return offs

    def _array_size(self, name: str, offs: int) -> int | None:
        """Bytes of the array value at offs (item type, count, items); None to parse it normally."""
        item = gguf.GGUFValueType(int(self._get(offs, np.uint32)[0]))
        n = int(self._get(offs + 4, np.uint64)[0])
        if n < _MIN_SKIPPED:
            return None
        pos = offs + 12
        if item == gguf.GGUFValueType.STRING:
            # NOTE: each string is a little-endian u64 length then its bytes; only the lengths are read
            data = self.data
            for _ in range(n):
                pos += 8 + int.from_bytes(data[pos : pos + 8].tobytes(), "little")
        else:
            scalar = self.gguf_scalar_to_np.get(item)
            if scalar is None:
                return None
            pos += n * np.dtype(scalar).itemsize
        self.skipped[name] = n
        return pos - offs

    def field_value(self, key: str) -> Any:
        """A scalar or string field's value (None when absent)."""
        field = self.fields.get(key)
        return None if field is None else field.contents()
