"""The only module that imports llama_cpp: model, context, batched decode, KV memory ops, samplers, state blobs.

Everything above this module speaks kvfork's own types (Batch, SamplingParams, token lists, bytes).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_grammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from kvfork.config import EngineConfig
from kvfork.engine.batch import Batch
from kvfork.engine.buildcheck import cpu_flags, crashing_features, missing_features
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import ContextOverflow, EngineError, InvalidModelFile, InvalidParameter
from kvfork.kvcache.cells import drop_out_of_window
from kvfork.kvcache.codec import decode, encode

__all__ = ["LlamaModel", "LlamaContext", "LoraAdapter", "Sampler", "batch_invariant_build", "exact_kernels",
           "json_grammar", "set_verbose", "system_info"]

_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
_KV_TYPE = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids
_verbose = False
_init_lock = threading.Lock()
_backend_ready = False
_decoded = False  # has any context of this process run a decode (ggml has read its process-wide switches)
_exact_kernels: str | None = None  # see exact_kernels()
_log = logging.getLogger("kvfork.engine")
BATCH_INVARIANT_ENV = "GGML_CPU_BATCH_INVARIANT"  # the patched build's one switch (engine/ggml-batch-invariant.patch)


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # NOTE: llama.cpp logs hundreds of lines per model load, and logs benign oddities of some GGUF files
    # at error level; kvfork is quiet unless asked, and turns real failures into exceptions instead.
    if _verbose:
        print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)


def set_verbose(verbose: bool) -> None:
    """Show (True) or hide (False) llama.cpp's own log; errors are always shown."""
    global _verbose
    _verbose = verbose


def _ensure_backend() -> None:
    global _backend_ready
    with _init_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            missing = missing_features(llama_cpp.llama_print_system_info().decode(), cpu_flags())
            if missing:
                raise EngineError(
                    f"this llama-cpp-python was built for a CPU with {', '.join(missing)}, which this one lacks "
                    "(it would die of SIGILL); `kvfork doctor --fix` rebuilds it for this machine"
                )
            _backend_ready = True


def system_info() -> str:
    """llama.cpp's system info line (its CPU features, and BATCH_INVARIANT = 1 on kvfork's patched build)."""
    _ensure_backend()
    return str(llama_cpp.llama_print_system_info().decode())


def batch_invariant_build() -> bool:
    """Whether the loaded llama.cpp carries kvfork's batch-invariant CPU kernels (engine/ggml-batch-invariant.patch,
    built by `kvfork build`): its system info then lists BATCH_INVARIANT = 1."""
    return "BATCH_INVARIANT = 1" in system_info()


def _require_exact_kernels() -> None:
    """Make every batch shape and cell layout round the same (exact mode), or refuse.

    With kvfork's patched build, GGML_CPU_BATCH_INVARIANT=1 routes every batch through one tiled
    flash-attention kernel whose result depends only on a query's visible cells in order, and gives every
    row count the tiled K-quant matmul's bits and tinyBLAS's (docs/kernels-patch.md): exact at llama.cpp's
    default speed.
    Without it (or when the switch comes too late), the slow exact settings: q8_0 flash attention (the one
    attention path that is batch-invariant upstream) and vec_dot for K-quant weights at every batch size.
    NOTE: ggml's CPU backend multiplies K-quant weights (Q4_K, Q6_K, ...) by batches of 8 rows or more
    with its tiled kernel and by smaller ones with vec_dot, which round differently: a token's logits
    then depend on how many rows share its decode (measured: 10 branches of gemma3-270m, 3 diverged
    from their from-scratch runs). GGML_CPU_TILED_MM=0 turns the tiled kernel off. ggml reads both
    switches once per process, at its first decode: after a fast-mode decode it is too late to change.
    """
    global _exact_kernels
    patched = batch_invariant_build()
    with _init_lock:
        if patched and (os.environ.get(BATCH_INVARIANT_ENV) == "1" or not _decoded):
            os.environ[BATCH_INVARIANT_ENV] = "1"
            _exact_kernels = "batch-invariant"
            return
        if not _exact_kernels:
            _log.warning(
                "exact mode without batch-invariant kernels (%s): it uses q8_0 flash attention and vec_dot"
                " matmuls, ~2-3x slower prefill than llama.cpp's defaults; `kvfork build` builds them",
                "GGML_CPU_BATCH_INVARIANT was not set before this process's first decode" if patched
                else "this llama-cpp-python is not kvfork's patched build")
        _exact_kernels = "fallback"
        if os.environ.get("GGML_CPU_TILED_MM") == "0":
            return
        if _decoded:
            raise EngineError(
                "exact mode needs ggml's tiled matmul off (GGML_CPU_TILED_MM=0), which ggml fixes at the first"
                " decode of a process, and this process has already decoded in fast mode: create exact engines"
                " first, or start the process with GGML_CPU_TILED_MM=0"
            )
        os.environ["GGML_CPU_TILED_MM"] = "0"


