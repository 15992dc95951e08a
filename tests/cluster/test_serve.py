"""The cluster on Ray Serve with stub replicas: coalescing, sessions, metrics, a replica killed under load."""

from __future__ import annotations

import concurrent.futures as cf
import re
import time

import httpx
import pytest

pytest.importorskip("ray")

from ray import serve  # noqa: E402

from kvfork.cluster.app import APP_NAME, build_app  # noqa: E402
from kvfork.cluster.stub import StubReplica  # noqa: E402

DOC_A = list(range(1000, 1000 + 960))
DOC_B = list(range(3000, 3000 + 960))


@pytest.fixture()
def cluster(ray_serve):
    def start(replicas: int = 2, router_kwargs: dict | None = None, **stub: object) -> str:
        app = build_app(StubReplica, {"prefill_s": 1e-4, "decode_s": 0.01, **stub}, replicas=replicas,
                        model="gemma3-270m", replica_cpus=0, router_kwargs=router_kwargs)
        serve.run(app, name=APP_NAME, route_prefix="/")
        return ray_serve

    yield start
    serve.delete(APP_NAME)


def complete(url: str, prompt: list[int], *, session: str | None = None, max_tokens: int = 4,
             stream: bool = False, timeout: float = 30) -> httpx.Response:
    headers = {"x-session-id": session} if session else {}
    return httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                                                     "stream": stream}, headers=headers, timeout=timeout)


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.match(r"^(kvfork_\w+(?:\{[^}]*\})?) ([-+\d.e]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def per_replica(m: dict[str, float], counter: str) -> dict[str, float]:
    pat = re.compile(r'kvfork_replica\{counter="' + re.escape(counter) + r'",replica="(\w+)"\}')
    return {pat.match(k).group(1): v for k, v in m.items() if pat.match(k)}


def settled(url: str, counter: str, total: float, timeout: float = 10) -> dict[str, float]:
    """Per-replica values of `counter` once the replicas' routing stats add up to `total`."""
    deadline = time.monotonic() + timeout
    while True:
        values = per_replica(metrics(url), counter)
        if sum(values.values()) >= total or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_agents_of_one_document_meet_on_one_replica_and_it_is_counted(cluster):
    url = cluster(replicas=2)
    with cf.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: complete(url, DOC_A + [i] * 40), range(8)))
    assert all(r.status_code == 200 for r in replies)
    requests = settled(url, "requests", 8)
    assert sorted(requests.values()) == [0.0, 8.0]  # all eight on one replica
    computed = sum(settled(url, "prefill_computed", 960 + 8 * 40).values())
    assert computed == 960 + 8 * 40  # the document once, each agent's own part
    m = metrics(url)
    assert m['kvfork_route_decisions_total{reason="coalesced"}'] + m.get(
        'kvfork_route_decisions_total{reason="prefix"}', 0) == 7
    assert m['kvfork_route_decisions_total{reason="fallback"}'] == 1
    assert m['kvfork_cluster{counter="requests"}'] == 8


@pytest.mark.timeout(120)
def test_a_session_keeps_a_pipeline_on_one_replica(cluster):
    url = cluster(replicas=3)
    served = set()
    for i, doc in enumerate([DOC_A, DOC_B, DOC_A[:500] + DOC_B[:460]]):
        reply = complete(url, doc + [i] * 10, session="pipeline-1")
        assert reply.status_code == 200
        served.add(reply.headers["x-kvfork-replica"])  # NOTE: the stub names the replica that served it
    requests = settled(url, "requests", 3)
    assert sorted(requests.values()) == [0.0, 0.0, 3.0]
    assert served == {r for r, n in requests.items() if n == 3.0}
    assert metrics(url)['kvfork_route_decisions_total{reason="session"}'] >= 2


def test_kvfork_serve_with_a_shared_tier_places_by_load():
    from kvfork.cluster.app import cluster_options, router_options

    assert router_options(cluster_options()) == {}
    assert router_options(cluster_options(snapshot_url="file:///shared", spill_tokens=5)) == {
        "shared_tier": True, "spill_tokens": 5}


@pytest.mark.timeout(120)
def test_with_a_shared_tier_a_finished_document_is_restored_on_an_idle_replica(cluster, tmp_path):
    url = cluster(replicas=2, shared_dir=str(tmp_path), router_kwargs={"shared_tier": True})
    first = complete(url, DOC_A + [0] * 40, session="pipeline-0")
    assert first.status_code == 200
    # the first replica holds the document, but has had all the work: the second restores it from the tier
    second = complete(url, DOC_A + [1] * 40, session="pipeline-1")
    assert second.status_code == 200
    assert first.headers["x-kvfork-replica"] != second.headers["x-kvfork-replica"]
    assert sorted(settled(url, "requests", 2).values()) == [1.0, 1.0]
    assert sum(settled(url, "prefill_computed", 960 + 2 * 40).values()) == 960 + 2 * 40  # the document once
    assert sum(per_replica(metrics(url), "restores_shared").values()) == 1
    assert metrics(url)['kvfork_route_decisions_total{reason="restored"}'] == 1


@pytest.mark.timeout(180)
def test_killing_a_replica_costs_only_its_in_flight_requests(cluster):
    import ray

    url = cluster(replicas=2, decode_s=0.05)  # 60 tokens: ~3 s per request
    with cf.ThreadPoolExecutor(8) as pool:
        # NOTE: sessions place the doomed and the surviving requests on different replicas
        doomed = [pool.submit(complete, url, DOC_A + [i] * 8, session="doomed", max_tokens=60, stream=True)
                  for i in range(3)]
        time.sleep(0.5)
        # NOTE: less work than the doomed ones (a short prompt), so the victim below is told apart by its work
        safe = [pool.submit(complete, url, DOC_B[:128] + [i] * 8, session="safe", max_tokens=20) for i in range(3)]
        time.sleep(1.0)
        work = {k: v for k, v in metrics(url).items() if k.startswith("kvfork_replica_work_tokens")}
        victim = max(work, key=work.get).split('"')[1]  # the doomed requests were routed first
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#kvfork-engine#{victim}", namespace="serve"),
                 no_restart=True)
        for f in doomed:
            reply = f.result()
            assert time.monotonic() - killed_at < 5.0  # answered with an error, not left hanging
            assert reply.status_code == 503 or '"replica_unavailable"' in reply.text
            assert reply.headers.get("x-kvfork-replica", victim) == victim  # NOTE: absent on a 503
        assert all(f.result().status_code == 200 for f in safe)
    # NOTE: the router stopped sending to the dead replica at once; Serve brings the deployment back to 2
    for i in range(4):
        assert complete(url, DOC_A + [i] * 8, session="doomed").status_code == 200
    deadline = time.monotonic() + 60
    while metrics(url).get("kvfork_cluster_replicas") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metrics(url)["kvfork_cluster_replicas"] == 2
    assert victim not in per_replica(metrics(url), "requests")
