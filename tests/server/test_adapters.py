"""LoRA decoders on the server (issue 8): "model": "<id>+<adapter>" over one shared base prefill, exact."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from kvfork import Engine
from kvfork.config import ServerConfig
from kvfork.errors import InvalidParameter
from kvfork.server.cli import load_adapters
from tests.support.models import load_all
from tests.support.serving import API_KEY, ENGINE, chat_prompt, serving
from tests.support.text import long_text

DOC = long_text(30)
AGENTS = [("gemma+planner", "Plan the repair."), ("gemma+coder", "Write one shell command."),
          ("gemma", "Which valve was inspected?")]


def _messages(task: str) -> list[dict]:
    return [{"role": "user", "content": f"{DOC}\n\n{task}"}]


@pytest.fixture(scope="module")
def decoders(gemma_path, adapter_files):
    engine = Engine(gemma_path, **ENGINE)
    specs = [f"{name}={path}" for name, path in adapter_files.items()]
    with pytest.raises(InvalidParameter, match="--naive-adapters"):
        load_adapters(engine, specs[:1], naive=False)  # random adapters were not trained on base KV
    engine.adapters.close()
    load_adapters(engine, specs, naive=True)
    config = ServerConfig(api_key=API_KEY, model_name="gemma", max_tokens=64)
    with serving(engine, config) as running:
        yield running
    engine.close()


def test_decoders_over_one_prefill_match_from_scratch(decoders, ref, adapter_files):
    load_all(ref, adapter_files, "base")
    client = decoders.client()
    assert [m.id for m in client.models.list().data] == ["gemma", "gemma+coder", "gemma+planner"]
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