def exact_kernels() -> str | None:
    """What exact mode runs on in this process: "batch-invariant" (the patched kernels), "fallback" (the slow
    exact settings) or None (no exact context yet)."""
    return _exact_kernels


class LlamaModel:
    """Weights and vocabulary of one GGUF file, loaded once and shared by every context."""

    def __init__(
        self, path: Path, *, verbose: bool = False, chat_template: str | None = None, repack: bool = False,
        vocab_only: bool = False,
    ) -> None:
        set_verbose(verbose)
        _ensure_backend()
        if repack and (crashing := crashing_features(system_info(), cpu_flags())):
            raise EngineError(
                f"repack=True puts weights in a buffer of this build's {', '.join(crashing)} kernels, which crash "
                "at the first decode (llama.cpp #20824); `kvfork doctor --fix` rebuilds llama-cpp-python without them"
            )
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repack
        params.vocab_only = vocab_only  # NOTE: tokenizer and chat template only (a cluster ingress): no context
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise InvalidModelFile(
                f"llama.cpp could not load {path} (unsupported or damaged GGUF; --verbose shows why)"
            )
        self.ptr = ptr
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(ptr)
        self.n_layer: int = llama_cpp.llama_model_n_layer(ptr)
        self.n_swa: int = llama_cpp.llama_model_n_swa(ptr)
        self.rope_type: int = llama_cpp.llama_model_rope_type(ptr)  # llama_rope_type: -1 none, 0 norm, 2 neox, ...
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(ptr, buf, len(buf))
        self.description = buf.value.decode("utf-8", errors="replace")
        template = chat_template.encode() if chat_template else llama_cpp.llama_model_chat_template(ptr, None)
        self.chat_template: str | None = template.decode("utf-8") if template else None
        # NOTE: a Jinja template (the GGUF's own, or one given) is rendered as its authors wrote it (jinja2's
        # sandbox, as transformers and llama-server --jinja do); a template name ("gemma") is llama.cpp's.
        self.jinja = self.chat_template is not None and "{%" in self.chat_template
        self._formatters: dict[bool, Jinja2ChatFormatter] = {}
        self._shown: set[int] = set()  # special tokens rendered in generated text (see show_special)
        self._pieces: dict[int, bytes] = {}

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (e.g. "qwen2.rope.freq_base"), None when the file has no such key."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # n is the full length; the buffer held a truncated copy
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of `text`; add_special adds BOS where the model wants it."""
        data = text.encode("utf-8")
        capacity = len(data) + 16
        out = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            out = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, parse_special)
        if n < 0:
            raise EngineError(f"llama_tokenize failed ({n}) on {len(data)} bytes of text")
        return list(out[:n])

    def show_special(self, texts: Sequence[str]) -> None:
        """Render these special tokens in generated text (a tool-call format's markers, which a parser
        must see); other special tokens stay hidden, as llama.cpp renders them by default."""
        for text in texts:
            ids = self.tokenize(text, add_special=False, parse_special=True)
            if len(ids) == 1:
                self._shown.add(ids[0])
                self._pieces.pop(ids[0], None)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (a piece may be part of a UTF-8 character)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token, special=token in self._shown)
        return piece

    def _piece(self, token: int, *, special: bool) -> bytes:
        """llama.cpp's text of one token; special=True renders control tokens too."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    @property
    def eot(self) -> int:
        """The token that ends an assistant turn (end-of-turn where the vocabulary has one, else EOS)."""
        token = int(llama_cpp.llama_vocab_eot(self.vocab))
        return token if token >= 0 else int(llama_cpp.llama_vocab_eos(self.vocab))

    def apply_chat_template(self, messages: list[tuple[str, str]], *, add_generation_prompt: bool) -> str:
        """Render (role, content) messages with the model's own chat template (see `render_chat`)."""
        return self.render_chat([{"role": r, "content": c} for r, c in messages],
                                add_generation_prompt=add_generation_prompt)

    @property
    def knows_tools(self) -> bool:
        """Whether the chat template lays out tool definitions, assistant tool calls and tool results."""
        return self.jinja and "tools" in (self.chat_template or "")

    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """Render OpenAI-shaped messages (role, content; tool_calls with arguments as objects; tool_call_id)
        and `tools`: the GGUF's Jinja template through jinja2's sandbox (llama-cpp-python's
        Jinja2ChatFormatter), else llama.cpp's built-in renderer (plain role and content only)."""
        if self.jinja:
            fmt = self._formatters.get(add_generation_prompt)
            if fmt is None:
                fmt = Jinja2ChatFormatter(self.chat_template,  # type: ignore[arg-type]
                                          eos_token=self._special(llama_cpp.llama_vocab_eos(self.vocab)),
                                          bos_token=self._special(llama_cpp.llama_vocab_bos(self.vocab)),
                                          add_generation_prompt=add_generation_prompt)
                self._formatters[add_generation_prompt] = fmt
            try:
                return fmt(messages=messages, tools=tools or None).prompt  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - a template's raise_exception, or a bad message shape
                raise InvalidParameter(f"the chat template of {self.path.name} refused the messages: {exc}") from None
        if tools or any(set(m) - {"role", "content"} for m in messages):
            raise InvalidParameter(f"the chat template of {self.path.name} has no place for tools or tool calls")
        return self._builtin_template([(m["role"], m["content"] or "") for m in messages], add_generation_prompt)

    def _special(self, token: int) -> str:
        """A special token's text (BOS, EOS) as templates write it; "" when the vocabulary has none."""
        return "" if token < 0 else self._piece(token, special=True).decode("utf-8", errors="replace")

    def _builtin_template(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise InvalidParameter(
                f"{self.path.name} has no chat template in its metadata; use chat=False (plain completion)"
                " or name one llama.cpp knows with chat_template= (e.g. 'chatml', 'gemma', 'llama3')"
            )
        chat = (llama_cpp.llama_chat_message * len(messages))()
        keep = []  # NOTE: the encoded strings must outlive the call; ctypes keeps only raw pointers
        for i, (role, content) in enumerate(messages):
            r, c = role.encode("utf-8"), content.encode("utf-8")
            keep += [r, c]
            chat[i].role, chat[i].content = r, c
        tmpl = self.chat_template.encode("utf-8")
        size = 4 * sum(len(c) for _, c in messages) + 1024
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_generation_prompt, buf, size)
            if n < 0:
                raise InvalidParameter(f"llama.cpp does not know the chat template of {self.path.name}; use chat=False")
            if n <= size:
                return buf.raw[:n].decode("utf-8")
            size = n + 1
        raise EngineError("llama_chat_apply_template kept asking for a larger buffer")

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None


