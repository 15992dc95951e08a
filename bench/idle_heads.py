"""What a composed prompt's idle head costs an unrelated prompt in the same Engine, and what parking it saves.

    python bench/idle_heads.py [--model gemma3-270m] [--head 1500] [--prompt 1500] [--repeats 3]

`Engine.compose` keeps a prompt's head (the tokens before its first segment; the whole prompt where it has
none) as the prefix cache's own entry, so the agent's next prompt forks it. llama.cpp's unified KV cache
attends over every cell up to the highest one in use, masked per sequence, so while that head sits idle in
the context every other prompt's attention reads its cells. With a store (and park_idle, fast mode's default)
the engine moves it there before a run that computes other tokens, and the next prompt with that head
restores it (Parking.before_run, Scheduler.park_idle).

Arms, each in a fresh engine (fast mode, 2 threads, a RAM-only SnapshotStore), in rotated order per repeat:
- nothing idle: the unrelated prompt alone in the context (what llama.cpp's one-sequence context pays);
- head idle: a --head-token head composed first and left in the context (park_idle=False);
- head parked: the same, park_idle on (the default).
Measured: the unrelated --prompt-token prompt's prefill + 1 token (seconds), medians of --repeats (min-max);
and, in the two head arms, how many of the head's tokens the next compose with that head computed again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import fmt, report, save, stats  # noqa: E402

from kvfork import Engine  # noqa: E402
from kvfork.store.store import SnapshotStore  # noqa: E402

OUT = Path("bench/out/idle_heads.json")
ARMS = ("nothing idle", "head idle", "head parked")


def run_arm(args: argparse.Namespace, arm: str, repeat: int) -> tuple[float, int | None]:
    """The unrelated prompt's seconds, and how many head tokens the next compose computed (None: no head)."""
    with Engine(args.model, store=SnapshotStore(), park_idle=arm != "head idle", n_threads=args.threads,
                progress=False) as engine:
        tokens = engine.tokenize(f"Repeat {repeat}.\n" + report(), add_bos=True)
        head, unrelated = tokens[: args.head], tokens[:1] + tokens[args.head: args.head + args.prompt]
        question = engine.tokenize(" When did it start?")
        if arm != "nothing idle":
            engine.compose([head, question], agent="a").close()
        t = time.perf_counter()
        engine.generate(unrelated, max_tokens=1)
        seconds = time.perf_counter() - t
        if arm == "nothing idle":
            return seconds, None
        again = engine.compose([head, question], agent="a")
        assert again.reuse is not None
        recomputed = again.reuse.computed_tokens - len(question)
        again.close()
        return seconds, recomputed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--head", type=int, default=1500, help="tokens of the composed head left idle")
    ap.add_argument("--prompt", type=int, default=1500, help="tokens of the unrelated prompt measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    recomputed: dict[str, list[int]] = {arm: [] for arm in ARMS[1:]}
    t0 = time.perf_counter()
    for r in range(args.repeats):
        for arm in ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]:
            s, n = run_arm(args, arm, r)
            seconds[arm].append(s)
            if n is not None:
                recomputed[arm].append(n)
    print(f"{args.model}, fast mode, {args.threads} threads, a {args.head}-token idle head, an unrelated"
          f" {args.prompt}-token prompt + 1 token, medians of {args.repeats} (min-max)")
    print("| arm | unrelated prompt | against nothing idle | head tokens computed again |")
    print("|---|---|---|---|")
    base = stats(seconds["nothing idle"])["median"]
    rows = {}
    for arm in ARMS:
        s = stats(seconds[arm])
        rows[arm] = {"seconds": s, "recomputed": recomputed.get(arm)}
        again = "-" if arm not in recomputed else "/".join(map(str, recomputed[arm]))
        print(f"| {arm} | {fmt(s, ' s', digits=2)} | {s['median'] / base:.2f}x | {again} |")
    save(OUT, vars(args), rows, t0)


if __name__ == "__main__":
    main()
