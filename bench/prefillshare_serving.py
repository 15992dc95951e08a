"""Issue 8's serving figures against llama.cpp (issue 16): 3 LoRA decoders over one ~3,500-token prompt,
kvfork fast and kvfork exact (one base prefill shared by the decoders) side by side with llama.cpp (one
prefill per decoder), each system in its own process (bench/arms.py).

    python bench/prefillshare_serving.py --adapters bench/out/ps21_D/adapters [--repeats 3]

Arms, each repeat in one run, side by side (order rotated per repeat), every decoder greedy to --max-tokens:
- kvfork shared (fast, exact): the base model prefills the prompt once; the three cache-conditioned
  decoders (<task>.cache.gguf) fork it (zero-copy) and decode together, one llama_decode per adapter per step.
- kvfork handoff (fast, exact): the base prefills once in its own context; each decoder gets the prompt's
  KV as a state blob (llama_state_seq_get/set) in a second context that has the adapters, and decodes there.
- llama.cpp: what a user with three fine-tuned decoders runs today: one llama-cpp-python `Llama(lora_path=)`
  per decoder, llama.cpp's defaults otherwise, each computing the whole prompt under its adapter, one after
  another. It loads the plain decoders (<task>.plain.gguf: ordinary LoRA fine-tunes, the same rank and
  modules, the same cost per token); their replies are not the cache decoders', so only times compare.
TTFT is from the start of the arm to a decoder's first token (the prompt arrives once, for all three).
Within kvfork, shared and handoff must give the same tokens (checked per mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arms import Arms, rotate  # noqa: E402
from prefillshare_tasks import TASKS, long_document  # noqa: E402
from workload import fmt, provenance, stats  # noqa: E402

from kvfork.models import resolve_model  # noqa: E402

ARMS = ("kvfork shared", "kvfork handoff", "kvfork-exact shared", "kvfork-exact handoff", "llama.cpp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, required=True, help="folder with <task>.cache.gguf and <task>.plain.gguf")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=3500, help="prompt length (the document)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out/prefillshare_serving.json"))
    args = ap.parse_args()

    import llama_cpp

    model = resolve_model(args.model)
    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)

    folder = args.adapters.resolve()  # NOTE: the arms' children run in bench/
    cache = {t: str(folder / f"{t}.cache.gguf") for t in TASKS}
    plain = [str(folder / f"{t}.plain.gguf") for t in TASKS]
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with Arms(model, threads=args.threads, n_ctx=8192, n_seq_max=8) as arms:
        settings = {kind: arm.info for kind, arm in arms.items()}
        for kind in ("kvfork", "kvfork-exact"):
            arms[kind].call("load_adapters", adapters=cache)
        for rep in range(args.repeats):
            document, _ = long_document(100 + rep, args.tokens, tokenize)
            instructions = _instructions()
            prompts = arms["kvfork"].call("prompts", doc=document, system=None, instructions=instructions)["prompts"]
            for arm in rotate(list(ARMS), rep):
                if arm == "llama.cpp":
                    row = arms[arm].call("lora_scratch", prompts=prompts, adapters=plain, max_tokens=args.max_tokens)
                else:
                    kind, how = arm.split()
                    row = arms[kind].call("decoders", arm=how, doc=document, instructions=instructions,
                                          names=list(TASKS), max_tokens=args.max_tokens)
                row["prompt_tokens"] = len(prompts[0])
                rows[arm].append(row)
                print(f"repeat {rep + 1} {arm:21s} e2e {row['e2e']:6.1f} s  ttft "
                      + " ".join(f"{t:5.1f}" for t in row["ttft"]), flush=True)
            for kind in ("kvfork", "kvfork-exact"):
                same = rows[f"{kind} shared"][-1]["tokens"] == rows[f"{kind} handoff"][-1]["tokens"]
                print(f"  {kind}: shared and handoff tokens identical: {same}", flush=True)
    summary = _summary(rows)
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows, "provenance": provenance(), "arms": settings,
                                    "settings": vars(args) | {"adapters": str(args.adapters), "out": str(args.out)}},
                                   indent=2))


def _instructions() -> list[str]:
    from prefillshare_tasks import INSTRUCTIONS  # the fixed instruction of each task

    return [INSTRUCTIONS[t] for t in TASKS]


def _summary(rows: dict[str, list[dict]]) -> dict:
    out: dict = {}
    base = rows["llama.cpp"]
    for arm, runs in rows.items():
        out[arm] = {"e2e_s": stats([r["e2e"] for r in runs]),
                    "ttft_mean_s": stats([sum(r["ttft"]) / len(r["ttft"]) for r in runs]),
                    "ttft_last_s": stats([max(r["ttft"]) for r in runs]),
                    "e2e_speedup_vs_llamacpp": stats([b["e2e"] / r["e2e"] for r, b in zip(runs, base, strict=True)]),
                    "ttft_speedup_vs_llamacpp": stats([sum(b["ttft"]) / sum(r["ttft"])
                                                       for r, b in zip(runs, base, strict=True)])}
    for kind in ("kvfork", "kvfork-exact"):
        pairs = zip(rows[f"{kind} shared"], rows[f"{kind} handoff"], strict=True)
        out[kind] = {"identical_tokens_shared_handoff": sum(s["tokens"] == h["tokens"] for s, h in pairs),
                     "handoff_capture_ms": stats([r["capture_s"] * 1e3 for r in rows[f"{kind} handoff"]]),
                     "handoff_restore_ms": stats([x * 1e3 for r in rows[f"{kind} handoff"] for x in r["restore_s"]]),
                     "handoff_blob_mib": rows[f"{kind} handoff"][0]["blob_bytes"] / 2**20}
    out["prompt_tokens"] = rows["llama.cpp"][0]["prompt_tokens"]
    print("| arm | end to end | mean TTFT | end to end, llama.cpp / arm | mean TTFT, llama.cpp / arm |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        o = out[arm]
        print(f"| {arm} | {fmt(o['e2e_s'], ' s')} | {fmt(o['ttft_mean_s'], ' s')} | "
              f"{fmt(o['e2e_speedup_vs_llamacpp'], 'x', digits=2)} | "
              f"{fmt(o['ttft_speedup_vs_llamacpp'], 'x', digits=2)} |")
    return out


if __name__ == "__main__":
    main()
