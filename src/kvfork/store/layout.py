"""StateLayout: everything a llama.cpp state blob depends on, so a blob is only restored where it fits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from kvfork.errors import SnapshotMismatch
from kvfork.store.fingerprint import model_fingerprint

__all__ = ["StateLayout"]


def _binding_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:  # pragma: no cover - kvfork depends on it
        return "unknown"


@dataclass(frozen=True)
class StateLayout:
    """The model and cache settings a sequence's KV bytes were produced under.

    NOTE: llama.cpp's seq state holds raw K/V rows: their type (kv_type), whether V is stored
    transposed (flash attention off) and the layer shapes (the model) must match the target context,
    and the byte layout itself belongs to one llama.cpp version. A blob restored under another
    layout is at best refused by llama.cpp and at worst read as garbage, so every field must match.
    """

    model: str  # model_fingerprint of the GGUF file
    model_desc: str  # human-readable, for messages only (not compared)
    kv_type: str
    flash_attn: str  # "on": V rows as is; "off": V transposed; "auto": llama.cpp decides
    kv_unified: bool
    n_swa: int  # sliding-window size of the model (0: full attention everywhere)
    llama_cpp: str  # llama-cpp-python version (it pins the llama.cpp sources)

    @classmethod
    def of(cls, model_path: Path, model_desc: str, n_swa: int, kv_type: str, flash_attn: str) -> StateLayout:
        """The layout of a context of the model at `model_path` with these KV settings."""
        return cls(
            model=model_fingerprint(model_path),
            model_desc=model_desc,
            kv_type=kv_type,
            flash_attn=flash_attn,
            kv_unified=True,
            n_swa=int(n_swa),
            llama_cpp=_binding_version(),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StateLayout:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        if missing:
            raise SnapshotMismatch(f"snapshot layout lacks {sorted(missing)}; another kvfork wrote it")
        return cls(**{k: data[k] for k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def root(self) -> bytes:
        """Seed of every content hash under this layout: same tokens, other layout -> other keys."""
        data = {k: v for k, v in self.to_dict().items() if k != "model_desc"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()

    def check(self, target: StateLayout) -> None:
        """Raise SnapshotMismatch naming each field where `target` (the engine) differs from self."""
        diffs = [
            f"{f.name}: snapshot {getattr(self, f.name)!r}, engine {getattr(target, f.name)!r}"
            for f in fields(self)
            if f.name != "model_desc" and getattr(self, f.name) != getattr(target, f.name)
        ]
        if diffs:
            what = "another model" if self.model != target.model else "another KV layout"
            raise SnapshotMismatch(
                f"snapshot was made with {what} ({self.model_desc} vs {target.model_desc}): "
                + "; ".join(diffs)
                + ". Load it into an engine with the same model file and kv_type/flash_attn, or prefill again"
            )
