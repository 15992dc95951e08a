"""LoRA decoders on the server (issue 8): "model": "<id>+<adapter>" over one shared base prefill, exact."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from kvfork import Engine
from kvfork.config import ServerConfig
from kvfork.engine.adapters import OWN_TOKENS_KEY, PREFILL_KEY
from kvfork.errors import InvalidParameter
from kvfork.server.cli import load_adapters
from kvfork.train.gguf_lora import random_lora_gguf
from tests.support.models import load_all
from tests.support.serving import API_KEY, ENGINE, chat_prompt, serving
from tests.support.text import long_text

DOC = long_text(30)
AGENTS = [("gemma+planner", "Plan the repair."), ("gemma+coder", "Write one shell command."),
          ("gemma", "Which valve was inspected?")]


def _messages(task: str) -> list[dict]:
    return [{"role": "user", "content": f"{DOC}\n\n{task}"}]


@pytest.fixture(scope="module")
def tail_file(gemma_path, tmp_path_factory):
    """A decoder trained to compute its prompts' last 12 tokens (`train-decoder --own-tokens 12`)."""
    return random_lora_gguf(gemma_path, tmp_path_factory.mktemp("tail") / "tail.gguf", rank=8, std=0.05, seed=5,
                            targets=("attn_q", "attn_v", "ffn_up"), meta={PREFILL_KEY: "base", OWN_TOKENS_KEY: "12"})


@pytest.fixture(scope="module")
def decoders(gemma_path, adapter_files, tail_file):
    engine = Engine(gemma_path, **ENGINE)
    specs = [f"{name}={path}" for name, path in adapter_files.items()]
    with pytest.raises(InvalidParameter, match="--naive-adapters"):
        load_adapters(engine, specs[:1], naive=False)  # random adapters were not trained on base KV
    engine.adapters.close()
    load_adapters(engine, specs, naive=True)
    load_adapters(engine, [f"tail={tail_file}"], naive=False)  # NOTE: trained on base KV: no opt-in needed
    config = ServerConfig(api_key=API_KEY, model_name="gemma", max_tokens=64)
    with serving(engine, config) as running:
        yield running
    engine.close()


def test_decoders_over_one_prefill_match_from_scratch(decoders, ref, adapter_files):
    load_all(ref, adapter_files, "base")
    client = decoders.client()
    assert [m.id for m in client.models.list().data] == ["gemma", "gemma+coder", "gemma+planner", "gemma+tail"]
    barrier = threading.Barrier(len(AGENTS))
    results: dict[int, object] = {}

    def agent(i: int) -> None:
        barrier.wait()
        model, task = AGENTS[i]
        results[i] = client.chat.completions.create(model=model, messages=_messages(task), max_tokens=10,
                                                    temperature=0)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(AGENTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(AGENTS)
    for i, (model, task) in enumerate(AGENTS):
        adapter = model.partition("+")[2] or None
        expected = ref.generate(chat_prompt(ref, _messages(task)), adapter=adapter, max_tokens=10)
        assert results[i].choices[0].message.content == expected.text, model
        assert results[i].model == model
    # the document is computed once for the three decoders
    assert sum(r.usage.prompt_tokens_details.cached_tokens for r in results.values()) >= 2 * 400
    assert results[0].choices[0].message.content != results[1].choices[0].message.content


def test_unknown_decoders_and_adapter_snapshots_are_refused(decoders):
    client = decoders.client()
    with pytest.raises(openai.NotFoundError, match="gemma\\+coder"):
        client.chat.completions.create(model="gemma+nope", messages=_messages("Hi."), max_tokens=2)
    r = httpx.post(f"{decoders.base_url}/v1/snapshots", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "gemma+coder", "prompt": "x"})
    assert r.status_code == 400 and "base model's prefill" in r.json()["error"]["message"]
    ok = client.chat.completions.create(model="gemma+coder", messages=_messages("Hi."), max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_a_decoder_that_computes_its_prompt_tail_is_exact_and_billed_for_it(decoders, ref, tail_file):
    """The server prefills the base model's part of the prompt only (it stops 12 tokens short) and the
    decoder's branch computes the rest; a repeat forks that part. Both replies are the decoder's from
    scratch, and the 12 tokens count as computed, not cached."""
    if "tail" not in ref.adapters.names():
        ref.load_adapter("tail", tail_file)
    client = decoders.client()
    messages = _messages("Name the station that restarted, and when.")
    expected = ref.generate(chat_prompt(ref, messages), adapter="tail", max_tokens=8)
    first, again = (client.chat.completions.create(model="gemma+tail", messages=messages, max_tokens=8,
                                                   temperature=0) for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content == expected.text
    assert first.usage.prompt_tokens_details.cached_tokens <= first.usage.prompt_tokens - 12
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 12
