"""A real engine replica (gemma) behind the cluster ingress answers as `kvfork serve` does."""

from __future__ import annotations

import httpx
import openai
import pytest

pytest.importorskip("ray")

from ray import serve  # noqa: E402

from kvfork import Engine  # noqa: E402
from kvfork.cluster.app import APP_NAME, run_cluster  # noqa: E402
from kvfork.config import ServerConfig  # noqa: E402
from tests.support.serving import API_KEY, ENGINE, serving  # noqa: E402

REPORT = "The pump on line 3 tripped at 04:10 after a pressure spike; the operator restarted it twice. " * 12


def ask(client: openai.OpenAI, question: str, **kw: object):
    return client.chat.completions.create(
        model="gemma", max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": REPORT}, {"role": "user", "content": question}], **kw)


@pytest.fixture(scope="module")
def both(ray_serve, gemma_path):
    """The cluster (1 replica) and a plain server, with the same engine and server settings."""
    settings = {k: v for k, v in ENGINE.items() if k not in ("n_batch", "n_ubatch")}
    run_cluster(1, model=str(gemma_path), blocking=False, api_key=API_KEY, model_name="gemma", threads=1,
                batch=ENGINE["n_batch"], **settings)
    engine = Engine(gemma_path, n_threads=1, **ENGINE)
    try:
        with serving(engine, ServerConfig(api_key=API_KEY, model_name="gemma")) as plain:
            yield (openai.OpenAI(base_url=f"{ray_serve}/v1", api_key=API_KEY, max_retries=0),
                   plain.client(), ray_serve)
    finally:
        serve.delete(APP_NAME)
        engine.close()


@pytest.mark.timeout(300)
def test_one_replica_answers_as_kvfork_serve_does(both):
    cluster, plain, url = both
    first = ask(cluster, "What tripped?")
    assert first.choices[0].message.content == ask(plain, "What tripped?").choices[0].message.content
    assert first.usage.prompt_tokens > 200
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(cluster, "What tripped?", stream=True)
                       if c.choices)
    assert streamed == first.choices[0].message.content
    # NOTE: a second agent's prompt forks the report held in the replica's prefix cache
    second = ask(cluster, "When did it trip?")
    assert second.usage.prompt_tokens_details.cached_tokens > 200
    assert [m.id for m in cluster.models.list().data] == ["gemma"]
    refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "gemma", "messages": []},
                         headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401
