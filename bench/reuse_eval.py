"""Issue 7's evaluation: reuse of shared content that is not a prefix, every mode against exact.

Three agents with different system prompts read the same shipping log (a new log per sample) and
answer a question with a known numeric answer:
  clerk     log + question                      -> describes the shipment, "Answer: N"
  auditor   log + question + the clerk's reply  -> "Answer: N"
  reporter  log + question + both replies       -> "Answer: N"
The clerk computes its prompt exactly (it is first: nothing to reuse) and its cached log becomes
the shared segment; the downstream agents get the log and the upstream replies placed under the
reuse mode. Each mode runs its own chain (downstream agents read that mode's upstream replies),
side by side per sample, greedy.

Per mode: reuse rate (prompt tokens placed rather than computed, downstream agents), kvcomm's
segment acceptance, time to first token of the downstream agents (composing included) and its
speedup against exact within the same sample, answer accuracy, and fidelity against exact on the
same prompt: greedy agreement (teacher-forced argmax equals exact's greedy token) and mean
KL(exact || mode) of the next-token distributions over exact's reply.

The baseline (issue 16): llama.cpp (llama-cpp-python's Llama with its defaults, in its own process,
bench/arms.py) computes each downstream agent's prompt of the exact chain from scratch, greedy: its time to first
token and its answers. Every mode's downstream TTFT speedup is taken against it within each sample; the
speedup against kvfork's exact mode stays as an extra column. Beside it, kvfork with `exact=True` (its own
process) computes the same prompts: what exact mode costs. `--no-baselines` skips both.

Writes bench/out/reuse_eval.json, docs/reuse.md's table (bench/out/reuse_eval.md) and docs/img/reuse.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from arms import Arm
from reuse_tasks import Task, answer_of, make_tasks
from workload import fmt, provenance, stats

from kvfork import Engine
from kvfork.engine.sampling import SamplingParams
from kvfork.prompt import slot, split_slots
from kvfork.reuse import REUSE_MODES, ReuseConfig, Segment

AGENTS = {
    "clerk": ("You are a logistics clerk who reads shipping records carefully.",
              "Question: {q}\nFirst describe that shipment in one sentence (carrier, goods, ports, date, crates,"
              " weight, delay), then end with 'Answer: <number>'.", 72),
    "auditor": ("You are a strict auditor who double-checks every figure against the source records.",
                "Question: {q}\nThe clerk replied:\n{clerk}\nCheck the clerk's reply against the log and"
                " reply with 'Answer: <number>' only.", 12),
    "reporter": ("You are an operations reporter who states final figures plainly for the team.",
                 "Question: {q}\nThe clerk replied:\n{clerk}\nThe auditor replied:\n{auditor}\n"
                 "Reply with the final figure as 'Answer: <number>' only.", 12),
}
ROOT = Path(__file__).resolve().parents[1]  # outputs land in the repository whatever the working folder

# NOTE: systems run in their own processes on the exact chain's prompts, and their rows' names
BASELINES = {"llama.cpp": "llama.cpp, from scratch", "kvfork-exact": "kvfork exact=True, recompute"}
Slots = dict[str, list]  # slot name -> its parts (token lists and Segments)


def pieces(engine: Engine, agent: str, question: str) -> list[tuple[str, bool]]:
    """The agent's chat prompt cut at its slots: (text, False) and (slot name, True), in order."""
    system, instruction, _ = AGENTS[agent]
    user = f"Shipping log:\n{slot('doc')}\n\n" + instruction.format(q=question, clerk=slot("clerk"),
                                                                       auditor=slot("auditor"))
    return split_slots(engine.model.apply_chat_template([("system", system), ("user", user)],
                                                        add_generation_prompt=True))


def build(engine: Engine, agent: str, task: Task, slots: Slots) -> list:
    parts: list = []
    for piece, is_slot in pieces(engine, agent, task.question):
        parts += slots[piece] if is_slot else [engine.tokenize(piece, special=True)]
    return parts


def flat(parts: list) -> tuple[int, ...]:
    return tuple(t for p in parts for t in (p.tokens if isinstance(p, Segment) else p))


