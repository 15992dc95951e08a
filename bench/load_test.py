"""Issue 6: a load test of `kvfork serve` on loopback: C concurrent clients for S seconds, a mix of
what agent frameworks send, ending with zero failed or lost requests and memory within budgets.

    python bench/load_test.py [--clients 32] [--seconds 300]

Each client loops until the time is up, picking at random (seeded per client):
  chat over one of 3 shared documents (n = 1 or 2, greedy or sampled with a seed), not streamed;
  the same, streamed (the official openai client reads every chunk);
  a plain completion of a short prompt of its own (nothing to share);
  the snapshot extension: create a snapshot of a document, complete from it, delete it;
  a planned disconnect: a stream dropped after its first chunks (the server must free its branches);
  a bad request (unknown model; n above the cap) that must get the right OpenAI-style error.
A request fails if it raises, times out, or its answer is malformed; every request sent is counted
when it returns, so a lost request shows up as sent - returned. A monitor samples the server's
resident memory and /metrics every 2 s: KV cells held against the context, store bytes per tier
against the configured budgets, and the resident set against a budget of (resident after warm-up +
the store's RAM budget + 256 MiB for the Python heap). Writes bench/out/load_test.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
from servers import kvfork_server
from workload import INSTRUCTIONS, SYSTEM, provenance, report, stats

from kvfork.models import resolve_model

HEAP_MIB = 256
ROLES = [SYSTEM, "You are a site reliability engineer reviewing an incident.",
         "You are a security auditor; answer tersely.", "You are a project manager writing for executives."]


def documents() -> list[str]:
    text = report()
    return [text[:2400], text[2400:6400], text[6400:12400]]  # ~600, ~1,000, ~1,500 tokens


class Client(threading.Thread):
    def __init__(self, index: int, base_url: str, deadline: float, docs: list[str], roles: bool = False) -> None:
        super().__init__(daemon=True)
        self.rng = random.Random(index)
        self.api = openai.OpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0)
        self.http = httpx.Client(base_url=base_url, timeout=600)
        self.deadline, self.docs, self.index, self.roles = deadline, docs, index, roles
        self.sent = 0
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.latency: dict[str, list[float]] = {}

    def messages(self) -> list[dict]:
        doc = self.rng.choice(self.docs)
        if self.roles:  # NOTE: --reuse: agents with their own system prompts, the document a message of its own
            return [{"role": "system", "content": self.rng.choice(ROLES)}, {"role": "user", "content": doc},
                    {"role": "user", "content": self.rng.choice(INSTRUCTIONS)}]
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{doc}\n\n{self.rng.choice(INSTRUCTIONS)}"}]

    def sampling(self) -> dict:
        if self.rng.random() < 0.5:
            return {"temperature": 0}
        return {"temperature": 0.7, "top_p": 0.9, "seed": self.rng.randrange(2**31)}

    def run(self) -> None:
        kinds = ["chat", "chat", "stream", "stream", "completion", "snapshot", "disconnect", "bad"]
        while time.monotonic() < self.deadline:
            kind = self.rng.choice(kinds)
            self.sent += 1
            t0 = time.perf_counter()
            try:
                getattr(self, f"do_{kind}")()
                self.outcomes[kind] += 1
                self.latency.setdefault(kind, []).append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                self.outcomes["failed"] += 1
                self.failures.append(f"client {self.index} {kind}: {type(e).__name__}: {e}"[:300])

    def do_chat(self) -> None:
        n = self.rng.choice([1, 1, 2])
        r = self.api.chat.completions.create(model="model", messages=self.messages(), n=n,
                                             max_tokens=self.rng.randint(8, 32), **self.sampling())
        check(len(r.choices) == n and all(c.message.content is not None and c.finish_reason for c in r.choices)
              and r.usage.completion_tokens >= 1, f"malformed chat answer {r}")

    def do_stream(self) -> None:
        stream = self.api.chat.completions.create(model="model", messages=self.messages(), stream=True,
                                                  max_tokens=self.rng.randint(8, 32),
                                                  stream_options={"include_usage": True}, **self.sampling())
        finish, usage = None, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        check(finish is not None and usage is not None, f"stream ended without finish/usage ({finish}, {usage})")

    def do_completion(self) -> None:
        r = self.api.completions.create(model="model", prompt=f"Client {self.index} note {self.sent}: the",
                                        max_tokens=self.rng.randint(4, 16), **self.sampling())
        check(len(r.choices) == 1 and r.choices[0].finish_reason is not None, f"malformed completion {r}")

    def do_snapshot(self) -> None:
        messages = self.messages()[:1] + [{"role": "user", "content": self.rng.choice(self.docs)}]
        made = self.http.post("/snapshots", json={"model": "model", "messages": messages})
        check(made.status_code == 201, f"snapshot create: {made.status_code} {made.text[:200]}")
        sid = made.json()["id"]
        r = self.api.chat.completions.create(model="model", max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": "Summarize it in one line."}],
                                             extra_body={"snapshot_id": sid})
        check(r.choices[0].message.content is not None, "no answer from a snapshot")
        gone = self.http.delete(f"/snapshots/{sid}")
        check(gone.status_code == 200, f"snapshot delete: {gone.status_code}")

    def do_disconnect(self) -> None:
        with self.http.stream("POST", "/chat/completions", json={
                "model": "model", "messages": self.messages(), "max_tokens": 64, "stream": True}) as r:
            check(r.status_code == 200, f"stream status {r.status_code}")
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break  # NOTE: closing the response here hangs up on the server mid-generation

    def do_bad(self) -> None:
        try:
            self.api.chat.completions.create(model="no-such-model", messages=self.messages(), max_tokens=4)
            raise AssertionError("an unknown model was accepted")
        except openai.NotFoundError:
            pass
        try:
            self.api.chat.completions.create(model="model", messages=self.messages(), max_tokens=4, n=99)
            raise AssertionError("n=99 was accepted")
        except openai.BadRequestError:
            pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def metric(text: str, name: str, label: str) -> float:
    m = re.search(rf'^{name}{{[^}}]*="{label}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store-ram-mb", type=int, default=48)
    ap.add_argument("--store-disk-mb", type=int, default=96)
    ap.add_argument("--reuse", choices=["shift", "kvcomm", "blend"], default=None,
                    help="serve with this reuse mode; clients then use 4 system prompts over the documents")
    ap.add_argument("--reuse-cache-mb", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench/out/load_test.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    store = tempfile.mkdtemp(prefix="kvfork-load-")
    extra = ["--store", store, "--store-ram-mb", str(args.store_ram_mb), "--store-disk-mb", str(args.store_disk_mb),
             "--max-queued", str(2 * args.clients), "--n-seq-max", "96"]
    if args.reuse:
        extra += ["--reuse", args.reuse, "--reuse-cache-mb", str(args.reuse_cache_mb)]
    docs = documents()
    with kvfork_server(str(resolve_model(args.model)), args.threads, 8192, extra=extra,
                       log=args.out.with_suffix(".log")) as server:
        metrics_url = server.base_url.removesuffix("/v1") + "/metrics"
        warm = Client(-1, server.base_url, 0, docs)
        warm.do_chat()
        rss0 = server.memory()[0]
        rss_budget = rss0 + (args.store_ram_mb << 20) + (HEAP_MIB << 20) + ((args.reuse_cache_mb << 20)
                                                                           if args.reuse else 0)
        samples: list[dict] = []
        clients = [Client(i, server.base_url, time.monotonic() + args.seconds, docs, args.reuse is not None)
                   for i in range(args.clients)]
        t0 = time.monotonic()
        for c in clients:
            c.start()
        while any(c.is_alive() for c in clients):
            text = httpx.get(metrics_url, timeout=30).text
            samples.append({"t": time.monotonic() - t0, "rss": server.memory()[0],
                            "cells": metric(text, "kvfork_kv_cells", "reserved"),
                            "cells_total": metric(text, "kvfork_kv_cells", "total"),
                            "store_ram": metric(text, "kvfork_store_bytes", "ram"),
                            "store_disk": metric(text, "kvfork_store_bytes", "disk")})
            time.sleep(2)
        for c in clients:
            c.join()
        wall = time.monotonic() - t0
        health = httpx.get(server.base_url.removesuffix("/v1") + "/health", timeout=30).status_code
        after = Client(-2, server.base_url, 0, docs)
        after.do_chat()  # the server still answers after the storm
        final_metrics = httpx.get(metrics_url, timeout=30).text
        peak = server.memory()[1]
    outcomes = sum((c.outcomes for c in clients), Counter())
    sent = sum(c.sent for c in clients)
    returned = sum(outcomes.values())
    latency = {k: stats(v) for k, v in
               ((k, [x for c in clients for x in c.latency.get(k, [])]) for k in
                ("chat", "stream", "completion", "snapshot", "disconnect", "bad")) if v}
    over = {"cells": max(s["cells"] - s["cells_total"] for s in samples),
            "store_ram": max(s["store_ram"] for s in samples) - (args.store_ram_mb << 20),
            "store_disk": max(s["store_disk"] for s in samples) - (args.store_disk_mb << 20),
            "rss": max(s["rss"] for s in samples) - rss_budget}
    result = {"provenance": provenance(), "clients": args.clients, "seconds": args.seconds, "wall_s": wall,
              "sent": sent, "returned": returned, "lost": sent - returned, "failed": outcomes["failed"],
              "outcomes": dict(outcomes), "failures": [f for c in clients for f in c.failures][:50],
              "latency_s": latency, "health_after": health, "rss_after_warmup": rss0, "rss_budget": rss_budget,
              "rss_peak_vmhwm": peak, "over_budget_bytes": over, "samples": samples,
              "requests_metric": re.findall(r"^kvfork_requests_total\{.*$", final_metrics, re.M),
              "prefill_metric": re.findall(r"^kvfork_prefill_tokens_\w+_total .*$", final_metrics, re.M),
              "reuse": args.reuse,
              "reuse_metric": re.findall(r"^kvfork_reuse_segments_total\{.*$", final_metrics, re.M)}
    ok = result["lost"] == 0 and result["failed"] == 0 and health == 200 and all(v <= 0 for v in over.values())
    result["passed"] = ok
    md = [f"| {args.clients} clients, {wall:.0f} s{f', --reuse {args.reuse}' if args.reuse else ''} | |", "|---|---|",
          f"| requests sent / returned / failed | {sent} / {returned} / {outcomes['failed']} |",
          f"| by kind | {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))} |",
          f"| peak KV cells held / context | {max(s['cells'] for s in samples):.0f} /"
          f" {samples[0]['cells_total']:.0f} |",
          f"| peak store bytes RAM / budget | {max(s['store_ram'] for s in samples) / 1e6:.1f} MB /"
          f" {(args.store_ram_mb << 20) / 1e6:.1f} MB |",
          f"| peak store bytes disk / budget | {max(s['store_disk'] for s in samples) / 1e6:.1f} MB /"
          f" {(args.store_disk_mb << 20) / 1e6:.1f} MB |",
          f"| resident memory after warm-up / peak sampled / budget | {rss0 / 1e6:.0f} MB /"
          f" {max(s['rss'] for s in samples) / 1e6:.0f} MB / {rss_budget / 1e6:.0f} MB |",
          *(f"| latency {k} (median, min-max) | {v['median']:.1f} s ({v['min']:.1f}-{v['max']:.1f}), n={v['n']} |"
            for k, v in latency.items()),
          *([f"| prefill tokens | {'; '.join(result['prefill_metric'])} |",
              f"| reuse segments | {'; '.join(result['reuse_metric'])} |"] if args.reuse else []),
          f"| passed | {ok} |"]
    result["table"] = "\n".join(md)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(result["table"] + "\n")
    print(result["table"])
    for f in result["failures"][:10]:
        print("FAILURE:", f)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
