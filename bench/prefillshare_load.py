"""Issue 21, requirement 3: a load benchmark in the PrefillShare paper's shape, through `kvfork serve` with
`+adapter` model ids, against llama.cpp's own server with the same LoRA adapters loaded.

    python bench/prefillshare_load.py --adapters bench/out/prefillshare/adapters     # the full run
    python bench/prefillshare_load.py --random-adapters                              # no trained decoders yet
    python bench/prefillshare_load.py --quick --random-adapters                      # smoke check, < 1 min

The workload. A *session* is one agent workflow over one shared prompt: a short synthetic business note
(`prefillshare_tasks.make_note`, ~250 tokens, a new one per session), read by three decoders one after
another, each its own LoRA decoder and its own checkable instruction: extract -> arith -> tool (the issue's
planner -> worker -> checker). A session's requests are sequential (a stage starts when the previous one
has answered); every request is `[system, user: note + "\\n\\n" + instruction]`, greedy, streamed, the same
max_tokens everywhere. The system prompt is common to every session (agent frameworks send one: here an
operations agent's rules and reference material, `--system-tokens` long, cut from the bundled report);
its length is printed with every reuse figure, because it is most of what is reused across sessions.
Sessions arrive as a seeded Poisson process at each rate of `--rates` (sessions/s) for `--window-s`
seconds; the same seed gives both arms the same arrival times and the same notes. A run ends when every
session is done or at window + `--drain-s`; requests still running then are counted as unfinished
(their latency so far enters p95 as a lower bound, marked ">="), and stages never sent are counted too.
`--concurrency N [N ...]` runs closed loops instead (the paper's "concurrent sessions"): N sessions from
the start, each followed at once by a new one (a new note) until the window closes, then the drain; the
notes come from one seeded stream, the same for both arms.

The arms (same model file, threads, KV cells, f16 KV cache, slots, max_tokens; each arm x rate x repeat
on a freshly started server, warmed up by one untimed session whose note is not used again):

- kvfork: `kvfork serve --adapter extract=... --adapter arith=... --adapter tool=...` with its defaults
  (fast mode), `"model": "model+<task>"`. The base model prefills [system + note] once per session (the
  system prompt once per server); each decoder's request forks it and computes only its instruction.
- llama-server (the baseline: one prefill per decoder): llama.cpp's own server, built from the llama.cpp of
  the installed llama-cpp-python (`python bench/build_llama_server.py`), with the three adapters loaded
  (`--lora FILE` x3) and picked per request with `"lora": [{"id": i, "scale": 1.0}]` (the others at 0).
  It has `-np` slots of `-c / -np` cells each, prompt caching on (`cache_prompt`, `--cache-ram`), its
  defaults otherwise. What it does with a prefix when the adapter changes, read in
  bench/peers/src/llama_cpp_python-0.3.36/vendor/llama.cpp (llama-cpp-python 0.3.36):
  * tools/server/server-context.cpp:1688-1704 (`launch_slot_with_task`): when a request's adapter set
    differs from the one its slot last ran (`are_lora_equal`, server-common.cpp:190), the slot's cached
    prompt is cleared (`lora_should_clear_cache`, server-common.cpp:163: always, unless both are aLoRAs),
    so a decoder recomputes the whole prompt, the shared system prompt and note included. A prefix is
    reused only when the slot last ran the same adapter: one prefill per decoder.
  * server-context.cpp:1528-1637 (`get_available_slot`) picks the slot by longest common token prefix,
    without looking at adapters, so a session's next stage usually lands on the slot that holds its note
    under the previous stage's adapter, and that cache is then dropped. The host-RAM prompt cache
    (`server_prompt_cache::load`, server-task.cpp:1793) is keyed by tokens only, too: a state computed
    under one adapter can be restored into a slot whose last adapter equals the request's, and then reused
    although another adapter computed it. Its `cached_tokens` are reported as the server reports them.
  * server-context.cpp:419-424 (`can_batch_with`): only slots with equal adapter sets share a batch;
    others wait for a later iteration (kvfork, too, runs one llama_decode per adapter per step).
- kvfork-exact: `kvfork serve --exact` with the same options: what exact mode costs beside fast mode
  (issue 16). `--arms kvfork llama-server` leaves it out.
- kvfork-unbounded (opt-in, `--arms kvfork llama-server kvfork-unbounded`): kvfork serve with
  `--max-running 256`, i.e. as it was before EngineConfig.max_running: every request it holds decodes at
  once. Side by side with the default (16), it shows what bounding the batch does under overload.
  kvfork-live (opt-in): `kvfork serve --store-ram-mb 0`, idle prefixes kept in the context rather than
  parked in host RAM (as before e99ab1e; Scheduler.park_idle).
  kvfork's own non-sharing path is not a column: `kvfork serve` serves every adapter over base-model
  prefixes and refuses adapters that compute their own prompt (docs/prefillshare.md).

What is reported, per arm and rate (median and min-max over `--repeats`): sessions and requests sent,
finished, unfinished, failed; mean and peak sessions in flight (sampled every 0.5 s); p50 and p95 latency
per request (sent -> last byte) and TTFT; throughput in finished requests/s and generated tokens/s;
generated tokens per request; and prompt-token reuse = sum(usage.prompt_tokens_details.cached_tokens) /
sum(usage.prompt_tokens) over finished requests, as each server reports it (per stage as well).
The baseline's saturation point is the first rate at which it leaves requests unfinished at the cap or its
throughput rises by less than 10% over the previous rate; the p95 ratio (baseline / kvfork) is reported
there. Targets (issue 21, default model, 2 cores): p95 at least 3x lower there; reuse >= 85% at 32+
concurrent sessions. Writes bench/out/prefillshare_load/<name>.json and prints a markdown table.

Adapters: `--adapters DIR` takes DIR/{extract,arith,tool}.cache.gguf (`kvfork train-decoder --mode cache`,
metadata kvfork.decoder.prefill = base). `--random-adapters` writes three random rank-16 LoRA GGUFs on every
attention and FFN projection instead (marked prefill = base; their replies are meaningless, the load is
the same), and the output says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefillshare_tasks import INSTRUCTIONS, TASKS, check, make_note  # noqa: E402
from servers import Server, kvfork_server, llama_server  # noqa: E402
from workload import fmt, provenance, report, stats  # noqa: E402

from kvfork.engine.llama import LlamaModel  # noqa: E402
from kvfork.models import resolve_model  # noqa: E402
from kvfork.train.gguf_lora import PREFILL_KEY, random_lora_gguf  # noqa: E402

# NOTE: exact mode's cost beside fast mode (issue 16): `kvfork serve --exact`
EXACT = "kvfork-exact"
ARMS = ("kvfork", EXACT, "llama-server")
# NOTE: kvfork as it was before EngineConfig.max_running: every request decodes at once (opt-in arm)
UNBOUNDED = "kvfork-unbounded"
# NOTE: kvfork as it was before e99ab1e: no host-RAM tier, idle prefixes stay in the context (opt-in arm)
LIVE = "kvfork-live"
STAGES = TASKS  # extract -> arith -> tool: the planner -> worker -> checker, one decoder each
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
OUT = Path("bench/out/prefillshare_load")
TARGET_P95_RATIO = 3.0
TARGET_REUSE = 0.85
RANDOM_NOTE = "RANDOM LoRA decoders (--random-adapters: no trained decoders; replies meaningless)"
SATURATION_GAIN = 1.10
WARM_UP_S = 120.0
SERVER_NOTE = ("kvfork serve: fast mode (f16 KV, flash attention auto since b9094d1), one pool of n_ctx cells for"
               " all requests;"
               " llama-server: its defaults (f16 KV, flash attention auto, cache_prompt on, --cache-ram 8192 MiB),"
               " n_ctx split into -np slots")  # throughput rising less than this over the previous rate = saturated

# Defaults for this 2-core machine (qwen2.5-coder-0.5b): rates from ~1 session in flight to well past the
# baseline's saturation (a session there is three ~1,300-token prefills at ~250 tokens/s, ~20 s of compute:
# ~0.05 sessions/s), within ~30 minutes for both arms and all rates.
DEFAULT_RATES = (0.011, 0.03, 0.1, 0.3, 0.75)
DEFAULT_WINDOW_S = 90.0
DEFAULT_DRAIN_S = 45.0
DEFAULT_SYSTEM_TOKENS = 1000
QUICK = {"model": "gemma3-270m", "rates": (0.4,), "window_s": 5.0, "drain_s": 10.0, "system_tokens": 100,
         "max_tokens": 16, "slots": 4, "ctx_per_slot": 1024}


@dataclass
class Settings:
    """What every arm runs with; printed and saved with the results."""

    model: str
    model_path: str
    threads: int
    slots: int
    ctx_per_slot: int
    max_tokens: int
    system_tokens: int
    chat_template: str | None
    window_s: float
    drain_s: float
    adapters: str
    random_adapters: bool
    closed_loop: bool = False  # loads are concurrent sessions (--concurrency), not arrival rates
    live_prefixes: int | None = None  # kvfork serve --live-prefixes (None: its default)

    @property
    def n_ctx(self) -> int:
        return self.slots * self.ctx_per_slot


@dataclass
class Record:
    """One request of one session, as it ended."""

    session: int
    stage: str
    status: str  # ok | error | unfinished
    sent_s: float  # since the run's start
    latency_s: float  # sent -> last byte (unfinished: sent -> the cap)
    ttft_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    correct: bool | None = None
    error: str = ""


@dataclass
class RunState:
    """Live bookkeeping of one arm x rate run."""

    records: list[Record] = field(default_factory=list)
    in_flight: dict[int, tuple[str, float]] = field(default_factory=dict)  # session -> (stage, sent_s)
    not_sent: int = 0
    active: int = 0
    started: int = 0  # sessions started (closed loops start them as earlier ones end)


# -- inputs -----------------------------------------------------------------------------------------
def system_prompt(n_tokens: int, model_path: str) -> str:
    """An operations agent's system prompt of about n_tokens tokens: rules, then reference material cut from
    the bundled incident report (what an agent framework sends with every request)."""
    head = ("You are one agent of a warehouse operations team. Read the note in the user's message and do"
            " exactly what the instruction after it asks, in the format it asks for. Answer from the note only.")
    if n_tokens <= 0:
        return ""
    vocab = LlamaModel(Path(model_path), vocab_only=True)  # NOTE: kvfork's own tokenizer type, no weights
    tokens = vocab.tokenize(head + "\n\nReference material:\n" + report(), add_special=False, parse_special=False)
    return vocab.detokenize(tokens[:n_tokens]).replace("\ufffd", "")  # NOTE: a cut through a UTF-8 character


def session_notes(seed: int, n: int):  # noqa: ANN201 - list[Note]
    rng = random.Random(seed)
    return [make_note(rng) for _ in range(n)]


def note_stream(seed: int) -> Iterator:
    """An endless seeded stream of notes (closed loops take one per session started)."""
    rng = random.Random(seed)
    while True:
        yield make_note(rng)


def arrivals(rate: float, window_s: float, seed: int) -> list[float]:
    """Poisson arrival times (s) in [0, window_s); at least one session."""
    rng, t, out = random.Random(seed), 0.0, [0.0]
    while (t := t + rng.expovariate(rate)) < window_s:
        out.append(t)
    return out


def make_adapters(args: argparse.Namespace, model_path: str) -> tuple[dict[str, Path], bool]:
    if not args.random_adapters:
        paths = {task: args.adapters / f"{task}.cache.gguf" for task in STAGES}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise SystemExit(f"missing adapters: {', '.join(missing)} (or pass --random-adapters)")
        return paths, False
    folder = OUT / f"random-adapters-{Path(model_path).stem}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, task in enumerate(STAGES):
        path = folder / f"{task}.random.gguf"
        if not path.exists():
            random_lora_gguf(model_path, path, rank=16, alpha=16.0, targets=LORA_TARGETS, seed=i,
                             meta={PREFILL_KEY: "base"})
        paths[task] = path
    return paths, True


# -- servers ----------------------------------------------------------------------------------------
def start_server(arm: str, s: Settings, adapters: dict[str, Path], log: Path) -> Server:
    template = ["--chat-template", s.chat_template] if s.chat_template else []
    if arm.startswith("kvfork"):
        # NOTE: admission and sequence-id limits above the most requests in flight, so kvfork never
        # refuses one (llama-server has no such limit: it queues)
        extra = [*(x for task, p in adapters.items() for x in ("--adapter", f"{task}={p}")),
                 "--max-queued", str(4 * s.slots), "--n-seq-max", "256",  # llama.cpp's most sequences
                 "--max-tokens", str(s.max_tokens), *template]
        if s.live_prefixes is not None:
            extra += ["--live-prefixes", str(s.live_prefixes)]
        if arm == UNBOUNDED:
            extra += ["--max-running", "256"]  # NOTE: above any load here: no request ever waits for a place
        if arm == LIVE:
            extra += ["--store-ram-mb", "0"]
        if arm == EXACT:
            extra += ["--exact"]
        return kvfork_server(s.model_path, s.threads, s.n_ctx, extra=extra, log=log)
    # NOTE: a template *name* is a built-in template only without jinja (with jinja, the default, llama-server
    # would render the name itself as a jinja template)
    template = ["--no-jinja", *template] if template else []
    extra = ["--lora", ",".join(str(p) for p in adapters.values()), *template]  # NOTE: ids 0, 1, 2 in STAGES order
    return llama_server(Path(s.model_path), s.threads, s.slots, s.ctx_per_slot, extra=extra, log=log)


def check_models(arm: str, server: Server, adapters: dict[str, Path]) -> None:
    """kvfork must list model+<task> for every decoder (GET /v1/models); llama-server must hold the three
    adapters in STAGES order (GET /lora-adapters), since a request names its adapter by that index."""
    root = server.base_url.removesuffix("/v1")
    if arm.startswith("kvfork"):
        listed = [m["id"] for m in httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]]
        wanted = [f"model+{task}" for task in STAGES]
        ok = set(wanted) <= set(listed)
    else:
        listed = [Path(a["path"]).resolve().as_posix() for a in httpx.get(f"{root}/lora-adapters", timeout=30).json()]
        wanted = [Path(adapters[task]).resolve().as_posix() for task in STAGES]
        ok = listed == wanted
    if not ok:
        raise RuntimeError(f"{arm} serves {listed}, not {wanted}")


def request_body(arm: str, stage: str, system: str, note: str, max_tokens: int) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"{note}\n\n{INSTRUCTIONS[stage]}"}]
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if arm.startswith("kvfork"):
        return {**body, "model": f"model+{stage}"}
    return {**body, "model": "model", "lora": [{"id": STAGES.index(stage), "scale": 1.0}]}


# -- the client -------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, body: dict, rec: Record, t0: float) -> str:
    """Stream one chat completion; fill rec with status, TTFT, latency and usage; return the reply's text."""
    text: list[str] = []
    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            rec.status, rec.error = "error", f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            rec.latency_s = time.perf_counter() - t0 - rec.sent_s
            return ""
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - t0 - rec.sent_s
                    text.append(piece)
            if chunk.get("usage"):
                usage = chunk["usage"]
                rec.prompt_tokens, rec.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    rec.latency_s = time.perf_counter() - t0 - rec.sent_s
    rec.status = "ok" if rec.prompt_tokens else "error"
    rec.error = "" if rec.prompt_tokens else "no usage in the stream"
    return "".join(text)


