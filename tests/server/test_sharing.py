"""Concurrent agents over one long document: the common prefix is prefilled once, outputs stay exact."""

from __future__ import annotations

import threading

from kvfork.scheduler.prefix_cache import common_prefix
from tests.support.serving import chat_prompt
from tests.support.text import long_text

DOC = long_text(30)
TASKS = ["Summarize the log.", "Which valve was inspected?", "List the times.", "What did the night crew do?"]


def _messages(task: str) -> list[dict]:
    return [{"role": "system", "content": "You read plant logs."}, {"role": "user", "content": f"{DOC}\n\n{task}"}]


def test_concurrent_agents_share_the_prefix(server, ref):
    reused0 = server.metric("kvfork_prefill_tokens_reused_total")
    computed0 = server.metric("kvfork_prefill_tokens_computed_total")
    client = server.client()
    barrier = threading.Barrier(len(TASKS))
    results: dict[int, object] = {}

    def agent(i: int) -> None:
        barrier.wait()
        results[i] = client.chat.completions.create(model="gemma", messages=_messages(TASKS[i]), max_tokens=8,
                                                    temperature=0)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(TASKS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(TASKS)
    prompts = [chat_prompt(ref, _messages(task)) for task in TASKS]
    for i, prompt in enumerate(prompts):
        out = results[i]
        assert out.usage.prompt_tokens == len(prompt)
        assert out.choices[0].message.content == ref.generate(prompt, max_tokens=8).text, TASKS[i]
    reused = server.metric("kvfork_prefill_tokens_reused_total") - reused0
    computed = server.metric("kvfork_prefill_tokens_computed_total") - computed0
    total = sum(len(p) for p in prompts)
    assert reused + computed == total
    # the document (~450 tokens) is computed once, not four times
    assert reused >= 3 * (len(prompts[0]) - 40), (reused, computed)
    assert sum(r.usage.prompt_tokens_details.cached_tokens for r in results.values()) == reused
    assert server.metric("kvfork_active_branches") == 0


def test_a_later_request_forks_part_of_an_earlier_prompt(server, ref):
    """Sequential requests: the second shares the first one's system prompt and document, not its question."""
    doc = long_text(12)
    client = server.client()
    system = {"role": "system", "content": "Be terse."}
    first = [system, {"role": "user", "content": f"{doc}\n\nWhat was logged first?"}]
    second = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"{doc}\n\nAny leaks?"}]
    client.chat.completions.create(model="gemma", messages=first, max_tokens=4, temperature=0)
    out = client.chat.completions.create(model="gemma", messages=second, max_tokens=8, temperature=0)
    shared = common_prefix(chat_prompt(ref, first), chat_prompt(ref, second))
    assert out.usage.prompt_tokens_details.cached_tokens >= shared - 8 > 100
    assert out.choices[0].message.content == ref.generate(chat_prompt(ref, second), max_tokens=8).text


def test_documents_after_one_system_prompt_do_not_chain_in_the_cache(server, ref):
    """Each new document shares only the system prompt with the last one: forking that short head of the
    previous (long) prompt would pin it, and the next would pin both: 6 x ~430 tokens > the 2,048 cells."""
    client = server.client()
    for i in range(6):
        msgs = [{"role": "system", "content": "You read maintenance logs and answer tersely."},
                {"role": "user", "content": f"Log number {i}.\n{long_text(30 + i)}\n\nWhat was logged first?"}]
        out = client.chat.completions.create(model="gemma", messages=msgs, max_tokens=4, temperature=0)
        assert out.choices[0].message.content == ref.generate(chat_prompt(ref, msgs), max_tokens=4).text
