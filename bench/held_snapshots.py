"""A new prompt beside snapshots the caller holds but does not use: kvfork against llama.cpp from scratch.

    python bench/held_snapshots.py [--repeats 3] [--held 2] [--new 600] [--tokens 32]

A pipeline or an Engine user keeps snapshots of earlier documents to fork later, and meanwhile asks about
something else. llama.cpp's unified KV cache attends over every cell up to the highest one in use, masked
per sequence, so without flash attention (fast mode, as llama-cpp-python's `Llama`) those idle cells cost
every token computed beside them; llama.cpp's own single-sequence context holds only the prompt it runs.
Since EngineConfig.park_idle, kvfork's fast mode moves idle snapshots to host RAM while other work runs
and brings one back when it is forked again.

Each repeat, each system in its own process (bench/arms.py), arms in rotated order:
- kvfork fast (park_idle, the default), kvfork fast with park_idle=False, kvfork exact (which keeps them:
  see EngineConfig): a new engine prefills --held documents in the model's chat layout (the report with its
  own first line, the second and later ones cut to half; the template's head is common to them, so a later
  one forks the first's) and keeps their snapshots; then computes a new prompt of --new
  tokens (the report's end, under a line unique to the repeat: nothing shared) and --tokens greedy tokens;
  then forks the first held snapshot again (timed: the restore, where it was parked);
- llama.cpp: llama-cpp-python's `Llama` with its defaults, the same new prompt from scratch.
TTFT is the new prompt's time to its first token (for kvfork, parking included); a step is a decode step
after it. Ratios are llama.cpp's time over kvfork's within one repeat (above 1: kvfork faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arms import OUT, Arms, rotate  # noqa: E402
from workload import document, fmt, provenance, report, stats  # noqa: E402

from kvfork.engine.llama import LlamaModel  # noqa: E402
from kvfork.models import resolve_model  # noqa: E402

ARMS = {"kvfork": ("kvfork", None), "kvfork, park_idle=False": ("kvfork", False),
        "kvfork exact": ("kvfork-exact", None), "llama.cpp": ("llama.cpp", None)}


def one_repeat(arms: Arms, args: argparse.Namespace, r: int, prompt: list[int]) -> dict:
    held = [document(f"held {r}.{i}", None if i == 0 else len(report()) // 2) for i in range(args.held)]
    row: dict = {}
    for name in rotate(list(ARMS), r):
        kind, park = ARMS[name]
        if kind == "llama.cpp":
            out = arms[kind].call("scratch", prompts=[prompt], max_tokens=args.tokens)
            ttft, total = out["ttft_s"][0], out["total_s"][0]
            row[name] = {"ttft_s": ttft, "step_s": (total - ttft) / (args.tokens - 1), "tokens": out["tokens"][0]}
        else:
            row[name] = arms[kind].call("beside", held=held, prompt=prompt, max_tokens=args.tokens, park=park)
        print(f"  repeat {r + 1} {name}: TTFT {row[name]['ttft_s']:.2f} s, step {1e3 * row[name]['step_s']:.1f} ms",
              flush=True)
    return row


def summarize(rows: list[dict]) -> dict:
    base = "llama.cpp"
    out = {}
    for name in ARMS:
        s = {"ttft_s": stats([r[name]["ttft_s"] for r in rows]), "step_s": stats([r[name]["step_s"] for r in rows]),
             "ttft_ratio": stats([r[base]["ttft_s"] / r[name]["ttft_s"] for r in rows]),
             "step_ratio": stats([r[base]["step_s"] / r[name]["step_s"] for r in rows]),
             "same_tokens_as_llama_cpp": sum(r[name]["tokens"] == r[base]["tokens"] for r in rows)}
        if name != base:
            s.update(held_tokens=rows[0][name]["held_tokens"], parked=[r[name]["parked"] for r in rows],
                     back_s=stats([r[name]["back_s"] for r in rows]))
        out[name] = s
    return out


def table(summary: dict, n: int) -> str:
    lines = ["| arm | snapshots held (tokens) | TTFT of the new prompt | llama.cpp / it | s per decode step"
             " | llama.cpp / it | fork of a held snapshot afterwards | same tokens as llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        held = f"{s['held_tokens']:,}, parked {min(s['parked'])}" if "held_tokens" in s else "none (own context)"
        back = fmt(s["back_s"], " s", digits=3) if "back_s" in s else ""
        lines.append(f"| {name} | {held} | {fmt(s['ttft_s'], ' s', digits=2)} | {fmt(s['ttft_ratio'], 'x', digits=2)}"
                     f" | {fmt(s['step_s'], ' ms', 1e3)} | {fmt(s['step_ratio'], 'x', digits=2)} | {back}"
                     f" | {s['same_tokens_as_llama_cpp']} of {n} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--held", type=int, default=2, help="documents whose snapshots the engine holds")
    ap.add_argument("--new", type=int, default=600, help="tokens of the new prompt")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens generated for it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    path = resolve_model(args.model)
    vocab = LlamaModel(path, vocab_only=True)  # NOTE: the tokenizer alone, for the prompts every arm is given
    tail = vocab.tokenize(report(), add_special=False, parse_special=False)[-args.new:]
    with Arms(path, ("kvfork", "kvfork-exact", "llama.cpp"), threads=args.threads) as arms:
        for r in range(args.repeats):
            prompt = vocab.tokenize(f"Notes, set {r}:\n", add_special=True, parse_special=False) + tail
            rows.append(one_repeat(arms, args, r, prompt))
        settings = {name: arm.info for name, arm in arms.items()}
    summary = summarize(rows)
    print(table(summary, args.repeats))
    out = OUT / "held_snapshots.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "settings": settings, "rows": rows, "summary": summary,
                                "wall_s": time.perf_counter() - t0, "provenance": provenance()}, indent=2))
    print(f"wrote {out} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
