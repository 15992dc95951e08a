"""TokenLogprob: the log-probability of a generated token under the model, with the most likely alternatives."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TokenLogprob", "MAX_TOP_LOGPROBS", "token_logprob"]

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log-probability and the `top` most likely tokens (id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """Log-softmax of the raw logits (the model's distribution, before temperature or filters) at `token`.

    NOTE: raw rather than after the sampler chain, as vLLM does by default: the figure then means the
    same thing whatever the sampling settings, and greedy and sampled requests can be compared.
    """
    x = logits.astype(np.float64)
    shift = x.max()
    logz = shift + np.log(np.exp(x - shift).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = tuple((int(i), float(x[i] - logz)) for i in idx)
    return TokenLogprob(token, float(x[token] - logz), top)