class LoraAdapter:
    """A LoRA adapter GGUF loaded against one model; a context applies the adapters it is given per decode."""

    def __init__(self, model: LlamaModel, path: Path) -> None:
        ptr = llama_cpp.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not ptr:
            raise InvalidModelFile(
                f"llama.cpp could not load {path} as a LoRA adapter of {model.path.name} (not a LoRA GGUF, or made"
                " for another base model; --verbose shows why)"
            )
        self.ptr = ptr
        self.path = path

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the adapter as text, None when it has no such key."""
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_adapter_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_adapter_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def close(self) -> None:
        # NOTE: llama_adapter_lora_free also unregisters it from the model, which would free it otherwise.
        if self.ptr:
            llama_cpp.llama_adapter_lora_free(self.ptr)
            self.ptr = None


# NOTE: llama-cpp-python's converter is a port of llama.cpp's that missed '^', '$' and '.' among the characters a
# regex escapes but a GBNF literal must not: a `pattern` such as "a\\.b" became the literal "a\.b", which llama.cpp's
# grammar parser rejects. llama.cpp's own converter (common/json-schema-to-grammar.cpp) lists all of them.
llama_grammar.ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS |= set("^$.")


@functools.lru_cache(maxsize=64)
def json_grammar(schema: str) -> bytes:
    """The GBNF grammar of a JSON Schema (llama-cpp-python's converter); InvalidParameter if it has none."""
    try:
        return json_schema_to_gbnf(schema).encode()
    except Exception as exc:  # noqa: BLE001 - the converter asserts on what it does not support
        raise InvalidParameter(f"unsupported json_schema: {exc}") from None


class Sampler:
    """One branch's llama.cpp sampler chain (penalties, top-k, top-p, min-p, temperature, seeded dist),
    sampling from one context's logits (made by `LlamaContext.sampler`), under a grammar if asked.

    NOTE: a grammar is checked against the token the chain picks, and applied to the whole vocabulary
    only when it rejects that token (llama.cpp's common sampler does the same): applied first to every
    one of 150k tokens, it cost 59% of the decode throughput of 8 branches (bench/structured.py). The
    result is the same distribution: a rejection resamples from the grammar's allowed tokens.
    """

    def __init__(self, ctx: LlamaContext, params: SamplingParams, seed: int) -> None:
        n_vocab = ctx.model.n_vocab
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        p = params
        self.grammar = None
        if p.json_schema is not None or p.grammar is not None:
            text = p.grammar.encode() if p.grammar is not None else json_grammar(p.json_schema)  # type: ignore[arg-type]
            self.grammar = llama_cpp.llama_sampler_init_grammar(ctx.model.vocab, text, b"root")
            if not self.grammar:
                llama_cpp.llama_sampler_free(chain)
                raise InvalidParameter("llama.cpp could not build a grammar for this json_schema or grammar")
            self._cells = (llama_cpp.llama_token_data * n_vocab)()
            self._view = np.frombuffer(self._cells, dtype=np.dtype([  # type: ignore[call-overload]  # a ctypes buffer
                ("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
            self._one = (llama_cpp.llama_token_data * 1)()
        # NOTE: without penalties, accepting a token changes nothing in the chain (greedy, top-k/p, temp and
        # dist keep no history), so a grammar's first pick can take llama.cpp's own fast path (see sample).
        self._history = bool(p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty)
        if self._history:
            add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, p.repeat_last_n, p.repeat_penalty,
                                                              p.frequency_penalty, p.presence_penalty))
        if p.greedy:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
        self.ptr = chain
        self.ctx = ctx

    def accept(self, token: int) -> None:
        """Tell the penalties a token is in the history (prompt tokens, or a token chosen elsewhere)."""
        llama_cpp.llama_sampler_accept(self.ptr, token)

    def sample(self, index: int) -> int:
        """Pick a token from the logits at batch index `index` of the last decode, and accept it."""
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.ptr, self.ctx.ptr, index))
        fast = not self._history
        # NOTE: llama_sampler_sample accepts its pick into the chain: harmless without penalties (see __init__)
        token = int(llama_cpp.llama_sampler_sample(self.ptr, self.ctx.ptr, index)) if fast else \
            self._pick(index, with_grammar=False)
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0  # type: ignore[assignment]
        one = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(one))
        rejected = not np.isfinite(self._one[0].logit)
        if rejected:  # NOTE: pick among what the grammar allows
            token = self._pick(index, with_grammar=True)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        if rejected or not fast:
            llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def _pick(self, index: int, *, with_grammar: bool) -> int:
        """The chain's choice over the logits at `index` (the grammar applied first if asked); not accepted."""
        logits = llama_cpp.llama_get_logits_ith(self.ctx.ptr, index)
        if not logits:
            raise EngineError(f"no logits at batch index {index} of the last decode")
        n = len(self._view)
        self._view["id"] = np.arange(n, dtype=np.int32)
        self._view["logit"] = np.ctypeslib.as_array(logits, shape=(n,))
        self._view["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(self._cells, n, -1, False)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(cur))
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise EngineError("the sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


class LlamaContext:
    """One llama context with a unified KV cache: every sequence id sees the same cells.

    It is the scheduler's `engine.backend.Backend`: decode, logits, samplers, KV memory ops, vocabulary.

    NOTE: kv_unified is what makes a fork zero-copy: seq_cp only tags the existing cells with the
    new id. With separate streams per sequence, seq_cp would copy the data.
    """

    def __init__(self, model: LlamaModel, config: EngineConfig) -> None:
        assert config.flash_attn is not None and config.kv_type is not None  # NOTE: EngineConfig resolved them
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_ubatch
        params.n_seq_max = config.n_seq_max
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        params.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        params.kv_unified = True
        params.type_k = params.type_v = _KV_TYPE[config.kv_type]
        params.no_perf = True
        if config.exact:
            _require_exact_kernels()
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise EngineError(f"llama.cpp could not create a context with n_ctx={config.n_ctx} (out of memory?)")
        self.ptr = ptr
        self.model = model
        self.n_ctx: int = llama_cpp.llama_n_ctx(ptr)
        self.n_batch = config.n_batch
        self.n_swa: int = model.n_swa
        self.n_seq_max = config.n_seq_max
        self.invariant = config.exact and _exact_kernels == "batch-invariant"
        self.mem = llama_cpp.llama_get_memory(ptr)
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._adapters: tuple[tuple[int, float], ...] = ()  # the active set, as (adapter pointer, scale)

    def set_adapters(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Make `adapters` (with their scales) the set every following decode applies; () for the bare model.

        NOTE: an unchanged set is skipped here; a changed one makes the next decode re-reserve its
        compute buffers (a few ms). The KV cache is untouched: cells keep what their decode computed.
        """
        key = tuple((ctypes.cast(a.ptr, ctypes.c_void_p).value or 0, float(s)) for a, s in adapters)
        if key == self._adapters:
            return
        n = len(adapters)
        ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(a.ptr for a, _ in adapters))
        scales = (ctypes.c_float * n)(*(s for _, s in adapters))
        llama_cpp.llama_set_adapters_lora(self.ptr, ptrs if n else None, n, scales if n else None)
        self._adapters = key

    def decode(self, batch: Batch) -> None:
        """Run one llama_decode over every token of `batch` (at most n_batch tokens)."""
        global _decoded
        n = len(batch)
        if not 0 < n <= self.n_batch:
            raise EngineError(f"batch of {n} tokens; must be 1..{self.n_batch}")
        b = self._batch
        for i in range(n):
            b.token[i] = batch.tokens[i]
            b.pos[i] = batch.positions[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = batch.seq_ids[i]
            b.logits[i] = batch.logits[i]
        b.n_tokens = n
        _decoded = True
        rc = llama_cpp.llama_decode(self.ptr, b)
        if rc == 1:
            raise ContextOverflow(f"no room in the KV cache ({self.n_ctx} cells) for {n} more tokens; raise n_ctx")
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")

    def sampler(self, params: SamplingParams, seed: int) -> Sampler:
        return Sampler(self, params, seed)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def token_bytes(self, token: int) -> bytes:
        return self.model.token_bytes(token)

    def logits(self, index: int) -> np.ndarray:
        """A copy of the raw logits at batch index `index` of the last decode (n_vocab floats)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        if not ptr:
            raise EngineError(f"no logits at batch index {index} of the last decode")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # -- KV memory: sequence-level operations on the unified cache -------------------------------
    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Tag the cells of `src` in [p0, p1) as also belonging to `dst` (no data is copied)."""
        llama_cpp.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Drop `seq_id` from its cells in [p0, p1); cells still held by other sequences stay."""
        return bool(llama_cpp.llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_pos_min(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self.mem, seq_id))

    def seq_pos_max(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.mem, seq_id))

    def can_shift(self) -> bool:
        """Whether this cache supports seq_add (llama.cpp's K-shift re-rotates the moved keys)."""
        return bool(llama_cpp.llama_memory_can_shift(self.mem))

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Move `seq_id`'s cells at positions [p0, p1) (p1 < 0: to the end) by `delta`.

        The keys are re-rotated to their new positions (K-shift) at the next decode. A cell moved below
        position 0 is dropped. NOTE: a cell shared with other sequences (a fork) has one position, so it
        moves for all of them. Raises InvalidParameter where the cache cannot shift: llama.cpp would
        abort the process at the next decode instead.
        """
        if not self.can_shift():
            raise InvalidParameter(
                "this model's KV cache cannot shift positions (multi-axis RoPE, or a sliding-window cache"
                " smaller than the full one); recompute the tokens at their new positions instead"
            )
        llama_cpp.llama_memory_seq_add(self.mem, seq_id, p0, p1, delta)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)

    def compact(self) -> None:
        """Move every used cell down into one run from cell 0, in the order they are in (their ids,
        positions and data kept), so that the next tokens go above all of them.

        NOTE: llama.cpp has no defragmentation left; this is its whole-cache state round trip (seq id -1:
        every used cell once, each with its set of ids, so forks still share; restored from cell 0 on).
        It copies the used cells out and back: ~25 MB for 4,000 q8_0 tokens of Qwen2.5-0.5B.
        """
        data: bytes | ctypes.Array[ctypes.c_uint8] = self._state_get(-1)
        if self.n_swa > 0 and any(self.seq_pos_max(s) >= self.n_swa for s in range(self.n_seq_max)):
            # NOTE: cells that slid out of a sequence's window would stay below the others, where llama.cpp
            # writes the next tokens (it may write over them), so they go (measured: a fork's tokens written
            # below its prefix in the sliding-window cache after a compaction that kept them)
            data = encode(drop_out_of_window(decode(bytes(data)), self.n_swa))
        if self._state_set(-1, data) != len(data):
            raise EngineError("llama.cpp could not put the KV cache's own cells back; the context is unusable")

    # -- state blobs: one sequence's KV cells serialized to bytes -------------------------------
    def state_seq_size(self, seq_id: int) -> int:
        """Bytes of the state blob of `seq_id`'s cells; -1 measures every used cell of the cache once."""
        return int(llama_cpp.llama_state_seq_get_size(self.ptr, seq_id))

    def state_seq_get(self, seq_id: int) -> bytes:
        return bytes(self._state_get(seq_id))

    def state_seq_set(self, seq_id: int, data: bytes) -> None:
        read = self._state_set(seq_id, data)
        if read == 0:
            raise ContextOverflow(
                f"llama.cpp could not restore a {len(data):,}-byte state (no room, or another layout)"
            )

    def _state_get(self, seq_id: int) -> ctypes.Array[ctypes.c_uint8]:
        """llama_state_seq_get_data into a new buffer of exactly its size (-1: every used cell once)."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        if written != size:
            raise EngineError(f"llama_state_seq_get_data wrote {written} of {size} bytes (sequence {seq_id})")
        return buf

    def _state_set(self, seq_id: int, data: bytes | ctypes.Array[ctypes.c_uint8]) -> int:
        """llama_state_seq_set_data from `data`; the bytes llama.cpp read (0: it could not place them)."""
        buf: Any
        if isinstance(data, bytes):
            # NOTE: a pointer into `data` itself, no copy (c_char_p of bytes): llama.cpp only reads the blob,
            # and `data` outlives the call. A copy cost ~28 ms of a 44 MB restore's ~110 ms.
            buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        elif isinstance(data, ctypes.Array):
            buf = data
        else:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id))

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None