async def one_session(client: httpx.AsyncClient, arm: str, index: int, note, system: str,  # noqa: ANN001
                      max_tokens: int, at: float, t0: float, state: RunState) -> None:
    try:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    except asyncio.CancelledError:
        state.not_sent += len(STAGES)  # NOTE: cut before it arrived (cannot happen while window < cap)
        raise
    state.active += 1
    try:
        for n, stage in enumerate(STAGES):
            sent = time.perf_counter() - t0
            state.in_flight[index] = (stage, sent)
            rec, reply = Record(index, stage, "running", sent, 0.0), ""
            try:
                reply = await one_request(client, request_body(arm, stage, system, note.text, max_tokens), rec, t0)
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none ends the run silently
                rec.status, rec.error = "error", f"{type(e).__name__}: {e}"[:200]
                rec.latency_s = time.perf_counter() - t0 - sent
            del state.in_flight[index]
            if rec.status == "ok":
                rec.correct = check(stage, reply, note.answer(stage))
            state.records.append(rec)
            if rec.status != "ok":
                state.not_sent += len(STAGES) - n - 1  # NOTE: a failed stage ends its session
                return
    except asyncio.CancelledError:
        stage, sent = state.in_flight.pop(index, (None, 0.0))
        if stage is not None:
            done = {r.stage for r in state.records if r.session == index}
            state.records.append(Record(index, stage, "unfinished", sent, time.perf_counter() - t0 - sent))
            state.not_sent += len(STAGES) - len(done) - 1
        raise
    finally:
        state.active -= 1


