"""Issue 8's serving figures: 3 LoRA decoders over one ~3,500-token prompt, one shared base prefill against
one prefill per decoder, and the two ways a decoder can receive the base KV (fork in one context, or a
state-blob hand-off into a decoder context).

    python bench/prefillshare_serving.py --adapters bench/out/prefillshare/adapters [--repeats 3]

Arms, each repeat in one run, side by side (order rotated per repeat):
- shared: the base model prefills the prompt once; the three cache-conditioned decoders fork it
  (zero-copy) and decode together, one llama_decode per adapter per step.
- separate: each decoder computes the whole prompt itself, one after another (what three fine-tuned
  models cost without sharing). The same cache-conditioned decoders, so the outputs must be the
  shared arm's token for token: the run checks it.
- handoff: the base prefills once in its own context; each decoder gets the prompt's KV as a state
  blob (llama_state_seq_get/set) in a second context that has the adapters, and decodes there alone.
TTFT is from the start of the arm to a decoder's first token (the prompt arrives once, for all three).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefillshare_tasks import TASKS, long_document  # noqa: E402
from workload import fmt, provenance, stats  # noqa: E402

from kvfork import Engine  # noqa: E402

ARMS = ("shared", "separate", "handoff")


def _arm_shared(engine: Engine, document: str, instructions: list[str], names: list[str], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with engine.prefill(document) as snapshot:
        t_prefilled = time.perf_counter() - t0
        outs = snapshot.fan_out(instructions, adapters=names, max_tokens=max_tokens)
    end = time.perf_counter() - t0
    return {"ttft": [t_prefilled + o.ttft_s for o in outs], "e2e": end, "tokens": [list(o.tokens) for o in outs],
            "prefilled": [o.computed_tokens for o in outs]}


def _arm_separate(engine: Engine, document: str, instructions: list[str], names: list[str], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = [], []
    for instruction, name in zip(instructions, names, strict=True):
        start = time.perf_counter() - t0
        out = engine.generate(engine.prompt_tokens(document, instruction), adapter=name, max_tokens=max_tokens)
        ttft.append(start + out.ttft_s)
        tokens.append(list(out.tokens))
    return {"ttft": ttft, "e2e": time.perf_counter() - t0, "tokens": tokens}


def _arm_handoff(engine: Engine, decoder_ctx: Engine, document: str, instructions: list[str], names: list[str],
                 max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens, moves = [], [], []
    with engine.prefill(document) as snapshot:
        t1 = time.perf_counter()
        host = snapshot.to_host()  # NOTE: llama_state_seq_get_data: the blob to hand over
        capture_s = time.perf_counter() - t1
    for instruction, name in zip(instructions, names, strict=True):
        t2 = time.perf_counter()
        with decoder_ctx.restore(host) as received:  # llama_state_seq_set_data in the decoder's context
            moves.append(time.perf_counter() - t2)
            start = time.perf_counter() - t0
            out = received.fan_out([instruction], adapters=[name], max_tokens=max_tokens)[0]
        ttft.append(start + out.ttft_s)
        tokens.append(list(out.tokens))
    return {"ttft": ttft, "e2e": time.perf_counter() - t0, "tokens": tokens, "capture_s": capture_s,
            "restore_s": moves, "blob_bytes": len(host.state)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=Path, required=True, help="folder with <task>.cache.gguf per task")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=3500, help="prompt length (the document)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chat-template", default=None, help="for a model without one (e.g. 'gemma' for gemma3-270m)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/prefillshare_serving.json"))
    args = ap.parse_args()

    common = {"n_threads": args.threads, "progress": False, "chat_template": args.chat_template}
    engine = Engine(args.model, n_ctx=16384, **common)
    decoder_ctx = Engine(args.model, n_ctx=8192, **common)
    names = []
    for task in TASKS:
        path = args.adapters / f"{task}.cache.gguf"
        for e in (engine, decoder_ctx):
            e.load_adapter(task, path)
        names.append(task)
    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for rep in range(args.repeats):
        document, _ = long_document(100 + rep, args.tokens, engine.tokenize)
        instructions = _instructions()
        n_prompt = len(engine.prompt_tokens(document, instructions[0]))
        order = ARMS[rep % 3:] + ARMS[: rep % 3]
        for arm in order:
            if arm == "shared":
                row = _arm_shared(engine, document, instructions, names, args.max_tokens)
            elif arm == "separate":
                row = _arm_separate(engine, document, instructions, names, args.max_tokens)
            else:
                row = _arm_handoff(engine, decoder_ctx, document, instructions, names, args.max_tokens)
            row["prompt_tokens"] = n_prompt
            rows[arm].append(row)
            print(f"repeat {rep + 1} {arm:8s} e2e {row['e2e']:6.1f} s  ttft "
                  + " ".join(f"{t:5.1f}" for t in row["ttft"]), flush=True)
        same = [rows["shared"][-1]["tokens"] == rows[a][-1]["tokens"] for a in ("separate", "handoff")]
        print(f"  identical tokens: separate {same[0]}, handoff {same[1]}", flush=True)
    summary = _summary(rows)
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows, "provenance": provenance(),
                                    "settings": vars(args) | {"adapters": str(args.adapters), "out": str(args.out)}},
                                   indent=2))
    engine.close()
    decoder_ctx.close()


def _instructions() -> list[str]:
    from prefillshare_tasks import INSTRUCTIONS  # the fixed instruction of each task

    return [INSTRUCTIONS[t] for t in TASKS]


def _summary(rows: dict[str, list[dict]]) -> dict:
    out: dict = {}
    for arm, runs in rows.items():
        out[arm] = {"e2e_s": stats([r["e2e"] for r in runs]),
                    "ttft_mean_s": stats([sum(r["ttft"]) / len(r["ttft"]) for r in runs]),
                    "ttft_last_s": stats([max(r["ttft"]) for r in runs])}
    for arm in ("separate", "handoff"):
        pairs = list(zip(rows["shared"], rows[arm], strict=True))
        out[f"e2e_speedup_shared_vs_{arm}"] = stats([o["e2e"] / s["e2e"] for s, o in pairs])
        out[f"ttft_speedup_shared_vs_{arm}"] = stats([sum(o["ttft"]) / sum(s["ttft"]) for s, o in pairs])
        out[f"identical_tokens_{arm}"] = sum(s["tokens"] == o["tokens"] for s, o in pairs)
    out["handoff_capture_ms"] = stats([r["capture_s"] * 1e3 for r in rows["handoff"]])
    out["handoff_restore_ms"] = stats([x * 1e3 for r in rows["handoff"] for x in r["restore_s"]])
    out["handoff_blob_mib"] = rows["handoff"][0]["blob_bytes"] / 2**20
    out["prompt_tokens"] = rows["shared"][0]["prompt_tokens"]
    for arm in ARMS:
        print(f"{arm:8s} e2e {fmt(out[arm]['e2e_s'], ' s')}  mean TTFT {fmt(out[arm]['ttft_mean_s'], ' s')}")
    return out


if __name__ == "__main__":
    main()
