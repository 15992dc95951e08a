"""Issue 18: agents with the same tools and document still share their prefill through `kvfork serve`.

    python bench/tools_sharing.py [--agents 8] [--repeats 3]

N agents, one thread each with the official openai client, send at once a chat request with the same
two tools, a system prompt holding the same ~3,000-character document and a question of their own
(tool_choice "auto", greedy, 48 tokens). Reported per repeat: the share of all prompt tokens the server
reused (`usage.prompt_tokens_details.cached_tokens`), wall time, and how many replies were tool calls.
Each repeat uses a document with a new first line, so nothing is cached from an earlier one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from servers import kvfork_server
from workload import document

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_sensor", "description": "The latest reading of a sensor named in the report.",
        "parameters": {"type": "object", "properties": {"sensor": {"type": "string"}}, "required": ["sensor"]}}},
    {"type": "function", "function": {
        "name": "open_ticket", "description": "Open a maintenance ticket.",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"},
                                                        "priority": {"enum": ["low", "high"]}},
                       "required": ["title", "priority"]}}},
]
QUESTIONS = ["Which sensor failed first? Look it up.", "Open a ticket for the root cause.",
             "Summarize the incident in one sentence.", "What was the peak pressure? Check the sensor.",
             "Should we open a high-priority ticket? Do it if so.", "Which team was on call?",
             "List two follow-up actions.", "Look up the flow sensor."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--doc-chars", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path("bench/out/tools_sharing.json"))
    args = ap.parse_args()
    rows = []
    with kvfork_server(args.model, args.threads, 8192) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)
        for r in range(args.repeats):
            doc = document(f"tools-{r}-{time.time_ns()}", args.doc_chars)

            def agent(i: int, doc: str = doc):
                messages = [{"role": "system", "content": f"You are an incident agent. The report:\n\n{doc}"},
                            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
                return client.chat.completions.create(model="model", messages=messages, tools=TOOLS,
                                                      temperature=0, max_tokens=48)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.agents) as pool:
                outs = list(pool.map(agent, range(args.agents)))
            wall = time.perf_counter() - t0
            prompt = sum(o.usage.prompt_tokens for o in outs)
            cached = sum(o.usage.prompt_tokens_details.cached_tokens for o in outs)
            calls = sum(bool(o.choices[0].message.tool_calls) for o in outs)
            rows.append({"repeat": r, "prompt_tokens": prompt, "cached_tokens": cached, "reuse": cached / prompt,
                         "wall_s": wall, "tool_calls": calls})
            print(f"repeat {r}: reused {cached:,} of {prompt:,} prompt tokens ({100 * cached / prompt:.1f}%),"
                  f" {wall:.1f} s, {calls}/{args.agents} replies were tool calls", flush=True)
    reuse = [row["reuse"] for row in rows]
    summary = {"model": args.model, "agents": args.agents, "rows": rows, "reuse_median": statistics.median(reuse),
               "reuse_min": min(reuse), "reuse_max": max(reuse)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"prompt tokens reused: {100 * summary['reuse_median']:.1f}% (median; {100 * min(reuse):.1f}-"
          f"{100 * max(reuse):.1f})")


if __name__ == "__main__":
    main()