async def closed_loop(client: httpx.AsyncClient, arm: str, notes: Iterator, system: str, s: Settings,
                      t0: float, state: RunState) -> None:
    """One of a closed loop's workers: a new session as soon as the last one ended, until the window closes."""
    while time.perf_counter() - t0 < s.window_s:
        index, state.started = state.started, state.started + 1
        await one_session(client, arm, index, next(notes), system, s.max_tokens, time.perf_counter() - t0, t0, state)


async def run_load(base_url: str, arm: str, notes: list | Iterator, times: list[float] | None, system: str,
                   s: Settings, concurrency: int = 0) -> dict:
    """All sessions of one run (at `times`, or `concurrency` closed-loop workers over the `notes` stream);
    returns its records, wall time and concurrency samples."""
    state = RunState()
    # NOTE: one connection per request, for both arms: llama-server (cpp-httplib) may close a kept-alive
    # connection right after a streamed reply, and a request httpx then sends on it fails with
    # "RemoteProtocolError: Server disconnected without sending a response" (seen in 2-3 of 12 requests)
    limits = httpx.Limits(max_connections=(concurrency or len(times or ())) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        if times is None:
            tasks = [asyncio.create_task(closed_loop(client, arm, iter(notes), system, s, t0, state))
                     for _ in range(concurrency)]
        else:
            state.started = len(times)
            tasks = [asyncio.create_task(one_session(client, arm, i, note, system, s.max_tokens, at, t0, state))
                     for i, (note, at) in enumerate(zip(notes, times, strict=True))]
        samples: list[tuple[float, int]] = []
        cap = s.window_s + s.drain_s
        while not all(t.done() for t in tasks) and time.perf_counter() - t0 < cap:
            samples.append((time.perf_counter() - t0, state.active))
            await asyncio.sleep(0.5)
        wall = time.perf_counter() - t0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"records": state.records, "not_sent": state.not_sent, "wall_s": wall, "samples": samples,
            "sessions": state.started}


