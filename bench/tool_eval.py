"""Issue 18: function calling on 20 tasks with known right calls, kvfork serve against llama-server --jinja.

    python bench/tool_eval.py [--systems kvfork llama-server] [--choices required auto]

Both servers run the same GGUF (the default model) with 2 threads, greedy, 128 tokens at most, and get
the same requests through the official openai client: the five tools of bench/tool_tasks.py and one user
message, under `tool_choice` "required" and "auto". llama-server runs with its defaults plus `--jinja`
(the GGUF's own chat template and llama.cpp's tool-call parsers); build it with
`python bench/build_llama_server.py`. Per system and tool_choice:
- called: replies that carry tool calls;
- well-formed: the first call names a defined tool and its arguments parse as JSON and validate against
  that tool's parameters (jsonschema);
- right: the first call names the expected tool and every expected argument matches (tool_tasks.matches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema
import openai
from servers import kvfork_server, llama_server
from tool_tasks import TASKS, TOOLS, matches

from kvfork.models import resolve_model

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def judge(message, expected_name: str, expected_args: dict) -> dict:
    calls = message.tool_calls or []
    row = {"called": bool(calls), "well_formed": False, "right": False, "content": message.content,
           "calls": [{"name": c.function.name, "arguments": c.function.arguments} for c in calls]}
    if not calls:
        return row
    name, raw = calls[0].function.name, calls[0].function.arguments
    try:
        args = json.loads(raw)
        jsonschema.validate(args, SCHEMAS[name])
        row["well_formed"] = isinstance(args, dict)
    except (ValueError, KeyError, jsonschema.ValidationError):
        return row
    row["right"] = name == expected_name and all(matches(v, args.get(k)) for k, v in expected_args.items())
    return row


def run(client: openai.OpenAI, choice: str, max_tokens: int) -> list[dict]:
    rows = []
    for text, name, args in TASKS:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": text}],
                                               tools=TOOLS, tool_choice=choice, temperature=0,
                                               max_tokens=max_tokens)
        row = judge(reply.choices[0].message, name, args)
        row |= {"task": text, "seconds": time.perf_counter() - t0, "finish": reply.choices[0].finish_reason}
        print(f"  {choice:8s} called={row['called']!s:5s} well_formed={row['well_formed']!s:5s} "
              f"right={row['right']!s:5s} {row['calls'][:1]}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--systems", nargs="+", default=["kvfork", "llama-server"])
    ap.add_argument("--choices", nargs="+", default=["required", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench/out/tool_eval.json"))
    args = ap.parse_args()
    path = resolve_model(args.model)
    starts = {"kvfork": lambda: kvfork_server(args.model, args.threads, 4096),
              "llama-server": lambda: llama_server(path, args.threads, 1, 4096, extra=["--jinja"])}
    results: dict[str, dict] = {}
    for system in args.systems:
        with starts[system]() as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
            for choice in args.choices:
                print(f"{system} tool_choice={choice}", flush=True)
                rows = run(client, choice, args.max_tokens)
                results[f"{system} {choice}"] = {
                    "called": sum(r["called"] for r in rows), "well_formed": sum(r["well_formed"] for r in rows),
                    "right": sum(r["right"] for r in rows), "of": len(rows), "rows": rows}
    print(json.dumps({k: {m: v[m] for m in ("called", "well_formed", "right", "of")} for k, v in results.items()},
                     indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {"model": args.model, "threads": args.threads,
                                                 "max_tokens": args.max_tokens, "greedy": True},
                                    "results": results}, indent=1))


if __name__ == "__main__":
    main()
