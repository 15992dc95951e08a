"""Export a trained decoder: its LoRA matrices as a GGUF adapter llama.cpp (and kvfork's engine) loads."""

from __future__ import annotations

import os
from pathlib import Path

from kvfork.train.gguf_lora import write_lora_gguf
from kvfork.train.result import TrainResult

__all__ = ["export_decoder"]


def export_decoder(result: TrainResult, path: str | os.PathLike[str]) -> Path:
    """Write result's adapter to path (atomically), with kvfork's metadata.

    `kvfork.decoder.prefill` says how the decoder was trained, so how it must be served: "base" (cache
    mode: the base model prefills the prompt, the adapter decodes from its last token on) or "adapter"
    (plain mode: the adapter is on for the whole prompt). `kvfork.decoder.base_model` names the base and
    `kvfork.train.*` record the settings; llama.cpp ignores keys it does not know.
    """
    return write_lora_gguf(
        path,
        arch=result.arch,
        n_layers=result.n_layers,
        alpha=result.config.alpha,
        tensors=result.tensors,
        meta=result.meta(),
    )
