"""Where the time goes: N agents over one document, kvfork fast and exact against llama.cpp from scratch,
each phase against its ideal bound (issue 16, requirement 5).

    python bench/scaling.py [--repeats 3] [--agents 2 4 8 16] [--docs 3500] [--tokens 32]

Every system in its own process (bench/arms.py): kvfork (fast, its default), kvfork exact, and
llama-cpp-python's `Llama` with llama.cpp's default settings. Per repeat and document length D (a new
document per repeat: nothing is reused across repeats), in rotated order:
  kvfork    prefill the document once (phase "shared"), then for each N a fan-out of N agents
            (~20-token instructions, O greedy tokens each, ignore_eos) from that one live prefill:
            phase "own" = until the last branch's first token (every branch's own part, prefilled in
            shared batches), phase "decode" = the rest; kvfork(N) = shared + own(N) + decode(N)
            (the shared prefill is counted in full for every N).
  llama.cpp one agent from scratch (document + instruction prefilled, O tokens decoded); agents run one
            after another and are independent runs of the same shape, so scratch(N) = N x that time.
            Its rates are the bounds' units: R_pp = prompt tokens / time to first token, t_tg = seconds
            per decode step after the first token (one sequence).
Bounds per phase: shared >= D / R_pp (llama.cpp's own prefill rate on these tokens); own >= (the N
agents' own tokens) / R_pp; decode >= O x t_tg (a step of N branches cannot cost less than a step of
one: every weight is read once per step either way). share of bound = bound / measured, per phase and
end to end. Writes bench/out/scaling.json, scaling.md and scaling.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from arms import OUT, Arms, llama_rates, rotate
from workload import INSTRUCTIONS, SYSTEM, document, fmt, provenance, report, stats

from kvfork.models import resolve_model

MODES = ("kvfork", "kvfork-exact")


def one_repeat(arms: Arms, chars: int, counts: list[int], n_tokens: int, r: int) -> dict:
    doc = document(f"scaling-{r}-{time.time_ns()}", chars)
    agents = INSTRUCTIONS[: max(counts)]
    prompt = arms["kvfork"].call("prompts", doc=doc, system=SYSTEM, instructions=agents[r % 2: r % 2 + 1])["prompts"]
    out: dict = {}
    for kind in rotate(["llama.cpp", *MODES], r):
        if kind == "llama.cpp":
            out[kind] = arms[kind].call("scratch", prompts=prompt, max_tokens=n_tokens)
        else:
            out[kind] = arms[kind].call("fanouts", doc=doc, system=SYSTEM, instructions=agents, counts=counts,
                                        max_tokens=n_tokens)
    base = out["llama.cpp"]
    total = base["total_s"][0]
    r_pp, t_tg = llama_rates(base)
    row: dict = {"D": out["kvfork"]["shared_tokens"], "scratch_s": total, "r_pp": r_pp, "t_tg": t_tg, "modes": {}}
    for mode in MODES:
        x = out[mode]
        cells = {}
        for n in counts:
            c = x["cells"][str(n)]
            bound = {"shared": x["shared_tokens"] / r_pp, "own": c["own_tokens"] / r_pp, "decode": n_tokens * t_tg}
            measured = {"shared": x["shared_s"], "own": c["own_s"], "decode": c["decode_s"]}
            kv = sum(measured.values())
            cells[n] = {"kvfork_s": kv, "speedup": n * total / kv, "ideal_speedup": n * total / sum(bound.values()),
                        "share": sum(bound.values()) / kv, "step_s": c["decode_s"] / (n_tokens - 1),
                        **{f"{k}_s": v for k, v in measured.items()},
                        **{f"{k}_share": bound[k] / measured[k] for k in bound}}
        row["modes"][mode] = cells
    return row


def summarize(runs: list[dict], counts: list[int]) -> dict:
    keys = list(runs[0]["modes"]["kvfork"][counts[0]])
    return {"D": round(stats([r["D"] for r in runs])["median"]), "scratch_s": stats([r["scratch_s"] for r in runs]),
            "r_pp": stats([r["r_pp"] for r in runs]), "t_tg": stats([r["t_tg"] for r in runs]),
            "modes": {m: {n: {k: stats([r["modes"][m][n][k] for r in runs]) for k in keys} for n in counts}
                      for m in MODES}}


def table(summary: list[dict], counts: list[int], n_tokens: int) -> str:
    lines = ["| D | N | mode | end to end | speedup vs llama.cpp | ideal | share | shared prefill (share) |"
             " own parts (share) | decode (share) | s per decode step |", "|" + "---|" * 11]
    for row in summary:
        for n in counts:
            for mode in MODES:
                c = row["modes"][mode][n]
                lines.append(
                    f"| {row['D']:,} | {n} | {'fast' if mode == 'kvfork' else 'exact'} | {fmt(c['kvfork_s'], ' s')} |"
                    f" {fmt(c['speedup'], 'x', digits=2)} | {c['ideal_speedup']['median']:.2f}x |"
                    f" {fmt(c['share'], '%', 100, 0)} | {c['shared_s']['median']:.1f} s"
                    f" ({c['shared_share']['median']:.0%}) | {c['own_s']['median']:.1f} s"
                    f" ({c['own_share']['median']:.0%})"
                    f" | {c['decode_s']['median']:.1f} s ({c['decode_share']['median']:.0%}) |"
                    f" {c['step_s']['median'] * 1e3:.0f} ms |")
    lines += ["", f"llama.cpp, one agent from scratch ({n_tokens} tokens): " + "; ".join(
        f"D = {row['D']:,}: {fmt(row['scratch_s'], ' s')}, prefill {fmt(row['r_pp'], ' tok/s', digits=0)},"
        f" decode step {fmt(row['t_tg'], ' ms', 1e3, 0)}" for row in summary)]
    return "\n".join(lines)


def plot(summary: list[dict], counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = iter(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"))
    for row in summary:
        for mode in MODES:
            color = next(colors)
            cells = [row["modes"][mode][n]["speedup"] for n in counts]
            med = [c["median"] for c in cells]
            err = [[m - c["min"] for m, c in zip(med, cells, strict=True)],
                   [c["max"] - m for m, c in zip(med, cells, strict=True)]]
            label = f"kvfork {'fast' if mode == 'kvfork' else 'exact'}, D = {row['D']:,}"
            ax.errorbar(counts, med, yerr=err, color=color, marker="o", capsize=3, label=label)
        ax.plot(counts, [row["modes"]["kvfork"][n]["ideal_speedup"]["median"] for n in counts], color="gray", ls="--",
                label=f"ideal bound, D = {row['D']:,}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("agents N")
    ax.set_ylabel("speedup over llama.cpp, agents from scratch")
    ax.set_title("N agents over one document (median, min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agents", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--docs", type=int, nargs="+", default=[3500], help="document lengths in tokens")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT / "scaling.json")
    args = ap.parse_args()
    counts = sorted(args.agents)
    path = resolve_model(args.model)
    n_ctx = max(args.docs) + 512 + max(counts) * (args.tokens + 48)
    runs: dict[int, list[dict]] = {d: [] for d in args.docs}
    with Arms(path, threads=args.threads, n_ctx=n_ctx, n_seq_max=max(counts) + 4) as arms:
        settings = {kind: arm.info for kind, arm in arms.items()}
        one_repeat(arms, 1500, counts[:1], 4, 0)  # warm-up: page the weights in, build the graphs
        per_token = len(report()) / len(arms["kvfork"].call("prompts", doc=report(), system=None,
                                                             instructions=[""])["prompts"][0])
        for r in range(args.repeats):
            for d in args.docs:
                x = one_repeat(arms, int(d * per_token), counts, args.tokens, r)
                runs[d].append(x)
                print(f"repeat {r + 1} D={x['D']}: llama.cpp one agent {x['scratch_s']:.1f} s; " + "; ".join(
                    f"{m} " + ", ".join(f"N={n} {c['speedup']:.2f}x ({c['share']:.0%} of bound)"
                                        for n, c in x["modes"][m].items()) for m in MODES), flush=True)
    summary = [summarize(runs[d], counts) for d in args.docs]
    md = table(summary, counts, args.tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": provenance(), "model": path.name, "threads": args.threads,
                                    "tokens": args.tokens, "settings": settings, "summary": summary,
                                    "runs": {str(d): v for d, v in runs.items()}}, indent=2))
    args.out.with_suffix(".md").write_text(md + "\n")
    plot(summary, counts, args.out.with_suffix(".png"))
    print("\n" + md)


if __name__ == "__main__":
    main()