def warm_up(base_url: str, arm: str, system: str, s: Settings, seed: int) -> float:
    """One untimed session (its own note, at most WARM_UP_S): loads the weights and the adapters, fills the
    system prompt's cache the way a running server has it. Returns its wall time."""
    run = asyncio.run(run_load(base_url, arm, session_notes(seed, 1), [0.0], system,
                               Settings(**{**asdict(s), "window_s": 0.0, "drain_s": WARM_UP_S})))
    bad = [r for r in run["records"] if r.status != "ok"]
    if bad:
        raise RuntimeError(f"{arm}: the warm-up session failed: {bad[0]}")
    return run["wall_s"]


# -- figures ----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summarize(run: dict) -> dict:
    """One run's figures (see the module docstring)."""
    recs: list[Record] = run["records"]
    ok = [r for r in recs if r.status == "ok"]
    unfinished = [r for r in recs if r.status == "unfinished"]
    latencies = [r.latency_s for r in ok + unfinished]  # NOTE: unfinished enter as lower bounds
    prompt = sum(r.prompt_tokens for r in ok)
    by_stage = {st: [r for r in ok if r.stage == st] for st in STAGES}
    done_at = max((r.sent_s + r.latency_s for r in ok), default=run["wall_s"])
    active = [a for _, a in run["samples"]] or [0]
    return {
        "sessions": run["sessions"], "requests_ok": len(ok), "unfinished": len(unfinished),
        "failed": sum(r.status == "error" for r in recs), "not_sent": run["not_sent"],
        "errors": sorted({r.error for r in recs if r.error})[:5],
        "sessions_in_flight_mean": statistics.fmean(active), "sessions_in_flight_max": max(active),
        "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
        "p95_lower_bound": bool(unfinished),
        "ttft_p50_s": percentile([r.ttft_s for r in ok if r.ttft_s is not None], 50),
        "ttft_p95_s": percentile([r.ttft_s for r in ok if r.ttft_s is not None], 95),
        "requests_per_s": len(ok) / done_at if done_at else 0.0,
        "gen_tokens_per_s": sum(r.completion_tokens for r in ok) / done_at if done_at else 0.0,
        "gen_tokens_per_request": statistics.fmean([r.completion_tokens for r in ok]) if ok else 0.0,
        "prompt_tokens_per_request": prompt / len(ok) if ok else 0.0,
        "reuse": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "reuse_by_stage": {st: (sum(r.cached_tokens for r in v) / sum(r.prompt_tokens for r in v)) if v else None
                           for st, v in by_stage.items()},
        "correct": sum(bool(r.correct) for r in ok), "wall_s": run["wall_s"],
    }


