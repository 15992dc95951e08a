"""Reuse modes through the server: a long message seen before at another offset is placed, not computed."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx

from kvfork.server.routes import chat_pieces
from tests.support.serving import API_KEY, chat_prompt
from tests.support.text import long_text

DOC = "Plant log:\n" + long_text(24)  # ~500 tokens: over the 64-token segment threshold


def _messages(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": DOC},
            {"role": "user", "content": question}]


def _ask(client, messages: list[dict], reuse: str | None, max_tokens: int = 8):
    extra = {"reuse": reuse} if reuse else None
    return client.chat.completions.create(model="gemma", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra)


def _pieces_tokens(ref, messages: list[dict]) -> list[int]:
    pieces = chat_pieces(SimpleNamespace(engine=ref), [(m["role"], m["content"]) for m in messages])
    return [t for piece, _ in pieces for t in piece]


def test_a_document_message_is_placed_under_another_system_prompt(server, ref):
    client = server.client()
    placed0 = server.metric("kvfork_prefill_tokens_placed_total")
    doc_tokens = len(ref.tokenize(DOC, special=True))
    first = _ask(client, _messages("You are a plant engineer.", "What did the night crew report?"), "shift")
    assert getattr(first.usage.prompt_tokens_details, "placed_tokens", 0) in (0, None)  # computed, then kept
    # the same head again: the segment lands where it was computed, so this is exactly a from-scratch run
    same = _messages("You are a plant engineer.", "Which valve was inspected?")
    out = _ask(client, same, "shift")
    assert out.usage.prompt_tokens_details.placed_tokens == doc_tokens
    assert out.choices[0].message.content == ref.generate(_pieces_tokens(ref, same), max_tokens=8).text
    # another agent's system prompt: the document sits at another offset and is still placed
    other = _messages("You are a cautious safety inspector who writes short, formal notes for the record.",
                      "Which valve was inspected?")
    out = _ask(client, other, "shift")
    usage = out.usage
    assert usage.prompt_tokens_details.placed_tokens == doc_tokens
    assert usage.prompt_tokens == len(_pieces_tokens(ref, other))
    assert usage.prompt_tokens_details.cached_tokens >= doc_tokens and out.choices[0].message.content
    assert server.metric("kvfork_prefill_tokens_placed_total") - placed0 == 2 * doc_tokens


def test_kvcomm_and_blend_requests_and_exact_requests_stay_exact_afterwards(server, ref):
    client = server.client()
    fallback0 = server.metric('kvfork_reuse_segments_total{action="fallback"}', 0.0)
    msgs = _messages("You are a shift supervisor.", "List two times from the log.")
    _ask(client, _messages("You are an operator.", "Summarize."), "blend")  # keeps the segment if new
    out = _ask(client, msgs, "kvcomm")  # no anchors yet for this agent: prefilled, becomes an anchor
    assert server.metric('kvfork_reuse_segments_total{action="fallback"}', 0.0) == fallback0 + 1
    assert not getattr(out.usage.prompt_tokens_details, "placed_tokens", 0)
    blended = _ask(client, msgs, "blend")
    assert 0 < blended.usage.prompt_tokens_details.placed_tokens < len(ref.tokenize(DOC, special=True))
    # approximate prompts are never live prefixes: an exact request of the same text is exact
    exact = _ask(client, msgs, None)
    assert exact.choices[0].message.content == ref.generate(chat_prompt(ref, msgs), max_tokens=8).text


def test_a_composed_prompt_sent_again_with_the_same_settings_is_forked_whole(server):
    client = server.client()
    msgs = _messages("You are a water engineer on call.", "Which station reported a leak?")
    _ask(client, _messages("You are an auditor.", "Summarize."), "shift")  # the document becomes a segment
    first = _ask(client, msgs, "shift")
    placed = first.usage.prompt_tokens_details.placed_tokens
    assert placed > 0
    again = _ask(client, msgs, "shift")
    details = again.usage.prompt_tokens_details
    # nothing composed again: the kept prompt is forked whole (billed as cached, as every full-prefix fork)
    assert details.cached_tokens == again.usage.prompt_tokens and details.placed_tokens == placed
    assert again.choices[0].message.content == first.choices[0].message.content
    # another mode's namespace does not see it
    other = _ask(client, msgs, "blend")
    assert other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens - 1


def test_an_unknown_reuse_mode_is_a_400(server):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "gemma", "messages": [{"role": "user", "content": "hi"}], "reuse": "approx"})
    assert r.status_code == 400 and "reuse" in r.text


def test_a_reply_is_placed_the_first_time_a_downstream_agent_sends_it(server, ref):
    client = server.client()
    upstream = client.chat.completions.create(
        model="gemma", messages=_messages("You are a plant engineer.", "Describe the log in detail."),
        max_tokens=64, temperature=0, extra_body={"reuse": "shift", "ignore_eos": True})
    reply = upstream.choices[0].message.content
    n_reply = len(ref.tokenize(reply, special=True))
    assert n_reply == 64, reply
    downstream = [{"role": "system", "content": "You are the shift lead."},
                  {"role": "user", "content": "Question: what should the night crew check first?"},
                  {"role": "user", "content": reply}]
    out = _ask(client, downstream, "shift")
    # the reply was never a message before: its KV came from the upstream agent's own branch
    # (all but its last token, which was sampled and never decoded)
    assert out.usage.prompt_tokens_details.placed_tokens == n_reply - 1
    assert out.choices[0].message.content


def test_a_client_that_leaves_during_composition_leaks_no_cells(server):
    dispatcher = server.app.state.kv.loop.dispatcher
    table = dispatcher.sched.table
    body = {"model": "gemma", "stream": True, "max_tokens": 8, "reuse": "shift",
            "messages": _messages("You are a night-shift operator.", "What failed?")}
    body["messages"][1]["content"] = "Another plant log:\n" + long_text(85)  # new content: computed, not placed
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200  # the headers come at once; leave while the prompt is being composed
        deadline = time.time() + 30
        while not dispatcher.composing and time.time() < deadline:
            time.sleep(0.001)
        assert dispatcher.composing
    deadline, quiet = time.time() + 60, 0
    while quiet < 20 and time.time() < deadline:  # idle for half a second in a row (read from this thread)
        quiet = 0 if dispatcher.sched.has_work else quiet + 1
        time.sleep(0.025)
    kept = set(dispatcher.prefixes.entries())
    stray = [s for s in table.sequences() if s not in kept and s.n_children == 0]
    assert not stray, [(len(s.tokens), s.status, s.released) for s in stray]

