"""How the decode step grows with the branches decoding together: the figures behind EngineConfig.max_running.

    python bench/decode_batch.py [--branches 1 2 4 8 16 32 64] [--prefix 1275] [--tokens 32] [--repeats 3]

One kvfork engine (fast mode, its defaults, 2 threads, the default model) prefills the first --prefix
tokens of the sample report once, then for each B fans out B branches (a short instruction each, greedy,
--tokens tokens, ignore_eos, max_running raised to B so all of them decode together). Reports per B the
median wall time of the fan-out over --repeats (min-max), the tokens/s of all branches together and the
time per decode step (wall / tokens per branch). Each decode row attends over every live cell, so past
the CPU's peak more branches only slow each one down.
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib import resources

from kvfork import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--prefix", type=int, default=1275, help="prefix tokens (the load benchmark's ~1,300)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    args = ap.parse_args()
    most = max(args.branches)
    report = resources.files("kvfork.data").joinpath("sample_report.txt").read_text()
    with Engine(args.model, n_ctx=args.prefix + most * (args.tokens + 64) + 512, n_seq_max=most + 1,
                max_running=most, n_threads=args.threads, progress=False) as engine:
        document = engine.detokenize(engine.tokenize(report)[: args.prefix])
        snap = engine.prefill(document)
        print(f"{args.model}, fast mode, {args.threads} threads, prefix {snap.n_tokens} tokens,"
              f" {args.tokens} tokens per branch, medians of {args.repeats}")
        print("| branches | wall s (min-max) | tokens/s, all branches | s per step |")
        print("|---|---|---|---|")
        for b in args.branches:
            walls = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                snap.fan_out([f"Summarise point {i + 1} in one line." for i in range(b)],
                             max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
                walls.append(time.perf_counter() - t)
            wall = statistics.median(walls)
            print(f"| {b} | {wall:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {b * args.tokens / wall:.1f}"
                  f" | {wall / args.tokens:.3f} |", flush=True)


if __name__ == "__main__":
    main()