def combine(runs: list[dict]) -> dict:
    """Repeats of one arm x rate: stats (median, min, max) of every numeric figure."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out = {k: stats([r[k] for r in runs if r[k] is not None]) for k in keys
           if any(r[k] is not None for r in runs)}
    out["p95_lower_bound"] = any(r["p95_lower_bound"] for r in runs)
    out["errors"] = sorted({e for r in runs for e in r["errors"]})[:5]
    return out


def saturation(rates: list[float], rows: dict[float, dict]) -> float | None:
    """The first rate at which the baseline leaves requests unfinished (or unsent) at the cap, or its
    throughput rises by less than SATURATION_GAIN over the previous rate."""
    for i, rate in enumerate(rates):
        row = rows[rate]
        if row["unfinished"]["median"] > 0 or row["not_sent"]["median"] > 0:
            return rate
        if i and row["requests_per_s"]["median"] < SATURATION_GAIN * rows[rates[i - 1]]["requests_per_s"]["median"]:
            return rate
    return None


def verdict(rates: list[float], summary: dict[str, dict[float, dict]]) -> dict:
    base, ours = summary["llama-server"], summary["kvfork"]
    ratios = {rate: base[rate]["p95_s"]["median"] / ours[rate]["p95_s"]["median"] for rate in rates
              if "p95_s" in base[rate] and "p95_s" in ours[rate]}
    sat = saturation(rates, base)
    busy = [rate for rate in rates if ours[rate]["sessions_in_flight_max"]["median"] >= 32]
    return {"saturation_rate": sat, "p95_ratio_by_rate": ratios,
            "p95_ratio_at_saturation": ratios.get(sat) if sat is not None else None,
            # NOTE: both may be censored (requests unfinished at the cap): the ratio is then of lower bounds
            "baseline_p95_is_lower_bound": bool(sat is not None and base[sat]["p95_lower_bound"]),
            "kvfork_p95_is_lower_bound": bool(sat is not None and ours[sat]["p95_lower_bound"]),
            "target_p95_met": bool(sat is not None and ratios.get(sat, 0) >= TARGET_P95_RATIO),
            "reuse_at_32plus": {rate: ours[rate]["reuse"]["median"] for rate in busy},
            "target_reuse_met": bool(busy) and all(ours[r]["reuse"]["median"] >= TARGET_REUSE for r in busy)}


def table(rates: list[float], summary: dict[str, dict[float, dict]], s: Settings) -> str:
    def cell(row: dict, key: str, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
        return fmt(row[key], unit, scale, digits) if key in row else "-"

    load = "concurrent sessions" if s.closed_loop else "rate (sessions/s)"
    head = (f"| {load} | arm | sessions in flight, mean / max | requests ok / unfinished / failed / unsent"
            " | p50 | p95 | TTFT p50 | requests/s | gen tokens/s | gen tokens/request | prompt reuse |")
    lines = [head, "|" + "---|" * 11]
    for rate in rates:
        for arm in summary:
            r = summary[arm][rate]
            p95 = (">=" if r["p95_lower_bound"] else "") + cell(r, "p95_s", " s")
            lines.append(
                f"| {rate:g} | {arm} | {r['sessions_in_flight_mean']['median']:.1f} /"
                f" {r['sessions_in_flight_max']['median']:.0f} | {r['requests_ok']['median']:.0f} /"
                f" {r['unfinished']['median']:.0f} / {r['failed']['median']:.0f} / {r['not_sent']['median']:.0f}"
                f" | {cell(r, 'p50_s', ' s')} | {p95} | {cell(r, 'ttft_p50_s', ' s')}"
                f" | {cell(r, 'requests_per_s', '', 1, 3)} | {cell(r, 'gen_tokens_per_s')}"
                f" | {cell(r, 'gen_tokens_per_request')} | {cell(r, 'reuse', '%', 100, 0)} |")
    notes = (f"\nSettings: {s.model}, {s.threads} threads, {s.slots} slots x {s.ctx_per_slot} cells (n_ctx {s.n_ctx}),"
             f" max_tokens {s.max_tokens}, system prompt {s.system_tokens} tokens shared by all sessions,"
             f" window {s.window_s:g} s + drain {s.drain_s:g} s. {SERVER_NOTE}."
             f" Adapters: {RANDOM_NOTE if s.random_adapters else s.adapters}.")
    return "\n".join(lines) + notes


# -- main -------------------------------------------------------------------------------------------
def settings_from(args: argparse.Namespace, adapters: dict[str, Path], random_adapters: bool) -> Settings:
    return Settings(model=args.model, model_path=str(resolve_model(args.model)), threads=args.threads,
                    slots=args.slots, ctx_per_slot=args.ctx_per_slot, max_tokens=args.max_tokens,
                    system_tokens=args.system_tokens, chat_template=args.chat_template, window_s=args.window_s,
                    drain_s=args.drain_s, adapters=str(next(iter(adapters.values())).parent),
                    random_adapters=random_adapters, closed_loop=bool(args.concurrency),
                    live_prefixes=args.live_prefixes)


def one_run(arm: str, rate: float, rep: int, s: Settings, adapters: dict[str, Path], system: str,
            seed: int, logs: Path) -> dict:
    """Start arm's server, warm it up, offer rate (closed loop: that many concurrent sessions) for the
    window, stop it; the run's figures."""
    run_seed = seed + 1000 * rep + round(rate * 1000)  # NOTE: the same for both arms: same arrivals, notes
    if s.closed_loop:
        times, notes, concurrency = None, note_stream(run_seed), int(rate)
    else:
        times = arrivals(rate, s.window_s, run_seed)
        notes, concurrency = session_notes(run_seed, len(times)), 0
    with start_server(arm, s, adapters, logs / f"{arm}-{rate:g}-{rep}.log") as server:
        check_models(arm, server, adapters)
        warm_s = warm_up(server.base_url, arm, system, s, seed=run_seed + 7)
        run = asyncio.run(run_load(server.base_url, arm, notes, times, system, s, concurrency))
    row = summarize(run)
    row["warm_up_s"] = warm_s
    row["records"] = [asdict(r) for r in run["records"]]
    load = f"sessions {rate:g}" if s.closed_loop else f"rate {rate:g}/s"
    print(f"  {arm:12s} {load} rep {rep + 1}: {row['sessions']} sessions, in flight max"
          f" {row['sessions_in_flight_max']}, ok {row['requests_ok']} unfinished {row['unfinished']} failed"
          f" {row['failed']} unsent {row['not_sent']}, p95 {row['p95_s'] or 0:.1f} s, reuse {row['reuse']:.0%},"
          f" {row['requests_per_s']:.3f} req/s, wall {row['wall_s']:.0f} s", flush=True)
    for error in row["errors"]:
        print(f"    error: {error}", flush=True)
    return row


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--adapters", type=Path, default=Path("bench/out/prefillshare/adapters"),
                     help="folder with {extract,arith,tool}.cache.gguf")
    src.add_argument("--random-adapters", action="store_true", help="random rank-16 LoRA decoders (no training)")
    ap.add_argument("--model", default=None, help="default qwen2.5-coder-0.5b (--quick: gemma3-270m)")
    ap.add_argument("--chat-template", default=None, help="for a model without one ('gemma' for gemma3-270m)")
    loads = ap.add_mutually_exclusive_group()
    loads.add_argument("--rates", type=float, nargs="+", default=None, help="sessions/s, increasing")
    loads.add_argument("--concurrency", type=int, nargs="+", default=None,
                       help="closed loops of this many concurrent sessions instead of arrival rates")
    ap.add_argument("--window-s", type=float, default=None, help="arrivals for this long at each rate")
    ap.add_argument("--drain-s", type=float, default=None, help="then at most this long to finish")
    ap.add_argument("--system-tokens", type=int, default=None, help="shared system prompt length (0: none)")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--slots", type=int, default=None, help="llama-server -np; kvfork n_ctx = slots x ctx-per-slot")
    ap.add_argument("--ctx-per-slot", type=int, default=None, help="KV cells per slot (default 2048)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--live-prefixes", type=int, default=None, help="kvfork serve --live-prefixes (default: its own)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--arms", nargs="+", choices=[*ARMS, UNBOUNDED, LIVE], default=list(ARMS),
                    help=f"{UNBOUNDED}: kvfork serve --max-running 256 (every request decodes at once); {LIVE}:"
                         " --store-ram-mb 0 (idle prefixes stay in the context)")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--quick", action="store_true", help="smoke check: gemma3-270m, 2 short rates (< 1 min)")
    ap.add_argument("--name", default=None, help="output file stem (default: full, quick or random)")
    args = ap.parse_args()
    quick = QUICK if args.quick else {}
    defaults = {"model": "qwen2.5-coder-0.5b", "rates": DEFAULT_RATES, "window_s": DEFAULT_WINDOW_S,
                "drain_s": DEFAULT_DRAIN_S, "system_tokens": DEFAULT_SYSTEM_TOKENS, "max_tokens": 64, "slots": 64,
                "ctx_per_slot": 2048}
    for key, value in {**defaults, **quick}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.chat_template is None and "gemma" in args.model:
        args.chat_template = "gemma"  # NOTE: the catalog's gemma3-270m GGUF has no usable template
    if args.concurrency:
        if min(args.concurrency) < 1:
            ap.error("--concurrency takes positive session counts")
        args.rates = args.concurrency  # NOTE: the load axis: sessions in flight instead of sessions/s
    args.rates = sorted(args.rates)
    return args


