"""Issues 8 and 21's accuracy evaluation: LoRA decoders over one shared base-model prefill (PrefillShare).

    python bench/prefillshare_eval.py --steps 80 --cache-steps 190 --n-test 30   # ~70 min here (run C)
    python bench/prefillshare_eval.py --steps 80 --cache-steps 165 --own-tokens 64 --n-test 30   # run D

    python bench/prefillshare_eval.py --tasks tool --steps 80 --cache-steps 190 --distill 0.5 --n-test 30

    # more test notes for run D's decoders, unchanged (notes 31-90 of the same test split; ~35 min here),
    # then the accuracy over all 90 notes, with a paired-bootstrap interval per task
    python bench/prefillshare_eval.py --out bench/out/ps21_D --own-tokens 64 --reuse-adapters --test-from 30 --n-test 90
    python bench/prefillshare_eval.py --combine bench/out/ps21_D/eval.json bench/out/ps21_D/eval_30_90.json

For each task of bench/prefillshare_tasks.py (extract, arith, tool, and `remain`, held back: added after
the settings were chosen on the other three) it trains two LoRA decoders on the train split with
`kvfork.train` (the code behind `kvfork train-decoder`): a plain one (adapter on over prompt and
response) and a cache-conditioned one (prompt KV from the base model, adapter off). The cache decoders
share one `PromptKV` (--share-prefill, the default): each training document's base prefix is computed
once for all of them, as serving computes it once for all decoders; the plain decoders cannot share it
(their adapter computes the prompt, with gradients). Then, on the held-out test split, with kvfork's
engine (llama.cpp, greedy), it scores:
- base: the base model alone;
- plain/own: the plain decoder computing its own prompt (a fine-tuned model served alone);
- plain/naive: the plain decoder reading the shared base prefill (naive reuse);
- cache/shared: the cache-conditioned decoder reading the shared base prefill (PrefillShare).
The tasks share each test document: it is prefilled once and the shared branches (tasks x base, naive,
cache) decode together, one llama_decode per adapter set per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefillshare_tasks import ALL_TASKS, HELD_BACK, check, lengthen, split, write_jsonl  # noqa: E402
from workload import provenance  # noqa: E402

from kvfork import Engine  # noqa: E402
from kvfork.train.config import DEFAULT_TARGETS, SCHEDULES  # noqa: E402

VARIANTS = ("base", "plain/own", "plain/naive", "cache/shared")


def train_all(args: argparse.Namespace, folder: Path) -> dict:
    """Train (or reuse, with --reuse-adapters) the plain and cache decoder of every task."""
    from kvfork.train.config import TrainConfig
    from kvfork.train.data import load_examples
    from kvfork.train.export import export_decoder
    from kvfork.train.loader import load_base_model
    from kvfork.train.trainer import PromptKV, Trainer

    folder.mkdir(parents=True, exist_ok=True)
    # NOTE: a plain decoder is trained only where it is scored or is a cache decoder's teacher
    modes = ("plain", "cache") if args.distill or {"plain/own", "plain/naive"} & set(args.variants) else ("cache",)
    todo = [(t, m) for m in modes for t in args.tasks
            if not (args.reuse_adapters and (folder / f"{t}.{m}.gguf").exists())]
    log: dict = {}
    if not todo:
        return log
    t0 = time.perf_counter()
    base = load_base_model(args.model)
    log["load_s"] = time.perf_counter() - t0
    # NOTE: the cache decoders of all tasks read the same training documents: with --share-prefill one
    # PromptKV computes each document's base prefix once for all of them (as serving does); without it,
    # each decoder computes its own (the per-decoder cost of issue 8's run A)
    shared = PromptKV(args.prompt_cache_mb) if args.share_prefill else None
    with Engine(args.model, n_ctx=4096, n_threads=args.threads) as tokenizer:
        for task, mode in todo:
            examples = load_examples(folder.parent / "data" / f"{task}.train.jsonl", tokenizer)
            if not args.share_prefill:
                examples = [dataclasses.replace(e, shared=0) for e in examples]
            steps = args.cache_steps if mode == "cache" and args.cache_steps else args.steps
            # NOTE: --distill: the cache decoder learns from its task's plain decoder too (trained first)
            teacher = str(folder / f"{task}.plain.gguf") if mode == "cache" and args.distill else None
            alpha = 2.0 * args.rank if args.alpha is None else args.alpha
            config = TrainConfig(mode=mode, rank=args.rank, alpha=alpha, lr=args.lr, steps=steps,
                                 schedule=args.schedule, targets=args.targets, seed=args.seed,
                                 n_threads=args.threads, prompt_cache_mb=args.prompt_cache_mb,
                                 teacher=teacher, distill=args.distill if teacher else 0.0,
                                 own_tokens=args.own_tokens if mode == "cache" else 1)
            trainer = Trainer(base, config, prompts=shared)
            result = trainer.train(examples, progress=not args.quiet)
            export_decoder(result, folder / f"{task}.{mode}.gguf")
            # NOTE: peft injects LoRA layers in place; unloading them gives the next decoder a bare base
            base = dataclasses.replace(base, model=trainer.model.unload())
            log[f"{task}.{mode}"] = {"steps": result.steps, "seconds": result.seconds, "examples": result.examples,
                                     "first_loss": sum(result.losses[:10]) / min(10, len(result.losses)),
                                     "final_loss": result.final_loss, "base_prompt_tokens": result.base_prompt_tokens}
            print(f"trained {task}.{mode}: {result.steps} steps in {result.seconds:.0f} s,"
                  f" loss {log[f'{task}.{mode}']['first_loss']:.3f} -> {result.final_loss:.3f}", flush=True)
    for mode in ("plain", "cache"):
        done = [log[f"{t}.{mode}"]["seconds"] for t in args.tasks if f"{t}.{mode}" in log]
        if done:
            log[f"{mode}_total_s"] = sum(done)
            print(f"{mode} decoders: {len(done)} trained in {sum(done):.0f} s", flush=True)
    return log


def evaluate(args: argparse.Namespace, folder: Path) -> dict:
    # NOTE: 4 tasks x 3 shared variants x 3 documents = 36 branches, ~200 own tokens each, over 3 prefixes
    engine = Engine(args.model, n_ctx=12288, n_seq_max=48, n_threads=args.threads, progress=False)
    variants = tuple(v for v in VARIANTS if v in args.variants)
    for task in args.tasks:
        if "plain/own" in variants:
            engine.load_adapter(f"{task}.own", folder / f"{task}.plain.gguf", prefill="adapter")
        if "plain/naive" in variants:
            engine.load_adapter(f"{task}.naive", folder / f"{task}.plain.gguf", prefill="base")
        if "cache/shared" in variants:
            engine.load_adapter(f"{task}.cache", folder / f"{task}.cache.gguf")
            assert engine.adapters.get(f"{task}.cache").prefill == "base", "the cache decoder must read base KV"
    tests = {task: split(task, "test", args.n_test) for task in args.tasks}
    hits = {task: {v: 0 for v in variants} for task in args.tasks}
    # NOTE: fast mode rounds a batch differently from one branch alone, so a shared variant's replies can
    # depend on which other variants decode beside it (plain/own always runs alone)
    shared = [(t, v) for t in args.tasks for v in ("base", "plain/naive", "cache/shared") if v in variants]
    adapters = [None if v == "base" else f"{t}.{'naive' if v == 'plain/naive' else 'cache'}" for t, v in shared]
    samples = []
    t0 = time.perf_counter()
    for start in range(args.test_from, args.n_test, args.batch):
        group = range(start, min(start + args.batch, args.n_test))
        documents = [tests[args.tasks[0]][i].document for i in group]
        assert all(tests[t][i].document == d for t in args.tasks for i, d in zip(group, documents, strict=True)), (
            "the tasks must share each test document"
        )
        # NOTE: the shared variants of `batch` documents decode together (one llama_decode per adapter
        # set per step for all of them); each document is still prefilled once, by the base model
        snapshots = [engine.prefill(d) for d in documents]
        try:
            branches = [snap.fork(adapter=a).send(tests[t][i].instruction)
                        for i, snap in zip(group, snapshots, strict=True)
                        for (t, _), a in zip(shared, adapters, strict=True)]
            outs = engine.generate_branches(branches, [engine.sampling(max_tokens=args.max_tokens)] * len(branches),
                                            close=True)
        finally:
            for snap in snapshots:
                snap.close()
        for k, i in enumerate(group):
            mine = outs[k * len(shared):(k + 1) * len(shared)]
            replies = {key: out.text for key, out in zip(shared, mine, strict=True)}
            for task in args.tasks if "plain/own" in variants else ():
                prompt = engine.prompt_tokens(documents[k], tests[task][i].instruction)
                replies[(task, "plain/own")] = engine.generate(prompt, adapter=f"{task}.own",
                                                               max_tokens=args.max_tokens).text
            row = {"i": i}
            for (task, variant), text in replies.items():
                ok = check(task, text, tests[task][i].answer)
                hits[task][variant] += ok
                row[f"{task}|{variant}"] = {"ok": ok, "reply": text}
            samples.append(row)
        done = {v: sum(hits[t][v] for t in args.tasks) for v in variants}
        seen = group[-1] + 1 - args.test_from
        print(f"[{group[-1] + 1}/{args.n_test}] {time.perf_counter() - t0:.0f} s  "
              + "  ".join(f"{v} {done[v]}/{len(args.tasks) * seen}" for v in variants), flush=True)
    engine.close()
    n = args.n_test - args.test_from
    accuracy = {task: {v: hits[task][v] / n for v in variants} for task in args.tasks}
    accuracy["mean"] = {v: sum(accuracy[t][v] for t in args.tasks) / len(args.tasks) for v in variants}
    return {"accuracy": accuracy, "n_test": args.n_test, "test_from": args.test_from,
            "eval_s": time.perf_counter() - t0, "samples": samples}


def combine(files: list[Path], seed: int = 0, draws: int = 10_000) -> dict:
    """Accuracy over the test notes of several eval JSON files (each note once), and per task the
    difference cache/shared - plain/own with a 95% interval from a paired bootstrap over notes.

    A note's (task, variant) reply is taken from the first file that scored it. Only the tasks scored on
    every note count, and only the variants scored for all of them on every note."""
    rows: dict[int, dict] = {}
    for f in files:
        for row in json.loads(f.read_text())["samples"]:
            merged = rows.setdefault(row["i"], {})
            for key, value in row.items():
                merged.setdefault(key, value)
    notes = [rows[i] for i in sorted(rows)]
    tasks = [t for t in ALL_TASKS if all(f"{t}|plain/own" in r and f"{t}|cache/shared" in r for r in notes)]
    variants = [v for v in VARIANTS if all(f"{t}|{v}" in r for r in notes for t in tasks)]
    out: dict = {"n_notes": len(notes), "variants": variants, "tasks": {}}
    rng = random.Random(seed)
    for task in [*tasks, "mean"]:
        group = tasks if task == "mean" else [task]

        def diff(sample: list[dict], group: list[str] = group) -> float:
            return sum(r[f"{t}|cache/shared"]["ok"] - r[f"{t}|plain/own"]["ok"]
                       for r in sample for t in group) / (len(sample) * len(group))

        boot = sorted(diff(rng.choices(notes, k=len(notes))) for _ in range(draws))
        acc = {v: sum(r[f"{t}|{v}"]["ok"] for r in notes for t in group) / (len(notes) * len(group))
               for v in variants}
        out["tasks"][task] = {"accuracy": acc, "diff": diff(notes),
                              "diff_95": [boot[int(0.025 * draws)], boot[int(0.975 * draws) - 1]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--out", type=Path, default=Path("bench/out/prefillshare"))
    ap.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=list(ALL_TASKS),
                    help=f"a subset of the tasks ({', '.join(HELD_BACK)} is held back: not used to choose settings)")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--test-from", type=int, default=0,
                    help="score test notes test-from+1..n-test only (more notes for decoders scored before;"
                    " the result goes to eval_FROM_N.json)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--cache-steps", type=int, default=None,
                    help="steps of the cache decoders (default --steps); a cache step costs ~60%% of a plain one")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--distill", type=float, default=0.0,
                    help="cache decoders distil their task's plain decoder with this weight (train-decoder --distill)")
    ap.add_argument("--own-tokens", type=int, default=1,
                    help="cache decoders compute the prompt's last N tokens with their adapter (train-decoder"
                    " --own-tokens; the rest is the shared base KV)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="LoRA alpha (default 2 x --rank: scale alpha / rank = 2)")
    ap.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                    help="learning-rate schedule (train-decoder --schedule)")
    ap.add_argument("--targets", type=lambda v: tuple(t for t in v.split(",") if t), default=DEFAULT_TARGETS,
                    help="comma-separated modules LoRA adapts (train-decoder --targets; default all linear ones)")
    ap.add_argument("--long-share", type=float, default=0.0,
                    help="share of training notes replaced by long notes (a mix of prompt lengths; the test notes"
                    " stay short)")
    ap.add_argument("--long-tokens", type=int, nargs=2, default=(600, 1500), metavar=("LO", "HI"),
                    help="token range of --long-share's notes")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=3, help="test documents whose shared branches decode together")
    ap.add_argument("--share-prefill", action=argparse.BooleanOptionalAction, default=True,
                    help="cache decoders share each training document's base prefix KV (computed once for all)")
    ap.add_argument("--prompt-cache-mb", type=int, default=4096, help="MiB of base prompt KV kept for reuse")
    ap.add_argument("--reuse-adapters", action="store_true", help="skip training where the GGUF exists")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="score these variants only (e.g. plain/own cache/shared, to add test notes where the"
                    " two are compared; --combine takes the others from earlier files)")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="only print the accuracy over these eval JSON files' notes together (no training or"
                    " evaluation), with cache - plain per task and its 95%% paired-bootstrap interval")
    args = ap.parse_args()
    if args.combine:
        result = combine(args.combine, args.seed)
        print(f"{result['n_notes']} test notes; cache/shared - plain/own, 95% paired bootstrap over notes")
        print("| task | " + " | ".join(result["variants"]) + " | cache - plain [95%] |")
        print("|---|" + "---|" * (len(result["variants"]) + 1))
        for task, row in result["tasks"].items():
            lo, hi = row["diff_95"]
            print(f"| {task} | " + " | ".join(f"{100 * row['accuracy'][v]:.1f}%" for v in result["variants"])
                  + f" | {100 * row['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
        return
    if not 0 <= args.test_from < args.n_test:
        ap.error("--test-from must be in [0, --n-test)")

    t0 = time.perf_counter()
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    if args.long_share:
        with Engine(args.model, n_ctx=4096, n_threads=args.threads, progress=False) as engine:
            trains = {t: lengthen(split(t, "train", args.n_train), args.long_share, tuple(args.long_tokens),
                                  args.seed, engine.tokenize) for t in ALL_TASKS}
    else:
        trains = {t: split(t, "train", args.n_train) for t in ALL_TASKS}
    for task in ALL_TASKS:
        write_jsonl(trains[task], data / f"{task}.train.jsonl")
        write_jsonl(split(task, "test", args.n_test), data / f"{task}.test.jsonl")
    training = train_all(args, args.out / "adapters")
    result = evaluate(args, args.out / "adapters")
    result |= {"training": training, "total_s": time.perf_counter() - t0, "provenance": provenance(),
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    name = "eval.json" if not args.test_from else f"eval_{args.test_from}_{args.n_test}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"\naccuracy (held-out test split, notes {args.test_from + 1}-{args.n_test}, greedy):")
    print("| task | " + " | ".join(row_variants := list(result["accuracy"]["mean"])) + " |")
    print("|---|" + "---|" * len(row_variants))
    for task, row in result["accuracy"].items():
        print(f"| {task} | " + " | ".join(f"{100 * row[v]:.0f}%" for v in row_variants) + " |")
    print(f"total {result['total_s'] / 60:.1f} min (evaluation {result['eval_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
