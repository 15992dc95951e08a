"""Issue 2's measurement: N agents over one shared document, fan-out vs from-scratch, side by side.

For each repeat (after a short warm-up), in alternating order:
  fan-out:      prefill the document once, fork N branches, decode them in one batch
  from scratch: each agent alone, one after another, prefilling document + instruction itself
Reports medians with min/max, the speedup per repeat, the time the N forks took (seq_cp), and
whether every agent's greedy tokens were identical in both modes.

    python bench/fanout.py [--model qwen2.5-coder-0.5b] [--agents 4] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from importlib import resources
from pathlib import Path

from workload import INSTRUCTIONS, SYSTEM, stats

from kvfork import Engine


def fan_out(engine: Engine, doc: str, agents: list[str], n: int) -> tuple[float, float, list[tuple]]:
    table = engine.scheduler.table
    fork_before = table.fork_seconds
    t0 = time.perf_counter()
    snap = engine.prefill(doc, system=SYSTEM)
    outs = snap.fan_out(agents, max_tokens=n, ignore_eos=True)
    wall = time.perf_counter() - t0
    snap.close()
    return wall, table.fork_seconds - fork_before, [o.tokens for o in outs]


def from_scratch(engine: Engine, doc: str, agents: list[str], n: int) -> tuple[float, list[tuple]]:
    t0 = time.perf_counter()
    tokens = []
    for agent in agents:
        prompt = engine.prompt_tokens(doc, agent, system=SYSTEM)
        tokens.append(engine.generate(prompt, max_tokens=n, ignore_eos=True).tokens)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc", type=Path, default=None, help="default: the bundled ~3,500-token report")
    ap.add_argument("--out", type=Path, default=Path("bench/out/fanout.json"))
    args = ap.parse_args()
    doc = args.doc.read_text() if args.doc else resources.files("kvfork").joinpath("data/sample_report.txt").read_text()
    agents = INSTRUCTIONS[: args.agents]
    engine = Engine(args.model, n_ctx=8192, n_seq_max=max(8, args.agents + 2), progress=False)
    fan_out(engine, doc[:1500], agents, 4)  # warm-up: page in the weights, build the graphs
    from_scratch(engine, doc[:1500], agents[:1], 4)
    rows = []
    for r in range(args.repeats):
        order = ["fan", "scratch"] if r % 2 == 0 else ["scratch", "fan"]
        row: dict = {}
        for mode in order:
            if mode == "fan":
                row["fanout_s"], row["forks_s"], fan_tokens = fan_out(engine, doc, agents, args.tokens)
            else:
                row["scratch_s"], scratch_tokens = from_scratch(engine, doc, agents, args.tokens)
        row["speedup"] = row["scratch_s"] / row["fanout_s"]
        row["identical"] = sum(a == b for a, b in zip(fan_tokens, scratch_tokens, strict=False))
        rows.append(row)
        print(f"repeat {r + 1}: fan-out {row['fanout_s']:.1f} s, from scratch {row['scratch_s']:.1f} s,"
              f" {row['speedup']:.2f}x, forks {row['forks_s'] * 1e3:.3f} ms,"
              f" identical {row['identical']}/{len(agents)}")
    n_doc = len(engine.prompt_tokens(doc, "", system=SYSTEM))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "model": engine.model_path.name, "threads": engine.config.n_threads,
        "machine": platform.processor() or platform.machine(),
        "commit": commit, "doc_tokens": n_doc, "agents": len(agents), "tokens_per_agent": args.tokens,
        "repeats": rows,
        "fanout_s": stats([r["fanout_s"] for r in rows]), "scratch_s": stats([r["scratch_s"] for r in rows]),
        "speedup": stats([r["speedup"] for r in rows]), "forks_ms": stats([r["forks_s"] * 1e3 for r in rows]),
        "identical_all": all(r["identical"] == len(agents) for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    s, f, k = result["speedup"], result["fanout_s"], result["forks_ms"]
    print(f"\n{len(agents)} agents x {args.tokens} tokens over {n_doc:,} shared tokens"
          f" ({result['model']}, {result['threads']} threads)")
    print(f"fan-out       median {f['median']:.1f} s (min {f['min']:.1f}, max {f['max']:.1f})")
    sc = result["scratch_s"]
    print(f"from scratch  median {sc['median']:.1f} s (min {sc['min']:.1f}, max {sc['max']:.1f})")
    print(f"speedup       median {s['median']:.2f}x (min {s['min']:.2f}, max {s['max']:.2f})")
    print(f"{len(agents)} forks      median {k['median']:.3f} ms (min {k['min']:.3f}, max {k['max']:.3f})")
    print(f"identical greedy outputs in every repeat: {result['identical_all']}")


if __name__ == "__main__":
    main()
