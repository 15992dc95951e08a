"""Trainer: a peft LoRA decoder over a frozen base, cache-conditioned (PrefillShare) or plain; needs torch."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tqdm import tqdm

from kvfork.errors import InvalidParameter
from kvfork.train.config import TrainConfig, TrainMode
from kvfork.train.data import Example
from kvfork.train.gguf_lora import PREFILL_KEY, LoraFile, gguf_tensor_name, read_lora_gguf
from kvfork.train.loader import BaseModel, load_base_model
from kvfork.train.result import TrainResult

__all__ = ["Trainer", "PromptKV", "train_decoder", "TEACHER_TOP_K"]

TEACHER_TOP_K = 32  # the teacher's likeliest tokens kept per response position (distillation)
_TEACHER = "teacher"  # the peft adapter name of a distillation teacher


class PromptKV:
    """The base model's KV of prompt heads (adapter off), least recently used dropped beyond a byte budget.

    The base is frozen, so a head's KV is the same at every step and for every decoder trained on that
    base: one PromptKV handed to several Trainers (one after another) computes each shared document
    prefix once for all of them, as kvfork's serving computes it once for all decoders (PrefillShare's
    saving, at training time). base_tokens counts the tokens run through the base for prompts.
    """

    def __init__(self, budget_mb: int) -> None:
        self.budget = budget_mb << 20
        self.base_tokens = 0
        self._kv: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, ...]) -> Any | None:
        kv = self._kv.get(key)
        if kv is not None:
            self._kv.move_to_end(key)
        return kv

    def put(self, key: tuple[int, ...], kv: Any) -> None:
        size = _kv_bytes(kv)
        if size > self.budget or key in self._kv:
            return
        while self._kv and self._bytes + size > self.budget:
            _, old = self._kv.popitem(last=False)
            self._bytes -= _kv_bytes(old)
        self._kv[key] = kv
        self._bytes += size


class Trainer:
    """Owns the peft model wrapped around one base model (injected in place: one Trainer per base).

    loss() is the contract both modes share: the mean cross-entropy of the response tokens given the
    prompt, where "cache" takes the prompt's KV from the base model (adapter off), as kvfork serves a
    decoder over a shared prefill, and "plain" runs the adapter over the whole sequence.
    """

    def __init__(self, base: BaseModel, config: TrainConfig, *, prompts: PromptKV | None = None) -> None:
        self.base = base
        self.config = config
        teacher = _read_teacher(config.teacher, base) if config.teacher is not None else None
        torch.set_num_threads(config.n_threads)
        torch.manual_seed(config.seed)  # NOTE: peft draws lora_A from torch's global generator
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,  # type: ignore[arg-type]  # NOTE: typed int, used as alpha / r
            lora_dropout=config.dropout,
            target_modules=list(config.targets),
            bias="none",
        )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations peft trips
                self.model = get_peft_model(base.model, lora)
        except ValueError as exc:
            raise InvalidParameter(f"LoRA targets {', '.join(config.targets)} do not fit {base.name}: {exc}") from exc
        # cache mode: base KV of prompt heads; pass one to several Trainers to share document prefixes
        self.prompts = prompts if prompts is not None else PromptKV(config.prompt_cache_mb)
        self._taught: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # example index -> teacher's top-k
        if teacher is not None:
            self._add_teacher(teacher)

    # -- the loss ---------------------------------------------------------------------------------
    def logits(self, example: Example, *, mode: TrainMode | None = None, adapter: bool = True) -> torch.Tensor:
        """The logits that score example.response, [len(response), n_vocab] (row i predicts response[i]).

        cache: the base model's KV of prompt[:-k] (adapter off), then prompt[-k:] and response[:-1] through
        the model (adapter on unless adapter=False), k = config.own_tokens (at most the whole prompt): what
        a decoder computes over kvfork's shared prefill. plain: prompt + response[:-1] in one forward.
        """
        mode = mode or self.config.mode
        n = len(example.response)
        if mode == "cache":
            own = min(self.config.own_tokens, len(example.prompt))
            past = self._prompt_kv(example, len(example.prompt) - own)
            ids = torch.tensor([example.prompt[-own:] + example.response[:-1]], dtype=torch.long)
            with self._adapter(adapter):
                out = self.model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=n)
        elif mode == "plain":
            ids = torch.tensor([example.prompt + example.response[:-1]], dtype=torch.long)
            with self._adapter(adapter):
                out = self.model(input_ids=ids, use_cache=False, logits_to_keep=n)
        else:
            raise InvalidParameter(f"mode must be 'cache' or 'plain', got {mode!r}")
        return out.logits[0].float()

    def loss(self, example: Example, *, mode: TrainMode | None = None, adapter: bool = True) -> torch.Tensor:
        """Mean cross-entropy of example.response (a scalar tensor; differentiable when adapter=True)."""
        return _response_ce(self.logits(example, mode=mode, adapter=adapter), example)

    def train_loss(self, index: int, example: Example) -> torch.Tensor:
        """The training objective: the response's cross-entropy, mixed with the teacher's term where
        config.distill > 0 (see TrainConfig); `index` keys the teacher's scores of this example."""
        w = self.config.distill
        if not w:
            return self.loss(example)
        logits = self.logits(example)
        ce = _response_ce(logits, example)
        if index not in self._taught:
            self._taught[index] = self._teacher_top_k(example)
        top, logp = self._taught[index]
        # NOTE: sparse distillation: the student's log-probabilities at the teacher's top-k tokens against
        # the teacher's probabilities renormalized over them (the rest of its mass is below 1e-3 or so)
        kd = -(logp.softmax(-1) * logits.log_softmax(-1).gather(1, top)).sum(-1).mean()
        return (1 - w) * ce + w * kd

    @torch.no_grad()
    def _teacher_top_k(self, example: Example) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's TEACHER_TOP_K likeliest next tokens at each response position and their
        log-probabilities, adapter "teacher" on over prompt and response (as the plain decoder is served)."""
        self.model.set_adapter(_TEACHER, inference_mode=True)
        try:
            logits = self.logits(example, mode="plain")
        finally:
            self.model.set_adapter("default")
            self._freeze_teacher()
        logp, top = logits.log_softmax(-1).topk(TEACHER_TOP_K, dim=-1)
        return top, logp

    def _add_teacher(self, teacher: _Teacher) -> None:
        """Add a plain decoder's adapter as the peft adapter "teacher" (frozen, inactive)."""
        modules = teacher.modules
        leaves = sorted({name.rsplit(".", 1)[1] for name in modules.values()})
        config = LoraConfig(r=teacher.lora.rank, lora_alpha=teacher.lora.alpha,  # type: ignore[arg-type]
                            target_modules=leaves, bias="none")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            self.model.add_adapter(_TEACHER, config)
        by_module = {modules[t]: pair for t, pair in teacher.lora.tensors.items()}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and _TEACHER in module.lora_A:
                a, b = by_module.get(name.removeprefix("base_model.model."), (None, None))
                # NOTE: nn.Linear layers in peft's ModuleDicts (its annotations say Tensor)
                lora_a: Any = module.lora_A[_TEACHER]
                lora_b: Any = module.lora_B[_TEACHER]
                with torch.no_grad():
                    if a is None:  # NOTE: a leaf name the teacher adapts in other layers only: no change here
                        lora_b.weight.zero_()
                    else:
                        lora_a.weight.copy_(torch.from_numpy(a))
                        lora_b.weight.copy_(torch.from_numpy(b))
        self.model.set_adapter("default")
        self._freeze_teacher()

    def _freeze_teacher(self) -> None:
        for name, param in self.model.named_parameters():
            if f".{_TEACHER}." in name:
                param.requires_grad_(False)

    @torch.no_grad()
    def mean_loss(self, examples: Sequence[Example], *, mode: TrainMode | None = None, adapter: bool = True) -> float:
        """The response loss averaged over examples (per example, then the mean), without gradients."""
        training = self.model.training
        self.model.eval()
        try:
            losses = [float(self.loss(e, mode=mode, adapter=adapter)) for e in examples]
        finally:
            self.model.train(training)
        return sum(losses) / len(losses)

    def _adapter(self, on: bool) -> Any:
        return contextlib.nullcontext() if on else self.model.disable_adapter()

    def _prompt_kv(self, example: Example, end: int) -> Any:
        """A fresh copy (the caller appends to it) of the base model's KV of prompt[:end], adapter off
        (None when end is 0).

        NOTE: the base is frozen, so this KV never changes during training. The cached head is the
        document's shared prefix where the example names one (the instruction after it is recomputed
        per step: a few dozen tokens), else all of prompt[:end]: computed once per document instead of
        once per step and decoder, which is most of cache mode's speed.
        """
        head = example.prompt[:end]
        if not head:
            return None
        split = example.shared if 0 < example.shared < len(head) else len(head)
        key = tuple(head[:split])
        kv = self.prompts.get(key)
        if kv is None:
            kv = self._base_kv(head[:split], None)
            self.prompts.put(key, kv)
        kv = copy.deepcopy(kv)  # NOTE: transformers 5 appends to a cache in place
        return self._base_kv(head[split:], kv) if split < len(head) else kv

    def _base_kv(self, tokens: list[int], past: Any) -> Any:
        """The KV after running tokens through the base (adapter off, no gradients) over past (or none)."""
        self.prompts.base_tokens += len(tokens)
        with torch.no_grad(), self.model.disable_adapter():
            ids = torch.tensor([tokens], dtype=torch.long)
            return self.model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=1).cache

    # -- training ---------------------------------------------------------------------------------
    def train(self, examples: Sequence[Example], *, progress: bool = True) -> TrainResult:
        """Fine-tune on examples; returns the LoRA matrices and the per-step losses."""
        cfg = self.config
        usable = [
            e for e in examples if len(e.prompt) <= cfg.max_prompt_tokens and len(e.response) <= cfg.max_response_tokens
        ]
        if not usable:
            raise InvalidParameter(
                f"all {len(examples)} examples exceed max_prompt_tokens={cfg.max_prompt_tokens}"
                f" or max_response_tokens={cfg.max_response_tokens}"
            )
        steps = cfg.steps or math.ceil(cfg.epochs * len(usable) / cfg.grad_accum)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = min(cfg.warmup, steps // 10)  # NOTE: a short run would otherwise never reach its learning rate
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, steps, warmup, cfg.schedule))
        order = _Order(len(usable), cfg.seed)
        result = TrainResult(
            config=cfg,
            base=self.base.name,
            arch=self.base.arch,
            n_layers=self.base.n_layers,
            tensors={},
            examples=len(usable),
            skipped=len(examples) - len(usable),
        )
        self.model.train()
        base_tokens = self.prompts.base_tokens
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"train-decoder ({cfg.mode})", disable=not progress, file=sys.stderr)
        for _ in bar:
            optim.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.grad_accum):
                index = order.next()
                example = usable[index]
                loss = self.train_loss(index, example)
                (loss / cfg.grad_accum).backward()
                total += loss.detach().item() / cfg.grad_accum
                result.response_tokens += len(example.response)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optim.step()
            sched.step()
            result.losses.append(total)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        self.model.eval()
        result.steps = steps
        result.seconds = time.perf_counter() - t0
        result.base_prompt_tokens = self.prompts.base_tokens - base_tokens
        result.tensors = self.lora_tensors()
        return result

    def lora_tensors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The adapter's matrices by transformers module name: (lora_A (r, in), lora_B (out, r)), float32."""
        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                pair: Any = (module.lora_A["default"], module.lora_B["default"])
                a, b = (m.weight.detach().to(torch.float32).numpy().copy() for m in pair)
                out[name.removeprefix("base_model.model.")] = (a, b)
        return out


