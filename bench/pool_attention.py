"""What other sequences' idle cells cost a decode in kvfork's one shared KV pool, flash attention off and on.

    python bench/pool_attention.py [--idle 0 16 40] [--prefix 1300] [--branches 8] [--tokens 16] [--repeats 3]

A server keeps idle prefixes in the context for later requests (`kvfork serve --live-prefixes`, 48 by
default). llama.cpp's unified KV cache attends over every cell up to the highest one in use, masked per
sequence. Without flash attention (kvfork's fast mode on CPU) that is two matmuls over all of those cells
for every row of a decode; ggml's CPU flash-attention kernel skips a masked cell after reading its mask.
So what is faster for one fan-out (docs/benchmarks.md: flash attention off) need not be faster in a pool
full of other sessions' prefixes.

For each flash-attention setting (`off`: fast mode's; `on`: what llama.cpp's "auto" picks on CPU) one
kvfork engine (fast mode otherwise, 2 threads, the default model) prefills the first --prefix tokens of
the sample report, then holds --idle more copies of it (restored from a host copy: other cells, other
sequence ids, as other sessions' prefixes are). At each count it measures, medians of --repeats (min-max):
- a fan-out of --branches branches from the first prefix, --tokens tokens each: seconds per decode step;
- the prefill of ~600 new tokens (the report's end, nothing shared): tokens/s.
Both settings run in this one process, one after the other (the same machine state for both).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import fmt, report, save, stats  # noqa: E402

from kvfork import Engine  # noqa: E402

OUT = Path("bench/out/pool_attention.json")


def measure(args: argparse.Namespace, flash_attn: str, text: str) -> list[dict]:
    most = max(args.idle)
    n_ctx = (most + 1) * (args.prefix + 64) + args.branches * (args.tokens + 64) + 2048
    rows = []
    with Engine(args.model, n_ctx=n_ctx, n_seq_max=most + args.branches + 4, max_running=args.branches,
                n_threads=args.threads, flash_attn=flash_attn, progress=False) as engine:
        tokens = engine.tokenize(text)
        document = engine.detokenize(tokens[: args.prefix])
        fresh = engine.detokenize(tokens[-600:])  # NOTE: the report's end: no prefix in common with `document`
        snap = engine.prefill(document)
        host = snap.to_host()
        idle = []
        for count in sorted(args.idle):
            while len(idle) < count:
                idle.append(engine.restore(host))
            steps, prefills = [], []
            for r in range(args.repeats):
                t = time.perf_counter()
                snap.fan_out([f"Summarise point {i + 1} in one line. ({r})" for i in range(args.branches)],
                             max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
                steps.append((time.perf_counter() - t) / args.tokens)
                new = engine.prefill(f"({r}) " + fresh, chat=False)
                prefills.append(new.n_tokens / new.prefill_s)
                new.close()
            cells = (count + 1) * snap.n_tokens
            row = {"flash_attn": flash_attn, "idle": count, "cells_held": cells,
                   "step_s": stats(steps), "prefill_tok_s": stats(prefills)}
            rows.append(row)
            print(f"| {flash_attn} | {count} | {cells:,} | {fmt(row['step_s'], digits=3)}"
                  f" | {fmt(row['prefill_tok_s'], digits=0)} |", flush=True)
        for s in idle:
            s.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, nargs="+", default=[0, 16, 40], help="idle prefixes held besides the first")
    ap.add_argument("--prefix", type=int, default=1300, help="tokens of each prefix (the load benchmark's ~1,300)")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--settings", nargs="+", default=["off", "on"], choices=["off", "on"])
    args = ap.parse_args()
    print(f"{args.model}, fast mode (f16 KV, no repack), {args.threads} threads, prefixes of {args.prefix} tokens,"
          f" {args.branches} branches x {args.tokens} tokens, medians of {args.repeats} (min-max)")
    print("| flash attention | idle prefixes | cells held | s per decode step | prefill tok/s (~600 new tokens) |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    rows = [row for fa in args.settings for row in measure(args, fa, report())]
    save(OUT, vars(args), rows, t0)


if __name__ == "__main__":
    main()
