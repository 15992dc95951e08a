"""The systems a benchmark compares, each in its own process: kvfork fast, kvfork exact, llama.cpp.

    with Arms(model_path, threads=2) as arms:       # starts every child and loads the model once
        prompts = arms["kvfork"].call("prompts", doc=doc, system=SYSTEM, instructions=agents)["prompts"]
        shared = arms["kvfork"].call("agents", doc=doc, system=SYSTEM, instructions=agents, max_tokens=64)
        scratch = arms["llama.cpp"].call("scratch", prompts=prompts, max_tokens=64)

Why processes: ggml reads its process-wide switches (GGML_CPU_TILED_MM) once, so exact and fast mode
cannot both be themselves in one process, and the baseline must be what users run: llama-cpp-python's
`Llama` with llama.cpp's own defaults (f16 KV cache, repacked weights, tiled matmul), one process of its
own. Each child times its own work (perf_counter around the calls), so the pipe costs nothing measured.

The llama.cpp child (`--kind llama.cpp`) sets only what a user must: the model, n_ctx (llama-cpp-python's
default, 512, cannot hold the document) and threads (the same for every arm). Everything else is
`Llama`'s own default, flash attention included: `Llama` turns it off unless asked (llama.cpp's own
"auto" turns it on on CPUs), and off is the faster of the two for this baseline here: it prefills as
fast or faster and decodes one sequence ~35% faster (`python bench/arms.py --compare-settings`, which
also measures kvfork with flash attention and with repacked weights: see EngineConfig).
`--flash-attn on` gives the baseline with flash attention. Its agents run from scratch:
`reset()` before each, so nothing of the previous agent's prompt is reused; op "scratch" with
`keep_prefix=True` instead lets `Llama.generate` reuse the previous call's longest common prefix, as one
`Llama` object does by itself.

KVFORK_BENCH_PATCHED=DIR (a `kvfork build --target DIR`) puts the patched llama-cpp-python in front of the
kvfork-exact child only: the other arms keep the installed one. Each kvfork child reports the kernels its
exact mode ran on ("batch-invariant" or "fallback") in its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adapter_ops import KvforkAdapters, LlamaCppAdapters
from restore_ops import KvforkRestore, LlamaCppRestore

from kvfork.engine.kernelbuild import pythonpath_first

__all__ = ["Arm", "Arms", "KINDS", "llama_rates", "rotate"]

KINDS = ("kvfork", "kvfork-exact", "llama.cpp")
# a folder holding `kvfork build --target DIR`'s llama-cpp-python: the kvfork-exact child (only) imports it first
PATCHED_ENV = "KVFORK_BENCH_PATCHED"
OUT = Path(__file__).resolve().parent / "out"


def rotate(items: list, r: int) -> list:
    """`items` in the order of repeat r: each repeat starts one system later."""
    k = r % len(items)
    return items[k:] + items[:k]


def llama_rates(scratch: dict[str, Any]) -> tuple[float, float]:
    """llama.cpp's own rates in a "scratch" reply: prefill tokens/s (prompt tokens / time to first token)
    and seconds per decode step of one sequence (after the first token); the units of every bound."""
    r_pp = sum(scratch["prompt_tokens"]) / sum(scratch["ttft_s"])
    steps = sum(len(t) - 1 for t in scratch["tokens"])
    return r_pp, sum(t - f for t, f in zip(scratch["total_s"], scratch["ttft_s"], strict=True)) / steps


class Arm:
    """One system in a child process, answering JSON calls over its stdin/stdout."""

    def __init__(self, kind: str, model: Path, *, threads: int, n_ctx: int, n_seq_max: int,
                 extra: tuple[str, ...] = ()) -> None:
        env = dict(os.environ)
        env.pop("GGML_CPU_TILED_MM", None)  # NOTE: each child starts as a user's process would
        patched = os.environ.get(PATCHED_ENV)
        if patched and kind == "kvfork-exact":  # NOTE: only exact mode gets `kvfork build`'s llama-cpp-python
            env = pythonpath_first(env, patched)
        argv = [sys.executable, __file__, "--kind", kind, "--model", str(model), "--threads", str(threads),
                "--n-ctx", str(n_ctx), "--n-seq-max", str(n_seq_max), *extra]
        self.kind = " ".join((kind, *extra))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=Path(__file__).resolve().parent)
        self.info = self._read()

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            died = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            # NOTE: a native build's AMX kernels segfault with llama.cpp's defaults (engine/buildcheck.py)
            hint = "; `kvfork doctor` checks the llama.cpp build against this CPU" if code < 0 else ""
            raise RuntimeError(f"{self.kind} child {died}{hint}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.kind}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Arms(dict):
    """Every arm of `kinds`, started in order (each child loads the model once and warms up)."""

    def __init__(self, model: Path, kinds: tuple[str, ...] = KINDS, *, threads: int = 2, n_ctx: int = 8192,
                 n_seq_max: int = 20) -> None:
        super().__init__()
        try:
            for kind in kinds:
                self[kind] = Arm(kind, model, threads=threads, n_ctx=n_ctx, n_seq_max=n_seq_max)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for arm in self.values():
            arm.close()

    def __enter__(self) -> Arms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the children ---------------------------------------------------------------------------------
class KvforkChild(KvforkRestore, KvforkAdapters):
    """kvfork's Engine in fast (default) or exact mode, used as a user would."""

    def __init__(self, model: str, exact: bool, threads: int, n_ctx: int, n_seq_max: int,
                 repack: bool | None = None, flash_attn: str | None = None) -> None:
        from kvfork import Engine
        from kvfork.engine.llama import exact_kernels

        def make_engine(store: Any = None, **config: Any) -> Engine:
            return Engine(model, n_ctx=n_ctx, n_seq_max=n_seq_max, n_threads=threads, exact=exact,
                          progress=False, repack=repack, flash_attn=flash_attn, store=store, **config)

        self.make_engine = make_engine  # NOTE: restore_ops makes a second context, a replica, with it
        self.engine = make_engine()
        self.info = {"settings": {k: getattr(self.engine.config, k) for k in
                                  ("exact", "kv_type", "flash_attn", "repack", "n_batch", "n_ubatch", "n_threads")},
                     "tiled_mm": os.environ.get("GGML_CPU_TILED_MM", "on (ggml default)"),
                     "exact_kernels": exact_kernels()}

    def prompts(self, doc: str, system: str | None, instructions: list[str]) -> dict[str, Any]:
        """The exact tokens of each agent's prompt (what every arm is given), and the shared part's length."""
        e = self.engine
        return {"prompts": [e.prompt_tokens(doc, i, system=system) for i in instructions],
                "prefix": e.tokenize(e.layout(doc, system).prefix, add_bos=True, special=True),  # what prefill computes
                "shared_tokens": len(e.prompt_tokens(doc, "", system=system)) - len(e.tokenize("", special=True))}

    def agents(self, doc: str, system: str | None, instructions: list[str], max_tokens: int,
               activation: bool = False) -> dict[str, Any]:
        """Prefill once, fan out, decode together: end to end and its phases.

        Phases: shared = the document's prefill; own = from fan_out's start to the last branch's first
        token (every branch's own part is prefilled in shared batches before any decodes alone);
        decode = the rest. activation: afterwards, a new branch from the live snapshot to its first token.
        """
        table = self.engine.scheduler.table  # NOTE: its fork_seconds: the time spent tagging shared cells
        forks_before = table.fork_seconds
        t0 = time.perf_counter()
        snap = self.engine.prefill(doc, system=system)
        t1 = time.perf_counter()
        outs = snap.fan_out(instructions, max_tokens=max_tokens, ignore_eos=True)
        t2 = time.perf_counter()
        own = max(o.ttft_s for o in outs)
        row = {"wall_s": t2 - t0, "shared_s": t1 - t0, "own_s": own, "decode_s": t2 - t1 - own,
               "forks_ms": (table.fork_seconds - forks_before) * 1e3,
               "shared_tokens": snap.n_tokens, "own_tokens": sum(o.computed_tokens for o in outs),
               "tokens": [list(o.tokens) for o in outs], "ttft_s": [t1 - t0 + o.ttft_s for o in outs]}
        if activation:
            t3 = time.perf_counter()
            with snap.fork() as branch:
                branch.send(instructions[-1]).generate(max_tokens=1)
            row["activation_s"] = time.perf_counter() - t3
        snap.close()
        return row

    def fanouts(self, doc: str, system: str | None, instructions: list[str], counts: list[int],
                max_tokens: int) -> dict[str, Any]:
        """One shared prefill, then for each N in counts a fan-out of the first N instructions, timed by phase."""
        t0 = time.perf_counter()
        snap = self.engine.prefill(doc, system=system)
        row: dict[str, Any] = {"shared_s": time.perf_counter() - t0, "shared_tokens": snap.n_tokens, "cells": {}}
        for n in counts:
            t1 = time.perf_counter()
            outs = snap.fan_out(instructions[:n], max_tokens=max_tokens, ignore_eos=True)
            wall = time.perf_counter() - t1
            own = max(o.ttft_s for o in outs)
            row["cells"][str(n)] = {"own_s": own, "decode_s": wall - own, "fan_s": wall,
                                    "own_tokens": sum(o.computed_tokens for o in outs),
                                    "tokens": [list(o.tokens) for o in outs]}
        snap.close()
        return row

    def memory(self, doc: str, system: str | None, counts: list[int], max_tokens: int) -> dict[str, Any]:
        """KV bytes llama.cpp holds for N open branches (every used cell once: the state size of seq -1)
        against N independent copies (each branch's own state, prefix included) and the ideal."""
        e = self.engine
        snap = e.prefill(doc, system=system)
        prefix = e.ctx.state_seq_size(snap.sequence.seq_id)  # NOTE: a bench may read the handle's sequence id
        rows = []
        for n in counts:
            branches = [snap.fork().send(f"Agent {i}: summarize part {i}.") for i in range(n)]
            e.generate_branches(branches, [e.sampling(max_tokens=max_tokens, ignore_eos=True)] * n)
            own = [e.ctx.state_seq_size(b.sequence.seq_id) for b in branches]
            held = e.ctx.state_seq_size(-1)
            ideal = prefix + sum(o - prefix for o in own)
            rows.append({"branches": n, "held_bytes": held, "copies_bytes": sum(own), "ideal_bytes": ideal})
            for b in branches:
                b.close()
        snap.close()
        return {"rows": rows}

    def beside(self, held: list[str], prompt: list[int], max_tokens: int, park: bool | None = None) -> dict[str, Any]:
        """A new prompt (prefill, then max_tokens greedy tokens) in an engine that holds snapshots of `held`
        documents (chat layout: the template's head is common to them) it does not use; then the first held
        snapshot forked again (brought back if parked). park: EngineConfig.park_idle (None: the mode's).
        A new engine each call, so each starts alike."""
        with self.make_engine(**({} if park is None else {"park_idle": park})) as e:
            snaps = [e.prefill(d) for d in held]
            out = e.generate(prompt, max_tokens=max_tokens, ignore_eos=True)
            parked = sum(s.parked for s in snaps)
            t0 = time.perf_counter()
            with snaps[0].fork():
                back = time.perf_counter() - t0
            return {"ttft_s": out.ttft_s, "step_s": (out.total_s - out.ttft_s) / (len(out.tokens) - 1),
                    "tokens": list(out.tokens), "held_tokens": sum(s.n_tokens for s in snaps), "parked": parked,
                    "back_s": back, "park_idle": e.config.park_idle}

    def prefill(self, doc: str, system: str | None) -> dict[str, Any]:
        """The shared prefill alone (as `kvfork demo` does it): seconds and tokens."""
        with self.engine.prefill(doc, system=system) as snap:
            return {"prefill_s": snap.prefill_s, "n_tokens": snap.n_tokens, "tokens": list(snap.tokens)}

    def scratch(self, prompts: list[list[int]], max_tokens: int, keep_prefix: bool = False) -> dict[str, Any]:
        """kvfork's own non-sharing path: each prompt prefilled whole, one after another (an extra column)."""
        t0 = time.perf_counter()
        outs = [self.engine.generate(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
        return {"wall_s": time.perf_counter() - t0, "tokens": [list(o.tokens) for o in outs],
                "ttft_s": [o.ttft_s for o in outs]}


class LlamaCppChild(LlamaCppRestore, LlamaCppAdapters):
    """llama-cpp-python's `Llama` with llama.cpp's defaults: the system users run today."""

    def __init__(self, model: str, threads: int, n_ctx: int, flash_attn: bool | None = None) -> None:
        import llama_cpp

        from kvfork.models import resolve_model

        own = {} if flash_attn is None else {"flash_attn": flash_attn}  # None: Llama's own default (off)
        # NOTE: what every Llama of this child is made with (adapter_ops makes one per LoRA decoder)
        self.model_path = str(resolve_model(model))
        self.llama_kwargs = {"n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads, "verbose": False,
                             **own}
        self.llm = llama_cpp.Llama(self.model_path, **self.llama_kwargs)
        c = self.llm.context_params
        self.info = {"settings": {"llama_cpp_python": llama_cpp.__version__, "n_ctx": c.n_ctx, "n_batch": c.n_batch,
                                  "n_ubatch": c.n_ubatch, "type_k": c.type_k, "flash_attn_type": c.flash_attn_type,
                                  "use_extra_bufts": bool(self.llm.model_params.use_extra_bufts),
                                  "threads": threads},
                     "tiled_mm": os.environ.get("GGML_CPU_TILED_MM", "on (ggml default)")}

    def _one(self, prompt: list[int], max_tokens: int, reset: bool) -> tuple[list[int], float, float]:
        if reset:
            self.llm.reset()  # NOTE: n_tokens = 0: generate() then prefills the whole prompt again
        t0 = time.perf_counter()
        out: list[int] = []
        ttft = 0.0
        # NOTE: greedy (temp 0), every token kept to max_tokens (as kvfork's ignore_eos)
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if not out:
                ttft = time.perf_counter() - t0
            out.append(int(token))
            if len(out) >= max_tokens:
                break
        return out, ttft, time.perf_counter() - t0

    def scratch(self, prompts: list[list[int]], max_tokens: int, keep_prefix: bool = False) -> dict[str, Any]:
        """Agents one after another, each from scratch (or, keep_prefix, with Llama's own prefix reuse)."""
        self.llm.reset()
        t0 = time.perf_counter()
        rows = [self._one(p, max_tokens, reset=not keep_prefix) for p in prompts]
        return {"wall_s": time.perf_counter() - t0, "tokens": [r[0] for r in rows], "ttft_s": [r[1] for r in rows],
                "total_s": [r[2] for r in rows], "prompt_tokens": [len(p) for p in prompts]}

    def prefill(self, tokens: list[int]) -> dict[str, Any]:
        """The same tokens prefilled alone (llama_decode in n_batch chunks, as Llama.eval does)."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return {"prefill_s": time.perf_counter() - t0, "n_tokens": len(tokens)}


def _child(args: argparse.Namespace) -> None:
    if args.kind == "llama.cpp":
        fa_llama = {"on": True, "auto": True, "off": False}.get(args.flash_attn)
        child: Any = LlamaCppChild(args.model, args.threads, args.n_ctx, flash_attn=fa_llama)
    else:
        repack = {"on": True, "off": False}.get(args.repack)
        fa = None if args.flash_attn == "default" else args.flash_attn
        child = KvforkChild(args.model, args.kind == "kvfork-exact", args.threads, args.n_ctx, args.n_seq_max,
                            repack, fa)
    print(json.dumps({"kind": args.kind, **child.info}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = getattr(child, op)(**request)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            reply = {"error": f"{op}: {type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def _compare_settings(args: argparse.Namespace) -> None:
    """The settings behind fast mode's defaults, side by side per repeat on a ~3,500-token report:
    llama-cpp-python's Llama with flash attention off (its own default) and on (llama.cpp's "auto" on
    CPUs): prefill rate; kvfork fast as it ships (flash attention off, weights not repacked), with
    flash attention "auto" (llama.cpp's default) and with repacked weights (llama.cpp's default):
    prefill rate and the time of one decode step with N = 1, 2, 4, 8 branches (24 tokens each)."""
    from workload import INSTRUCTIONS, SYSTEM, document, provenance, stats

    model = Path(args.model)
    llama = {fa: Arm("llama.cpp", model, threads=args.threads, n_ctx=args.n_ctx, n_seq_max=1,
                     extra=("--flash-attn", fa)) for fa in ("off", "on")}
    variants = {"as shipped": (), "flash_attn auto": ("--flash-attn", "auto"), "repack on": ("--repack", "on")}
    kv = {name: Arm("kvfork", model, threads=args.threads, n_ctx=args.n_ctx, n_seq_max=12, extra=extra)
          for name, extra in variants.items()}
    rows: dict[str, list[float]] = {}
    n_tokens = 24
    for r in range(args.repeats):
        doc = document(f"settings-{r}-{time.time_ns()}")
        first = kv["as shipped"]
        (prompt,) = first.call("prompts", doc=doc, system=SYSTEM, instructions=["Summarize it."])["prompts"]
        for fa, arm in llama.items():
            rows.setdefault(f"llama.cpp flash_attn {fa}: prefill tok/s", []).append(
                len(prompt) / arm.call("prefill", tokens=prompt)["prefill_s"])
        for name in rotate(list(kv), r):
            x = kv[name].call("fanouts", doc=doc, system=SYSTEM, instructions=INSTRUCTIONS, counts=[1, 2, 4, 8],
                              max_tokens=n_tokens)
            rows.setdefault(f"kvfork fast {name}: prefill tok/s", []).append(x["shared_tokens"] / x["shared_s"])
            for n, c in x["cells"].items():
                steps = n_tokens - 1  # NOTE: the first token ends the own-part prefill, not a decode step
                rows.setdefault(f"kvfork fast {name}: decode step ms, N={n}", []).append(c["decode_s"] / steps * 1e3)
        print(f"repeat {r + 1}: " + "; ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items()), flush=True)
    for arm in (*llama.values(), *kv.values()):
        arm.close()
    out = {"provenance": provenance(), "tokens": len(prompt), "settings": {k: stats(v) for k, v in rows.items()}}
    OUT.mkdir(exist_ok=True)
    (OUT / "reference_settings.json").write_text(json.dumps(out, indent=2))
    for k, v in out["settings"].items():
        print(f"{k}: {v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=KINDS, default=None, help="run as this child (internal)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--n-seq-max", type=int, default=20)
    ap.add_argument("--flash-attn", choices=["on", "off", "auto", "default"], default="default",
                    help="a child's flash attention (default: Llama's own (off) for llama.cpp, the mode's for kvfork)")
    ap.add_argument("--repack", choices=["on", "off", "default"], default="default", help="a kvfork child's repack")
    ap.add_argument("--compare-settings", action="store_true", help="measure the settings behind fast mode")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.kind:
        _child(args)
    elif args.compare_settings:
        _compare_settings(args)
    else:
        ap.print_help()


if __name__ == "__main__":
    main()
