"""Prefill once per cluster: a prefix one server computed is restored by another through the shared tier."""

from __future__ import annotations

import pytest

from kvfork import Engine
from kvfork.config import ServerConfig
from kvfork.server.dispatch import PUBLISH_MIN_TOKENS
from kvfork.store.store import SnapshotStore
from tests.support.serving import API_KEY, serving

REPORT = "Line 3's pump tripped at 04:10 after a pressure spike; the operator restarted it twice. " * 30


def ask(running, question: str, report: str = REPORT):
    return running.client().chat.completions.create(
        model="qwen", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": report}, {"role": "user", "content": question}])


@pytest.mark.timeout(300)
def test_a_prefix_computed_by_one_replica_is_restored_by_another(qwen_path, tmp_path):
    # NOTE: the default model: a stored prompt is restored up to where another prompt leaves it (trimmed);
    # gemma 3's sliding window forbids that trim, so there only the same prompt again would be restored.
    url = (tmp_path / "shared").as_uri()
    stores = [SnapshotStore(None, url=url, shared_refresh_s=0.0) for _ in range(2)]
    # NOTE: room for about two such prompts: the third document B restores must evict to fit
    engines = [Engine(qwen_path, store=store, n_ctx=1600, n_seq_max=8, progress=False) for store in stores]
    config = ServerConfig(api_key=API_KEY, model_name="qwen")
    try:
        with serving(engines[0], config) as first, serving(engines[1], config) as second:
            a = ask(first, "What tripped?")
            assert a.usage.prompt_tokens > PUBLISH_MIN_TOKENS
            assert stores[0].flush(30)
            assert stores[0].stats().writes_shared == 1  # written once prefilled, not only when evicted
            b = ask(second, "When did it trip?")
            assert stores[1].stats().hits_shared == 1
            assert b.usage.prompt_tokens_details.cached_tokens > PUBLISH_MIN_TOKENS
            assert b.choices[0].message.content
            for i in (2, 3):  # NOTE: a restore makes room as a prefill does (it used to prefill instead)
                report = f"Shift {i} report.\n" + REPORT
                ask(first, "What tripped?", report)
                assert stores[0].flush(30)
                again = ask(second, "When did it trip?", report)
                assert again.usage.prompt_tokens_details.cached_tokens > PUBLISH_MIN_TOKENS
            assert stores[1].stats().hits_shared == 3
    finally:
        for engine in engines:
            engine.close()
        for store in stores:
            store.close()
