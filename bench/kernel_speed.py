"""Exact mode's kernels against llama.cpp's defaults: prefill of a long document, one-branch decode, fan-out decode.

    python bench/kernel_speed.py --tokens 3500 --reps 3 [--pythonpath /tmp/kvb/target]

Arms (each run in its own process: ggml reads its switches once per process; all on the same build, which
must be kvfork's patched one for the last arm):
- defaults:     llama.cpp's defaults: f16 KV, flash attention auto, repacked weights, tiled matmul;
- defaults-fa-off: the same with flash attention off (llama-cpp-python's `Llama` default, kvfork fast mode);
- exact-today:  kvfork's exact settings without the patched kernels: q8_0 KV + flash attention on, no repack,
                GGML_CPU_TILED_MM=0;
- exact-patched: kvfork exact mode on the patched build: the same settings + GGML_CPU_BATCH_INVARIANT=1.
Each repeat runs every arm once, in rotated order; the report gives medians. Prefill goes in 512-token
batches; decode-1 is 32 steps of one sequence after the document; fan-out is 16 steps of N branches forked
from the document (seq_cp), one batch of N rows per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvfork.engine.kernelbuild import pythonpath_first

ARMS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "defaults": ({}, dict(kv_type="f16", flash_attn="auto", repack=True)),
    "defaults-fa-off": ({}, dict(kv_type="f16", flash_attn="off", repack=True)),
    "exact-today": ({"GGML_CPU_TILED_MM": "0"}, dict(kv_type="q8_0", flash_attn="on", repack=False)),
    "exact-patched": ({"GGML_CPU_BATCH_INVARIANT": "1"}, dict(kv_type="q8_0", flash_attn="on", repack=False)),
}
SWITCHES = ("GGML_CPU_TILED_MM", "GGML_CPU_BATCH_INVARIANT", "GGML_CPU_TILED_MM_FORCE")


def _document(model, n: int) -> list[int]:
    sentences = []
    i = 0
    while True:
        sentences.append(f"Station {i % 17} reported a pressure of {40 + (i * 7) % 23} psi at {8 + i % 12}:"
                         f"{(i * 13) % 60:02d} on day {1 + i // 9}, and the crew {['logged', 'checked'][i % 2]} it.")
        i += 1
        if i % 50 == 0:
            ids = model.tokenize(" ".join(sentences), add_special=True, parse_special=False)
            if len(ids) >= n:
                return ids[:n]


def run_arm(name: str, model_path: Path, n_tokens: int, threads: int, fanouts: list[int]) -> dict:
    """One arm, in this process: prefill seconds, one-branch decode tok/s, fan-out aggregate tok/s."""
    from kvfork.config import EngineConfig
    from kvfork.engine.batch import Batch
    from kvfork.engine.llama import LlamaContext, LlamaModel

    _, settings = ARMS[name]
    n_seq = max(fanouts, default=1) + 1
    model = LlamaModel(model_path, repack=settings["repack"])
    config = EngineConfig(n_ctx=n_tokens + 64 * n_seq + 256, n_batch=512, n_ubatch=512, n_seq_max=max(n_seq, 2),
                          n_threads=threads, kv_type=settings["kv_type"], flash_attn=settings["flash_attn"],
                          repack=settings["repack"])
    ctx = LlamaContext(model, config)
    doc = _document(model, n_tokens)
    start = time.perf_counter()
    for i in range(0, n_tokens, 512):
        batch = Batch()
        for j, token in enumerate(doc[i:i + 512]):
            batch.add(token, i + j, 0, logits=i + j == n_tokens - 1)
        ctx.decode(batch)
    prefill = time.perf_counter() - start
    out = {"arm": name, "prefill_s": prefill, "prefill_tok_s": n_tokens / prefill}
    steps = 32
    start = time.perf_counter()
    for s in range(steps):
        batch = Batch()
        batch.add(doc[s], n_tokens + s, 0, logits=True)
        ctx.decode(batch)
    out["decode1_tok_s"] = steps / (time.perf_counter() - start)
    ctx.seq_rm(0, n_tokens, -1)
    for n in fanouts:
        for b in range(1, n + 1):
            ctx.seq_cp(0, b, 0, n_tokens)
        start = time.perf_counter()
        for s in range(16):
            batch = Batch()
            for b in range(1, n + 1):
                batch.add(doc[(s * 31 + b * 7) % n_tokens], n_tokens + s, b, logits=True)
            ctx.decode(batch)
        out[f"fanout{n}_tok_s"] = 16 * n / (time.perf_counter() - start)
        for b in range(1, n + 1):
            ctx.seq_rm(b, -1, -1)
    ctx.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=3500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fanout", default="4,16", help="branch counts of the fan-out decode (comma-separated)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--pythonpath", default=None, help="folder holding the (patched) llama_cpp to measure")
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    fanouts = [int(x) for x in args.fanout.split(",") if x]
    from kvfork.models import resolve_model

    model_path = resolve_model(args.model)
    if args.arm:
        print(json.dumps(run_arm(args.arm, model_path, args.tokens, args.threads, fanouts)))
        return 0
    arms = args.arms.split(",")
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.reps):
        for name in arms[r % len(arms):] + arms[:r % len(arms)]:
            env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
            env.update(ARMS[name][0])
            if args.pythonpath:
                env = pythonpath_first(env, args.pythonpath)
            cmd = [sys.executable, __file__, "--arm", name, "--model", args.model, "--tokens", str(args.tokens),
                   "--threads", str(args.threads), "--fanout", args.fanout]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                print(run.stderr[-2000:], file=sys.stderr)
                return 1
            results[name].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[name][-1]), file=sys.stderr, flush=True)
    keys = [k for k in results[arms[0]][0] if k.endswith("tok_s")]
    base = {k: statistics.median(x[k] for x in results[arms[0]]) for k in keys}
    print(f"{args.model}, {args.tokens} tokens, {args.threads} threads, medians of {args.reps}"
          f" (ratio to {arms[0]}):")
    print(f"{'arm':16s}" + "".join(f"{k:>24s}" for k in keys))
    for name in arms:
        med = {k: statistics.median(x[k] for x in results[name]) for k in keys}
        print(f"{name:16s}" + "".join(f"{med[k]:14.1f} ({med[k] / base[k]:5.2f}x)" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
