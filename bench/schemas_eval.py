"""Issue 18: do constrained replies parse and validate? 30 held-in JSON schemas (bench/schema_tasks.py).

    python bench/schemas_eval.py [--batch 10] [--max-tokens 320]

One engine, the bundled report prefilled once; every task's branch forks it. Each task is asked twice
with the same prompt (the instruction and its schema in the text): constrained by `json_schema`
(llama.cpp's grammar sampler) and unconstrained (the baseline: the model alone). A reply counts when
`json.loads` of its whole text validates against the schema (jsonschema); for the baseline we also
count replies whose JSON validates once a markdown fence around it is removed, as many callers do.
Greedy; kvfork's fast settings; the default model.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jsonschema
from schema_tasks import TASKS
from workload import report

from kvfork import Engine, SamplingParams, resolve_model

FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)


def verdict(text: str, schema: dict) -> str:
    """'valid', 'invalid' (JSON, wrong shape) or 'unparsed'."""
    try:
        value = json.loads(text)
    except ValueError:
        return "unparsed"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return "invalid"
    return "valid"


def fenced(text: str, schema: dict) -> str:
    match = FENCE.search(text)
    return verdict(match.group(1) if match else text, schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--batch", type=int, default=10, help="branches decoding together")
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--doc-chars", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path("bench/out/schemas_eval.json"))
    args = ap.parse_args()
    engine = Engine(resolve_model(args.model), n_ctx=12288, n_seq_max=args.batch + 4, progress=False)
    asks = [f"{instruction}\nAnswer with JSON only, following this JSON Schema: {json.dumps(schema)}"
            for _, instruction, schema in TASKS]
    rows: list[dict] = [{"task": name, "schema": schema} for name, _, schema in TASKS]
    t0 = time.perf_counter()
    with engine.prefill(report()[: args.doc_chars]) as snap:
        for arm in ("constrained", "unconstrained"):
            for lo in range(0, len(TASKS), args.batch):
                part = range(lo, min(lo + args.batch, len(TASKS)))
                params = [SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                         json_schema=TASKS[i][2] if arm == "constrained" else None)
                          for i in part]
                for i, out in zip(part, snap.fan_out([asks[i] for i in part], params=params), strict=True):
                    row = rows[i]
                    row[arm] = {"text": out.text, "finish": out.finish_reason, "tokens": out.completion_tokens,
                                "verdict": verdict(out.text, row["schema"]),
                                "fenced": fenced(out.text, row["schema"])}
                    print(f"{arm:13s} {row['task']:15s} {row[arm]['verdict']:8s} {out.finish_reason:6s} "
                          f"{out.completion_tokens:4d} tokens", flush=True)
    summary = {arm: {"valid": sum(r[arm]["verdict"] == "valid" for r in rows),
                     "valid_after_unfencing": sum(r[arm]["fenced"] == "valid" for r in rows),
                     "hit_max_tokens": sum(r[arm]["finish"] == "length" for r in rows), "of": len(rows)}
               for arm in ("constrained", "unconstrained")}
    summary["settings"] = {"model": args.model, "batch": args.batch, "max_tokens": args.max_tokens,
                           "doc_chars": args.doc_chars, "greedy": True, "wall_s": time.perf_counter() - t0}
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
