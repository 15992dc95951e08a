"""Issue 5, scenario B: speedup of fan-out against from-scratch agents for N = 1..16 agents and
documents of ~1k, 3.5k and 8k tokens, and the share of the ideal bound it reaches.

    python bench/scaling.py [--repeats 3] [--agents 1 2 4 8 16] [--docs 1000 3500 8000] [--tokens 32]

Per repeat and document length D (a new document per repeat: nothing is reused across repeats):
  prefill   the document once (timed: t_pp);
  fan-out   for each N, N agents (~20-token instructions S, O greedy tokens each, ignore_eos) forked
            from that one live prefill and decoded in one batch (timed: t_fan(N));
            kvfork(N) = t_pp + t_fan(N)  (the same prefill serves every N: its cost is counted in full);
  scratch   one agent run from scratch (document + instruction prefilled, O tokens decoded).
            NOTE: from-scratch agents run one after another and are independent runs of the same
            shape, so scratch(N) = N x the measured one-agent time; N = 2 is measured in full by
            bench/scenarios.py (scenario A) and N = 4 by bench/fanout.py.
Rates for the bound, all measured in the same repeat: R_pp = (D+S) / scratch time to first token;
R_tg(1) = decode steps/s of the scratch agent; R_tg(N) = decode steps/s of the N-branch batch.
  naive = N*((D+S)/R_pp + O/R_tg(1)),  ideal = (D+N*S)/R_pp + O/R_tg(N),  bound = naive / ideal;
  share of the bound = measured speedup / bound.
Writes bench/out/scaling.json, scaling.md and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

from workload import INSTRUCTIONS, SYSTEM, document, fmt, provenance, report, stats

from kvfork import Engine


def decode_rate(ttft_s: float, total_s: float, n_tokens: int) -> float:
    """Decode steps per second after the first token."""
    return (n_tokens - 1) / (total_s - ttft_s)


def one_repeat(engine: Engine, chars: int, counts: list[int], n_tokens: int, scratch_agent: int) -> dict:
    doc = document(uuid.uuid4().hex[:12], chars)
    d = len(engine.prompt_tokens(doc, "", system=SYSTEM))
    s = statistics.mean(len(engine.prompt_tokens(doc, i, system=SYSTEM)) - d for i in INSTRUCTIONS[: max(counts)])
    t0 = time.perf_counter()
    snap = engine.prefill(doc, system=SYSTEM)
    t_pp = time.perf_counter() - t0
    cells = {}
    for n in counts:
        t1 = time.perf_counter()
        fan = snap.fan_out(INSTRUCTIONS[:n], max_tokens=n_tokens, ignore_eos=True)
        t_fan = time.perf_counter() - t1
        assert all(c.completion_tokens == n_tokens for c in fan), [c.finish_reason for c in fan]
        steps = statistics.median(decode_rate(c.ttft_s, c.total_s, n_tokens) for c in fan)
        cells[n] = {"kvfork_s": t_pp + t_fan, "fan_s": t_fan, "r_tg": steps,
                    "tokens": [list(c.tokens) for c in fan]}
    snap.close()
    scratch = engine.generate(engine.prompt_tokens(doc, INSTRUCTIONS[scratch_agent], system=SYSTEM),
                              max_tokens=n_tokens, ignore_eos=True)
    r_pp = (d + s) / scratch.ttft_s
    r_tg1 = decode_rate(scratch.ttft_s, scratch.total_s, n_tokens)
    out = {"D": d, "S": s, "t_pp": t_pp, "scratch_s": scratch.total_s, "r_pp": r_pp, "r_tg1": r_tg1, "cells": {}}
    for n, c in cells.items():
        naive = n * ((d + s) / r_pp + n_tokens / r_tg1)
        ideal = (d + n * s) / r_pp + n_tokens / c["r_tg"]
        speedup = n * scratch.total_s / c["kvfork_s"]
        out["cells"][n] = {**{k: v for k, v in c.items() if k != "tokens"}, "speedup": speedup,
                           "bound": naive / ideal, "share": speedup / (naive / ideal),
                           "same_as_scratch": c["tokens"][scratch_agent] == list(scratch.tokens)
                           if scratch_agent < n else None}
    return out


def summarize(repeats: list[dict], counts: list[int]) -> dict:
    keys = ("kvfork_s", "speedup", "bound", "share", "r_tg")
    return {"D": round(statistics.median(r["D"] for r in repeats)),
            "r_pp": stats([r["r_pp"] for r in repeats]), "r_tg1": stats([r["r_tg1"] for r in repeats]),
            "scratch_s": stats([r["scratch_s"] for r in repeats]),
            "cells": {n: {k: stats([r["cells"][n][k] for r in repeats]) for k in keys} for n in counts}}


def plot(summary: list[dict], counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, color in zip(summary, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        med = [row["cells"][n]["speedup"]["median"] for n in counts]
        lo = [row["cells"][n]["speedup"]["min"] for n in counts]
        hi = [row["cells"][n]["speedup"]["max"] for n in counts]
        err = [[m - a for m, a in zip(med, lo, strict=True)], [b - m for m, b in zip(med, hi, strict=True)]]
        ax.errorbar(counts, med, yerr=err,
                    color=color, marker="o", capsize=3, label=f"kvfork, D = {row['D']:,} tokens")
        ax.plot(counts, [row["cells"][n]["bound"]["median"] for n in counts], color=color, ls="--",
                label=f"ideal bound, D = {row['D']:,}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("agents N")
    ax.set_ylabel("speedup over from-scratch agents")
    ax.set_title("Scenario B: fan-out vs from scratch (median, min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(summary: list[dict], counts: list[int]) -> str:
    lines = ["| D (tokens) | N | kvfork end to end | speedup | ideal bound | share of bound | R_tg(N) steps/s |",
             "|---|---|---|---|---|---|---|"]
    for row in summary:
        for n in counts:
            c = row["cells"][n]
            lines.append(f"| {row['D']:,} | {n} | {fmt(c['kvfork_s'], ' s')} | {fmt(c['speedup'], 'x', digits=2)} |"
                         f" {fmt(c['bound'], 'x', digits=2)} | {fmt(c['share'], '%', 100, 0)} |"
                         f" {fmt(c['r_tg'], '', digits=1)} |")
    lines.append("")
    lines.append("| D (tokens) | one agent from scratch | R_pp (tokens/s) | R_tg(1) (tokens/s) |")
    lines.append("|---|---|---|---|")
    for row in summary:
        lines.append(f"| {row['D']:,} | {fmt(row['scratch_s'], ' s')} | {fmt(row['r_pp'])} | {fmt(row['r_tg1'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--docs", type=int, nargs="+", default=[1000, 3500, 8000], help="document lengths in tokens")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chat-template", default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/out/scaling.json"))
    args = ap.parse_args()
    counts = sorted(args.agents)
    engine = Engine(args.model, n_ctx=max(args.docs) + 512 + max(counts) * (args.tokens + 48),
                    n_seq_max=max(counts) + 4, n_threads=args.threads, progress=False, chat_template=args.chat_template)
    per_token = len(report()) / len(engine.tokenize(report()))
    one_repeat(engine, 600, counts[:2], 4, 0)  # warm-up
    runs: dict[int, list[dict]] = {d: [] for d in args.docs}
    for r in range(args.repeats):
        for d in args.docs:
            x = one_repeat(engine, int(d * per_token), counts, args.tokens, scratch_agent=r % 2)
            runs[d].append(x)
            print(f"repeat {r + 1} D={x['D']}: prefill {x['t_pp']:.1f} s, one agent from scratch"
                  f" {x['scratch_s']:.1f} s; " + ", ".join(
                      f"N={n} {c['speedup']:.2f}x ({100 * c['share']:.0f}% of {c['bound']:.2f}x)"
                      for n, c in x["cells"].items()), flush=True)
    summary = [summarize(runs[d], counts) for d in args.docs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md = table(summary, counts)
    args.out.write_text(json.dumps({"provenance": provenance(), "model": engine.model_path.name,
                                    "threads": args.threads, "tokens": args.tokens, "summary": summary,
                                    "runs": {str(d): v for d, v in runs.items()}}, indent=2))
    args.out.with_suffix(".md").write_text(md + "\n")
    plot(summary, counts, args.out.with_suffix(".png"))
    print("\n" + md)


if __name__ == "__main__":
    main()
