"""Issue 20 with real replicas: a document prefilled on one replica, then asked on the other.

    python bench/cluster_real.py [--repeats 3] [--threads 2]

Two engine replicas of the default model on Ray Serve behind kvfork's ingress and router (this machine:
2 cores; each replica's --threads, fast mode). Per repeat, a new document (~3,500 tokens: the bundled
report with a new first line):
1. agent 1 asks about it under session s1: its replica (A) prefills the document (TTFT_1, timed by the
   client to the first streamed token); a one-token request under session s2, sent while A is busy, places
   s2 on the other replica (B);
2. once A's request is done (and, with the shared tier, its snapshot written), agent 2 asks about the same
   document under session s2, so B serves it (TTFT_2).
With `--snapshot-url` (arms "shared", fast mode, and "exact-shared", `--exact`) B restores the document from
the shared tier; without it ("none") B prefills it again.
3. the baseline (issue 16): llama.cpp's own `llama-server` (its defaults, `-np 1`, same model file and
   threads, started before the first arm and idle until asked) gets agent 2's request in the same repeat:
   a replica of a cluster that does not share prefills, seeing the document for the first time (TTFT_L).
Reported: TTFT_2 / TTFT_1 (target <= 2% with the shared tier), TTFT_2 / TTFT_L, the replicas' prefill
counters (prompt tokens computed over the distinct document tokens: amplification), and restores.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import re
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve
from servers import Server, llama_server
from workload import document, fmt, stats

from kvfork.cluster.app import APP_NAME, build_app, cluster_options, replica_options, router_options
from kvfork.cluster.replica import EngineReplica
from kvfork.models import resolve_model

QUESTIONS = ("Summarize the incident in one sentence.", "Which system failed first?")


def ask(url: str, doc: str, question: str, session: str, max_tokens: int = 16) -> tuple[float, str]:
    body = {"model": "qwen", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": doc}, {"role": "user", "content": question}]}
    t0 = time.perf_counter()
    ttft, text = None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-session-id": session},
                      timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(delta)
    assert ttft is not None, "no token came back"
    return ttft, "".join(text)


def counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.match(r'kvfork_cluster\{counter="(\w+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def run_arm(url: str, args: argparse.Namespace, shared: str | None, exact: bool, llama: Server) -> list[dict]:
    cluster_args = cluster_options(model=args.model, threads=args.threads, n_ctx=8192, snapshot_url=shared,
                                   model_name="qwen", exact=exact)
    # NOTE: the router as `kvfork serve --replicas 2` runs it (with --snapshot-url: placed by load)
    app = build_app(EngineReplica, {"options": replica_options(cluster_args)}, replicas=2, model=args.model,
                    replica_cpus=0, router_kwargs=router_options(cluster_args))
    serve.run(app, name=APP_NAME, route_prefix="/")
    rows = []
    try:
        for r in range(args.repeats):
            doc = document(f"cluster-{r}-{time.time_ns()}")
            before = counters(url)
            folder = Path(shared.removeprefix("file://")) if shared else None
            files = len(list(folder.glob("*.kvs"))) if folder and folder.exists() else 0
            with cf.ThreadPoolExecutor(2) as pool:
                first = pool.submit(ask, url, doc, QUESTIONS[0], f"s1-{r}")
                time.sleep(1.0)  # NOTE: A has the document's work by now: s2 goes to the least loaded, B
                pool.submit(ask, url, "hi", "hi", f"s2-{r}", 1).result()
                ttft1, _ = first.result()
            if folder is not None:
                deadline = time.monotonic() + 120
                while (not folder.exists() or len(list(folder.glob("*.kvs"))) <= files) \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
            ttft2, _ = ask(url, doc, QUESTIONS[1], f"s2-{r}")
            time.sleep(1.5)  # NOTE: the replicas' routing stats (polled every 0.5 s) reach /metrics
            after = counters(url)
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            ttft_l, _ = ask(llama.base_url.removesuffix("/v1"), doc, QUESTIONS[1], f"s2-{r}")
            rows.append({"repeat": r, "ttft1_s": ttft1, "ttft2_s": ttft2, "ratio": ttft2 / ttft1,
                         "ttft_llama_server_s": ttft_l, "ratio_llama_server": ttft2 / ttft_l, **delta})
            print(f"  repeat {r}: TTFT on A {ttft1:.2f} s, on B {ttft2:.3f} s ({100 * ttft2 / ttft1:.1f}%),"
                  f" llama-server {ttft_l:.2f} s ({100 * ttft2 / ttft_l:.1f}%), prefill computed"
                  f" {delta.get('prefill_computed', 0):.0f}, restores {delta.get('restores_shared', 0):.0f}",
                  flush=True)
    finally:
        serve.delete(APP_NAME)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads per replica")
    ap.add_argument("--port", type=int, default=8231)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "cluster_real.json")
    args = ap.parse_args()
    ray.init(include_dashboard=False, configure_logging=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{args.port}"
    summary: dict = {"model": args.model, "threads_per_replica": args.threads, "replicas": 2, "arms": {}}
    llama = llama_server(resolve_model(args.model), args.threads, 1, 8192,
                         log=args.out.parent / "cluster-llama-server.log").__enter__()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # NOTE: exact first: its replicas set process-wide ggml switches, best in fresh worker processes
            for arm, shared, exact in (("exact-shared", (Path(tmp) / "exact").as_uri(), True),
                                       ("shared", (Path(tmp) / "shared").as_uri(), False), ("none", None, False)):
                print(f"arm {arm}:", flush=True)
                rows = run_arm(url, args, shared, exact, llama)
                ratio = stats([row["ratio"] for row in rows])
                summary["arms"][arm] = {"rows": rows, "ratio": ratio,
                                        "ratio_llama_server": stats([row["ratio_llama_server"] for row in rows]),
                                        "ttft_a_s": stats([row["ttft1_s"] for row in rows]),
                                        "ttft_b_s": stats([row["ttft2_s"] for row in rows]),
                                        "ttft_llama_server_s": stats([row["ttft_llama_server_s"] for row in rows])}
                print(f"arm {arm}: TTFT on B / TTFT on A {fmt(ratio, '%', 100, 2)}", flush=True)
    finally:
        llama.__exit__(None, None, None)
        serve.shutdown()
        ray.shutdown()
    print("| arm | TTFT on A | TTFT on B | llama-server, cold | B / A | B / llama-server | computed per repeat |")
    print("|---|---|---|---|---|---|---|")
    for arm, a in summary["arms"].items():
        computed = [row.get("prefill_computed", 0) for row in a["rows"]]
        print(f"| {arm} | {fmt(a['ttft_a_s'], ' s')} | {fmt(a['ttft_b_s'], ' s', digits=3)}"
              f" | {fmt(a['ttft_llama_server_s'], ' s')} | {fmt(a['ratio'], '%', 100, 2)}"
              f" | {fmt(a['ratio_llama_server'], '%', 100, 2)} | {min(computed):.0f}-{max(computed):.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
