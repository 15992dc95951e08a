"""ReuseConfig: how shared content that is not a prefix is reused (issue 7), validated when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvfork.errors import InvalidParameter

__all__ = ["ReuseConfig", "ReuseMode", "REUSE_MODES"]

ReuseMode = Literal["exact", "shift", "kvcomm", "blend"]
REUSE_MODES: tuple[str, ...] = ("exact", "shift", "kvcomm", "blend")


@dataclass(frozen=True)
class ReuseConfig:
    """A reuse mode and its knobs.

    exact   recompute every token after an agent's own prefix (the default; bit-exact).
    shift   place the segment's cached KV at its new offset, keys re-rotated (llama.cpp's --cache-reuse);
            the deviation the different prefix causes is ignored.
    kvcomm  shift, plus the deviation estimated from an online pool of anchors (KVCOMM): weights
            softmax(-distance / temperature) over the anchors of the same (segment name, agent); when
            their entropy exceeds gamma * log2(n anchors), or the pool has fewer than min_anchors, the
            segment is prefilled normally and becomes a new anchor. At most max_anchors per pool.
    blend   shift, but the first blend_tokens tokens of each segment are recomputed (they attend to the
            new prefix; EPIC's and CacheBlend's observation that the deviation concentrates there).

    Segments shorter than min_segment tokens are always computed. NOTE: approximate modes change
    the model's output; the evaluation (bench/reuse_eval.py) reports their quality against exact.
    """

    mode: ReuseMode = "exact"
    temperature: float = 0.0005  # relative L2 distance units; calibrated by bench/reuse_calibrate.py
    gamma: float = 0.3
    max_anchors: int = 20
    min_anchors: int = 2
    delta_tokens: int = 64  # per-position deviations kept per anchor; the rest is one mean row
    blend_tokens: int = 16
    min_segment: int = 16

    def __post_init__(self) -> None:
        if self.mode not in REUSE_MODES:
            raise InvalidParameter(f"reuse mode must be one of {', '.join(REUSE_MODES)}; got {self.mode!r}")
        if not self.temperature > 0:
            raise InvalidParameter(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.gamma <= 1:
            raise InvalidParameter(f"gamma must be in [0, 1], got {self.gamma}")
        if not 1 <= self.min_anchors <= self.max_anchors:
            raise InvalidParameter(f"need 1 <= min_anchors <= max_anchors, got {self.min_anchors}, {self.max_anchors}")
        for name in ("delta_tokens", "blend_tokens", "min_segment"):
            if getattr(self, name) < 0:
                raise InvalidParameter(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def of(cls, value: ReuseConfig | str | None) -> ReuseConfig:
        """A ReuseConfig from a config, a mode name, or None (exact)."""
        if value is None:
            return cls()
        if isinstance(value, ReuseConfig):
            return value
        if isinstance(value, str):
            return cls(mode=value)  # type: ignore[arg-type]
        raise InvalidParameter(f"reuse must be a mode name or a ReuseConfig, got {type(value).__name__}")
