"""A LangGraph ReAct agent with two tools, unchanged, against `kvfork serve`.

The agent, a travel assistant with a weather tool and a clock tool, is LangChain's `create_agent` (the
successor of LangGraph's `create_react_agent`: a LangGraph graph that calls the model, runs the tools it asks for
and calls it again until it answers) on a plain `ChatOpenAI` model; only the base URL, API key and model name
point it at kvfork, plus a middleware (the framework's own hook) with the agent's policy: tools on the first
step, then the answer in a schema (a 0.5B model otherwise loops on its tools). The agent's second request sends
the conversation back with the tool results appended, so the server forks the whole first prompt: the script
prints each request's `cached_tokens`, as LangChain reports them (`usage_metadata.input_token_details.cache_read`),
and the server's /metrics counters.

    kvfork serve &                     # the default model, qwen2.5-coder-0.5b
    pip install -e ".[frameworks]" && python examples/langgraph_react.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import json

from _server import cli, metric, served_model, show_shared
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, wrap_model_call
from langchain.agents.structured_output import ProviderStrategy
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

TEMPERATURES = {"paris": 18, "rome": 24, "oslo": 7, "cairo": 31}
UTC_OFFSETS = {"tokyo": 9, "paris": 1, "new york": -5, "london": 0}
CALLS: list[tuple[str, dict]] = []  # every tool call the agent made: (name, arguments)


@tool
def get_temperature(city: str) -> str:
    """The current temperature of a city, in degrees Celsius."""
    CALLS.append(("get_temperature", {"city": city}))
    celsius = TEMPERATURES.get(city.strip().lower())
    return f"It is {celsius} degrees Celsius in {city}." if celsius is not None else f"Unknown city: {city}."


@tool
def get_local_time(city: str) -> str:
    """The current local time in a city (24-hour clock)."""
    CALLS.append(("get_local_time", {"city": city}))
    offset = UTC_OFFSETS.get(city.strip().lower())
    return f"It is {(5 + offset) % 24:02d}:30 in {city}." if offset is not None else f"Unknown city: {city}."


class Answer(BaseModel):
    """The agent's final answer."""

    paris_temperature: str = Field(description="the temperature in Paris, as the tool gave it")
    tokyo_time: str = Field(description="the local time in Tokyo, as the tool gave it")


SYSTEM = "You are a travel assistant. Answer with the tools' results, briefly."
QUESTION = "What is the temperature in Paris, and what time is it in Tokyo?"


@wrap_model_call
def tools_then_answer(request: ModelRequest, handler):  # type: ignore[no-untyped-def]
    """The agent's policy: call tools first, then answer in the Answer schema. The model still picks the tools
    and their arguments (`required`: the server constrains the reply to well-formed calls of defined tools) and
    then fills the answer (the schema goes to the server as `response_format`, which constrains the reply to
    it). A 0.5B model left to `auto` tends to call the same tools again, or to echo the calls as text."""
    if any(isinstance(m, ToolMessage) for m in request.messages):
        return handler(request)
    # NOTE: strict tools, as create_agent binds them with a response format: the first request's tool definitions
    # then match the second's token for token, and the server forks the whole first prompt
    return handler(request.override(tool_choice="required", response_format=None,
                                    model_settings={**request.model_settings, "strict": True}))


def main(base_url: str = "http://127.0.0.1:8000/v1", api_key: str = "none", model: str | None = None,
         max_tokens: int = 64) -> dict:
    """Run the agent once; return its answer, the tool calls it made, each request's usage and /metrics deltas."""
    CALLS.clear()
    llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=model or served_model(base_url, api_key),
                     temperature=0, max_tokens=max_tokens, max_retries=0)
    agent = create_agent(llm, [get_temperature, get_local_time], system_prompt=SYSTEM,
                         middleware=[tools_then_answer],
                         response_format=ProviderStrategy(Answer))
    before = {k: metric(base_url, f"kvfork_prefill_tokens_{k}_total") for k in ("computed", "reused")}
    state = agent.invoke({"messages": [{"role": "user", "content": QUESTION}]}, {"recursion_limit": 12})
    replies = [m for m in state["messages"] if isinstance(m, AIMessage)]
    requests = [{"prompt_tokens": (m.usage_metadata or {}).get("input_tokens", 0),
                 "cached_tokens": (m.usage_metadata or {}).get("input_token_details", {}).get("cache_read", 0),
                 "tool_calls": [c["name"] for c in m.tool_calls]} for m in replies]
    return {
        "answer": state["structured_response"].model_dump() if state.get("structured_response") else None,
        "answer_text": replies[-1].text if replies else "",
        "tool_calls": list(CALLS),
        "tool_results": [m.content for m in state["messages"] if isinstance(m, ToolMessage)],
        "requests": requests,
        "cached_tokens": sum(r["cached_tokens"] for r in requests),
        "prefill_computed": metric(base_url, "kvfork_prefill_tokens_computed_total") - before["computed"],
        "prefill_reused": metric(base_url, "kvfork_prefill_tokens_reused_total") - before["reused"],
    }


def show(result: dict) -> None:
    for name, args in result["tool_calls"]:
        print(f"tool call: {name}({json.dumps(args)})")
    print(f"answer: {json.dumps(result['answer'])}")
    show_shared(result, lambda r: f": {r['prompt_tokens']} prompt tokens, {r['cached_tokens']} cached"
              f"{' -> ' + ', '.join(r['tool_calls']) if r['tool_calls'] else ''}")


if __name__ == "__main__":
    cli(__doc__, main, show)