def train_decoder(
    config: TrainConfig, model_name: str, examples: Sequence[Example], *, progress: bool = True
) -> TrainResult:
    """Load the catalog model into transformers and train a LoRA decoder on examples (see Trainer)."""
    return Trainer(load_base_model(model_name), config).train(examples, progress=progress)


def _response_ce(logits: torch.Tensor, example: Example) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, torch.tensor(example.response, dtype=torch.long))


@dataclass(frozen=True)
class _Teacher:
    lora: LoraFile
    modules: dict[str, str]  # the GGUF tensor names it adapts -> transformers module names


def _read_teacher(path: str, base: BaseModel) -> _Teacher:
    """A plain decoder's adapter GGUF, checked against the base before anything is injected."""
    lora = read_lora_gguf(path)
    prefill = lora.meta.get(PREFILL_KEY)
    if prefill not in (None, "adapter"):
        raise InvalidParameter(f"the teacher {path} was trained over base-model prompt KV ({PREFILL_KEY} ="
                               f" {prefill!r}); distil from a plain decoder (train-decoder --mode plain)")
    if lora.arch != base.arch:
        raise InvalidParameter(f"the teacher {path} is for {lora.arch!r}, the base is {base.arch!r}")
    names = {}
    for name, module in base.model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            with contextlib.suppress(InvalidParameter):
                names[gguf_tensor_name(base.arch, base.n_layers, name)] = name.removeprefix("base_model.model.")
    missing = sorted(set(lora.tensors) - set(names))
    if missing:
        raise InvalidParameter(f"the teacher {path} adapts tensors {base.name} lacks: {', '.join(missing[:3])}")
    return _Teacher(lora, {t: names[t] for t in lora.tensors})


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps, then constant or cosine down to a tenth."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def _kv_bytes(kv: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values) if t is not None)


class _Order:
    """Example indices, reshuffled every pass (seeded): every example once per pass."""

    def __init__(self, n: int, seed: int) -> None:
        self._rng = random.Random(seed)
        self._n = n
        self._queue: list[int] = []

    def next(self) -> int:
        if not self._queue:
            self._queue = list(range(self._n))
            self._rng.shuffle(self._queue)
        return self._queue.pop()
