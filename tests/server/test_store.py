"""--store: a snapshot made on one server is restored by the next one (a new process in real life)."""

from __future__ import annotations

import httpx

from kvfork import Engine, SnapshotStore
from kvfork.config import ServerConfig
from tests.support.serving import ENGINE, chat_prompt, serving
from tests.support.text import long_text


def test_a_stored_snapshot_warms_the_next_server(gemma_path, ref, tmp_path):
    doc = [{"role": "system", "content": "You read logs."}, {"role": "user", "content": long_text(10)},
           {"role": "assistant", "content": "Ready."}]
    with Engine(gemma_path, store=SnapshotStore(tmp_path), **ENGINE) as engine:
        with serving(engine, ServerConfig(model_name="gemma")) as first:
            made = httpx.post(f"{first.base_url}/v1/snapshots", json={"model": "gemma", "messages": doc}, timeout=60)
            assert made.status_code == 201, made.text
    question = [{"role": "user", "content": "Which day came last?"}]
    with Engine(gemma_path, store=SnapshotStore(tmp_path), **ENGINE) as engine:
        with serving(engine, ServerConfig(model_name="gemma")) as second:
            out = second.client().chat.completions.create(model="gemma", messages=doc + question, max_tokens=6,
                                                          temperature=0)
            assert second.metric("kvfork_snapshot_hits") == 1
            assert out.usage.prompt_tokens_details.cached_tokens >= made.json()["n_tokens"] - 32
            assert out.choices[0].message.content == ref.generate(chat_prompt(ref, doc + question), max_tokens=6).text


def test_store_bytes_and_budgets_in_metrics(gemma_path, tmp_path):
    with Engine(gemma_path, store=SnapshotStore(tmp_path, ram_bytes=64 << 20, disk_bytes=128 << 20), **ENGINE) as e:
        with serving(e, ServerConfig(model_name="gemma")) as srv:
            assert srv.metric('kvfork_store_budget_bytes{tier="ram"}') == 64 << 20
            assert srv.metric('kvfork_store_budget_bytes{tier="disk"}') == 128 << 20
            assert srv.metric('kvfork_store_bytes{tier="disk"}') == 0
            made = httpx.post(f"{srv.base_url}/v1/snapshots", json={"model": "gemma", "prompt": long_text(4)},
                              timeout=60)
            assert made.status_code == 201, made.text
            assert srv.metric('kvfork_store_bytes{tier="disk"}') > 0
            assert srv.metric('kvfork_store_bytes{tier="ram"}') > 0


def test_a_restarted_server_restores_the_prefixes_it_held(gemma_path, ref, tmp_path):
    """Ordinary requests' prompts, not just pinned snapshots: the prefix cache demotes its entries to the
    store (on eviction, and when the engine closes), and the next server restores instead of prefilling."""
    messages = [{"role": "system", "content": "You read logs."},
                {"role": "user", "content": long_text(10) + "\n\nWhich day came last?"}]
    want = ref.generate(chat_prompt(ref, messages), max_tokens=6).text
    with Engine(gemma_path, store=SnapshotStore(tmp_path), **ENGINE) as engine:
        with serving(engine, ServerConfig(model_name="gemma")) as first:
            out = first.client().chat.completions.create(model="gemma", messages=messages, max_tokens=6,
                                                         temperature=0)
            assert out.choices[0].message.content == want
            assert first.metric("kvfork_snapshot_hits") == 0 and out.usage.prompt_tokens_details.cached_tokens == 0
    with Engine(gemma_path, store=SnapshotStore(tmp_path), **ENGINE) as engine:
        with serving(engine, ServerConfig(model_name="gemma")) as second:
            out = second.client().chat.completions.create(model="gemma", messages=messages, max_tokens=6,
                                                          temperature=0)
            assert second.metric("kvfork_snapshot_hits") == 1
            assert out.usage.prompt_tokens_details.cached_tokens == out.usage.prompt_tokens  # none prefilled
            assert out.choices[0].message.content == want


def test_a_prefix_evicted_from_the_context_is_restored_from_the_store(gemma_path, ref, tmp_path):
    """live_prefixes=0: every prompt node is evicted once its request has forked it, so it goes to the store."""
    messages = [{"role": "user", "content": long_text(8) + "\n\nWhat was restarted?"}]
    want = ref.generate(chat_prompt(ref, messages), max_tokens=6).text
    with Engine(gemma_path, store=SnapshotStore(tmp_path), **ENGINE) as engine:
        with serving(engine, ServerConfig(model_name="gemma", live_prefixes=0)) as srv:
            cached = []
            for _ in range(2):
                out = srv.client().chat.completions.create(model="gemma", messages=messages, max_tokens=6,
                                                           temperature=0)
                assert out.choices[0].message.content == want
                cached.append(out.usage.prompt_tokens_details.cached_tokens)
            assert cached == [0, out.usage.prompt_tokens] and srv.metric("kvfork_snapshot_hits") == 1


def test_idle_prefixes_wait_in_host_ram_while_other_requests_run_and_come_back_whole(gemma_path, ref):
    """With a store (kvfork serve keeps a RAM tier by default), a finished request's prefix leaves the
    context once another request runs (every step would read its cells), and a later request restores it."""
    first = [{"role": "user", "content": long_text(8) + "\n\nWhat was restarted?"}]
    other = [{"role": "user", "content": "Name three colours."}]
    want = ref.generate(chat_prompt(ref, first), max_tokens=6).text
    with Engine(gemma_path, store=SnapshotStore(), **ENGINE) as engine:
        with serving(engine, ServerConfig(model_name="gemma")) as srv:
            def ask(messages):
                return srv.client().chat.completions.create(model="gemma", messages=messages, max_tokens=6,
                                                            temperature=0)

            assert ask(first).choices[0].message.content == want
            assert srv.metric("kvfork_parked_prefixes_total") == 0  # nothing else ran: it stayed live
            ask(other)
            assert srv.metric("kvfork_parked_prefixes_total") >= 1 and srv.metric("kvfork_snapshot_hits") == 0
            again = ask(first)
            assert srv.metric("kvfork_snapshot_hits") == 1
            assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
            assert again.choices[0].message.content == want
