"""Issue 16's table: kvfork fast, kvfork exact and llama.cpp from scratch, side by side in one run.

    python bench/scenarios.py [--repeats 3] [--model qwen2.5-coder-0.5b] [--scenarios one swarm four demo]

Every system runs in its own process (bench/arms.py): kvfork with its defaults (fast), kvfork with
exact=True, and llama-cpp-python's `Llama` with its own defaults (llama.cpp's f16 KV cache, repacked
weights and tiled matmul; flash attention off, `Llama`'s default and the faster setting here), the same
model file, threads and n_ctx. Per repeat, a document with a new first line (nothing cached from an earlier repeat), and
the systems in rotated order. Scenarios, on the bundled ~3,500-token report:
  one     1 agent x 64 tokens: kvfork's overhead (prefill + decode through kvfork vs llama.cpp)
  swarm   SwarmKV's setting: 2 agents x 64 tokens; and agent 2 activated later from the live snapshot
          (fork -> first token) against its from-scratch time to first token
  four    4 agents x 32 tokens
  demo    `kvfork demo`'s shared prefill (report + system prompt) against llama.cpp prefilling the
          same tokens: the prefill rate
  memory  KV bytes held for 1-16 open branches (32 tokens each) against independent copies, both
          modes (once, not timed)
llama.cpp's agents run one after another, each from scratch (Llama.reset() first). --prefix-reuse
adds a column where one Llama object serves them in a row and reuses the previous prompt's longest
common prefix by itself (llama-cpp-python's own behaviour). Greedy, every token kept (ignore_eos).
Writes bench/out/scenarios.json and scenarios.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from arms import OUT, Arms, llama_rates, rotate
from workload import INSTRUCTIONS, SYSTEM, document, fmt, provenance, stats

from kvfork.cli import DEMO_SYSTEM
from kvfork.models import resolve_model

SCENARIOS = {"one": (1, 64), "swarm": (2, 64), "four": (4, 32)}
KVFORK = ("kvfork", "kvfork-exact")


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of greedy tokens that agree before the first difference, over every agent."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        same += n
        total += max(len(x), len(y))
    return same / total if total else 1.0


def run_agents(arms: Arms, name: str, doc: str, prefix_reuse: bool, r: int) -> dict[str, dict]:
    n, max_tokens = SCENARIOS[name]
    agents = INSTRUCTIONS[:n]
    prompts = arms["kvfork"].call("prompts", doc=doc, system=SYSTEM, instructions=agents)["prompts"]
    jobs = {kind: ("agents", {"doc": doc, "system": SYSTEM, "instructions": agents, "max_tokens": max_tokens,
                              "activation": name == "swarm"}) for kind in KVFORK if kind in arms}
    jobs["llama.cpp"] = ("scratch", {"prompts": prompts, "max_tokens": max_tokens})
    if prefix_reuse:
        jobs["llama.cpp prefix reuse"] = ("scratch", {"prompts": prompts, "max_tokens": max_tokens,
                                                      "keep_prefix": True})
    out = {}
    for label in rotate(list(jobs), r):
        op, kw = jobs[label]
        out[label] = arms[label.split(" ")[0]].call(op, **kw)
    return {label: out[label] for label in jobs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    # NOTE: "four" and "demo" are off by default: bench/scaling.py measures N = 4 (against 4 x one measured
    # llama.cpp agent), and "one" measures the demo's prompt (the same report, system prompt and an
    # instruction) through time to first token; on a 2-core machine every scenario costs minutes.
    ap.add_argument("--scenarios", nargs="+", default=["one", "swarm"])
    ap.add_argument("--prefix-reuse", action="store_true", help="add llama.cpp with Llama's own prefix reuse")
    ap.add_argument("--doc-chars", type=int, default=None, help="cut the report (a quick smoke run)")
    ap.add_argument("--out", type=Path, default=OUT / "scenarios.json")
    ap.add_argument("--summarize", type=Path, default=None,
                    help="only summarize runs saved before ({'runs': ...}, as scenarios.runs.json holds them)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        write(args, json.loads(args.summarize.read_text()))
        return
    path = resolve_model(args.model)
    rows: dict[str, list[dict]] = {s: [] for s in args.scenarios}
    with Arms(path, threads=args.threads) as arms:
        head = {"provenance": provenance(), "model": path.name, "threads": args.threads,
                "settings": {kind: arm.info for kind, arm in arms.items()}}
        for kind in KVFORK:  # NOTE: warm-up: page the weights in, build the graphs
            arms[kind].call("agents", doc=document("warm-up", 1500), system=SYSTEM, instructions=INSTRUCTIONS[:2],
                            max_tokens=4)
        warm = arms["kvfork"].call("prompts", doc=document("warm-up", 1500), system=SYSTEM,
                                   instructions=INSTRUCTIONS[:1])["prompts"]
        arms["llama.cpp"].call("scratch", prompts=warm, max_tokens=4)
        timed = [s for s in args.scenarios if s != "memory"]
        if "memory" in args.scenarios:
            rows["memory"] = [{kind: arms[kind].call("memory", doc=document("memory", args.doc_chars), system=SYSTEM,
                                                     counts=[1, 2, 4, 8, 16], max_tokens=32)["rows"]
                               for kind in KVFORK}]
        for r in range(args.repeats):
            for name in rotate(timed, r):
                doc = document(f"{name}-{r}-{time.time_ns()}", args.doc_chars)
                if name == "demo":
                    rows[name].append(run_demo(arms, doc, r))
                else:
                    rows[name].append(measure_agents(arms, name, doc, r, args.prefix_reuse))
                print(f"repeat {r + 1} {name}: " + json.dumps(brief(rows[name][-1])), flush=True)
                # NOTE: every run is on disk before the next one starts: a failure later loses nothing measured
                args.out.with_suffix(".runs.json").write_text(json.dumps({**head, "runs": rows}))
    write(args, {**head, "runs": rows})


def write(args: argparse.Namespace, result: dict) -> None:
    """Summarize the runs in `result` and write scenarios.json and its table."""
    rows = result["runs"]
    result["summary"] = {name: summarize(name, runs) for name, runs in rows.items() if name != "memory"}
    if "memory" in rows:
        result["summary"]["memory"] = rows["memory"][0]
    result["table"] = table(result["summary"], args.prefix_reuse)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(result["table"] + "\n")
    print("\n" + result["table"])


def measure_agents(arms: Arms, name: str, doc: str, r: int, prefix_reuse: bool) -> dict:
    out = run_agents(arms, name, doc, prefix_reuse, r)
    base = out["llama.cpp"]
    row = {"systems": out, "wall_s": {k: v["wall_s"] for k, v in out.items()}}
    row["speedup"] = {k: base["wall_s"] / v["wall_s"] for k, v in out.items()}
    row["exact_cost"] = out["kvfork-exact"]["wall_s"] / out["kvfork"]["wall_s"]
    row["agree_with_llama_cpp"] = {k: agreement(v["tokens"], base["tokens"]) for k, v in out.items()}
    row["forks_ms"] = out["kvfork"]["forks_ms"]
    if name == "one":  # NOTE: the whole prompt to its first token: the prefill rate on the same tokens
        n_prompt = base["prompt_tokens"][0]
        row["prompt_tokens"] = n_prompt
        row["rate_tok_s"] = {k: n_prompt / v["ttft_s"][0] for k, v in out.items()}
        row["rate_vs_llama_cpp"] = {k: v / row["rate_tok_s"]["llama.cpp"] for k, v in row["rate_tok_s"].items()}
    # NOTE: where the time goes: each kvfork phase against its bound at llama.cpp's own rates in this repeat
    # (prefill: prompt tokens / time to first token; decode: seconds per step of one sequence)
    r_pp, t_tg = llama_rates(base)
    row["phases"] = {k: {"shared_s": out[k]["shared_s"], "own_s": out[k]["own_s"], "decode_s": out[k]["decode_s"]}
                     for k in KVFORK}
    row["bounds"] = {"shared_s": out["kvfork"]["shared_tokens"] / r_pp, "own_s": out["kvfork"]["own_tokens"] / r_pp,
                     "decode_s": len(base["tokens"][0]) * t_tg}
    if name == "swarm":
        row["activation_s"] = {k: out[k]["activation_s"] for k in KVFORK}
        row["scratch_ttft_s"] = base["ttft_s"][-1]
    return row


def run_demo(arms: Arms, doc: str, r: int) -> dict:
    # NOTE: llama.cpp is given the very tokens kvfork prefilled, so it goes last; the two kvfork modes rotate
    out = {kind: arms[kind].call("prefill", doc=doc, system=DEMO_SYSTEM) for kind in rotate(list(KVFORK), r)}
    tokens = out["kvfork"]["tokens"]
    out["llama.cpp"] = arms["llama.cpp"].call("prefill", tokens=tokens)
    for v in out.values():
        v.pop("tokens", None)
    rate = {k: v["n_tokens"] / v["prefill_s"] for k, v in out.items()}
    return {"tokens": len(tokens), "rate_tok_s": rate,
            "rate_vs_llama_cpp": {k: v / rate["llama.cpp"] for k, v in rate.items()}}


def brief(row: dict) -> dict:
    keys = ("wall_s", "speedup", "exact_cost", "rate_tok_s", "rate_vs_llama_cpp", "activation_s",
            "agree_with_llama_cpp", "bounds")
    out = {k: ({a: round(b, 3) for a, b in v.items()} if isinstance(v, dict) else round(v, 3))
           for k, v in row.items() if k in keys}
    if "phases" in row:
        out["phases"] = {m: {k: round(v, 2) for k, v in p.items()} for m, p in row["phases"].items()}
    return out


def summarize(name: str, runs: list[dict]) -> dict:
    out: dict = {}
    for key in ("wall_s", "speedup", "rate_tok_s", "rate_vs_llama_cpp", "agree_with_llama_cpp", "activation_s",
                "bounds"):
        if key in runs[0]:
            out[key] = {k: stats([r[key][k] for r in runs]) for k in runs[0][key]}
    for key in ("exact_cost", "scratch_ttft_s", "tokens", "forks_ms", "prompt_tokens"):
        if key in runs[0]:
            out[key] = stats([r[key] for r in runs])
    if "phases" in runs[0]:
        out["phases"] = {m: {k: stats([r["phases"][m][k] for r in runs]) for k in runs[0]["phases"][m]}
                         for m in KVFORK}
    if "activation_s" in out and "scratch_ttft_s" in runs[0]:
        out["activation_speedup"] = {k: stats([r["scratch_ttft_s"] / r["activation_s"][k] for r in runs])
                                     for k in KVFORK}
    return out


def table(summary: dict, prefix_reuse: bool) -> str:
    head = ("| scenario | kvfork (fast) | kvfork exact | llama.cpp, from scratch |"
            + (" llama.cpp, Llama's prefix reuse |" if prefix_reuse else "")
            + " fast: speedup | exact: speedup | exact / fast |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    labels = {"one": "1 agent x 64 tokens", "swarm": "2 agents x 64 tokens (SwarmKV)", "four": "4 agents x 32 tokens"}
    for name, s in summary.items():
        if name in ("demo", "memory"):
            continue
        w, sp = s["wall_s"], s["speedup"]
        extra = f" {fmt(w['llama.cpp prefix reuse'], ' s')} |" if prefix_reuse else ""
        lines.append(f"| {labels[name]} | {fmt(w['kvfork'], ' s')} | {fmt(w['kvfork-exact'], ' s')} |"
                     f" {fmt(w['llama.cpp'], ' s')} |{extra} {fmt(sp['kvfork'], 'x', digits=2)} |"
                     f" {fmt(sp['kvfork-exact'], 'x', digits=2)} | {fmt(s['exact_cost'], 'x', digits=2)} |")
    notes = []
    if "activation_speedup" in summary.get("swarm", {}):
        a = summary["swarm"]
        notes.append("SwarmKV: agent 2 activated from the live snapshot in"
                     f" {fmt(a['activation_s']['kvfork'], ' s', digits=3)}"
                     f" (fast) / {fmt(a['activation_s']['kvfork-exact'], ' s', digits=3)} (exact) against"
                     f" {fmt(a['scratch_ttft_s'], ' s')} to its first token from scratch:"
                     f" {fmt(a['activation_speedup']['kvfork'], 'x', digits=0)} /"
                     f" {fmt(a['activation_speedup']['kvfork-exact'], 'x', digits=0)} sooner.")
    if "forks_ms" in summary.get("four", {}):
        notes.append("4 agents: the 4 forks (seq_cp on the unified cache) took"
                     f" {fmt(summary['four']['forks_ms'], ' ms', digits=2)}"
                     " together.")
    for name in ("one", "swarm", "four"):
        if name in summary:
            ph, b = summary[name]["phases"], summary[name]["bounds"]
            notes.append(f"{labels[name]}, where the time goes (median s; bounds at llama.cpp's own rates after):"
                         + "; ".join(f" {'fast' if m == 'kvfork' else 'exact'}: shared prefill"
                                     f" {ph[m]['shared_s']['median']:.1f}, own parts {ph[m]['own_s']['median']:.2f},"
                                     f" decode {ph[m]['decode_s']['median']:.1f}" for m in KVFORK)
                         + f"; bounds {b['shared_s']['median']:.1f}, {b['own_s']['median']:.2f},"
                         f" {b['decode_s']['median']:.1f}.")
    for name in ("one", "swarm", "four"):
        if name in summary:
            g = summary[name]["agree_with_llama_cpp"]
            notes.append(f"{labels[name]}: greedy tokens agreeing with llama.cpp's (up to the first difference):"
                         f" fast {fmt(g['kvfork'], '%', 100, 0)}, exact {fmt(g['kvfork-exact'], '%', 100, 0)}.")
    if "rate_tok_s" in summary.get("one", {}):
        d = summary["one"]
        n = f"{d['prompt_tokens']['median']:.0f} tokens: " if "prompt_tokens" in d else ""
        notes.append(f"1 agent: its whole prompt ({n}the report, the demo's"
                     " system prompt and an instruction) to the first token: fast"
                     f" {fmt(d['rate_tok_s']['kvfork'], ' tok/s', digits=0)}, exact"
                     f" {fmt(d['rate_tok_s']['kvfork-exact'], ' tok/s', digits=0)}, llama.cpp"
                     f" {fmt(d['rate_tok_s']['llama.cpp'], ' tok/s', digits=0)}: fast at"
                     f" {fmt(d['rate_vs_llama_cpp']['kvfork'], '%', 100, 0)} of llama.cpp's rate, exact at"
                     f" {fmt(d['rate_vs_llama_cpp']['kvfork-exact'], '%', 100, 0)} (within each repeat).")
    if "demo" in summary:
        d = summary["demo"]
        n = f" ({d['tokens']['median']:.0f} tokens)" if "tokens" in d else ""
        notes.append(f"`kvfork demo`'s shared prefill{n}: fast"
                     f" {fmt(d['rate_tok_s']['kvfork'], ' tok/s', digits=0)}, exact"
                     f" {fmt(d['rate_tok_s']['kvfork-exact'], ' tok/s', digits=0)}, llama.cpp"
                     f" {fmt(d['rate_tok_s']['llama.cpp'], ' tok/s', digits=0)}: fast at"
                     f" {fmt(d['rate_vs_llama_cpp']['kvfork'], '%', 100, 0)} of llama.cpp's rate, exact at"
                     f" {fmt(d['rate_vs_llama_cpp']['kvfork-exact'], '%', 100, 0)}.")
    if "memory" in summary:
        notes.append("KV bytes held by N open branches of 32 tokens over the report, against N independent copies"
                     " (each branch's whole state): " + "; ".join(
                         f"{'fast' if kind == 'kvfork' else 'exact'}: " + ", ".join(
                             f"N={m['branches']} {m['held_bytes'] / 1e6:.0f} MB vs {m['copies_bytes'] / 1e6:.0f} MB"
                             for m in summary["memory"][kind]) for kind in KVFORK) + ".")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


if __name__ == "__main__":
    main()
