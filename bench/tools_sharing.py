"""Issue 18: agents with the same tools and document still share their prefill through `kvfork serve`.

    python bench/tools_sharing.py [--agents 8] [--repeats 3]

N agents, one thread each with the official openai client, send at once a chat request with the same
two tools, a system prompt holding the same ~3,000-character document and a question of their own
(tool_choice "auto", greedy, 48 tokens). Reported per repeat: the share of all prompt tokens the server
reused (`usage.prompt_tokens_details.cached_tokens`), wall time, and how many replies were tool calls.
Each repeat uses a document with a new first line, so nothing is cached from an earlier one.
Then (round 2) every agent sends its next turn at once, as an agent loop does: its first request, the
reply, and a tool result for each call it made (or a follow-up question if it made none). Round 1 is
cold: the first agent's prompt cannot be reused, so at most 7/8 of the prompt tokens can be.
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

            firsts = [[{"role": "system", "content": f"You are an incident agent. The report:\n\n{doc}"},
                       {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.agents)]

            def ask(messages: list[dict]):
                return client.chat.completions.create(model="model", messages=messages, tools=TOOLS,
                                                      temperature=0, max_tokens=48)

            row: dict = {"repeat": r}
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.agents) as pool:
                outs = list(pool.map(ask, firsts))
                row["round1"] = tally(outs, time.perf_counter() - t0)
                t0 = time.perf_counter()
                seconds = [m + next_turn(o.choices[0].message) for m, o in zip(firsts, outs, strict=True)]
                outs = list(pool.map(ask, seconds))
                row["round2"] = tally(outs, time.perf_counter() - t0)
            both = row["round1"]["cached_tokens"] + row["round2"]["cached_tokens"]
            row["both_rounds_reuse"] = both / (row["round1"]["prompt_tokens"] + row["round2"]["prompt_tokens"])
            rows.append(row)
            for k in ("round1", "round2"):
                t = row[k]
                print(f"repeat {r} {k}: reused {t['cached_tokens']:,} of {t['prompt_tokens']:,} prompt tokens "
                      f"({100 * t['reuse']:.1f}%), {t['wall_s']:.1f} s, {t['tool_calls']}/{args.agents} replies "
                      "were tool calls", flush=True)
    summary: dict = {"model": args.model, "agents": args.agents, "rows": rows}
    for key, pick in (("round1", lambda row: row["round1"]["reuse"]), ("round2", lambda row: row["round2"]["reuse"]),
                      ("both_rounds", lambda row: row["both_rounds_reuse"])):
        reuse = [pick(row) for row in rows]
        summary[key] = {"median": statistics.median(reuse), "min": min(reuse), "max": max(reuse)}
        print(f"{key}: prompt tokens reused {100 * statistics.median(reuse):.1f}% (median; "
              f"{100 * min(reuse):.1f}-{100 * max(reuse):.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


def tally(outs, wall: float) -> dict:
    prompt = sum(o.usage.prompt_tokens for o in outs)
    cached = sum(o.usage.prompt_tokens_details.cached_tokens for o in outs)
    return {"prompt_tokens": prompt, "cached_tokens": cached, "reuse": cached / prompt, "wall_s": wall,
            "tool_calls": sum(bool(o.choices[0].message.tool_calls) for o in outs)}


def next_turn(reply) -> list[dict]:
    """The agent loop's next messages: the reply, then a tool result per call (or a follow-up question)."""
    turn = [reply.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})]
    if not reply.tool_calls:
        return [*turn, {"role": "user", "content": "Thanks. Anything else we should check?"}]
    return turn + [{"role": "tool", "tool_call_id": call.id, "content": f"{call.function.name}: ok, nothing unusual"}
                   for call in reply.tool_calls]


if __name__ == "__main__":
    main()
