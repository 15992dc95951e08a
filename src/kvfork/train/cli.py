"""`kvfork train-decoder`: fine-tune a LoRA decoder on a JSONL file and write it as a GGUF adapter."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

from kvfork.errors import InvalidParameter, KvforkError
from kvfork.models import DEFAULT_MODEL
from kvfork.train.config import DEFAULT_TARGETS, SCHEDULES, TRAIN_MODES, TrainConfig
from kvfork.train.data import Example, load_examples

__all__ = ["add_train_commands", "train_command"]

_TRAIN_PACKAGES = ("torch", "transformers", "peft", "gguf")
# the options whose dest is the TrainConfig field of the same name
_SAME_NAMES = (
    "mode", "rank", "alpha", "dropout", "lr", "steps", "epochs", "grad_accum", "warmup", "schedule", "seed",
    "max_prompt_tokens", "max_response_tokens", "prompt_cache_mb", "own_tokens",
)  # fmt: skip


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `train-decoder` (always listed; without the train extra it says what to install)."""
    d = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "train-decoder",
        help="fine-tune a LoRA decoder over the base model's prefill (needs kvfork[train])",
        description="Fine-tune a LoRA decoder on a JSONL file ({document, instruction, response[, system]} per"
        " line) and write it as a GGUF adapter for `Engine.load_adapter`. --mode cache (default) trains it"
        " over the base model's prompt KV, as kvfork serves decoders that share one prefill; --mode plain"
        " is an ordinary LoRA fine-tune (the adapter also computes the prompt). Several --data/--out pairs"
        " train several decoders in one run, one after another; in cache mode a document's prefix that"
        " several of them read is computed once for all.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or GGUF path of the base model")
    p.add_argument("--data", type=Path, action="append", required=True, help="training examples (JSONL); repeatable")
    p.add_argument("--out", type=Path, action="append", required=True,
                   help="the adapter GGUF to write; one per --data, in the same order")
    p.add_argument("--eval", type=Path, default=None,
                   help="held-out examples (JSONL): loss before and after (one decoder only)")
    p.add_argument("--mode", choices=TRAIN_MODES, default=d["mode"].default)
    p.add_argument("--rank", type=int, default=d["rank"].default)
    p.add_argument("--alpha", type=float, default=d["alpha"].default)
    p.add_argument("--dropout", type=float, default=d["dropout"].default)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names")
    p.add_argument("--lr", type=float, default=d["lr"].default)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=0, help="optimizer steps (default: --epochs passes)")
    length.add_argument("--epochs", type=int, default=d["epochs"].default)
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"].default, help="examples per step")
    p.add_argument("--warmup", type=int, default=d["warmup"].default, help="warmup steps")
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"].default)
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: up to 8 cores)")
    p.add_argument("--max-prompt-tokens", type=int, default=d["max_prompt_tokens"].default)
    p.add_argument("--max-response-tokens", type=int, default=d["max_response_tokens"].default)
    p.add_argument("--prompt-cache-mb", type=int, default=d["prompt_cache_mb"].default,
                   help="cache mode: MiB of base-model prompt KV kept for reuse (shared by all decoders of the run)")
    p.add_argument("--own-tokens", type=int, default=d["own_tokens"].default,
                   help="cache mode: how many of the prompt's last tokens the adapter computes (the rest is the"
                   " base model's KV; served the same way, from the adapter file)")
    p.add_argument("--teacher", type=Path, action="append", default=None,
                   help="distil from this plain decoder (its adapter GGUF, `--mode plain`); one per --data, in"
                   " the same order")
    p.add_argument("--distill", type=float, default=None,
                   help="weight of the teacher's term in the loss, in [0, 1] (default 0.5 with --teacher)")
    p.add_argument("--chat-template", default=None, help="for models without one (e.g. gemma)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    _require_train_extra()
    from kvfork.train.export import export_decoder
    from kvfork.train.loader import load_base_model
    from kvfork.train.trainer import PromptKV, Trainer

    if len(args.data) != len(args.out):
        raise InvalidParameter(f"give one --out per --data: {len(args.data)} --data, {len(args.out)} --out")
    teachers = [str(t) for t in args.teacher] if args.teacher else [None] * len(args.data)
    if len(teachers) != len(args.data):
        raise InvalidParameter(f"give one --teacher per --data: {len(args.data)} --data, {len(teachers)} --teacher")
    configs = [TrainConfig(**_config_fields(args), teacher=t) for t in teachers]
    config = configs[0]
    if args.eval and len(args.data) > 1:
        raise InvalidParameter("--eval takes one decoder's held-out examples; train with one --data/--out pair")
    sets, held_out = _examples(args)
    print(
        f"train-decoder: {' + '.join(str(len(s)) for s in sets)} examples, mode {config.mode}, rank {config.rank},"
        f" {config.n_threads} threads",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    base = load_base_model(args.model)
    print(f"loaded {base.path.name} into transformers in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    prompts = PromptKV(config.prompt_cache_mb)  # NOTE: one for the run: decoders over one document share its KV
    for train, out, config in zip(sets, args.out, configs, strict=True):
        trainer = Trainer(base, config, prompts=prompts)
        before = trainer.mean_loss(held_out) if held_out else None
        result = trainer.train(train, progress=not args.no_progress)
        after = trainer.mean_loss(held_out) if held_out else None
        path = export_decoder(result, out)
        # NOTE: peft injects the LoRA layers in place; unloading them gives the next decoder a bare base
        base = dataclasses.replace(base, model=trainer.model.unload())
        per_step = result.seconds / result.steps if result.steps else 0.0
        first = result.losses[0] if result.losses else float("nan")
        print(
            f"steps {result.steps} in {result.seconds:.1f} s ({per_step:.2f} s/step);"
            f" loss {first:.4f} at the first step, final loss {result.final_loss:.4f}"
        )
        if result.skipped:
            print(f"skipped {result.skipped} examples over the token limits")
        if before is not None and after is not None:
            print(f"held-out response loss ({len(held_out)} examples, {config.mode} mode): {before:.4f} -> {after:.4f}")
        print(f"wrote {path} (prefill: {config.prefill})")
    return 0


def _config_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {name: getattr(args, name) for name in _SAME_NAMES}
    fields["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.threads is not None:
        fields["n_threads"] = args.threads
    fields["distill"] = args.distill if args.distill is not None else 0.5 if args.teacher else 0.0
    return fields


def _examples(args: argparse.Namespace) -> tuple[list[list[Example]], list[Example]]:
    """Tokenized with llama.cpp (the serving tokenizer and chat template); the engine is closed before
    torch loads the base, so the two copies of the weights are not held at once."""
    from kvfork.runtime import Engine  # NOTE: imported late so `kvfork --help` does not load llama.cpp

    with Engine(args.model, n_ctx=4096, n_seq_max=2, chat_template=args.chat_template) as engine:
        sets = [load_examples(path, engine) for path in args.data]
        held_out = load_examples(args.eval, engine) if args.eval else []
    return sets, held_out


def _require_train_extra() -> None:
    missing = [name for name in _TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise KvforkError(
            f"kvfork train-decoder needs the train extra ({', '.join(missing)} not installed):"
            " pip install 'kvfork[train]' (torch's CPU build first, where no local wheel is at hand:"
            " pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
        )
