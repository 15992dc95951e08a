"""Issue 18: what constrained decoding (json_schema, llama.cpp's grammar sampler) costs in decode
throughput with 8 branches decoding together, and whether every constrained reply validates.

    python bench/structured.py [--branches 8] [--repeats 3] [--exact]

One engine, one prefilled document; per repeat, 8 branches forked from it decode (a) under a JSON
Schema that asks for an array of 24 integers and an enum, then (b) unconstrained with ignore_eos, each
branch for as many tokens as its constrained reply had, side by side. Decode throughput is the tokens all
branches generated over the time from the first token to the last (prefill of the instructions is
excluded). Greedy sampling; the default model; kvfork's fast settings unless --exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jsonschema
from workload import report

from kvfork import Engine, SamplingParams, resolve_model

SCHEMA = {
    "type": "object",
    "properties": {
        "severity": {"enum": ["low", "medium", "high"]},
        "readings": {"type": "array", "items": {"type": "integer"}, "minItems": 24, "maxItems": 24},
    },
    "required": ["severity", "readings"],
}


def decode_rate(outs) -> tuple[float, int]:
    """(tokens per second over the decode phase of all branches together, tokens generated)."""
    start = min(o.ttft_s for o in outs)
    end = max(o.total_s for o in outs)
    n = sum(o.completion_tokens for o in outs)
    return n / (end - start), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc-chars", type=int, default=3000)
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/out/structured.json"))
    args = ap.parse_args()
    engine = Engine(resolve_model(args.model), n_ctx=8192, n_seq_max=args.branches + 4, exact=args.exact,
                    progress=False)
    doc = report()[: args.doc_chars]
    asks = [f"Agent {i}: give the severity and 24 pressure readings from the report as JSON." for i in
            range(args.branches)]
    rows = []
    with engine.prefill(doc) as snap:
        for r in range(args.repeats):
            t0 = time.perf_counter()
            con = snap.fan_out(asks, params=SamplingParams(max_tokens=256, json_schema=SCHEMA))
            t_con = time.perf_counter() - t0
            valid = 0
            for out in con:
                try:
                    jsonschema.validate(json.loads(out.text), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            t0 = time.perf_counter()
            free = snap.fan_out(asks, params=[SamplingParams(max_tokens=o.completion_tokens, ignore_eos=True)
                                              for o in con])
            t_free = time.perf_counter() - t0
            (rate_con, n_con), (rate_free, n_free) = decode_rate(con), decode_rate(free)
            rows.append({"repeat": r, "constrained_tok_s": rate_con, "free_tok_s": rate_free,
                         "constrained_tokens": n_con, "free_tokens": n_free, "valid": valid,
                         "wall_constrained_s": t_con, "wall_free_s": t_free})
            print(f"repeat {r}: constrained {rate_con:.1f} tok/s ({n_con} tokens, {valid}/{len(con)} valid),"
                  f" unconstrained {rate_free:.1f} tok/s ({n_free} tokens)", flush=True)
    engine.close()
    cost = [1 - row["constrained_tok_s"] / row["free_tok_s"] for row in rows]
    summary = {"model": args.model, "branches": args.branches, "exact": args.exact, "rows": rows,
               "cost_median": statistics.median(cost), "cost_min": min(cost), "cost_max": max(cost),
               "valid": sum(r["valid"] for r in rows), "replies": args.branches * args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"decode throughput lost to the grammar: {100 * summary['cost_median']:.1f}% (median;"
          f" {100 * summary['cost_min']:.1f}-{100 * summary['cost_max']:.1f}), {summary['valid']}/"
          f"{summary['replies']} constrained replies valid")


if __name__ == "__main__":
    main()
