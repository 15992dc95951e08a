"""Route keys: a request's prompt as the snapshot store's chained block hashes, short enough to report.

The ingress computes them from the prompt tokens it renders; every replica computes the same keys over
the prefixes it holds and reports them through Ray Serve's routing stats, so the router compares like with
like. Key i covers every token up to the end of block i (store/keys.py), so a replica that reports key i
holds the whole prefix up to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from kvfork.store.keys import as_array, block_hashes

__all__ = ["ROUTE_BLOCK", "route_keys", "route_root"]

# NOTE: the store's default block (StoreConfig.block_size): a 3,500-token document is ~110 keys, and a match
# is found to within 32 tokens, far below what a prefill of the rest would cost.
ROUTE_BLOCK = 32
_KEY_HEX = 16  # 64 bits of each sha256: collisions among a replica's few thousand keys are negligible


def route_root(model_fingerprint: str) -> bytes:
    """The chain's seed: the model's content fingerprint (store/fingerprint.py), so two models never match."""
    return hashlib.sha256(b"kvfork-route\0" + model_fingerprint.encode()).digest()


def route_keys(root: bytes, tokens: Sequence[int], block_size: int = ROUTE_BLOCK) -> list[str]:
    """The hex-truncated chained hash of every full block of `tokens`, in order."""
    return [h.hex()[:_KEY_HEX] for h in block_hashes(root, as_array(tokens), block_size)]