def main() -> None:
    # NOTE: a SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server children are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    model_path = str(resolve_model(args.model))
    adapters, random_adapters = make_adapters(args, model_path)
    s = settings_from(args, adapters, random_adapters)
    name = args.name or ("quick" if args.quick else "random" if random_adapters else "full")
    OUT.mkdir(parents=True, exist_ok=True)
    logs = OUT / f"{name}-logs"
    logs.mkdir(exist_ok=True)
    system = system_prompt(s.system_tokens, model_path)
    print(json.dumps(asdict(s)), flush=True)
    t_start = time.perf_counter()
    runs: dict[str, dict[float, list[dict]]] = {arm: {rate: [] for rate in args.rates} for arm in args.arms}
    for rep in range(args.repeats):
        for rate in args.rates:
            order = args.arms if rep % 2 == 0 else args.arms[::-1]  # NOTE: alternate which arm runs first
            for arm in order:
                runs[arm][rate].append(one_run(arm, rate, rep, s, adapters, system, args.seed, logs))
    summary = {arm: {rate: combine(rows) for rate, rows in by_rate.items()} for arm, by_rate in runs.items()}
    result = {"settings": asdict(s), "rates": args.rates, "repeats": args.repeats, "summary": summary,
              "provenance": provenance(), "wall_s": time.perf_counter() - t_start,
              "runs": {arm: {str(rate): rows for rate, rows in by_rate.items()} for arm, by_rate in runs.items()}}
    if {"kvfork", "llama-server"} <= set(args.arms):
        result["verdict"] = verdict(args.rates, summary)
        result["table"] = table(args.rates, summary, s)
        print(result["table"])
        print(json.dumps(result["verdict"], indent=2))
    out = OUT / f"{name}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
