"""Load a catalog GGUF into transformers, offline, in float32 (the base of a LoRA decoder)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from kvfork.errors import InvalidModelFile, InvalidParameter
from kvfork.models import resolve_model
from kvfork.train.gguf_header import LeanGGUFReader
from kvfork.train.gguf_lora import SUPPORTED_ARCHS

__all__ = ["BaseModel", "load_base_model"]

_patch_lock = threading.Lock()


@dataclass(frozen=True)
class BaseModel:
    """The transformers model and what the adapter export needs about it."""

    model: Any  # a transformers PreTrainedModel (float32, eval mode)
    path: Path  # the GGUF it came from
    name: str  # the catalog name or the path as given
    arch: str  # llama.cpp's architecture name ("qwen2", "gemma3")
    n_layers: int


def load_base_model(model: str | os.PathLike[str]) -> BaseModel:
    """Dequantize a catalog model's GGUF (or a GGUF path) into a transformers model; nothing is fetched.

    Raises InvalidParameter for an architecture the LoRA export does not support.
    """
    # NOTE: set before transformers is imported, so no code path tries the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model(model)
    header = LeanGGUFReader(path)
    arch = str(header.field_value("general.architecture"))
    if arch not in SUPPORTED_ARCHS:
        raise InvalidParameter(f"training supports {', '.join(SUPPORTED_ARCHS)} models; {path.name} is {arch!r}")
    n_layers = int(header.field_value(f"{arch}.block_count"))
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise InvalidModelFile(f"{path.name} has no token_embd.weight tensor")
    with tempfile.TemporaryDirectory(prefix="kvfork-gguf-") as folder, _lean_gguf_reads(), _quiet_transformers():
        # NOTE: transformers resolves gguf_file inside a folder; a symlink avoids copying the weights
        (Path(folder) / path.name).symlink_to(path.resolve())
        # NOTE: the vocabulary size comes from the tokenizer arrays the lean reader skips: the embedding has it
        config = AutoConfig.from_pretrained(folder, gguf_file=path.name, vocab_size=int(embd.shape[1]))
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=path.name, config=config, dtype=torch.float32, local_files_only=True
        )
    loaded.eval()
    return BaseModel(model=loaded, path=path, name=str(model), arch=arch, n_layers=n_layers)


@contextlib.contextmanager
def _lean_gguf_reads() -> Iterator[None]:
    """transformers imports `GGUFReader` from gguf at each load: hand it the lean reader meanwhile."""
    with _patch_lock:
        original = gguf.GGUFReader
        gguf.GGUFReader = LeanGGUFReader  # type: ignore[misc]
        try:
            yield
        finally:
            gguf.GGUFReader = original  # type: ignore[misc]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' GGUF loader logs every metadata key it does not map; keep errors only."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
