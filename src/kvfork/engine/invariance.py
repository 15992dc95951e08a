"""Bitwise batch- and layout-invariance check of the llama.cpp build: one token's logits decoded alone against
the same token decoded inside batches of other sizes, with its sequence's cells contiguous or interleaved with
other sequences' cells and holes.

ggml reads its kernel switches once per process, so run it in a fresh interpreter:
`python -m kvfork.engine.invariance MODEL.gguf --threads 2` prints one JSON object (`kvfork build` and
tests/engine/test_invariance.py do).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvfork.config import EngineConfig
from kvfork.engine.batch import Batch
from kvfork.engine.llama import LlamaContext, LlamaModel

__all__ = ["SIZES", "Case", "check"]

SIZES = (2, 4, 7, 8, 16, 63, 64, 65, 512)
LAYOUTS = ("contiguous", "interleaved")
_TEXT = (
    "The pump station log for the north district recorded pressure readings every hour. On the second day the"
    " operators noticed a slow drop in the eastern main, traced it to a valve that had been left half open after"
    " maintenance, and restored normal flow before noon. Later that week a storm cut power to two substations."
)


@dataclass(frozen=True)
class Case:
    """One comparison: the target token's logits in a batch of `rows` rows, cells laid out as `layout`."""

    layout: str
    rows: int
    equal: bool
    max_abs_diff: float


def _tokens(model: LlamaModel, n: int) -> list[int]:
    ids = model.tokenize(_TEXT, add_special=False, parse_special=False)
    return [ids[i % len(ids)] for i in range(n)]


def _prefix(ctx: LlamaContext, prefix: list[int], layout: str, filler: list[int]) -> None:
    """Put `prefix` in sequence 0 at cells 0..n-1 (contiguous), or interleaved row by row with sequences 1 and 2,
    then 2's cells freed and refilled by sequence 3, then 37 cells of sequence 2 freed again: the prefix's cells
    lie among other sequences' cells, and the target batch lands in holes after them.

    NOTE: ggml sums a query's attention in cell order, so the target's visible cells must keep the order of
    a from-scratch run (prefix first, then the target), as kvfork's scheduler keeps it (it frees cells only
    between turns): a target decoded into a hole before later prefix cells rounds differently."""
    batch = Batch()
    for i, token in enumerate(prefix):
        batch.add(token, i, 0)
        if layout == "interleaved":
            batch.add(filler[i], i, 1)
            batch.add(filler[-1 - i], i, 2)
    ctx.decode(batch)
    if layout == "interleaved":
        ctx.seq_rm(2)
        refill, tail = Batch(), Batch()
        for i in range(len(prefix)):
            refill.add(filler[2 * i], i, 3)
        ctx.decode(refill)
        for i in range(37):
            tail.add(filler[3 * i], i, 2)
        ctx.decode(tail)
        ctx.seq_rm(2)


def _target(ctx: LlamaContext, token: int, pos: int, rows: int, filler: list[int]) -> np.ndarray:
    """Decode `token` at `pos` of sequence 0 as the middle row of a batch of `rows` rows (the others: sequence 2)."""
    batch = Batch()
    others = iter(range(rows - 1))
    index = -1
    for row in range(rows):
        if row == rows // 2:
            index = batch.add(token, pos, 0, logits=True)
        else:
            j = next(others)
            batch.add(filler[j % len(filler)], j, 2)
    ctx.decode(batch)
    return ctx.logits(index)


def check(model_path: Path, *, n_threads: int, exact: bool = True, sizes: tuple[int, ...] = SIZES,
          layouts: tuple[str, ...] = LAYOUTS, n_prefix: int = 100) -> tuple[str, list[Case]]:
    """Compare the target's logits in every (layout, batch size) case with the reference (contiguous, alone).

    Returns the reference logits' sha256 (equal across thread counts when the build is thread-invariant)
    and one Case per comparison."""
    config = EngineConfig(n_ctx=2048, n_batch=512, n_ubatch=512, n_seq_max=4, n_threads=n_threads, exact=exact,
                          kv_type="q8_0" if exact else "f16", flash_attn="on")
    model = LlamaModel(model_path)
    ctx = LlamaContext(model, config)
    try:
        tokens = _tokens(model, 3 * n_prefix + 1 + max(sizes))
        prefix, token, filler = tokens[:n_prefix], tokens[n_prefix], tokens[n_prefix + 1:]
        _prefix(ctx, prefix, "contiguous", filler)
        ref = _target(ctx, token, n_prefix, 1, filler)
        cases = []
        for layout in layouts:
            for rows in ((1,) if layout != "contiguous" else ()) + tuple(sizes):
                ctx.clear()
                _prefix(ctx, prefix, layout, filler)
                got = _target(ctx, token, n_prefix, rows, filler)
                cases.append(Case(layout, rows, bool(np.array_equal(got, ref)),
                                  float(np.max(np.abs(got.astype(np.float64) - ref)))))
        return hashlib.sha256(ref.tobytes()).hexdigest(), cases
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="fast mode (f16 KV, flash attention on), no switch")
    parser.add_argument("--sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=SIZES)
    args = parser.parse_args(argv)
    from kvfork.engine.llama import system_info

    digest, cases = check(args.model, n_threads=args.threads, exact=not args.fast, sizes=args.sizes)
    print(json.dumps({"system_info": system_info(), "reference": digest,
                      "cases": [asdict(c) for c in cases]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
