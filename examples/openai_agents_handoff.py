"""Two OpenAI Agents SDK agents, unchanged, against `kvfork serve`: a triage agent hands off to a weather agent,
which calls a function tool whose result is its answer.

The SDK runs on the chat completions API (`OpenAIChatCompletionsModel` on an `AsyncOpenAI` client whose base
URL is the server); tracing is off (it would upload to OpenAI). Both agents' instructions start with the SDK's
recommended handoff prompt, so the weather agent's request forks what the triage agent's prefilled: the
script prints each request's `cached_tokens` (the SDK's `usage.input_tokens_details.cached_tokens`) and the
server's /metrics counters.

    kvfork serve &                     # the default model, qwen2.5-coder-0.5b
    pip install -e ".[frameworks]" && python examples/openai_agents_handoff.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import asyncio
import json

from _server import cli, metric, show_shared
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.extensions.handoff_prompt import prompt_with_handoff_instructions
from openai import AsyncOpenAI

WEATHER = {"paris": "sunny, 18 degrees Celsius", "rome": "cloudy, 24 degrees Celsius", "oslo": "snow, -3 degrees"}
CALLS: list[tuple[str, dict]] = []  # every function tool call: (name, arguments)


@function_tool
def get_weather(city: str) -> str:
    """The current weather of a city.

    Args:
        city: the city's name, e.g. "Paris".
    """
    CALLS.append(("get_weather", {"city": city}))
    return f"{city}: {WEATHER.get(city.strip().lower(), 'no data')}"


QUESTION = "What is the weather in Rome right now?"


def agents(client: AsyncOpenAI, model: str, max_tokens: int) -> Agent:
    """The triage agent, whose only move is a handoff to the weather agent, which has the tool."""
    llm = OpenAIChatCompletionsModel(model=model, openai_client=client)
    # NOTE: tool_choice "required" on the first step of each agent: the 0.5B model then always acts (the server
    # constrains the reply to a well-formed call); the SDK resets it to "auto" after a tool ran (reset_tool_choice).
    settings = ModelSettings(temperature=0, max_tokens=max_tokens, tool_choice="required")
    weather = Agent(
        name="Weather agent",
        handoff_description="Answers questions about the weather with live data.",
        instructions=prompt_with_handoff_instructions(
            "You answer weather questions. Call get_weather for the city, then answer in one sentence."),
        tools=[get_weather], model=llm, model_settings=settings,
        # NOTE: the tool's result is the agent's answer: after it, on "auto", the 0.5B model echoes calls as text
        # rather than answering (a larger model can drop this line and answer in its own words).
        tool_use_behavior="stop_on_first_tool",
    )
    return Agent(
        name="Triage agent",
        instructions=prompt_with_handoff_instructions(
            "You route the user to the right agent. Weather questions go to the Weather agent."),
        handoffs=[weather], model=llm, model_settings=settings,
    )


async def run(base_url: str, api_key: str, model: str | None, max_tokens: int) -> dict:
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    model = model or (await client.models.list()).data[0].id
    triage = agents(client, model, max_tokens)
    before = {k: metric(base_url, f"kvfork_prefill_tokens_{k}_total") for k in ("computed", "reused")}
    result = await Runner.run(triage, QUESTION, max_turns=6)
    requests = [{"prompt_tokens": r.usage.input_tokens, "cached_tokens": r.usage.input_tokens_details.cached_tokens,
                 "calls": [item.name for item in r.output if getattr(item, "type", "") == "function_call"]}
                for r in result.raw_responses]
    return {
        "answer": result.final_output,
        "last_agent": result.last_agent.name,
        "handoffs": [item.target_agent.name for item in result.new_items if item.type == "handoff_output_item"],
        "tool_calls": list(CALLS),
        "requests": requests,
        "cached_tokens": sum(r["cached_tokens"] for r in requests),
        "prefill_computed": metric(base_url, "kvfork_prefill_tokens_computed_total") - before["computed"],
        "prefill_reused": metric(base_url, "kvfork_prefill_tokens_reused_total") - before["reused"],
    }


def main(base_url: str = "http://127.0.0.1:8000/v1", api_key: str = "none", model: str | None = None,
         max_tokens: int = 64) -> dict:
    """Run the two agents once; return the answer, handoffs, tool calls, each request's usage, /metrics deltas."""
    set_tracing_disabled(True)
    CALLS.clear()
    return asyncio.run(run(base_url, api_key, model, max_tokens))


def show(result: dict) -> None:
    for target in result["handoffs"]:
        print(f"handoff: -> {target}")
    for name, args in result["tool_calls"]:
        print(f"tool call: {name}({json.dumps(args)})")
    print(f"answer ({result['last_agent']}): {result['answer']}")
    show_shared(result, lambda r: f": {r['prompt_tokens']} prompt tokens, {r['cached_tokens']} cached"
              f"{' -> ' + ', '.join(r['calls']) if r['calls'] else ''}")


if __name__ == "__main__":
    cli(__doc__, main, show)
