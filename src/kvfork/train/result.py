"""TrainResult: a trained decoder's LoRA matrices and how its training went (numpy only, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kvfork.train.config import TrainConfig

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """What a training run produced: the LoRA matrices by transformers module name, and how it went."""

    config: TrainConfig
    base: str  # the catalog name (or path) of the base model
    arch: str
    n_layers: int
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]  # module -> (lora_A (r, in), lora_B (out, r)), float32
    losses: list[float] = field(default_factory=list)  # mean response loss of each optimizer step
    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    skipped: int = 0  # over the max_* token limits
    response_tokens: int = 0  # trained on, over all steps
    base_prompt_tokens: int = 0  # cache mode: prompt tokens the base computed (a shared prefix counts once)

    @property
    def final_loss(self) -> float:
        """The mean of the last tenth of the steps' losses (at least one): less noisy than the last step's."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)

    def meta(self) -> dict[str, str]:
        """kvfork's keys for the adapter file: who prefills (llama.cpp ignores them; kvfork's engine reads them)."""
        out = {
            "kvfork.decoder.prefill": self.config.prefill,
            "kvfork.decoder.own_tokens": str(self.config.own_tokens),
            "kvfork.decoder.base_model": self.base,
            "kvfork.train.examples": str(self.examples),
            "kvfork.train.steps_done": str(self.steps),
            "kvfork.train.final_loss": f"{self.final_loss:.5f}",
        }
        out.update(self.config.as_meta())
        return out
