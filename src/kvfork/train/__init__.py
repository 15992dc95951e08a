"""LoRA decoders for PrefillShare (issue 8): cache-conditioned fine-tuning and the GGUF adapter file.

Always importable: `TrainConfig`, `Example`, `load_examples` (so `kvfork train-decoder` can say what is
missing). With numpy + gguf only: `TrainResult`, `export_decoder`, and the adapter writer
`kvfork.train.gguf_lora` (`write_lora_gguf`, `random_lora_gguf`). With the train extra
(`pip install 'kvfork[train]'`): `Trainer`, `train_decoder`, `load_base_model`. The rest is imported on
first use.
"""

from __future__ import annotations

from typing import Any

from kvfork.train.config import TRAIN_MODES, TrainConfig
from kvfork.train.data import Example, load_examples

__all__ = [
    "TrainConfig",
    "TRAIN_MODES",
    "Example",
    "load_examples",
    "TrainResult",
    "export_decoder",
    "PREFILL_KEY",
    "write_lora_gguf",
    "random_lora_gguf",
    "Trainer",
    "train_decoder",
    "load_base_model",
]

_LAZY = {
    "TrainResult": "kvfork.train.result",
    "export_decoder": "kvfork.train.export",
    "PREFILL_KEY": "kvfork.train.gguf_lora",
    "write_lora_gguf": "kvfork.train.gguf_lora",
    "random_lora_gguf": "kvfork.train.gguf_lora",
    "Trainer": "kvfork.train.trainer",
    "train_decoder": "kvfork.train.trainer",
    "load_base_model": "kvfork.train.loader",
}


def __getattr__(name: str) -> Any:
    # NOTE: gguf, torch and transformers belong to the optional extra (and torch takes seconds to import)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvfork.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
