"""Issue 5, scenarios A and C, on one engine in one run (medians of repeats after a warm-up, min/max).

A  "Prefill once, fan out" (SwarmKV's published setting): 2 agents, the ~3,500-token report,
   ~20-token instructions, 64 generated tokens each. Against the two agents run one after another
   from scratch: end-to-end speedup, the second agent's activation latency (asking for its branch
   -> first token, with the snapshot live) against its from-scratch time to first token, and the
   prefill time saved.
C  Memory: KV bytes llama.cpp holds for N open branches (every used cell of the unified cache,
   counted once: llama_state_seq_get_size(ctx, -1)) against N independent copies (each branch's
   own state blob, prefix included) and the ideal (prefix once + each branch's own tokens).

    python bench/scenarios.py [--repeats 3] [--model qwen2.5-coder-0.5b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from importlib import resources
from pathlib import Path

from workload import INSTRUCTIONS, SYSTEM, stats

from kvfork import Engine

AGENTS = INSTRUCTIONS[:2]


def scenario_a(engine: Engine, doc: str, n_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    snap = engine.prefill(doc, system=SYSTEM)
    fan = snap.fan_out(AGENTS, max_tokens=n_tokens, ignore_eos=True)
    fork_wall = time.perf_counter() - t0
    t1 = time.perf_counter()  # the second agent activated later, from the live snapshot
    with snap.fork() as branch:
        branch.send(AGENTS[1]).generate(max_tokens=1)
    activation = time.perf_counter() - t1
    snap.close()
    t2 = time.perf_counter()
    scratch = [engine.generate(engine.prompt_tokens(doc, a, system=SYSTEM), max_tokens=n_tokens, ignore_eos=True)
               for a in AGENTS]
    scratch_wall = time.perf_counter() - t2
    return {
        "fork_s": fork_wall, "scratch_s": scratch_wall, "speedup": scratch_wall / fork_wall,
        "activation_s": activation, "scratch_ttft_s": scratch[1].ttft_s,
        "activation_speedup": scratch[1].ttft_s / activation, "prefill_saved_s": scratch[1].ttft_s - activation,
        "identical": float(all(f.tokens == s.tokens for f, s in zip(fan, scratch, strict=True))),
    }


def scenario_c(engine: Engine, doc: str, counts: list[int], n_tokens: int) -> list[dict[str, float]]:
    snap = engine.prefill(doc, system=SYSTEM)
    prefix = engine.ctx.state_seq_size(snap._seq.seq_id)
    rows = []
    for n in counts:
        branches = [snap.fork().send(f"Agent {i}: {AGENTS[i % 2]}") for i in range(n)]
        engine.generate_branches(branches, [engine.sampling(max_tokens=n_tokens, ignore_eos=True)] * n)
        own = [engine.ctx.state_seq_size(b._seq.seq_id) for b in branches]
        held = engine.ctx.state_seq_size(-1)
        ideal = prefix + sum(o - prefix for o in own)
        rows.append({"branches": n, "held_bytes": held, "copies_bytes": sum(own), "ideal_bytes": ideal,
                     "held_vs_ideal": held / ideal, "copies_vs_held": sum(own) / held})
        for b in branches:
            b.close()
    snap.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/out/scenarios.json"))
    ap.add_argument("--chat-template", default=None, help="for a GGUF without one (gemma3-270m: gemma)")
    ap.add_argument("--doc-chars", type=int, default=None, help="cut the report (a quick smoke run)")
    args = ap.parse_args()
    doc = resources.files("kvfork").joinpath("data/sample_report.txt").read_text()[: args.doc_chars]
    engine = Engine(args.model, n_ctx=8192, n_seq_max=20, progress=False, chat_template=args.chat_template)
    scenario_a(engine, doc[:1200], 4)  # warm-up
    runs = []
    for r in range(args.repeats):
        runs.append(scenario_a(engine, doc, 64))
        x = runs[-1]
        print(f"A repeat {r + 1}: fork {x['fork_s']:.1f} s, scratch {x['scratch_s']:.1f} s ({x['speedup']:.2f}x);"
              f" agent 2 activation {x['activation_s'] * 1e3:.0f} ms vs {x['scratch_ttft_s']:.1f} s"
              f" ({x['activation_speedup']:.0f}x); identical {bool(x['identical'])}")
    memory = scenario_c(engine, doc, [1, 2, 4, 8, 16], 32)
    for row in memory:
        print(f"C {row['branches']:2d} branches: held {row['held_bytes'] / 1e6:.1f} MB,"
              f" ideal {row['ideal_bytes'] / 1e6:.1f} MB ({row['held_vs_ideal']:.3f}),"
              f" independent copies {row['copies_bytes'] / 1e6:.1f} MB")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    keys = ["fork_s", "scratch_s", "speedup", "activation_s", "scratch_ttft_s", "activation_speedup", "prefill_saved_s"]
    result = {"model": engine.model_path.name, "threads": engine.config.n_threads, "commit": commit,
              "doc_tokens": len(engine.prompt_tokens(doc, "", system=SYSTEM)),
              "A": {k: stats([r[k] for r in runs]) for k in keys}, "A_runs": runs, "C": memory}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    a = result["A"]
    print("\nScenario A (median, min-max): " + "; ".join(
        f"{k} {a[k]['median']:.3g} ({a[k]['min']:.3g}-{a[k]['max']:.3g})" for k in keys))


if __name__ == "__main__":
    main()
