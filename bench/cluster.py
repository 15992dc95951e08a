"""Issue 20, requirement 7 (stub replicas): routing policies compared on a skewed multi-agent workload.

    python bench/cluster.py --replicas 4 8 --repeats 3 --rate-per-replica 0.3 0.6 1.0 --smg-python VENV/bin/python
    python bench/cluster.py --quick                             # R=4, 1 repeat, 12 pipelines (~2 min)

Workload (the same seeds for every arm): D documents of `--doc-tokens` distinct token ids each; pipelines
arrive as a Poisson process (`--rate-per-replica` x R pipelines/s), each picks a document with Zipf(s)
popularity and sends its N agent requests at once: the document + the agent's own `--suffix-tokens`
(unique) tokens, `max_tokens` `--max-tokens`, streamed through the ingress's /v1/completions as token ids.
Every request carries `x-session-id: <pipeline id>` in every arm (only the kvfork router reads it).

Arms, each a fresh Serve application over R StubReplicas (cluster/stub.py: it sleeps `prefill_s` per prompt
token it does not hold and `decode_s` per decode step; an LRU of `--capacity-blocks` route blocks):
round_robin, pow2 (Serve's default), ray_prefix (Ray's PrefixCacheAffinityRouter), kvfork, and kvfork +
shared (StubReplica shared_dir = a fresh folder: a prefix another replica computed is restored at 2% of its
prefill time); and smg: SMG (sglang-router, `--policy cache_aware`, its defaults) in front of the same
stubs served as plain HTTP servers (bench/stub_http.py), prompts sent as text ("t<id>" words) since its tree
matches characters (`--smg-python`: a python with sglang-router installed; the arm is skipped without one).
The Ray arms' router, and kvfork_shared's tier-aware placement, are the same code `kvfork serve --replicas`
runs (`--snapshot-url` turns the latter on).

Figures per arm (median over repeats, min-max):
- amplification = sum of the replicas' prefill_computed / (tokens of the distinct documents the run used
  + every request's suffix tokens), i.e. prompt tokens computed over the tokens of the distinct prompts' union;
- TTFT p50/p95: client side, request sent -> first streamed chunk (the stub sends it right after prefill);
- makespan p50/p95: a pipeline's first request sent -> its last agent's stream done;
- imbalance: std/mean (population) of the replicas' busy_s; restores from the shared tier; routing decisions
  by reason (kvfork router only, from the ingress's /metrics); failed requests.
Time is scaled down: real kvfork prefills ~180 tokens/s here (5.5e-3 s/token); the stub's default 2e-4 s/token
is ~28x faster, and decode_s 5e-3 s/step likewise stands for ~0.14 s/step of the 0.5B model on 2 cores.
Writes bench/out/cluster-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from servers import Server, free_port
from workload import provenance, stats

from kvfork.cluster import app as cluster_app
from kvfork.cluster.app import APP_NAME, build_app
from kvfork.cluster.stub import StubReplica

ARMS = ("round_robin", "pow2", "ray_prefix", "smg", "kvfork", "kvfork_shared")
# NOTE: `ray.serve.llm.request_router` imports vLLM or SGLang first (neither is installed here); the router
# itself lives in a module that needs neither.
RAY_PREFIX_DIRECT = ("ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router"
                     ":PrefixCacheAffinityRouter")


# -- workload ----------------------------------------------------------------------------------------------
def make_workload(args: argparse.Namespace, replicas: int, rate_per_replica: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    docs = [[rng.randrange(1000, 30000) for _ in range(args.doc_tokens)] for _ in range(args.docs)]
    weights = [1.0 / (i + 1) ** args.zipf for i in range(args.docs)]
    rate = rate_per_replica * replicas
    t, pipelines = 0.0, []
    for p in range(args.pipelines):
        t += rng.expovariate(rate)
        doc = rng.choices(range(args.docs), weights)[0]
        suffixes = [[rng.randrange(30000, 60000) for _ in range(args.suffix_tokens)] for _ in range(args.agents)]
        pipelines.append({"id": f"p{seed}-{p}", "at": t, "doc": doc, "suffixes": suffixes})
    used = sorted({p["doc"] for p in pipelines})
    distinct = len(used) * args.doc_tokens + args.pipelines * args.agents * args.suffix_tokens
    return {"docs": docs, "pipelines": pipelines, "distinct_docs": len(used), "denominator_tokens": distinct,
            "rate": rate}


# -- client ------------------------------------------------------------------------------------------------
async def agent(client: httpx.AsyncClient, url: str, prompt: list[int], session: str, max_tokens: int,
                text: bool = False) -> dict:
    # NOTE: SMG's cache-aware policy matches the prompt's characters: it gets the same tokens as "t<id>" words
    body = {"model": "stub", "prompt": " ".join(f"t{t}" for t in prompt) if text else prompt,
            "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    ttft, replica = None, None

    def failed(error: str) -> dict:
        return {"ok": False, "sent": t0, "done": time.perf_counter(), "error": error, "replica": replica}

    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers={"x-session-id": session}) as reply:
            replica = reply.headers.get("x-kvfork-replica")  # NOTE: the stubs name themselves before prefilling
            if reply.status_code != 200:
                await reply.aread()
                return failed(f"HTTP {reply.status_code}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if '"error"' in line and line != "data: [DONE]":
                    return failed(line[:200])
    except Exception as exc:  # noqa: BLE001 - counted as failed
        return failed(f"{type(exc).__name__}: {exc}")
    return {"ok": ttft is not None, "sent": t0, "done": time.perf_counter(), "ttft": ttft, "replica": replica}


async def pipeline(client: httpx.AsyncClient, url: str, wl: dict, p: dict, start: float, max_tokens: int,
                   text: bool) -> dict:
    await asyncio.sleep(max(0.0, start + p["at"] - time.perf_counter()))
    doc = wl["docs"][p["doc"]]
    results = await asyncio.gather(*(agent(client, url, doc + s, p["id"], max_tokens, text) for s in p["suffixes"]))
    for r in results:
        r["doc"] = p["doc"]
    ok = all(r["ok"] for r in results)
    first = min(r["sent"] for r in results)
    return {"id": p["id"], "ok": ok, "results": results,
            "makespan": max(r["done"] for r in results) - first if ok else None}


async def drive(url: str, wl: dict, max_tokens: int, text: bool = False) -> list[dict]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter() + 0.2
        return await asyncio.gather(*(pipeline(client, url, wl, p, start, max_tokens, text)
                                      for p in wl["pipelines"]))


# -- replicas' counters and the router's decisions ---------------------------------------------------------
def replica_counters() -> dict[str, dict[str, float]]:
    """Each live engine replica's routing stats (its counters), asked of the replica actors directly, so
    every router is measured the same way (only kvfork's router puts them on /metrics)."""
    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"] if isinstance(actor, dict) else actor
        if "SERVE_REPLICA::" in name and "kvfork-engine" in name:
            handle = ray.get_actor(name, namespace="serve")
            stats = ray.get(handle.record_routing_stats.remote(), timeout=30)
            out[name.rsplit("#", 1)[-1]] = {k: float(v) for k, v in stats.items() if k != "keys"}
    return out


def by_label(url: str, metric: str, label: str) -> dict[str, float]:
    """One metric of the ingress's /metrics, its samples by the value of `label`."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(metric + r'\{' + label + r'="([^"]+)"\} (\S+)', text)}


def decisions(url: str) -> dict[str, float]:
    return by_label(url, "kvfork_route_decisions_total", "reason")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# -- one arm -----------------------------------------------------------------------------------------------
def run_smg(replicas: int, wl: dict, args: argparse.Namespace) -> tuple[list[dict], dict[str, dict], float]:
    """SMG (sglang-router, its cache-aware policy with its defaults) in front of R stub HTTP servers
    (bench/stub_http.py: the same StubReplica as the Ray arms, as plain servers): no Ray on this path."""
    probe = subprocess.run([args.smg_python, "-c", "import sglang_router"], capture_output=True)
    if probe.returncode != 0:
        raise RuntimeError(f"{args.smg_python} has no sglang_router: pip install sglang-router (a venv of its"
                           " own is fine) and pass --smg-python that venv's python")
    ports = [free_port() for _ in range(replicas)]
    stub_argv = [sys.executable, str(Path(__file__).with_name("stub_http.py")), "--ports", *map(str, ports),
                 "--prefill-s", str(args.prefill_s), "--decode-s", str(args.decode_s),
                 "--capacity-blocks", str(args.capacity_blocks)]
    router_port = free_port()
    smg_argv = [args.smg_python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(router_port), "--policy", "cache_aware", "--log-level", "warn",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--worker-urls", *(f"http://127.0.0.1:{p}" for p in ports)]
    logs = Path(tempfile.mkdtemp(prefix="kvfork-smg-"))
    with Server("stub replicas", stub_argv, ports[0], ready_path="/health", log=logs / "stubs.log"):
        for port in ports[1:]:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).raise_for_status()
        with Server("smg", smg_argv, router_port, ready_path="/health", log=logs / "smg.log"):
            t0 = time.perf_counter()
            pipes = asyncio.run(drive(f"http://127.0.0.1:{router_port}", wl, args.max_tokens, text=True))
            wall = time.perf_counter() - t0
            counters = {str(p): httpx.get(f"http://127.0.0.1:{p}/stub/stats", timeout=30).json() for p in ports}
    return pipes, counters, wall


def run_arm(arm: str, replicas: int, wl: dict, args: argparse.Namespace, url: str) -> dict:
    if arm == "smg":
        pipes, counters, wall = run_smg(replicas, wl, args)
        return measure(pipes, counters, {}, wl, wall)
    kwargs: dict[str, Any] = {"prefill_s": args.prefill_s, "decode_s": args.decode_s,
                              "capacity_blocks": args.capacity_blocks}
    shared = None
    router_kwargs: dict[str, Any] = {}
    if arm == "kvfork_shared":
        shared = tempfile.mkdtemp(prefix="kvfork-stub-shared-")
        kwargs["shared_dir"] = shared
        router_kwargs["shared_tier"] = True  # NOTE: as `kvfork serve --replicas N --snapshot-url` sets it
    router = "kvfork" if arm.startswith("kvfork") else arm
    if router == "kvfork":
        router_kwargs.update(json.loads(args.router_kwargs))
    app = build_app(StubReplica, kwargs, replicas=replicas, model=args.model, router=router,
                    router_kwargs=router_kwargs, replica_cpus=0)
    serve.run(app, name=APP_NAME, route_prefix="/")
    killer = Killer(url, args.kill_at) if args.kill_at is not None else None
    try:
        t0 = time.perf_counter()
        if killer is not None:
            killer.start()
        pipes = asyncio.run(drive(url, wl, args.max_tokens))
        wall = time.perf_counter() - t0
        if killer is not None:
            killer.join()
        counters = replica_counters()
        reasons = decisions(url) if router == "kvfork" else {}
    finally:
        serve.delete(APP_NAME)
        if shared:
            shutil.rmtree(shared, ignore_errors=True)
    out = measure(pipes, counters, reasons, wl, wall)
    if killer is not None:
        out["kill"] = killer.outcome(pipes)
    return out


class Killer(threading.Thread):
    """Kills the engine replica with the most work routed to it, `at` seconds into the run (the failure
    target: only requests in flight on it are lost, each answered with an error within 5 s)."""

    def __init__(self, url: str, at: float) -> None:
        super().__init__(daemon=True)
        self.url, self.at = url, at
        self.victim: str | None = None
        self.killed_at: float | None = None

    def run(self) -> None:
        time.sleep(self.at)
        work = by_label(self.url, "kvfork_replica_work_tokens", "replica")
        if not work:
            return
        self.victim = max(work, key=work.__getitem__)
        self.killed_at = time.perf_counter()
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#kvfork-engine#{self.victim}", namespace="serve"),
                 no_restart=True)

    def outcome(self, pipes: list[dict]) -> dict:
        results = [r for p in pipes for r in p["results"]]
        if self.killed_at is None:
            return {"victim": None}
        killed_at = self.killed_at
        on_victim = {id(r) for r in results if r.get("replica") == self.victim and r["sent"] < killed_at < r["done"]}
        failed = [r for r in results if not r["ok"]]
        lost = [r for r in failed if id(r) in on_victim]
        return {
            "victim": self.victim, "killed_at_s": self.at, "in_flight_on_victim": len(on_victim),
            "failed": len(failed), "failed_in_flight_on_victim": len(lost), "failed_elsewhere": len(failed) - len(lost),
            "error_after_kill_max_s": max((r["done"] - killed_at for r in lost), default=None),
            "ok_after_kill": sum(1 for r in results if r["ok"] and r["sent"] > self.killed_at),
        }


def measure(pipes: list[dict], counters: dict[str, dict], reasons: dict[str, float], wl: dict, wall: float) -> dict:
    results = [r for p in pipes for r in p["results"]]
    ttfts = [r["ttft"] for r in results if r["ok"]]
    spans = [p["makespan"] for p in pipes if p["ok"]]
    busy = [c.get("busy_s", 0.0) for c in counters.values()]
    computed = sum(c.get("prefill_computed", 0.0) for c in counters.values())
    errors = [r["error"] for r in results if not r["ok"]]
    t_first = min((r["sent"] for r in results), default=0.0)
    return {
        "amplification": computed / wl["denominator_tokens"], "prefill_computed": computed,
        "prefill_reused": sum(c.get("prefill_reused", 0.0) for c in counters.values()),
        "ttft_p50": pct(ttfts, 0.5) if ttfts else None, "ttft_p95": pct(ttfts, 0.95) if ttfts else None,
        "makespan_p50": pct(spans, 0.5) if spans else None, "makespan_p95": pct(spans, 0.95) if spans else None,
        "imbalance": statistics.pstdev(busy) / statistics.mean(busy) if busy and statistics.mean(busy) else None,
        "busy_s": busy, "restores_shared": sum(c.get("restores_shared", 0.0) for c in counters.values()),
        "decisions": reasons, "failed": len(errors), "errors": errors[:5], "requests": len(results),
        "replicas_reporting": len(counters), "wall_s": wall,
        # NOTE: every request, for looking into a tail: document, replica (stubs name it), sent, TTFT
        "requests_log": [{"doc": r["doc"], "replica": r.get("replica"), "sent": round(r["sent"] - t_first, 4),
                          "ttft": r.get("ttft"), "ok": r["ok"]} for r in results],
    }


# -- summary -----------------------------------------------------------------------------------------------
FIGS = ("amplification", "ttft_p50", "ttft_p95", "makespan_p50", "makespan_p95", "imbalance", "restores_shared",
        "failed")


def summarize(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for fig in FIGS:
        values = [r[fig] for r in runs if r.get(fig) is not None]
        if values:
            out[fig] = stats(values)
    reasons: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r["decisions"].items():
            reasons.setdefault(k, []).append(v)
    out["decisions"] = {k: statistics.median(v) for k, v in reasons.items()}
    return out


def cell(s: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def markdown(summary: dict) -> str:
    lines = []
    for label, arms in summary["results"].items():
        lines += [f"\n### {label}\n",
                  "| arm | amplification | TTFT p50 (ms) | TTFT p95 (ms) | makespan p50 (s) | makespan p95 (s) |"
                  " imbalance | restores | decisions | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, s in arms.items():
            if "skipped" in s:
                lines.append(f"| {arm} | skipped: {s['skipped']} |||||||||")
                continue
            dec = ", ".join(f"{k} {v:.0f}" for k, v in sorted(s["decisions"].items()) if v) or "-"
            lines.append(f"| {arm} | {cell(s.get('amplification'))} | {cell(s.get('ttft_p50'), 0, 1e3)} |"
                         f" {cell(s.get('ttft_p95'), 0, 1e3)} | {cell(s.get('makespan_p50'))} |"
                         f" {cell(s.get('makespan_p95'))} | {cell(s.get('imbalance'))} |"
                         f" {cell(s.get('restores_shared'), 0)} | {dec} | {cell(s.get('failed'), 0)} |")
        lines += targets(arms)
    for label, arms in summary["runs"].items():
        for arm, runs in arms.items():
            for k, run in enumerate(runs):
                if run.get("kill", {}).get("victim"):
                    kill = run["kill"]
                    worst = kill["error_after_kill_max_s"]
                    lines.append(
                        f"- {label}, {arm}, repeat {k}: killed the busiest replica at {kill['killed_at_s']:g} s;"
                        f" {kill['in_flight_on_victim']} requests were in flight on it, {kill['failed']} failed"
                        f" ({kill['failed_in_flight_on_victim']} of those in flight on it, {kill['failed_elsewhere']}"
                        f" elsewhere), the last error {'-' if worst is None else f'{worst:.2f} s'} after the kill;"
                        f" {kill['ok_after_kill']} requests sent after it succeeded")
    return "\n".join(lines) + "\n"


def targets(arms: dict) -> list[str]:
    rr, ks = arms.get("round_robin", {}), arms.get("kvfork_shared", {})
    if "amplification" not in rr or "amplification" not in ks:
        return []

    def med(s: dict, k: str) -> float:
        return float(s[k]["median"])

    out = ["", "Targets (kvfork + shared vs round_robin, medians):"]
    amp = med(ks, "amplification")
    out.append(f"- amplification {amp:.2f} (target <= 1.1: {'met' if amp <= 1.1 else 'NOT met'});"
               f" round_robin {med(rr, 'amplification'):.2f}")
    for fig in ("ttft_p95", "makespan_p95"):
        ratio = med(rr, fig) / med(ks, fig)
        out.append(f"- {fig}: {ratio:.2f}x better than round_robin (target >= 2x:"
                   f" {'met' if ratio >= 2 else 'NOT met'})")
    ki, ri = med(ks, "imbalance"), med(rr, "imbalance")
    verdict = "met" if ki <= 1.3 * ri else "NOT met"
    note = " (round_robin's is ~0: it sends every replica the same requests)" if ri < 0.05 else ""
    out.append(f"- imbalance {ki:.2f} vs round_robin {ri:.2f}{note} (target <= 1.3x round_robin's: {verdict})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--docs", type=int, default=16, help="D distinct documents")
    ap.add_argument("--doc-tokens", type=int, default=3500)
    ap.add_argument("--agents", type=int, default=4, help="N agents per pipeline")
    ap.add_argument("--suffix-tokens", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--zipf", type=float, default=1.1, help="document popularity skew s")
    ap.add_argument("--pipelines", type=int, default=32, help="pipelines per run")
    ap.add_argument("--rate-per-replica", type=float, nargs="+", default=[0.3],
                    help="pipelines/s per replica (Poisson); several: a load sweep, each its own table")
    ap.add_argument("--prefill-s", type=float, default=2e-4, help="stub seconds per prompt token computed")
    ap.add_argument("--decode-s", type=float, default=5e-3, help="stub seconds per decode step")
    ap.add_argument("--capacity-blocks", type=int, default=1024,
                    help="each replica's LRU of 32-token route blocks (1024 = ~9 documents)")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--model", default="gemma3-270m", help="the ingress's vocabulary (prompts are token ids)")
    ap.add_argument("--router-kwargs", default="{}", metavar="JSON",
                    help="kvfork arms: RouterConfig fields, e.g. '{\"balance_tokens\": 512}'")
    ap.add_argument("--kill-at", type=float, default=None, metavar="S",
                    help="kvfork arms: kill the replica with the most work S seconds into each run and report"
                         " what was lost (requests in flight on it vs elsewhere, seconds to their errors)")
    ap.add_argument("--smg-python", default=sys.executable,
                    help="a python with sglang-router installed (SMG), for the smg arm")
    ap.add_argument("--quick", action="store_true", help="R=4, 1 repeat, 12 pipelines")
    ap.add_argument("--tag", default=None, help="output name: bench/out/cluster-<tag>.json/.md")
    args = ap.parse_args()
    if args.quick:
        args.replicas, args.repeats, args.pipelines = [4], 1, 12
    tag = args.tag or ("quick" if args.quick else "stub")
    settings = {k: v for k, v in vars(args).items() if k not in ("tag",)}
    print("settings:", json.dumps(settings), flush=True)

    try:
        importlib.import_module("ray.serve.llm.request_router")
    except ImportError as exc:
        print(f"ray_prefix: {ROUTER_NOTE}: {str(exc).splitlines()[0][:120]}", flush=True)
        cluster_app.ROUTERS["ray_prefix"] = RAY_PREFIX_DIRECT

    ray.init(num_cpus=max(args.replicas) + 4, include_dashboard=False, configure_logging=False,
             logging_level=logging.ERROR, log_to_driver=False)
    for name in ("httpx", "ray", "ray.serve"):  # NOTE: one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    summary: dict[str, Any] = {"settings": settings, "provenance": provenance(), "results": {}, "runs": {}}
    try:
        for r, rate in [(r, rate) for r in args.replicas for rate in args.rate_per_replica]:
            label = f"R = {r} stub replicas, {rate:g} pipelines/s per replica"
            summary["results"][label], summary["runs"][label] = {}, {}
            workloads = [make_workload(args, r, rate, args.seed + k) for k in range(args.repeats)]
            for k, wl in enumerate(workloads):
                print(f"R={r} repeat {k}: {args.pipelines} pipelines at {wl['rate']:.2f}/s over"
                      f" {wl['distinct_docs']} distinct documents; denominator {wl['denominator_tokens']} tokens",
                      flush=True)
            for arm in args.arms:
                runs = []
                for k, wl in enumerate(workloads):
                    try:
                        run = run_arm(arm, r, wl, args, url)
                    except Exception as exc:  # noqa: BLE001 - an arm that cannot start is reported, not hidden
                        print(f"  {arm}: failed to run: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        summary["results"][label][arm] = {"skipped": f"{type(exc).__name__}: {str(exc)[:120]}"}
                        break
                    runs.append(run)
                    print(f"  R={r} {arm} #{k}: amp {run['amplification']:.2f}, TTFT p95"
                          f" {1e3 * (run['ttft_p95'] or 0):.0f} ms, makespan p95 {run['makespan_p95'] or 0:.2f} s,"
                          f" imbalance {run['imbalance'] or 0:.2f}, restores {run['restores_shared']:.0f},"
                          f" failed {run['failed']}, {run['decisions'] or ''} ({run['wall_s']:.1f} s)", flush=True)
                    if "kill" in run:
                        print(f"    killed: {json.dumps(run['kill'])}", flush=True)
                if runs:
                    summary["runs"][label][arm] = runs
                    summary["results"][label][arm] = summarize(runs)
    finally:
        serve.shutdown()
        ray.shutdown()
    md = markdown(summary)
    head = (f"Stub replicas; settings: {json.dumps(settings)}\n\nDenominator of amplification: tokens of the"
            " distinct documents a run used + every request's suffix tokens. Median over repeats (min-max).\n"
            "smg: SMG (sglang-router) with its cache-aware policy and defaults, in front of the same stubs as"
            " plain HTTP servers (bench/stub_http.py), prompts as text; no Ray on its path.\n")
    out = Path(__file__).parent / "out" / f"cluster-{tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    out.with_suffix(".md").write_text(head + md)
    print(head + md)


ROUTER_NOTE = "ray.serve.llm.request_router needs vLLM or SGLang; using the router's own module"

if __name__ == "__main__":
    main()
