"""Three LangGraph agents review one report in parallel, then a chair merges them; all through `kvfork serve`.

Nothing here knows about kvfork: the agents are plain OpenAI chat calls. The server notices that
the three reviewers' prompts share the system prompt and the report (a common token prefix), prefills
it once and forks it to each of them; the chair's prompt shares it too. At the end the script reads
/metrics and prints what that saved.

    kvfork serve &                                   # default model; or --model gemma3-270m --chat-template gemma
    pip install langgraph openai && python examples/langgraph_agents.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse
import operator
import re
import time
import urllib.request
from importlib import resources
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph
from openai import OpenAI

SYSTEM = "You review incident reports. Answer from the report only, briefly."
REVIEWERS = {
    "timeline": "Check the timeline for gaps or contradictions.",
    "risks": "List the three biggest open risks, one line each.",
    "actions": "Judge whether the corrective actions match the root cause.",
}


class Review(TypedDict):
    reviews: Annotated[list[str], operator.add]  # each reviewer appends; LangGraph merges them
    verdict: str


def build(client: OpenAI, model: str, report: str, max_tokens: int) -> StateGraph:
    def ask(instruction: str) -> str:
        out = client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{report}\n\n{instruction}"}],
        )
        return out.choices[0].message.content or ""

    def reviewer(name: str, instruction: str):  # type: ignore[no-untyped-def]
        def node(state: Review) -> dict:
            return {"reviews": [f"[{name}] {ask(instruction)}"]}
        return node

    def chair(state: Review) -> dict:
        return {"verdict": ask("Merge these reviews into one verdict:\n" + "\n".join(state["reviews"]))}

    graph = StateGraph(Review)
    for name, instruction in REVIEWERS.items():
        graph.add_node(name, reviewer(name, instruction))
        graph.add_edge(START, name)  # NOTE: three edges from START: LangGraph runs the reviewers in parallel
        graph.add_edge(name, "chair")
    graph.add_node("chair", chair)
    graph.add_edge("chair", END)
    return graph


def metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics").read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--chars", type=int, default=0, help="use only the first CHARS of the report (0: all)")
    args = parser.parse_args()
    report = resources.files("kvfork").joinpath("data/sample_report.txt").read_text(encoding="utf-8")
    report = report[: args.chars] if args.chars else report
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    root = args.base_url.rsplit("/v1", 1)[0]
    before = {k: metric(root, f"kvfork_prefill_tokens_{k}_total") for k in ("computed", "reused")}
    t0 = time.perf_counter()
    result = build(client, model, report, args.max_tokens).compile().invoke({"reviews": [], "verdict": ""})
    wall = time.perf_counter() - t0
    for review in result["reviews"]:
        print(review.strip(), "\n")
    print("[chair]", result["verdict"].strip())
    computed = metric(root, "kvfork_prefill_tokens_computed_total") - before["computed"]
    reused = metric(root, "kvfork_prefill_tokens_reused_total") - before["reused"]
    total = computed + reused
    print(f"\n--- what the server shared ({wall:.1f} s for {len(REVIEWERS) + 1} agents) ---")
    print(f"prompt tokens: {total:,.0f}; prefilled: {computed:,.0f}; reused from a shared prefix: {reused:,.0f}"
          f" ({reused / total:.0%})" if total else "no requests counted")


if __name__ == "__main__":
    main()
