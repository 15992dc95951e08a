"""Issue 18: agents with the same tools and document still share their prefill through `kvfork serve`,
against llama.cpp's own server (issue 16).

    python bench/build_llama_server.py                    # once: llama.cpp's server, same llama.cpp
    python bench/tools_sharing.py [--agents 8] [--repeats 3]

Servers, all started before the first repeat, order rotated per repeat, same model file and threads:
  kvfork          `kvfork serve`, its defaults (fast mode)
  kvfork-exact    `kvfork serve --exact`
  llama-server    llama.cpp's own server with its defaults and `--jinja` (the chat template's tool format),
                  `-np N` (one slot per agent), 2,048 tokens per slot: the baseline
N agents, one thread each with the official openai client, send at once a chat request with the same
two tools, a system prompt holding the same ~3,000-character document and a question of their own
(tool_choice "auto", greedy, 48 tokens). Reported per server and repeat: the share of all prompt tokens
the server reused (`usage.prompt_tokens_details.cached_tokens`, which both servers report), wall time,
and how many replies were tool calls. Each repeat uses a document with a new first line, so nothing is
cached from an earlier one. Then (round 2) every agent sends its next turn at once, as an agent loop
does: its first request, the reply, and a tool result for each call it made (or a follow-up question if
it made none). Round 1 is cold: the first agent's prompt cannot be reused, so at most 7/8 of the prompt
tokens can be. Wall-time ratios are taken within each repeat, against llama-server.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from servers import Server, kvfork_server, llama_server
from workload import document, fmt, provenance, stats

from kvfork.models import resolve_model

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
    ap.add_argument("--only", nargs="*", default=None, help="kvfork kvfork-exact llama-server")
    ap.add_argument("--out", type=Path, default=Path("bench/out/tools_sharing.json"))
    args = ap.parse_args()
    path = resolve_model(args.model)
    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    makers = {
        "kvfork": lambda: kvfork_server(str(path), args.threads, 8192, log=logs / "tools-kvfork.log"),
        "kvfork-exact": lambda: kvfork_server(str(path), args.threads, 8192, extra=["--exact"],
                                              log=logs / "tools-kvfork-exact.log"),
        "llama-server": lambda: llama_server(path, args.threads, args.agents, 2048, extra=["--jinja"],
                                             log=logs / "tools-llama-server.log"),
    }
    servers: dict[str, Server] = {}
    rows: dict[str, list[dict]] = {}
    try:
        for name, make in makers.items():
            if args.only is None or name in args.only:
                servers[name] = make().__enter__()
        names = list(servers)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                row = one_repeat(servers[name], args, r)
                rows.setdefault(name, []).append(row)
                for k in ("round1", "round2"):
                    t = row[k]
                    print(f"repeat {r + 1} {name} {k}: reused {t['cached_tokens']:,} of {t['prompt_tokens']:,} prompt"
                          f" tokens ({100 * t['reuse']:.1f}%), {t['wall_s']:.1f} s, {t['tool_calls']}/{args.agents}"
                          " replies were tool calls", flush=True)
    finally:
        for server in servers.values():
            server.__exit__(None, None, None)
    summary: dict = {"provenance": provenance(), "model": args.model, "agents": args.agents, "rows": rows}
    lines = [f"| {args.agents} agents, tools + ~{args.doc_chars:,}-character report | round 1 reused | round 2 reused"
             " | round 1 wall | round 2 wall | both rounds, llama-server / server |", "|---|---|---|---|---|---|"]
    base = rows.get("llama-server")
    for name, runs in rows.items():
        cell: dict = {}
        for key in ("round1", "round2"):
            cell[f"{key}_reuse"] = stats([row[key]["reuse"] for row in runs])
            cell[f"{key}_wall_s"] = stats([row[key]["wall_s"] for row in runs])
        cell["both_rounds_reuse"] = stats([row["both_rounds_reuse"] for row in runs])
        wall = [row["round1"]["wall_s"] + row["round2"]["wall_s"] for row in runs]
        if base:
            cell["speedup_vs_llama_server"] = stats([(b["round1"]["wall_s"] + b["round2"]["wall_s"]) / w
                                                     for w, b in zip(wall, base, strict=True)])
        summary[name] = cell
        vs = fmt(cell["speedup_vs_llama_server"], "x", digits=2) if base else "not run"
        lines.append(f"| {name} | {fmt(cell['round1_reuse'], '%', 100)} | {fmt(cell['round2_reuse'], '%', 100)}"
                     f" | {fmt(cell['round1_wall_s'], ' s')} | {fmt(cell['round2_wall_s'], ' s')} | {vs} |")
    summary["table"] = "\n".join(lines)
    print("\n" + summary["table"])
    args.out.write_text(json.dumps(summary, indent=1))


def one_repeat(server: Server, args: argparse.Namespace, r: int) -> dict:
    """Both rounds of one repeat against one server, on a document of their own."""
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=1200)
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
    return row


def tally(outs, wall: float) -> dict:
    prompt = sum(o.usage.prompt_tokens for o in outs)
    cached = sum((o.usage.prompt_tokens_details.cached_tokens or 0) if o.usage.prompt_tokens_details else 0
                 for o in outs)
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
