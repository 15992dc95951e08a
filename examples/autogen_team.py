"""An AutoGen AgentChat team of two agents, unchanged, against `kvfork serve`: a researcher with a tool and a
writer who answers from what it found, taking turns (RoundRobinGroupChat).

Both agents run on a plain `OpenAIChatCompletionClient` whose base URL is the server. Their system messages
start with the same team brief, and the writer's request carries the conversation the researcher's started,
so the server forks what the researcher's request prefilled. AutoGen's usage records do not carry cached
tokens, so the script reads the server's /metrics counters after each request (a request's share is the
counter's growth since the one before: run it against a server nothing else uses at the same time).

    kvfork serve &                     # the default model, qwen2.5-coder-0.5b
    pip install -e ".[frameworks]" && python examples/autogen_team.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import asyncio
import json

from _server import cli, metric, served_model, show_shared
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.messages import ToolCallExecutionEvent, ToolCallRequestEvent
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_ext.models.openai import OpenAIChatCompletionClient

POPULATIONS = {"lyon": 522_000, "paris": 2_103_000, "marseille": 873_000}
CALLS: list[tuple[str, dict]] = []  # every tool call: (name, arguments)


def get_population(city: str) -> str:
    """The number of people living in a city (the city proper, latest census)."""
    CALLS.append(("get_population", {"city": city}))
    n = POPULATIONS.get(city.strip().lower())
    return f"{city} has {n:,} inhabitants." if n is not None else f"No census data for {city}."


BRIEF = ("You are one of two agents on a city facts desk. The researcher looks facts up with its tool; the writer"
         " then answers the user's question in one short sentence, from the researcher's findings only.")
TASK = "How many people live in Lyon?"


async def run(base_url: str, api_key: str, model: str, max_tokens: int) -> dict:
    client = OpenAIChatCompletionClient(
        model=model, base_url=base_url, api_key=api_key, temperature=0, max_tokens=max_tokens, max_retries=0,
        # NOTE: a model AutoGen does not know needs its capabilities stated; kvfork serves tools and JSON schemas
        model_info={"vision": False, "function_calling": True, "json_output": True, "structured_output": True,
                    "family": "unknown"},
    )
    researcher = AssistantAgent(
        "researcher", client, tools=[get_population],
        system_message=BRIEF + " You are the researcher: call get_population for the city in the question.")
    writer = AssistantAgent(
        "writer", client, system_message=BRIEF + " You are the writer: answer the question in one sentence.")
    # NOTE: three messages: the task, the researcher's tool result, the writer's answer
    team = RoundRobinGroupChat([researcher, writer], termination_condition=MaxMessageTermination(3))
    before = {k: metric(base_url, f"kvfork_prefill_tokens_{k}_total") for k in ("computed", "reused")}
    requests, seen, result = [], before["reused"], None
    async for item in team.run_stream(task=TASK):
        if isinstance(item, TaskResult):
            result = item
        elif item.models_usage is not None:  # a model request finished: what /metrics counted since the last one
            now = metric(base_url, "kvfork_prefill_tokens_reused_total")
            requests.append({"agent": item.source, "prompt_tokens": item.models_usage.prompt_tokens,
                             "cached_tokens": int(now - seen)})
            seen = now
    await client.close()
    assert result is not None
    computed = metric(base_url, "kvfork_prefill_tokens_computed_total") - before["computed"]
    reused = metric(base_url, "kvfork_prefill_tokens_reused_total") - before["reused"]
    messages = [m for m in result.messages if not isinstance(m, ToolCallRequestEvent | ToolCallExecutionEvent)]
    return {
        "answer": messages[-1].to_text() if messages[-1].source == "writer" else "",
        "transcript": [(m.source, m.to_text()) for m in messages],
        "tool_calls": list(CALLS),
        "requests": requests,
        "cached_tokens": reused,  # every token the server took from a shared prefix instead of prefilling it
        "prefill_computed": computed,
        "prefill_reused": reused,
        "stop_reason": result.stop_reason,
    }


def main(base_url: str = "http://127.0.0.1:8000/v1", api_key: str = "none", model: str | None = None,
         max_tokens: int = 64) -> dict:
    """Run the team once; return the answer, the transcript, the tool calls, the requests and /metrics deltas."""
    CALLS.clear()
    return asyncio.run(run(base_url, api_key, model or served_model(base_url, api_key), max_tokens))


def show(result: dict) -> None:
    for source, text in result["transcript"]:
        print(f"[{source}] {text.strip()}")
    for name, args in result["tool_calls"]:
        print(f"tool call: {name}({json.dumps(args)})")
    show_shared(result, lambda r: f" ({r['agent']}): {r['prompt_tokens']} prompt tokens, {r['cached_tokens']} cached")


if __name__ == "__main__":
    cli(__doc__, main, show)
