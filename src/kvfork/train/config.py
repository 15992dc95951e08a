"""TrainConfig: how a LoRA decoder is fine-tuned (issue 8), validated when built; no torch needed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Literal

from kvfork.errors import InvalidParameter

__all__ = ["TrainConfig", "TrainMode", "TRAIN_MODES", "SCHEDULES", "DEFAULT_TARGETS"]

TrainMode = Literal["cache", "plain"]
TRAIN_MODES: tuple[TrainMode, ...] = ("cache", "plain")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")

# NOTE: attention and MLP projections both. In cache mode the prompt's K/V are the base model's and stay
# fixed, so the adapter acts only through the response tokens' own path: q_proj (how they read the base's
# cache), k/v_proj (what later response tokens read of earlier ones), o_proj and the MLP (what they make of
# it). Measured on gemma3-270m, cache mode, a JSON-extraction task (16 examples, 16 steps, held-out loss
# from 2.79): q,k,v,o 0.25 (lr 5e-4) / 0.86 (lr 2e-4); with the MLP too 0.16 / 0.25, at about the same
# time per step (the LoRA matrices are small next to the frozen weights). llama.cpp adapts all of them.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class TrainConfig:
    """A LoRA decoder's training settings.

    mode "cache" (PrefillShare's cache-conditioned fine-tuning): the prompt's KV comes from the base model
    with the adapter off, exactly as kvfork serves a decoder over a shared base prefill; only the last
    `own_tokens` prompt tokens and the response run through the adapter. mode "plain": an ordinary LoRA
    fine-tune, adapter on over prompt and response. Both put the loss on the response tokens only.

    steps > 0 trains that many optimizer steps (cycling through the examples, reshuffled each pass);
    steps 0 trains `epochs` passes. One step is `grad_accum` examples. The learning rate warms up linearly
    for `warmup` steps (at most a tenth of the run), then stays (constant) or decays to a tenth (cosine).
    n_threads: torch's threads. NOTE: on a machine whose cores are busy with other work, fewer threads are
    faster: each torch op waits at a barrier for all of them (2 threads on 2 busy cores: 10x slower).
    Examples whose prompt or response exceeds the max_* token limits are skipped (and counted).
    teacher + distill (knowledge distillation, for cache mode): a plain decoder of the same base (trained
    with its own prefill) scores each training reply once, adapter on over the whole prompt; the loss
    becomes (1 - distill) x cross-entropy + distill x the cross-entropy against the teacher's next-token
    distribution (its TEACHER_TOP_K likeliest tokens, renormalized). The teacher's own training is a cost
    of its own: count it when comparing training budgets.
    """

    mode: TrainMode = "cache"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 5e-4
    steps: int = 0
    epochs: int = 1
    grad_accum: int = 1
    warmup: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    n_threads: int = field(default_factory=_default_threads)
    max_prompt_tokens: int = 4096
    max_response_tokens: int = 1024
    prompt_cache_mb: int = 1024  # cache mode: base-model prompt KV kept between passes (recomputed beyond)
    teacher: str | None = None  # a plain decoder's adapter GGUF: distil its replies' distribution (see distill)
    distill: float = 0.0  # weight of the teacher's term in the loss, in [0, 1]: (1 - w) CE + w KD
    own_tokens: int = 1  # cache mode: the prompt's last tokens the adapter computes (the rest is base KV)

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise InvalidParameter(f"mode must be one of {', '.join(TRAIN_MODES)}; got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidParameter(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise InvalidParameter(f"targets must be a non-empty tuple of module names; got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("rank", "epochs", "grad_accum", "n_threads", "max_prompt_tokens", "max_response_tokens",
                     "own_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameter(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("steps", "warmup", "seed", "prompt_cache_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidParameter(f"{name} must be an integer >= 0, got {value!r}")
        if not self.alpha > 0:
            raise InvalidParameter(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InvalidParameter(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.lr < 1:
            raise InvalidParameter(f"lr must be in (0, 1), got {self.lr}")
        if not self.weight_decay >= 0:
            raise InvalidParameter(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.max_grad_norm > 0:
            raise InvalidParameter(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if isinstance(self.distill, bool) or not isinstance(self.distill, int | float) or not 0 <= self.distill <= 1:
            raise InvalidParameter(f"distill must be in [0, 1], got {self.distill!r}")
        if self.mode != "cache" and self.own_tokens != 1:
            raise InvalidParameter(f"own_tokens is a cache-mode setting (plain: the adapter computes every prompt"
                                   f" token); got own_tokens={self.own_tokens} with mode={self.mode!r}")
        if (self.teacher is None) != (self.distill == 0):
            raise InvalidParameter("distill > 0 needs a teacher (a plain decoder's adapter GGUF), and a teacher"
                                   f" needs distill > 0; got teacher={self.teacher!r}, distill={self.distill}")

    @property
    def prefill(self) -> str:
        """Who computes the prompt's KV when the decoder is served: the base model, or the adapter itself."""
        return "base" if self.mode == "cache" else "adapter"

    def as_meta(self) -> dict[str, str]:
        """The settings as strings (the adapter file's `kvfork.train.*` metadata)."""
        out = {}
        for key, value in asdict(self).items():
            out[f"kvfork.train.{key}"] = ",".join(value) if isinstance(value, tuple) else str(value)
        return out