def reply_slot(engine: Engine, branch, name: str, min_segment: int) -> list:
    """The reply's parts: a Segment of the branch's cached cells, then the tokens never cached."""
    toks, start, cached = engine.composer.reply(branch.sequence)
    if cached < max(1, min_segment):
        return [toks]
    seg = engine.capture_segment(branch, start, start + cached, f"reply:{name}")
    return [seg, toks[cached:]] if cached < len(toks) else [seg]


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = logsm(p_logits), logsm(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def run_agent(engine: Engine, agent: str, parts: list, mode: str, config: ReuseConfig) -> dict:
    """Compose, generate greedily; returns the record and keeps snapshot and branch open in it."""
    cfg = config if mode == config.mode else ReuseConfig(**{**vars(config), "mode": mode})
    t0 = time.perf_counter()
    snap = engine.compose(parts, agent=agent, reuse=cfg)
    compose_s = time.perf_counter() - t0
    branch = snap.fork()
    comp = engine.generate_branches([branch], [SamplingParams(max_tokens=AGENTS[agent][2], temperature=0)])[0]
    rep = snap.reuse
    return {"snap": snap, "branch": branch, "completion": comp, "ttft_s": compose_s + comp.ttft_s,
            "head": len(parts[0]), "compose_s": compose_s, "report": rep.as_dict(), "text": comp.text}


def one_sample(engine: Engine, task: Task, modes: list[str], config: ReuseConfig,
               refs: dict) -> tuple[dict, dict[str, list[int]]]:
    """Every mode's records for one task, and the prompt tokens of each downstream agent in the exact chain."""
    out: dict = {m: {} for m in modes}
    prompts: dict[str, list[int]] = {}
    doc = engine.tokenize(task.document, special=False)
    # NOTE: each agent's snapshot and branch are closed once its record and its reply's cells are taken, as
    # the pipeline runner does: branches left open to the end of the sample held their cells in every later
    # agent's attention (fast mode's recompute measured 0.78x of llama.cpp that way, 0.79x after a38449a)
    clerk_parts = build(engine, "clerk", task, {"doc": [doc]})
    clerk = run_agent(engine, "clerk", clerk_parts, "exact", config)
    try:
        head = len(engine.tokenize(pieces(engine, "clerk", task.question)[0][0], special=True))
        doc_seg = engine.capture_segment(clerk["snap"], head, head + len(doc), "doc")
        clerk_reply = reply_slot(engine, clerk["branch"], "clerk", config.min_segment)
        clerk_record = _record(engine, clerk, task, refs, flat(clerk_parts))
    finally:
        _close(clerk)
    for mode in modes:
        replies = {"clerk": clerk_reply}
        out[mode]["clerk"] = clerk_record
        for agent in ("auditor", "reporter"):
            slots = {"doc": [doc_seg], **replies}
            parts = build(engine, agent, task, slots)
            res = run_agent(engine, agent, parts, mode, config)
            try:
                prompt = flat(parts)
                out[mode][agent] = _record(engine, res, task, refs, prompt)
                if mode == "exact":
                    prompts[agent] = list(prompt)
                replies[agent] = reply_slot(engine, res["branch"], agent, config.min_segment)
            finally:
                _close(res)
    return out, prompts


def _close(res: dict) -> None:
    res["branch"].close()
    res["snap"].close()


def baseline_sample(engine: Engine, arm: Arm, task: Task, prompts: dict[str, list[int]]) -> dict:
    """A system in its own process (llama.cpp, or kvfork exact=True) on the exact chain's downstream
    prompts, each computed whole: time to first token and the answer, per agent."""
    out = {}
    for agent in ("auditor", "reporter"):
        prompt = prompts[agent]
        row = arm.call("scratch", prompts=[prompt], max_tokens=AGENTS[agent][2])
        tokens = row["tokens"][0]
        cut = next((i for i, t in enumerate(tokens) if engine.model.is_eog(t)), len(tokens))
        text = engine.detokenize(tokens[:cut])  # NOTE: the child keeps every token to max_tokens; a reply ends at EOS
        out[agent] = {"ttft_s": row["ttft_s"][0], "text": text, "answer": answer_of(text),
                      "correct": answer_of(text) == task.answer}
    return out


def _record(engine: Engine, res: dict, task: Task, refs: dict, prompt: tuple[int, ...]) -> dict:
    """The agent's figures; fidelity against exact on this very prompt (exact computed once per prompt)."""
    comp = res["completion"]
    if prompt not in refs:
        if res["report"]["mode"] == "exact":
            ref_snap, ref_tokens = res["snap"], list(comp.tokens)
            refs[prompt] = (ref_tokens, engine.next_token_logits(ref_snap, ref_tokens))
        else:  # the mode's chain made a prompt exact never saw: compute exact on it now
            head = res["head"]
            ref = engine.compose([list(prompt[:head]), list(prompt[head:])], agent="reference", reuse="exact")
            try:
                b = ref.fork()
                c = engine.generate_branches([b], [SamplingParams(max_tokens=len(comp.tokens) or 1, temperature=0)])[0]
                b.close()
                refs[prompt] = (list(c.tokens), engine.next_token_logits(ref, list(c.tokens)))
            finally:
                ref.close()
    ref_tokens, ref_logits = refs[prompt]
    logits = ref_logits if res["report"]["mode"] == "exact" else engine.next_token_logits(res["snap"], ref_tokens)
    agree = float((logits.argmax(axis=1) == np.asarray(ref_tokens)).mean())
    return {"text": comp.text, "answer": answer_of(comp.text), "correct": answer_of(comp.text) == task.answer,
            "ttft_s": res["ttft_s"], "compose_s": res["compose_s"], "report": res["report"],
            "agreement": agree, "kl": float(kl(ref_logits, logits).mean()),
            "same_output": list(comp.tokens) == ref_tokens}


def summarize(samples: list[dict], modes: list[str]) -> dict:
    down = ("auditor", "reporter")
    summary: dict = {}
    for mode in modes:
        recs = [s[mode][a] for s in samples for a in AGENTS]
        drecs = [s[mode][a] for s in samples for a in down]
        prompt = sum(r["report"]["prompt_tokens"] for r in drecs)
        placed = sum(r["report"]["reused_tokens"] for r in drecs)
        segs = [seg for r in drecs for seg in r["report"]["segments"]]
        speed = [statistics.median(s["exact"][a]["ttft_s"] for a in down) / statistics.median(s[mode][a]["ttft_s"]
                 for a in down) for s in samples]
        summary[mode] = {
            "reuse_rate": placed / prompt if prompt else 0.0,
            "segments_placed": sum(seg["action"] != "computed" and seg["action"] != "fallback" for seg in segs),
            "segments_fallback": sum(seg["action"] == "fallback" for seg in segs),
            "segments": len(segs),
            "ttft_downstream_s": stats([r["ttft_s"] for r in drecs]),
            "ttft_speedup": stats(speed),
            "accuracy": {a: sum(s[mode][a]["correct"] for s in samples) / len(samples) for a in AGENTS},
            "accuracy_all": sum(r["correct"] for r in recs) / len(recs),
            "agreement": statistics.fmean(r["agreement"] for r in drecs),
            "kl": statistics.fmean(r["kl"] for r in drecs),
            "kl_max": max(r["kl"] for r in drecs),
            "same_output": sum(r["same_output"] for r in drecs) / len(drecs),
        }
        if all("llama.cpp" in s for s in samples):
            summary[mode]["ttft_speedup_vs_llamacpp"] = stats(
                [statistics.median(s["llama.cpp"][a]["ttft_s"] for a in down)
                 / statistics.median(s[mode][a]["ttft_s"] for a in down) for s in samples])
    for base in BASELINES:
        if not all(base in s for s in samples):
            continue
        recs = [s[base][a] for s in samples for a in down]
        summary[base] = {
            "ttft_downstream_s": stats([s[base][a]["ttft_s"] for s in samples for a in down]),
            "ttft_speedup_vs_llamacpp": stats([statistics.median(s["llama.cpp"][a]["ttft_s"] for a in down)
                                               / statistics.median(s[base][a]["ttft_s"] for a in down)
                                               for s in samples]),
            "accuracy": {a: sum(s[base][a]["correct"] for s in samples) / len(samples) for a in down},
            "accuracy_all": sum(r["correct"] for r in recs) / len(recs)}
    return summary


def markdown(summary: dict, n: int) -> str:
    head = ("| mode | reuse rate | downstream TTFT | speedup vs llama.cpp | speedup vs exact (kvfork's own) |"
            " accuracy (clerk / auditor / reporter) | greedy agreement | mean KL | same reply |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for mode, s in summary.items():
        acc = " / ".join(f"{100 * s['accuracy'][a]:.0f}%" if a in s["accuracy"] else "-" for a in AGENTS)
        if mode in BASELINES:
            rows.append(f"| {BASELINES[mode]} | 0% | {fmt(s['ttft_downstream_s'], ' s', digits=2)}"
                        f" | {fmt(s['ttft_speedup_vs_llamacpp'], 'x', digits=2)} | | {acc} | | | |")
            continue
        fb = f", {s['segments_fallback']} of {s['segments']} segments fell back" if mode == "kvcomm" else ""
        vs = fmt(s["ttft_speedup_vs_llamacpp"], "x", digits=2) if "ttft_speedup_vs_llamacpp" in s else "not run"
        rows.append(f"| {mode} | {100 * s['reuse_rate']:.1f}%{fb} | {fmt(s['ttft_downstream_s'], ' s', digits=2)}"
                    f" | {vs} | {fmt(s['ttft_speedup'], 'x', digits=2)} | {acc} | {100 * s['agreement']:.1f}%"
                    f" | {s['kl']:.4f} (max {s['kl_max']:.3f}) | {100 * s['same_output']:.0f}% |")
    return head + "\n".join(rows) + (f"\n\n{n} samples; downstream agents = auditor and reporter. llama.cpp and"
                                      " kvfork exact=True compute the exact chain's downstream prompts, each in its"
                                      " own process.\n")


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m for m in summary if m not in BASELINES]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(modes, [summary[m]["ttft_speedup"]["median"] for m in modes], color="#4878a8")
    axes[0].axhline(3, ls="--", color="grey")
    axes[0].set_title("downstream TTFT speedup vs exact (median)")
    axes[1].bar(modes, [100 * summary[m]["accuracy_all"] for m in modes], color="#6a9f58")
    axes[1].set_title("answer accuracy, all agents (%)")
    axes[2].bar(modes, [summary[m]["kl"] for m in modes], color="#c4704f")
    axes[2].set_title("mean KL(exact || mode), downstream")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--records", type=int, default=10, help="shipments per log")
    ap.add_argument("--modes", nargs="+", default=list(REUSE_MODES), choices=REUSE_MODES)
    ap.add_argument("--temperature", type=float, default=ReuseConfig.temperature)
    ap.add_argument("--gamma", type=float, default=ReuseConfig.gamma)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baselines", action="store_true", help="skip llama.cpp and kvfork exact=True")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/reuse_eval.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/reuse.png")
    args = ap.parse_args()
    modes = ["exact"] + [m for m in args.modes if m != "exact"]
    config = ReuseConfig(temperature=args.temperature, gamma=args.gamma)
    engine = Engine(args.model, n_ctx=8192, n_threads=args.threads, progress=False)
    arms = {} if args.no_baselines else {b: Arm(b, engine.model_path, threads=args.threads, n_ctx=8192, n_seq_max=4)
                                         for b in BASELINES}
    tasks = make_tasks(args.samples, args.records)
    samples, refs = [], {}
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        sample, prompts = one_sample(engine, task, modes, config, refs)
        for base, arm in arms.items():
            sample[base] = baseline_sample(engine, arm, task, prompts)
        samples.append(sample)
        refs.clear()
        line = "  ".join(f"{m}: " + "".join("+" if samples[-1][m][a]["correct"] else "-" for a in AGENTS)
                         + f" {statistics.fmean(samples[-1][m][a]['ttft_s'] for a in ('auditor', 'reporter')):.2f}s"
                         for m in modes)
        print(f"sample {i + 1}/{len(tasks)} ({time.perf_counter() - t0:.0f} s)  {line}", flush=True)
    summary = summarize(samples, modes)
    table = markdown(summary, len(samples))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc_tokens = [len(engine.tokenize(t.document)) for t in tasks]
    args.out.write_text(json.dumps({"provenance": provenance(), "model": engine.model_path.name,
                                    "config": vars(config), "doc_tokens": stats(doc_tokens), "summary": summary,
                                    "samples": samples}, indent=1, default=str))
    args.out.with_suffix(".md").write_text(table)
    plot(summary, args.plot)
    engine.close()
    for arm in arms.values():
        arm.close()


if __name__ == "__main__":
    main()
