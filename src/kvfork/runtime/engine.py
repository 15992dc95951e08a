"""Engine: the public entry point; loads a model once and owns one llama context and its scheduler."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kvfork.config import EngineConfig
from kvfork.engine.adapters import Adapter, Adapters
from kvfork.engine.llama import LlamaContext, LlamaModel, json_grammar
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import ContextOverflow, InvalidParameter
from kvfork.models import DEFAULT_MODEL, resolve_model
from kvfork.prompt import ChatLayout
from kvfork.result import Completion
from kvfork.reuse.composer import Composer, Part, Segment
from kvfork.reuse.config import ReuseConfig
from kvfork.runtime import warm
from kvfork.runtime.branch import Branch
from kvfork.runtime.parking import Parking
from kvfork.runtime.snapshot import Snapshot
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus
from kvfork.scheduler.scheduler import Scheduler
from kvfork.scheduler.scoring import next_token_logits
from kvfork.store.host import HostSnapshot
from kvfork.store.layout import StateLayout
from kvfork.store.store import SnapshotStore

__all__ = ["Engine"]

_PROGRESS_MIN_TOKENS = 1024


class Engine:
    """One model, one llama context with a unified KV cache, one scheduler.

    >>> engine = Engine("qwen2.5-coder-0.5b")
    >>> shared = engine.prefill(document, system="You are a careful analyst.")
    >>> answers = shared.fan_out(["Summarize it.", "List the risks."], max_tokens=128)

    Thread-safe: calls are serialized by a lock; branches generating at the same time share batches.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        config: EngineConfig | None = None,
        *,
        store: SnapshotStore | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = EngineConfig(**overrides)
        elif overrides:
            raise InvalidParameter("pass either config or keyword overrides, not both")
        path = resolve_model(model)
        llama = LlamaModel(path, verbose=config.verbose, chat_template=config.chat_template, repack=bool(config.repack))
        try:
            ctx = LlamaContext(llama, config)
        except BaseException:
            llama.close()
            raise
        self._attach(path, llama, ctx, config, store)

    @classmethod
    def on(cls, path: Path, model: LlamaModel, ctx: LlamaContext, config: EngineConfig, *,
           store: SnapshotStore | None = None) -> Engine:
        """An engine over a model and context made elsewhere: the seam where another backend plugs in
        (the unit tests run engines, pipelines and the server's dispatcher on a fake one, without weights).

        `path` names the model (its file: snapshot layouts hash it); the engine owns both and closes them.
        """
        engine = cls.__new__(cls)
        engine._attach(path, model, ctx, config, store)
        return engine

    def _attach(self, path: Path, model: LlamaModel, ctx: LlamaContext, config: EngineConfig,
                store: SnapshotStore | None) -> None:
        self.config = config
        self.model_path = path
        self.model = model
        self.ctx = ctx
        self.scheduler = Scheduler(ctx, config)
        self.adapters = Adapters(model)  # LoRA decoders by name (issue 8: PrefillShare)
        self.store = store  # the prefix cache's lower tier; every prefilled snapshot is also stored
        if store is not None:
            self.scheduler.prefixes.lower = warm.StoreTier(self, store)
        # NOTE: serializes every use of the context; the server's loop holds it around each step.
        self.lock = threading.RLock()
        self._composer: Composer | None = None
        self.parking = Parking(self)  # idle snapshots to host RAM while other work runs (EngineConfig.park_idle)

    # -- text and prompts ------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Seq[int]) -> str:
        return self.model.detokenize(list(tokens))

    def layout(self, document: str, system: str | None = None, *, tools: list[dict] | None = None) -> ChatLayout:
        """The chat layout (shared prefix, per-agent turns) of this model's template; `tools` (OpenAI-shaped
        definitions) are laid out by the template too (render_chat)."""
        if tools:
            return ChatLayout.build(lambda msgs, add: self.model.render_chat(
                [{"role": r, "content": c} for r, c in msgs], tools=tools, add_generation_prompt=add), document, system)
        return ChatLayout.build(
            lambda msgs, add: self.model.apply_chat_template(msgs, add_generation_prompt=add), document, system
        )

    def prompt_tokens(
        self, document: str, instruction: str, *, system: str | None = None, chat: bool = True
    ) -> list[int]:
        """The exact tokens an agent sees: shared prefix + its first turn (what a branch holds)."""
        if chat:
            layout = self.layout(document, system)
            return self.tokenize(layout.prefix, add_bos=True, special=True) + self.tokenize(
                layout.first_turn(instruction), special=True
            )
        return self.tokenize(document, add_bos=True) + self.tokenize(instruction)

    def prefix_tokens(self, document: str, *, system: str | None = None) -> list[int]:
        """The shared prefix `prefill(document, system=system)` computes: the head of every
        `prompt_tokens(document, instruction, system=system)` (chat template laid out)."""
        return self.tokenize(self.layout(document, system).prefix, add_bos=True, special=True)

    def load_adapter(
        self, name: str, path: str | os.PathLike[str], *, scale: float = 1.0, prefill: str | None = None
    ) -> Adapter:
        """Load a LoRA decoder (GGUF) under `name`; branches pick it with `adapter=name`.

        prefill None takes the file's own setting (`kvfork train-decoder` writes "base" for a
        cache-conditioned decoder, which reads the base model's prefill); other adapters compute their
        own prompts ("adapter"). See `Adapter` for the exact rule.
        """
        with self.lock:
            return self.adapters.load(name, path, scale=scale, prefill=prefill)

    def sampling(self, **fields: Any) -> SamplingParams:
        """SamplingParams from keywords; unknown names or bad values raise InvalidParameter."""
        return self.check_sampling(SamplingParams().with_overrides(**fields))

    @staticmethod
    def check_sampling(params: SamplingParams) -> SamplingParams:
        """`params`, if this engine can apply them all: a json_schema its grammar converter cannot
        express raises InvalidParameter now, not after the prompt is prefilled."""
        if params.json_schema is not None:
            json_grammar(params.json_schema)
        return params

    # -- prefill, fork, generate -----------------------------------------------------------------
    def prefill(self, document: str, *, system: str | None = None, chat: bool = True,
                tools: list[dict] | None = None) -> Snapshot:
        """Prefill the shared context once; returns a live Snapshot to fork branches from.

        chat=True lays the model's chat template out as [system, user: document + instruction] and
        stops the prefix right before the instruction; chat=False prefills the text as is.
        `tools`: OpenAI-shaped tool definitions the template lays out too (chat only).
        """
        if not isinstance(document, str):
            raise TypeError(f"document must be a str, got {type(document).__name__}")
        if not chat and not document:
            raise InvalidParameter("empty prompt: nothing to prefill")
        layout = self.layout(document, system, tools=tools) if chat else None
        text = layout.prefix if layout else document
        tokens = self.tokenize(text, add_bos=True, special=chat)
        if len(tokens) >= self.ctx.n_ctx:
            raise ContextOverflow(
                f"the shared context is {len(tokens):,} tokens but the KV cache holds {self.ctx.n_ctx:,};"
                f" raise n_ctx (the model was trained for {self.model.n_ctx_train:,}) or shorten the document"
            )
        t0 = time.perf_counter()
        with self.lock:
            self.parking.before_prefill(tokens)
            seq = self.scheduler.sequence_for(tokens)  # NOTE: a fork of a prefix in the context, or a restore
            try:
                if seq.n_pending or seq.seq_id is None:
                    self.scheduler.submit(seq, SamplingParams(max_tokens=0), share=True)
                    self._run([seq], progress=seq.n_pending >= _PROGRESS_MIN_TOKENS and self.config.progress)
                if seq.error is not None:
                    raise seq.error
            except BaseException:
                self.scheduler.release(seq)  # NOTE: also unpins a live parent this prefill forked
                raise
            self.scheduler.prefixes.pin(seq)  # NOTE: the Snapshot owns it; later prefills fork it
        snapshot = self.parking.hold(Snapshot(self, seq, layout, time.perf_counter() - t0))
        if self.store is not None:
            warm.remember(self.store, snapshot)
        return snapshot

    def restore(self, host: HostSnapshot, *, keep: int | None = None) -> Snapshot:
        """A live Snapshot holding a host copy's cells (or their first `keep` tokens), without a prefill.

        Other sequences of the context are untouched. Raises SnapshotMismatch if this engine's model
        or KV layout differs from the copy's, or if `keep` cuts into a sliding window's past;
        ContextOverflow if the context has no room.
        """
        t0 = time.perf_counter()
        seq = warm.adopt(self, host, keep)
        return self.parking.hold(Snapshot(self, seq, host.chat, time.perf_counter() - t0))

    @functools.cached_property
    def state_layout(self) -> StateLayout:
        """What this context's state blobs depend on (model file, KV type, flash attention, llama.cpp)."""
        kv_type, flash_attn = self.config.kv_type, self.config.flash_attn
        assert kv_type is not None and flash_attn is not None  # NOTE: EngineConfig resolved them
        return StateLayout.of(self.model_path, self.model.description, self.model.n_swa, kv_type, flash_attn)

    def generate(
        self,
        prompt: str | Seq[int],
        *,
        system: str | None = None,
        chat: bool = True,
        adapter: str | Adapter | None = None,
        **sampling: Any,
    ) -> Completion:
        """One agent from scratch, in this context: prefill the whole prompt, then decode.

        With an adapter, the prompt is computed as that decoder's branches compute theirs (see Adapter).
        """
        if isinstance(prompt, str):
            if chat:
                tokens = self.prompt_tokens("", prompt, system=system, chat=True)
            else:
                tokens = self.tokenize(prompt, add_bos=True)
        else:
            tokens = [int(t) for t in prompt]
        if not tokens:
            raise InvalidParameter("empty prompt")
        params = self.sampling(**sampling)
        seq = KvSequence(tokens=tokens, adapter=self.adapters.get(adapter))
        try:
            with self.lock:
                self.scheduler.submit(seq, params)
                self._run([seq])
            return self._completion(seq)
        finally:
            self._release(seq)

    def generate_branches(
        self, branches: Seq[Branch], params: Seq[SamplingParams], *, close: bool = False
    ) -> list[Completion]:
        """Prefill every branch's new turn in shared batches and decode them together.

        Raises the first submission error (context overflow, bad state) before anything runs, and
        leaves every branch as it was (its sent text queued again).
        close=True frees each branch the moment its turn ends (queued branches take its place).
        """
        with self.lock:
            submitted: list[KvSequence] = []
            try:
                for branch, p in zip(branches, params, strict=True):
                    self.scheduler.submit(branch.sequence, p, append=branch.turn_tokens(), one_shot=close)
                    submitted.append(branch.sequence)
            except BaseException:
                for seq in submitted:
                    self.scheduler.withdraw(seq)
                raise
            self._run(submitted)
            results = [self._completion(seq) for seq in submitted]
        for branch, completion in zip(branches, results, strict=False):
            branch.took_turn(completion)
        return results

    # -- reuse of shared content that is not a prefix (kvfork.reuse) ------------------------------
    @property
    def composer(self) -> Composer:
        """The engine's segment reuse (and its kvcomm anchor pool), made on first use."""
        with self.lock:
            if self._composer is None:
                self._composer = Composer(self.scheduler, self.ctx, self.model, self._run)
            return self._composer

    def segment(self, name: str, tokens: Seq[int], *, head: Seq[int] = ()) -> Segment:
        """Compute `tokens` once after `head` and keep their KV as a Segment to place into other prompts."""
        with self.lock:
            return self.composer.segment(name, tokens, head)[0]

    def capture_segment(self, source: Snapshot | Branch, start: int, end: int, name: str) -> Segment:
        """The KV that a snapshot or branch already holds for its tokens [start, end), as a Segment."""
        with self.lock:
            return self.composer.capture(name, source.sequence, start, end)

    def compose(self, parts: Seq[Part], *, agent: str, reuse: ReuseConfig | str | None = None) -> Snapshot:
        """A snapshot of the parts' tokens, in order: token lists computed, Segments reused as `reuse` says.

        `agent` names whose prompt this is (kvcomm pools anchors per segment name and agent). The
        snapshot's `reuse` report says what was placed and computed; with reuse "exact" its KV is
        bit-identical to a from-scratch prefill. Fork it to generate. The head (the tokens before the first
        Segment) stays in the prefix cache for the agent's next prompt; with a store it waits there while
        other work runs (EngineConfig.park_idle), without one it stays in the context until room is needed.
        """
        config = ReuseConfig.of(reuse)
        t0 = time.perf_counter()
        with self.lock:
            seq, report = self.composer.compose(parts, agent, config)
        # NOTE: not put in the prefix cache: its placed cells are approximate, and a later exact
        # prefill of the same tokens must not fork them.
        snapshot = self.parking.hold(Snapshot(self, seq, None, time.perf_counter() - t0))
        snapshot.reuse = report
        return snapshot

    def next_token_logits(self, source: Snapshot | Branch, tokens: Seq[int]) -> np.ndarray:
        """Teacher forcing: raw logits [len(tokens), n_vocab]; row i scores tokens[i] after the source's
        tokens and tokens[:i]. The source is left as it was (a temporary fork does the work)."""
        with self.lock:
            return next_token_logits(self.scheduler, source.sequence, [int(t) for t in tokens])

    def close(self) -> None:
        """Free the context and the model; the engine cannot be used afterwards."""
        with self.lock:
            if self.store is not None:
                self.scheduler.prefixes.demote_all()  # NOTE: the next engine on this store starts warm
            if self._composer is not None:
                self._composer.close()
            self.adapters.close()
            self.ctx.close()
            self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- handles ---------------------------------------------------------------------------------
    def fork(self, source: Snapshot | Branch, *, adapter: str | Adapter | None = None) -> Branch:
        """A new branch sharing everything `source` holds (zero-copy), decoded by `adapter` (None: the
        base model). What Snapshot.fork and Branch.fork do."""
        parent = source.sequence
        replies = source.replies if isinstance(source, Branch) else 0
        with self.lock:
            chosen = self.adapters.get(adapter)
            for own in (chosen, parent.adapter):
                if own is not None and own.prefill == "adapter" and chosen is not parent.adapter:
                    raise InvalidParameter(
                        f"adapter {own.name!r} computes its own prompts (prefill='adapter'), so its cells and"
                        " another decoder's (or the base model's) cannot be mixed: generate from scratch with"
                        f" adapter={own.name!r}, or load it with prefill='base' to read base KV it was not"
                        " trained on (naive reuse)"
                    )
            return Branch(self, self.scheduler.fork(parent, adapter=chosen), source.layout, replies)

    def release(self, source: Snapshot | Branch) -> None:
        """Free what `source` holds alone (its forks keep what they share). What close() does."""
        self._release(source.sequence)

    def _release(self, seq: KvSequence) -> None:
        with self.lock:
            if not seq.released:
                self.scheduler.release(seq)

    def _run(self, seqs: list[KvSequence], progress: bool = False) -> None:
        """Step the scheduler until every sequence in `seqs` has ended its turn."""
        self.parking.before_run(seqs)
        bar = tqdm(total=sum(s.n_pending for s in seqs), unit="tok", desc="prefill", disable=None) if progress else None
        done_before = sum(s.n_in_kv for s in seqs)
        try:
            while any(s.status in (SeqStatus.WAITING, SeqStatus.RUNNING) for s in seqs):
                self.scheduler.step()
                if bar is not None:
                    done = sum(s.n_in_kv for s in seqs)
                    bar.update(done - done_before)
                    done_before = done
        except BaseException:
            for seq in seqs:
                self.scheduler.cancel(seq)
            raise
        finally:
            if bar is not None:
                bar.close()

    def _completion(self, seq: KvSequence) -> Completion:
        prompt = len(seq.tokens) - len(seq.generated)
        end = seq.t_done or time.perf_counter()
        return Completion(
            text=seq.text,
            tokens=tuple(seq.generated),
            finish_reason=seq.finish_reason or "cancelled",
            prompt_tokens=prompt,
            reused_tokens=prompt - seq.n_prompt_computed,
            computed_tokens=seq.n_prompt_computed,
            ttft_s=(seq.t_first_token or end) - seq.t_submit,
            total_s=end - seq.t_submit,
            error=str(seq.error) if seq.error is not None else None,
            logprobs=tuple(seq.logprobs) if seq.params.logprobs is not None else None,
        )


